"""Every policy loss of minirspo, and the router-shift ratio, in one file.

RSPO (Router-Shift Policy Optimization, arXiv 2510.23027) is GMPO with router-shift (RS) weighting:
per token it measures how far the router moved on the experts the *old* policy activated, turns that
into a weight γ in (0, 1], stops its gradient, floors it at γ_min and multiplies it into the importance
ratio before clipping. RS is a plug-in: every loss here takes `router_shift=` (None = RS off).

The equations, notation and defaults with their sources are in docs/rspo.md; in brief:

    log w_t   = log π_θ(y_t) − log π_old(y_t)                                     token ratio
    γ_t       = exp(−(1/L) Σ_ℓ (1/K) Σ_k |log p_θ^ℓ(e_k) − log p_old^ℓ(e_k)|)      router shift
    log w̃_t   = log w_t + log sg[max(γ_t, γ_min)]                                 RS plug-in
    GRPO  J = mean_i  (1/|y_i|) Σ_t min(w̃ Â, clip(w̃, 1−ε_lo, 1+ε_hi) Â)
    GSPO  J = mean_i  min(s_i Â, clip(s_i, 1−ε_lo, 1+ε_hi) Â),   s_i = exp((1/|y_i|) Σ_t log w̃_t)
    GMPO  J = mean_i  Â_i exp((1/|y_i|) Σ_t ℓ̂_t),  ℓ̂ = min(log w̃, ε_hi) if Â>0, max(log w̃, −ε_lo) if Â<0
    RSPO  = GMPO with RS on.                      Every returned loss is −J, to minimise.

Against the behaviour policy μ that sampled the tokens (an engine's low-precision copy, minirspo.rollout), with
δ_t = log π_old(y_t) − log μ(y_t): truncated importance sampling (TIS) weights min(e^δ_t, C) per token or
min(e^{Σ_t δ_t}, C) per sequence, and masked importance sampling (MIS / IcePop) keeping a token (or a sequence,
by its geometric-mean ratio e^{mean_t δ_t}) only inside [low, high]. Both are stop-gradient weights: GRPO takes
a (B, T) `weight` on its per-token terms, GSPO/GMPO/RSPO a (B,) `weight` on each sequence's term
(docs/rspo.md, "Rollout corrections", says where each enters and why).

Notation: B sequences (groups of G contiguous responses), T tokens, L MoE layers, E experts per layer,
K experts activated per token. Only torch is imported: the loss knows nothing about models.

Where the code departs from the paper's letter, and why (docs/rspo.md lists these and the loop's own):
- All clips are written one-sided, by the sign of Â: min(xÂ, clip(x)Â) = Â·min(x, hi) when Â > 0 and
  Â·max(x, lo) when Â < 0. Values are identical; the one-sided form makes "the clip changed the
  objective" (the clip-fraction metrics) a plain comparison, and at the exact boundary x == hi the
  gradient passes (torch.clamp's subgradient) where torch.minimum would split it in half.
- Inputs may be bfloat16; every loss and γ is computed in float32 and returned as float32.
- Padding is removed with `torch.where` before any `exp`, so −inf or ±50 log-probs at masked positions
  neither reach the loss nor turn a zero gradient into NaN (0 · inf).
- `group_advantages` sets a group whose rewards are all equal to exactly 0: in float arithmetic
  r − mean(r) can be ±1 ulp, and dividing by (0 + eps) would blow that up to ±1e-3 instead of 0.
- `router_logprobs_at` (used by `router_shift_ratio`) works one layer at a time, so its float32 temporaries are (B, T, E) for one
  layer, never a second (L, B, T, E) tensor beside the router logits.
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor


class LossOutput(NamedTuple):
    loss: Tensor                # scalar, −J: minimise it
    metrics: dict[str, Tensor]  # detached float32 scalars: clip_frac_low/high, ratio_mean, approx_kl


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------

def group_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """Â_i = (r_i − mean_group r) / (std_group r + eps), std with Bessel's correction (GRPO).

    `rewards` (B,) holds groups of `group_size` contiguous responses to one prompt. A group whose rewards
    are all equal gets Â = 0 exactly (it carries no learning signal). `normalize_std=False` gives
    Â = r − mean (Dr. GRPO's unscaled advantage).
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has B={rewards.numel()} entries, not a multiple of group_size={group_size}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards contain NaN/inf at positions {bad[:10]}")
    grouped = rewards.float().view(-1, group_size)                        # (B/G, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)              # (B/G, G)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    flat_group = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)     # (B/G, 1)
    return torch.where(flat_group, 0.0, advantages).flatten()             # (B,)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Number of groups whose rewards are all equal (they contribute no gradient)."""
    grouped = rewards.view(-1, group_size)                                # (B/G, G)
    return (grouped == grouped[:, :1]).all(dim=1).sum()


# ---------------------------------------------------------------------------------------------------
# Router-shift ratio
# ---------------------------------------------------------------------------------------------------

def router_shift_ratio(router_logits: Tensor, old_topk_idx: Tensor, old_topk_logprobs: Tensor,
                       mask: Tensor | None = None) -> Tensor:
    """γ (B, T) = exp(−(1/L) Σ_ℓ (1/K) Σ_k |log p_θ^ℓ(e_k) − log p_old^ℓ(e_k)|), 1 where `mask` is False.

    router_logits      (L, B, T, E)  raw pre-softmax logits of the current policy
    old_topk_idx       (L, B, T, K)  experts e_k the old policy activated (int64)
    old_topk_logprobs  (L, B, T, K)  the old policy's router log-softmax at those experts
    p^ℓ = softmax over all E experts. γ is differentiable here; the losses apply the stop-gradient.
    """
    if router_logits.ndim != 4:
        raise ValueError(f"router_logits must be (L, B, T, E), got shape {tuple(router_logits.shape)}")
    n_layers, batch, tokens, n_experts = router_logits.shape
    if old_topk_idx.ndim != 4 or old_topk_idx.shape[:3] != router_logits.shape[:3]:
        raise ValueError(f"old_topk_idx must be (L, B, T, K) = ({n_layers}, {batch}, {tokens}, K), "
                         f"got shape {tuple(old_topk_idx.shape)}")
    if old_topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"old_topk_idx must hold integer expert indices (int64), got {old_topk_idx.dtype}")
    if old_topk_idx.shape[-1] > n_experts:
        raise ValueError(f"old_topk_idx has K={old_topk_idx.shape[-1]} experts per token but the router "
                         f"has only E={n_experts}")
    if old_topk_logprobs.shape != old_topk_idx.shape:
        raise ValueError(f"old_topk_logprobs must match old_topk_idx {tuple(old_topk_idx.shape)}, "
                         f"got shape {tuple(old_topk_logprobs.shape)}")
    if mask is not None:
        mask = _as_bool_mask(mask, (batch, tokens), "mask")
    new_at_old = router_logprobs_at(router_logits, old_topk_idx)                   # (L, B, T, K)
    mean_abs_shift = (new_at_old - old_topk_logprobs.float()).abs().mean(dim=(0, 3))  # (B, T)
    gamma = torch.exp(-mean_abs_shift)                                             # (B, T)
    return gamma if mask is None else torch.where(mask, gamma, 1.0)


