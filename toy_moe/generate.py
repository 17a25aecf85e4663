"""Batched sampling from a ToyMoE with a KV cache, optionally recording what an RL update needs from the rollout.

Notation: B batch, P prompt length (left-padded), N generated steps, V vocab, E experts, K top-k,
L MoE layers.

Alignment with a full forward over `cat(prompt_ids, tokens)` with mask `cat(prompt_mask, mask)`:
    logprobs[:, n]            come from logits at position P + n − 1 (the position that predicts token n);
    topk_idx / topk_logprobs  [:, :, n] are the routing OF token n, i.e. router_logits[:, :, P + n].
So each generated token is fed through the model once more after it is sampled, the last one included,
to record its own experts; per token only the K chosen experts and their router log-probs are kept.
With `record=False` (what an RL loop that re-scores its rollouts wants) none of this is computed: no
log-probs, no routing, and no forward after the last token.
"""

from typing import NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor

from toy_moe.model import KVCache, ToyMoE, ToyMoEOutput


class Rollout(NamedTuple):
    tokens: Tensor  # (B, N) sampled tokens; pad_id after a row stopped
    logprobs: Tensor | None  # (B, N) float32 log-prob of each token (see token_logprobs); 0 where mask is False
    mask: Tensor  # (B, N) bool, True for generated tokens up to and including the stop token
    topk_idx: Tensor | None  # (L, B, N, K) experts each token was routed to (pads keep their valid-id routing)
    topk_logprobs: Tensor | None  # (L, B, N, K) float32 router log-softmax over all E at those experts; 0 where mask is False
    prompt_topk_idx: Tensor | None = None  # (L, B, P, K) experts of each prompt position, from the prefill
    # The last four are None when generate(..., record=False).


def _masked_scores(logits: Tensor, temperature: float, banned_tokens: Sequence[int]) -> Tensor:
    """logits / temperature in float32 with banned tokens at −inf: the sampling distribution before top-p."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature}")
    scores = logits.float() / temperature  # (..., V)
    if banned_tokens:
        if min(banned_tokens) < 0 or max(banned_tokens) >= scores.shape[-1]:
            raise ValueError(f"banned_tokens {tuple(banned_tokens)} must lie in [0, {scores.shape[-1]})")
        banned = torch.tensor(list(banned_tokens), device=scores.device)
        scores = scores.index_fill(-1, banned, float("-inf"))  # (..., V)
    return scores


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   banned_tokens: Sequence[int] = ()) -> Tensor:
    """log-prob of `tokens` under log_softmax(logits / temperature) with banned tokens set to −inf.

    The one definition shared by sampling and by the RL loop's scoring forward: logits (..., V), tokens (...)
    int64, result (...) float32. A banned token scores −inf, so mask with torch.where, never by multiplying.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal the logits shape without V, "
                         f"{tuple(logits.shape[:-1])}")
    log_probs = _masked_scores(logits, temperature, banned_tokens).log_softmax(dim=-1)  # (..., V)
    return log_probs.gather(-1, tokens[..., None]).squeeze(-1)  # (...)


def pick_tokens(logits: Tensor, temperature: float, top_p: float, banned_tokens: Sequence[int], generator) -> Tensor:
    """Greedy when temperature == 0, else a nucleus (top-p) sample; logits (B, V) -> tokens (B,). Public so that
    other decode loops (minirspo's, over an HF model) sample by the same rule that `token_logprobs` scores."""
    if temperature == 0:
        return _masked_scores(logits, 1.0, banned_tokens).argmax(dim=-1)  # (B,)
    probs = _masked_scores(logits, temperature, banned_tokens).softmax(dim=-1)  # (B, V)
    if top_p == 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (B, V)
    choice = torch.multinomial(sorted_probs.masked_fill(outside_nucleus, 0.0), 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)  # (B,)


