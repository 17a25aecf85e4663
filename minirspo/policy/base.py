"""The policy interface: the one door between the RL loop and a model, and what every implementation shares.

Notation: B sequences, P prompt tokens (left-padded), N response tokens (right-padded), S = P + N,
V vocabulary, L MoE layers, E experts, K experts per token.

The loop (`minirspo.module`) never touches a model directly. A `Policy` turns prompt text into token
ids, samples responses (`Samples`: tokens and their mask, and on request what the sampler itself saw: the
log-prob of each sampled token and the routing of every token, which is what a behaviour policy μ records for
minirspo.rollout), and scores given responses with the forward pass that trains (`Scores`: log-probs, entropy
and router logits at the response tokens, plus the top-K routing of every position for routing replay).

Alignment, shared by every implementation: the log-prob of response token n comes from the logits at
position P + n − 1 (the position that predicts it); its routing ("the experts activated for token n",
RSPO.md) is the router's choice at position P + n, where the token itself is processed.
"""
from abc import ABC, abstractmethod
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn


Record = Literal["none", "tokens", "routing"]  # what `Policy.generate` records besides the tokens


class Samples(NamedTuple):
    tokens: Tensor  # (B, N) sampled response tokens; padding after a row's stop token
    mask: Tensor    # (B, N) bool, True up to and including the first stop token
    # Recorded while sampling, only when asked (`generate(record=...)`); None otherwise:
    logprobs: Tensor | None = None       # (B, N) float32 log-prob of each sampled token, on the footing of
                                         # `score` (temperature and banned tokens, before top-p); 0 at padding
    topk_idx: Tensor | None = None       # (L, B, N, K) experts each response token was routed to
    topk_logprobs: Tensor | None = None  # (L, B, N, K) float32 router log-softmax (over all E) at them; 0 at padding
    routing: Tensor | None = None        # (L, B, S, K) experts of every position, prompt included (record="routing")


class Scores(NamedTuple):
    logprobs: Tensor       # (B, N) float32 log-prob of each response token, 0 at padding
    entropy: Tensor        # (B, N) float32 entropy of the next-token distribution, detached
    router_logits: Tensor  # (L, B, N, E) float32 raw router logits at the response tokens
    topk_idx: Tensor       # (L, B, N, K) experts used at the response tokens
    routing: Tensor        # (L, B, S, K) experts used at every position: what routing replay feeds back
    aux_loss: Tensor       # scalar, the model's unweighted load-balance loss over real tokens


@torch.no_grad()
def next_token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats, detached, float32) of softmax(logits) over the last dim: (..., V) -> (...)."""
    log_p = logits.float().log_softmax(dim=-1)                                         # (..., V)
    return -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)                # (...)


class Policy(ABC):
    """What the RL loop needs from a model. `model` is the nn.Module the optimiser trains."""

    model: nn.Module
    stop_ids: tuple[int, ...]  # tokens that end a response (it keeps the first one)
    banned: tuple[int, ...]    # tokens never sampled (special tokens other than the stop tokens, ids past the tokenizer)
    pad_id: int                # what fills a response after its stop token

    @property
    @abstractmethod
    def is_moe(self) -> bool:
        """False for a dense model: RSPO then has no router to measure."""

    @property
    @abstractmethod
    def router_weights(self) -> list[nn.Parameter]:
        """The MoE routers' weights, one per MoE layer ([] for a dense model): `--router-lr-scale` scales them."""

    @property
    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """The repeated blocks of `model`: one FSDP unit and one activation-checkpointing unit each."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompt texts -> left-padded ids (B, P) int64 and mask (B, P) bool."""

    @abstractmethod
    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        """Response ids (B, N) -> texts, stopping at the end-of-sequence token."""

    @property
    @abstractmethod
    def matmul_weights(self) -> list[tuple[str, int]]:
        """(name in `model.named_parameters()`, the axis its matrix multiply sums over) of every weight that
        multiplies activations, except embeddings, the LM head and the routers: what an FP8 engine quantizes
        (minirspo.rollout.precision), one scale per output channel, i.e. over that axis."""

    @abstractmethod
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, record: Record = "none") -> Samples:
        """Sample responses without gradient (temperature 0 = greedy). `record`: "none" (tokens and mask),
        "tokens" (also log-probs and the top-K routing of each response token), "routing" (also the routing
        of every prompt position, for rollout routing replay)."""

    @abstractmethod
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, mask: Tensor, *,
              routing: Tensor | None = None, freeze_router: bool = False,
              temperature: float = 1.0) -> Scores:
        """Score responses with the training forward; `routing` (L, B, S, K) replays given experts."""


def left_pad(encoded: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id lists -> left-padded ids (B, P) int64 and mask (B, P) bool, on `device`."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)                  # (B, P)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)                         # (B, P)
    for row, prompt in enumerate(encoded):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return ids.to(device), mask.to(device)