def router_logprobs_at(router_logits: Tensor, topk_idx: Tensor) -> Tensor:
    """log softmax(z^ℓ)[e_k] (L, B, T, K), float32: what a rollout stores instead of (L, B, T, E).

    The model side records the old policy's routing with this same function, so when the router has not
    moved the two sides agree bit for bit and γ is exactly 1. One layer at a time keeps the float32
    temporaries at (B, T, E).
    """
    return torch.stack([layer.float().log_softmax(dim=-1).gather(-1, idx.long())   # (B, T, K)
                        for layer, idx in zip(router_logits, topk_idx)])           # (L, B, T, K)


@torch.no_grad()
def router_shift_metrics(gamma: Tensor, mask: Tensor, gamma_min: float) -> dict[str, Tensor]:
    """γ over valid tokens: mean, lowest (`gamma_lowest`: not the floor --gamma-min, which the loop logs as
    `gamma_floor`) and the share below the floor (`gamma_floored_frac`).

    The losses do not call this: the caller that computed γ does, once per minibatch (the RL loop logs γ
    for every loss, RS on or off), so the loss call stays as cheap as GMPO's.
    """
    weight = mask.float()                                                          # (B, T)
    gamma = gamma.float()
    # one matrix-vector product for both weighted sums
    stacked = torch.stack([gamma, (gamma < gamma_min).float()]).flatten(1)        # (2, B·T)
    mean, floored = (stacked @ weight.flatten()) / weight.sum().clamp(min=1)
    return {"gamma_mean": mean, "gamma_floored_frac": floored,
            "gamma_lowest": torch.maximum(gamma, 1.0 - weight).amin()}            # padding reads as 1