def _check_generate_args(model: ToyMoE, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
                         temperature: float, top_p: float, stop_tokens: Sequence[int], banned_tokens: Sequence[int],
                         pad_id: int) -> Tensor:
    """Raise a ValueError naming the bad argument; return prompt_mask as bool."""
    config = model.config
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be a (B, P) int64 tensor, got {tuple(prompt_ids.shape)} {prompt_ids.dtype}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}")
    prompt_mask = prompt_mask.bool()
    if not bool(prompt_mask[:, -1].all()) or bool((prompt_mask[:, 1:] < prompt_mask[:, :-1]).any()):
        raise ValueError("prompt_mask must be left-padded: pads first, then at least one real token in every row")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(prompt_mask.sum(1).max()) + max_new_tokens > config.max_seq_len:
        raise ValueError(f"longest prompt + max_new_tokens={max_new_tokens} exceeds max_seq_len={config.max_seq_len}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, ids in (("stop_tokens", stop_tokens), ("banned_tokens", banned_tokens), ("pad_id", (pad_id,))):
        if any(not 0 <= i < config.vocab_size for i in ids):
            raise ValueError(f"{name} {tuple(ids)} must lie in [0, vocab_size={config.vocab_size})")
    if set(stop_tokens) & set(banned_tokens):
        raise ValueError(f"stop_tokens and banned_tokens overlap: {sorted(set(stop_tokens) & set(banned_tokens))}")
    if len(set(banned_tokens)) >= config.vocab_size:
        raise ValueError("banned_tokens covers the whole vocabulary")
    if model.training and config.dropout > 0:
        raise ValueError("model is in training mode with dropout: call model.eval() before generate")
    return prompt_mask


@torch.no_grad()
def generate(
    model: ToyMoE,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    banned_tokens: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    record: bool = True,
) -> Rollout:
    """Sample up to `max_new_tokens` per row after LEFT-padded prompts (B, P); stop a row at its first stop
    token and return as soon as every row has stopped (so N <= max_new_tokens).

    temperature == 0 is greedy, and its logprobs are then taken at temperature 1. The recorded log-prob is
    under the temperature-scaled, banned-masked distribution BEFORE top-p truncation (token_logprobs), which
    is the distribution an RL loss can recompute; with top_p < 1 the sampler's own distribution differs.
    Banned tokens (PAD, BOS, ...) are never sampled: a sampled PAD/BOS mid-answer is what made cached and
    full-forward log-probs disagree in the CPU prototype. `use_cache=False` recomputes the whole prefix each
    step (for the benchmark and tests only). `record=False` returns tokens and mask only (the other fields
    None) and skips the log-probs, the routing and the forward that would route the last token; the tokens
    are the same as with `record=True` for the same generator state.
    """
    prompt_mask = _check_generate_args(
        model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, stop_tokens, banned_tokens, pad_id
    )  # (B, P)
    batch_size, prompt_len = prompt_ids.shape
    param = next(model.parameters())
    kv_cache = None
    if use_cache:
        slots = prompt_len + max_new_tokens
        kv_cache = KVCache(model.config, batch_size, slots, device=param.device, dtype=param.dtype)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=prompt_ids.device)
    score_temperature = temperature if temperature > 0 else 1.0

    ids, mask = prompt_ids, prompt_mask  # (B, P + n), what the no-cache path recomputes
    out = model(prompt_ids, prompt_mask, kv_cache=kv_cache)
    prompt_topk_idx = out.topk_idx  # (L, B, P, K)
    alive = torch.ones(batch_size, dtype=torch.bool, device=prompt_ids.device)  # (B,)
    steps: list[tuple[Tensor, ...]] = []
    for n in range(max_new_tokens):
        next_logits = out.logits[:, -1]  # (B, V)
        token = pick_tokens(next_logits, temperature, top_p, banned_tokens, generator)  # (B,)
        token = torch.where(alive, token, pad_id)  # (B,)
        step = [token, alive]
        if record:
            logprob = token_logprobs(next_logits, token, temperature=score_temperature, banned_tokens=banned_tokens)  # (B,)
            step.append(torch.where(alive, logprob, 0.0))
        still_alive = alive & ~torch.isin(token, stop)  # (B,)
        finished = n == max_new_tokens - 1 or not bool(still_alive.any())
        if record or not finished:
            # Feed the token back: this both routes the token itself and gives the next step's logits.
            ids, mask, out = _feed(model, token, alive, kv_cache, ids, mask)
        if record:
            token_experts = out.topk_idx[:, :, -1]  # (L, B, K)
            router_logprobs = out.router_logits[:, :, -1].log_softmax(dim=-1).gather(-1, token_experts)  # (L, B, K)
            step += [token_experts, torch.where(rearrange(alive, "b -> 1 b 1"), router_logprobs, 0.0)]
        steps.append(tuple(step))
        alive = still_alive
        if finished:
            break

    tokens, masks, *recorded = zip(*steps)
    tokens = rearrange(list(tokens), "n b -> b n")  # (B, N)
    masks = rearrange(list(masks), "n b -> b n")  # (B, N)
    if not record:
        return Rollout(tokens=tokens, logprobs=None, mask=masks, topk_idx=None, topk_logprobs=None)
    logprobs, experts, expert_logprobs = recorded
    return Rollout(
        tokens=tokens,
        logprobs=rearrange(list(logprobs), "n b -> b n"),  # (B, N)
        mask=masks,
        topk_idx=rearrange(list(experts), "n l b k -> l b n k"),  # (L, B, N, K)
        topk_logprobs=rearrange(list(expert_logprobs), "n l b k -> l b n k"),  # (L, B, N, K)
        prompt_topk_idx=prompt_topk_idx,
    )


def _feed(model: ToyMoE, token: Tensor, token_mask: Tensor, kv_cache: KVCache | None, ids: Tensor,
          mask: Tensor) -> tuple[Tensor, Tensor, ToyMoEOutput]:
    """Run the sampled tokens (B,) through the model, through the KV cache or (no cache) by recomputing the
    whole prefix; returns the prefix so far (grown only on the no-cache path) and the model's output."""
    if kv_cache is not None:
        return ids, mask, model(token[:, None], token_mask[:, None], kv_cache=kv_cache)
    ids = torch.cat([ids, token[:, None]], dim=1)  # (B, P + n + 1)
    mask = torch.cat([mask, token_mask[:, None]], dim=1)  # (B, P + n + 1)
    return ids, mask, model(ids, mask)
