"""Assignment 1: the router-shift ratio γ of RSPO (read brief.md first).

Notation: B sequences, T tokens, L MoE layers, E experts per layer, K experts activated per token.

Grade it with:
    python -m minirspo.grade router_shift_ratio --submission tutorials/assignments/router_shift_ratio/router_shift.py
Use torch only; importing minirspo.loss's own router-shift code scores 0.
"""
import torch
from torch import Tensor


def router_shift_ratio(router_logits: Tensor, old_topk_idx: Tensor, old_topk_logprobs: Tensor,
                       mask: Tensor | None = None) -> Tensor:
    """γ (B, T) = exp(−(1/L) Σ_ℓ (1/K) Σ_k |log p_θ^ℓ(e_k) − log p_old^ℓ(e_k)|), and 1 where `mask` is False.

    router_logits      (L, B, T, E)  raw pre-softmax logits of the current policy's routers
    old_topk_idx       (L, B, T, K)  int64, the experts e_k the OLD policy activated for each token
    old_topk_logprobs  (L, B, T, K)  the old policy's router log-softmax at those experts
    mask               (B, T) bool   True on real tokens, or None (every token is real)
    p^ℓ_θ = softmax(router_logits[ℓ]) over all E experts. γ stays differentiable wrt router_logits.
    Inputs of the wrong shape raise ValueError naming the argument.
    """
    # Exercise stub, allowed in this student file only: replace this line with your implementation.
    raise NotImplementedError("router_shift_ratio is not implemented yet")