@torch.no_grad()
def routing_flips(router_logits: Tensor, topk_idx: Tensor, mask: Tensor) -> Tensor:
    """(L, B, T) bool: the valid (layer, token) pairs whose top-K expert set under `router_logits`' own top-K
    differs, as a set, from `topk_idx` (L, B, T, K). The router's own choice, so under a replay it still says
    where the router would have sent each token."""
    own = router_logits.topk(topk_idx.shape[-1], dim=-1).indices.sort(dim=-1).values  # (L, B, T, K)
    return (own != topk_idx.sort(dim=-1).values).any(dim=-1) & mask.bool()           # (L, B, T)


@torch.no_grad()
def routing_consistency(router_logits: Tensor, old_topk_idx: Tensor, mask: Tensor) -> Tensor:
    """Share of (valid token, MoE layer) pairs whose top-K expert set under the current router equals the
    old policy's, as sets (the paper's non-shifted routing ratio; `routing_flips` counts the others)."""
    flips = routing_flips(router_logits, old_topk_idx, mask)                       # (L, B, T)
    pairs = mask.float().sum() * flips.shape[0]
    return (pairs - flips.float().sum()) / pairs.clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------------

def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              router_shift: Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
              gamma_min: float = 0.8, weight: Tensor | None = None) -> LossOutput:
    """GRPO (+RS): token-level PPO clip, each sequence averaged over its own tokens.

    J = (1/B) Σ_i (1/|y_i|) Σ_t ρ_t min(w̃ Â_i, clip(w̃, 1−ε_low, 1+ε_high) Â_i)
    ρ (B, T) = `weight` (stop-gradient; a rollout correction, 1 when None) multiplies each clipped token term.
    """
    batch = _prepare(logprobs, old_logprobs, advantages, mask, router_shift, gamma_min)
    ratio = batch.shifted.exp()                                                    # (B, T)
    low, high = _one_sided_bounds(batch.advantages, 1.0 - clip_low, 1.0 + clip_high)  # (B, 1) each
    per_token = batch.advantages[:, None] * ratio.clamp(min=low, max=high)        # (B, T)
    if weight is not None:
        per_token = per_token * _check_weight(weight, tuple(logprobs.shape))
    objective = _masked_mean(per_token, batch.weight).mean()
    return _output(objective, batch, ratio, _clip_counts(ratio, low, high, batch.weight))


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              router_shift: Tensor | None = None, clip_low: float = 3e-4, clip_high: float = 4e-4,
              gamma_min: float = 0.8, weight: Tensor | None = None) -> LossOutput:
    """GSPO (+RS): one length-normalised ratio per sequence, clipped per sequence (arXiv 2507.18071).

    s_i = exp((1/|y_i|) Σ_t log w̃_t);  J = (1/B) Σ_i ρ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)
    ρ (B,) = `weight`, a stop-gradient sequence weight (1 when None).
    """
    batch = _prepare(logprobs, old_logprobs, advantages, mask, router_shift, gamma_min)
    has_tokens = batch.weight.amax(dim=1)                                          # (B,) 1.0 or 0.0
    seq_ratio = _masked_mean(batch.shifted, batch.weight).exp()                    # (B,)
    low, high = _one_sided_bounds(batch.advantages, 1.0 - clip_low, 1.0 + clip_high)  # (B, 1) each
    clipped = seq_ratio.clamp(min=low[:, 0], max=high[:, 0])                       # (B,)
    objective = (batch.advantages * clipped * has_tokens * _sequence_weight(weight, shape=(len(logprobs),))).mean()
    clip_counts = _clip_counts(seq_ratio, low[:, 0], high[:, 0], has_tokens)
    return _output(objective, batch, seq_ratio, clip_counts, ratio_weight=has_tokens)


def gmpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              router_shift: Tensor | None = None, clip_low: float = 0.4, clip_high: float = 0.4,
              gamma_min: float = 0.8, weight: Tensor | None = None) -> LossOutput:
    """GMPO (+RS): geometric mean of token ratios with a token-level clip in log space (arXiv 2507.20673).

    ℓ̂_t = min(log w̃_t, ε_high) if Â_i > 0, max(log w̃_t, −ε_low) if Â_i < 0
    J = (1/B) Σ_i ρ_i Â_i exp((1/|y_i|) Σ_t ℓ̂_t),   ρ (B,) = `weight`, stop-gradient (1 when None)
    """
    batch = _prepare(logprobs, old_logprobs, advantages, mask, router_shift, gamma_min)
    low, high = _one_sided_bounds(batch.advantages, -clip_low, clip_high)         # (B, 1) each
    clipped = batch.shifted.clamp(min=low, max=high)                               # (B, T)
    has_tokens = batch.weight.amax(dim=1)                                          # (B,) 1.0 or 0.0
    seq_ratio = _masked_mean(clipped, batch.weight).exp()                          # (B,)
    objective = (batch.advantages * seq_ratio * has_tokens * _sequence_weight(weight, shape=(len(logprobs),))).mean()
    clip_counts = _clip_counts(batch.shifted, low, high, batch.weight)
    return _output(objective, batch, batch.shifted.exp(), clip_counts)


def rspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              router_shift: Tensor | None = None, clip_low: float = 0.4, clip_high: float = 0.4,
              gamma_min: float = 0.8, weight: Tensor | None = None) -> LossOutput:
    """RSPO = GMPO + router-shift weighting; `router_shift` is required (from `router_shift_ratio`)."""
    if router_shift is None:
        raise ValueError("rspo_loss needs router_shift (B, T) from router_shift_ratio(...): RSPO is GMPO "
                         "with router-shift weighting; use gmpo_loss for GMPO without it")
    return gmpo_loss(logprobs, old_logprobs, advantages, mask, router_shift=router_shift,
                     clip_low=clip_low, clip_high=clip_high, gamma_min=gamma_min, weight=weight)


LOSSES = {"grpo": grpo_loss, "gspo": gspo_loss, "gmpo": gmpo_loss, "rspo": rspo_loss}


