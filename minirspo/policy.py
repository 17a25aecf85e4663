"""The one door between the RL loop and a model: generate rollouts, score tokens, replay or freeze routing.

Notation: B sequences, P prompt tokens (left-padded), N response tokens (right-padded), S = P + N,
V vocabulary, L MoE layers, E experts, K experts per token.

The loop (`minirspo.module`) never touches a model directly. A `Policy` turns prompt text into token
ids, samples responses (a `Rollout`: tokens, per-token log-probs and top-K routing, nothing of size E per
token), and scores given responses with the forward pass that trains (`Scores`: log-probs, entropy and
router logits at the response tokens, plus the top-K routing of every position for routing replay).

Alignment, shared by every implementation: the log-prob of response token n comes from the logits at
position P + n − 1 (the position that predicts it); its routing ("the experts activated for token n",
RSPO.md) is the router's choice at position P + n, where the token itself is processed.
"""
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from toy_moe.generate import Rollout, generate, token_logprobs
from toy_moe.model import ToyMoE
from toy_moe.tokenizer import ToyTokenizer

__all__ = ["Policy", "Rollout", "Scores", "ToyPolicy", "load_policy"]


class Scores(NamedTuple):
    logprobs: Tensor       # (B, N) float32 log-prob of each response token, 0 at padding
    entropy: Tensor        # (B, N) float32 entropy of the next-token distribution, detached
    router_logits: Tensor  # (L, B, N, E) float32 raw router logits at the response tokens
    topk_idx: Tensor       # (L, B, N, K) experts used at the response tokens
    routing: Tensor        # (L, B, S, K) experts used at every position: what routing replay feeds back
    aux_loss: Tensor       # scalar, the model's unweighted load-balance loss over real tokens


class Policy(ABC):
    """What the RL loop needs from a model. `model` is the nn.Module the optimiser trains."""

    model: nn.Module

    @property
    @abstractmethod
    def is_moe(self) -> bool:
        """False for a dense model: RSPO then has no router to measure."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompt texts -> left-padded ids (B, P) int64 and mask (B, P) bool."""

    @abstractmethod
    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        """Response ids (B, N) -> texts, stopping at the end-of-sequence token."""

    @abstractmethod
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample responses without gradient (temperature 0 = greedy)."""

    @abstractmethod
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, mask: Tensor, *,
              routing: Tensor | None = None, freeze_router: bool = False,
              temperature: float = 1.0) -> Scores:
        """Score responses with the training forward; `routing` (L, B, S, K) replays given experts."""


class ToyPolicy(Policy):
    """`toy_moe.ToyMoE` behind the policy interface; special tokens other than EOS are never sampled."""

    def __init__(self, model: ToyMoE, tokenizer: ToyTokenizer):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.banned = tuple(i for i in tokenizer.special_ids if i != tokenizer.eos_id)

    @property
    def is_moe(self) -> bool:
        return self.model.n_moe_layers > 0

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        encoded = [self.tokenizer.encode_prompt(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_id, dtype=torch.long)   # (B, P)
        for row, prompt in enumerate(encoded):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
        device = next(self.model.parameters()).device
        return ids.to(device), (ids != self.tokenizer.pad_id).to(device)

    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode_response(row[valid]) for row, valid in zip(tokens.cpu(), mask.cpu())]

    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None) -> Rollout:
        return generate(self.model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_tokens=(self.tokenizer.eos_id,),
                        banned_tokens=self.banned, pad_id=self.tokenizer.pad_id, generator=generator)

    def score(self, prompt_ids, prompt_mask, tokens, mask, *, routing=None, freeze_router=False,
              temperature=1.0) -> Scores:
        prompt_len = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids, tokens], dim=1)                                  # (B, S)
        out = self.model(ids, torch.cat([prompt_mask, mask], dim=1), routing=routing,
                         freeze_router=freeze_router)
        next_logits = out.logits[:, prompt_len - 1:-1]                                 # (B, N, V)
        logprobs = token_logprobs(next_logits, tokens, temperature=temperature, banned_tokens=self.banned)
        with torch.no_grad():
            log_p = next_logits.float().log_softmax(dim=-1)                            # (B, N, V)
            entropy = -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)    # (B, N)
        return Scores(logprobs=torch.where(mask, logprobs, 0.0), entropy=entropy,
                      router_logits=out.router_logits[:, :, prompt_len:],              # (L, B, N, E)
                      topk_idx=out.topk_idx[:, :, prompt_len:],                        # (L, B, N, K)
                      routing=out.topk_idx, aux_loss=out.aux_loss)


def load_policy(spec: str) -> Policy:
    """`toy:PATH` (a toy_moe checkpoint, see toy_moe.pretrain) -> a Policy. Clear error for a missing path."""
    kind, _, path = spec.partition(":")
    if kind != "toy" or not path:
        raise ValueError(f"model spec must be 'toy:PATH', got {spec!r}")
    from toy_moe.pretrain import load_toy_checkpoint
    if not Path(path).exists():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    model, tokenizer = load_toy_checkpoint(path)
    return ToyPolicy(model, tokenizer)
