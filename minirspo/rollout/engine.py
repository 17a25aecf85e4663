"""The behaviour policy μ behind one interface: `RolloutEngine` samples, the trainer's weights reach it by `sync`.

Notation: B sequences, P prompt tokens (left-padded), N response tokens (right-padded), S = P + N, L MoE layers,
K experts per token.

μ is the policy the tokens were sampled from; π_old (the trainer's own scoring of the rollout before the
updates, minirspo.module) and π_θ (the policy being updated) are the trainer's. In every production RL stack μ
is an inference engine with its own low-precision copy of the weights, so μ ≠ π_old even on identical weights
(R3, arXiv 2510.11370). `BuiltinEngine` is the project's own: at rollout precision "32" it samples with the
trainer's model itself (μ = π_old up to float noise: today's behaviour, nothing copied), otherwise with a
`LowPrecisionCopy` (bf16, fp16, fp8), in both cases with the policy's KV-cache decode. What it records while
sampling (`Samples.logprobs`, `topk_idx`, `topk_logprobs`, `routing`) is μ's own view of each token.
"""
from abc import ABC, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minirspo.policy import Policy, Samples
from minirspo.policy.base import Record
from minirspo.rollout.precision import LowPrecisionCopy


class RolloutEngine(ABC):
    """What the RL loop needs from a behaviour policy."""

    precision: str

    @abstractmethod
    def sync(self) -> None:
        """Bring the engine's weights up to the trainer's (called before each rollout; the first call builds
        the engine's copy, so a resumed run rebuilds it from the restored weights)."""

    @abstractmethod
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, temperature: float,
               top_p: float, generator: torch.Generator | None, record: Record) -> Samples:
        """Responses to left-padded prompts (B, P), and what `record` asks for (`Policy.generate`)."""

    def close(self) -> None:
        """Free what the engine holds beyond the trainer's own model (its copy, a server); it may start again."""


class BuiltinEngine(RolloutEngine):
    """The policy's own KV-cache decode, on the trainer's model ("32") or on a low-precision copy of it."""

    def __init__(self, policy: Policy, precision: str = "32"):
        self.trainer, self.precision = policy, precision
        self.copy: LowPrecisionCopy | None = None

    def close(self) -> None:
        self.copy = None

    def sync(self) -> None:
        if self.precision == "32":
            return
        if self.copy is None:  # built here, not in __init__: on the device the trainer's weights are on by now
            self.copy = LowPrecisionCopy(self.trainer, self.precision)
        else:
            self.copy.refresh()

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_p, generator, record) -> Samples:
        arguments = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                         record=record)
        if self.precision == "32":
            model = self.trainer.model
            model.eval()  # and back: the trainer's model trains between rollouts
            try:
                return self.trainer.generate(prompt_ids, prompt_mask, **arguments)
            finally:
                model.train()
        if self.copy is None:
            raise RuntimeError("call sync() before sample(): the engine has no weights yet")
        # the copy computes in its own dtype: an autocast of the trainer's --precision must not recast it
        with torch.autocast(prompt_ids.device.type, enabled=False):
            return self.copy.policy.generate(prompt_ids, prompt_mask, **arguments)


BATCH_FIRST = ("tokens", "mask", "logprobs")  # Samples fields with the batch on dim 0; the routing ones on dim 1


def join_rollouts(parts: Sequence[Samples], prompt_width: int) -> Samples:
    """Rows of several rollouts (e.g. DAPO's resampling rounds) as one: responses right-padded to the longest
    response (columns no row uses are dropped), routing's prompt part left-aligned to `prompt_width` (the
    joined prompts' padded width; a part's wider padding is cut, its real positions are kept). Padding
    positions get experts 0..K−1, distinct and valid, so a replay of them is well-formed (they are masked)."""
    width = max(int(part.mask.sum(dim=1).max()) for part in parts)

    def right(x: Tensor, dim: int, value=0) -> Tensor:  # pad or cut the token axis `dim` to `width`
        x = x.narrow(dim, 0, min(width, x.shape[dim]))
        return F.pad(x, [0, 0] * (x.ndim - 1 - dim) + [0, width - x.shape[dim]], value=value)

    def experts(x: Tensor, length: int, left: bool) -> Tensor:  # (L, b, ·, K) cut or padded to `length`, pads 0..K−1
        x = x[:, :, max(x.shape[2] - length, 0):] if left else x[:, :, :length]
        filler = torch.arange(x.shape[-1], device=x.device).expand(*x.shape[:2], length - x.shape[2], -1)
        return torch.cat([filler, x] if left else [x, filler], dim=2)                      # (L, b, length, K)

    def routing(part: Samples) -> Tensor:  # (L, b, prompt_width + width, K)
        prompt_len = part.routing.shape[2] - part.tokens.shape[1]
        return torch.cat([experts(part.routing[:, :, :prompt_len], prompt_width, left=True),
                          experts(part.routing[:, :, prompt_len:], width, left=False)], dim=2)

    joined = {"tokens": [right(p.tokens, 1) for p in parts], "mask": [right(p.mask, 1, False) for p in parts]}
    if parts[0].logprobs is not None:
        joined["logprobs"] = [right(p.logprobs, 1) for p in parts]
    if parts[0].topk_idx is not None:  # an engine may return log-probs without routing (vLLM)
        joined["topk_idx"] = [experts(p.topk_idx, width, left=False) for p in parts]
        joined["topk_logprobs"] = [right(p.topk_logprobs, 2) for p in parts]
    if parts[0].routing is not None:
        joined["routing"] = [routing(p) for p in parts]
    return Samples(**{name: torch.cat(tensors, dim=0 if name in BATCH_FIRST else 1) for name, tensors in joined.items()})


def rows_of(samples: Samples, rows: slice) -> Samples:
    """The rows `rows` of a rollout (the batch is dim 0 of BATCH_FIRST's fields, dim 1 of the routing ones)."""
    return Samples(*(None if x is None else x[rows] if name in BATCH_FIRST else x[:, rows]
                     for name, x in zip(Samples._fields, samples)))