def policy_loss(name: str, **kwargs) -> LossOutput:
    """Dispatch by name: policy_loss("rspo", logprobs=..., old_logprobs=..., ...)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)


# ---------------------------------------------------------------------------------------------------
# Rollout corrections: the behaviour policy μ against π_old
# ---------------------------------------------------------------------------------------------------

def rollout_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """δ (B, T) = log π_old − log μ of each sampled token, float32, 0 at padding, detached."""
    if tuple(rollout_logprobs.shape) != tuple(old_logprobs.shape) or old_logprobs.ndim != 2:
        raise ValueError(f"old_logprobs and rollout_logprobs must both be (B, T), got {tuple(old_logprobs.shape)} "
                         f"and {tuple(rollout_logprobs.shape)}")
    mask = _as_bool_mask(mask, tuple(old_logprobs.shape), "mask")
    return torch.where(mask, old_logprobs.detach().float() - rollout_logprobs.detach().float(), 0.0)


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, level: str = "token",
                         cap: float = 2.0) -> Tensor:
    """Truncated importance sampling (TIS; verl `rollout_is`, TRL `vllm_importance_sampling_mode`): (B, T)
    float32 weights, detached, 0 at padding.

    token:    ρ_t = min(π_old(y_t) / μ(y_t), C)
    sequence: ρ_i = min(Π_t π_old(y_t) / μ(y_t), C) on every valid token of row i
    Computed as exp(min(log-ratio, log C)), so a product of many large ratios never overflows.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    delta = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)                 # (B, T)
    valid = mask.bool()
    if level == "sequence":
        delta = delta.sum(dim=1, keepdim=True).expand_as(delta)                      # (B, T)
    return torch.where(valid, delta.clamp(max=math.log(cap)).exp(), 0.0)


def rollout_keep_mask(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, level: str = "token",
                      low: float = 0.5, high: float = 2.0) -> Tensor:
    """Masked importance sampling (MIS; IcePop): (B, T) bool, True on the valid tokens that keep their gradient.

    token:    keep y_t when low <= π_old(y_t) / μ(y_t) <= high
    sequence: keep every token of row i when low <= exp(mean_t log π_old / μ) <= high (its geometric-mean ratio)
    Compared in log space; a row without valid tokens keeps nothing.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    delta = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)                 # (B, T)
    valid = mask.bool()
    if level == "sequence":
        delta = _masked_mean(delta, valid.float())[:, None].expand_as(delta)         # (B, T)
    return valid & (delta >= math.log(low)) & (delta <= math.log(high))


@torch.no_grad()
def rollout_mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                             router_logits: Tensor | None = None,
                             rollout_topk_idx: Tensor | None = None) -> dict[str, Tensor]:
    """How far the behaviour policy μ is from π_old on one batch of valid tokens:

    rollout_logprob_diff_mean / _max   mean and max of |log π_old − log μ|
    rollout_kl                         k3 estimate of KL(μ ‖ π_old): (r − 1) − log r, r = π_old / μ, mean over tokens
    rollout_routing_mismatch           share of (token, MoE layer) pairs whose top-K set under π_old's own router,
                                       router_logits (L, B, T, E), differs from the rollout's, rollout_topk_idx (L, B, T, K)
    rollout_tokens_flipped             share of tokens with at least one such layer
    The routing pair is only computed when both router tensors are given (and L > 0).
    """
    delta = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)                 # (B, T)
    weight = mask.float()                                                           # (B, T)
    n_valid = weight.sum().clamp(min=1)
    metrics = {"rollout_logprob_diff_mean": _weighted_sum(delta.abs(), weight) / n_valid,
               "rollout_logprob_diff_max": delta.abs().amax() if delta.numel() else delta.new_zeros(()),
               "rollout_kl": _weighted_sum(torch.expm1(delta) - delta, weight) / n_valid}
    if router_logits is not None and rollout_topk_idx is not None and router_logits.shape[0] > 0:
        differs = routing_flips(router_logits, rollout_topk_idx, mask)                # (L, B, T)
        metrics["rollout_routing_mismatch"] = differs.float().sum() / (n_valid * differs.shape[0])
        metrics["rollout_tokens_flipped"] = differs.any(dim=0).float().sum() / n_valid
    return metrics


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------

def _check_weight(weight: Tensor, shape: tuple) -> Tensor:
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"weight must have shape {tuple(shape)}, got {tuple(weight.shape)}")
    return weight.detach().float()


def _sequence_weight(weight: Tensor | None, shape: tuple) -> Tensor | float:
    """A sequence-level loss's per-sequence weight (B,), detached float32; 1.0 when there is none."""
    return 1.0 if weight is None else _check_weight(weight, shape)


