"""Assignment 2: the RSPO loss, GMPO with router-shift weighting (read brief.md first).

Notation: B sequences, T tokens (right-padded), Â_i the advantage of sequence i, |y_i| its valid tokens.

Grade it with:
    python -m minirspo.grade rspo_loss --submission tutorials/assignments/rspo_loss/rspo_loss.py
Use torch only; importing minirspo.loss's policy losses scores 0 (LossOutput, a plain NamedTuple, is fine).
"""
import torch
from torch import Tensor

from minirspo.loss import LossOutput  # LossOutput(loss, metrics): a NamedTuple, metrics may be {}


def rspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              router_shift: Tensor, clip_low: float = 0.4, clip_high: float = 0.4,
              gamma_min: float = 0.8) -> LossOutput:
    """RSPO: the loss −J to minimise, with

        log w̃_{i,t} = log π_θ(y_t) − log π_old(y_t) + log sg[max(γ_{i,t}, γ_min)]
        ℓ̂_{i,t}     = min(log w̃, ε_high) if Â_i > 0,   max(log w̃, −ε_low) if Â_i < 0
        J           = (1/B) Σ_i Â_i · exp((1/|y_i|) Σ_t ℓ̂_{i,t})

    logprobs      (B, T)  log π_θ of each response token (differentiable)
    old_logprobs  (B, T)  log π_old of the same tokens
    advantages    (B,)    Â_i
    mask          (B, T)  bool, True on valid tokens; padding may hold any value
    router_shift  (B, T)  γ from router_shift_ratio, in (0, 1]
    A sequence with no valid token contributes 0 and still counts in B.
    """
    # Exercise stub, allowed in this student file only: replace this line with your implementation.
    raise NotImplementedError("rspo_loss is not implemented yet")