class _Batch(NamedTuple):
    weight: Tensor      # (B, T) float32, 1.0 on valid tokens: masking by product is cheaper than by where
    n_valid: Tensor     # scalar, number of valid tokens (at least 1)
    log_ratio: Tensor   # (B, T) log w, 0 at padding
    shifted: Tensor     # (B, T) log w̃ = log w + log sg[max(γ, γ_min)]
    advantages: Tensor  # (B,) float32


def _prepare(logprobs, old_logprobs, advantages, mask, router_shift, gamma_min) -> _Batch:
    """Validate the inputs and compute what every loss shares: log w and log w̃."""
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be floating point, got {logprobs.dtype}")
    shape = tuple(logprobs.shape)
    if tuple(old_logprobs.shape) != shape:
        raise ValueError(f"old_logprobs must match logprobs {shape}, got {tuple(old_logprobs.shape)}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({shape[0]},), got {tuple(advantages.shape)}")
    if not 0.0 < gamma_min <= 1.0:
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min}")
    mask = _as_bool_mask(mask, shape, "mask")

    weight = mask.float()                                                          # (B, T)
    n_valid = weight.sum().clamp(min=1)
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.float(), 0.0)   # (B, T)
    shifted = log_ratio
    if router_shift is not None:
        if tuple(router_shift.shape) != shape:
            raise ValueError(f"router_shift must be (B, T) = {shape}, got {tuple(router_shift.shape)}")
        # sg[γ]; padding needs no masking: log max(γ, γ_min) is finite and every reader of log w̃ weights it.
        # In place on clamp's fresh copy: three element-wise kernels and no new tensor, the whole price of RS.
        shifted = router_shift.detach().float().clamp(min=gamma_min).log_().add_(log_ratio)  # (B, T)
    return _Batch(weight, n_valid, log_ratio, shifted, advantages.float())


def _as_bool_mask(mask: Tensor, shape: tuple, name: str) -> Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be bool or hold only 0/1, got dtype {mask.dtype} with other values")
    return mask.bool()


def _one_sided_bounds(advantages: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Per-sequence clamp bounds (B, 1) for min(x Â, clip(x, low, high) Â) = Â · clamp(x, lo_i, hi_i).

    Â > 0 caps x at `high`, Â < 0 floors it at `low`; the other side (and both when Â = 0) stays open.
    """
    adv = advantages[:, None]                                                      # (B, 1)
    return torch.where(adv < 0, low, -torch.inf), torch.where(adv > 0, high, torch.inf)


def _masked_mean(x: Tensor, weight: Tensor) -> Tensor:
    """(B, T) -> (B,): mean over each row's valid tokens, 0 for a row with none."""
    return (x * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def _weighted_sum(x: Tensor, weight: Tensor) -> Tensor:
    return torch.dot(x.flatten().to(weight.dtype), weight.flatten())


@torch.no_grad()
def _clip_counts(x: Tensor, low: Tensor, high: Tensor, weight: Tensor) -> dict[str, Tensor]:
    """Share of valid entries where the one-sided clip bites (so their gradient is zero)."""
    n = weight.sum().clamp(min=1)
    return {"clip_frac_low": _weighted_sum(x < low, weight) / n,
            "clip_frac_high": _weighted_sum(x > high, weight) / n}


def _output(objective: Tensor, batch: _Batch, ratio: Tensor, clip_counts: dict[str, Tensor],
            ratio_weight: Tensor | None = None) -> LossOutput:
    with torch.no_grad():
        ratio_weight = batch.weight if ratio_weight is None else ratio_weight
        k3 = torch.expm1(batch.log_ratio) - batch.log_ratio                       # (w − 1) − log w
        metrics = clip_counts | {
            "ratio_mean": _weighted_sum(ratio, ratio_weight) / ratio_weight.sum().clamp(min=1),
            "approx_kl": _weighted_sum(k3, batch.weight) / batch.n_valid}
    return LossOutput(-objective, metrics)
