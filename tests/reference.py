"""Naive float64 references for minirspo.loss, written from docs/rspo.md and not from loss.py.

Every quantity is built from 0-d float64 tensors (or Python floats where no gradient is needed) with
explicit Python loops over sequences i, tokens t, MoE layers l and activated experts k, so that each line
can be checked against an equation of docs/rspo.md by eye and torch.autograd gives reference gradients.
Slow by design: tiny inputs only.

Notation: B batch (sequences), T tokens, E experts, K top-k, L MoE layers, G group size.
A_i advantage of sequence i; |y_i| its number of valid tokens; ell~ the RS-rescaled token log-ratio.
"""

import math

import torch
from torch import Tensor

# Clip ranges (clip_low, clip_high): GRPO/PPO 0.2 (arXiv 2402.03300); GSPO 3e-4/4e-4 (arXiv 2507.18071);
# GMPO 0.4 in log space (arXiv 2507.20673), which RSPO (arXiv 2510.23027) inherits.
DEFAULT_CLIPS = {"grpo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "gmpo": (0.4, 0.4), "rspo": (0.4, 0.4)}
DEFAULT_GAMMA_MIN = 0.8  # docs/rspo.md: the floor of public implementations of RSPO


def group_advantages_ref(rewards: list[float], group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> list[float]:
    """A_i = (r_i - group mean) / (group std with Bessel's correction + eps); exactly 0 for an all-equal group."""
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if all(reward == group[0] for reward in group):
            advantages.extend([0.0] * len(group))
            continue
        mean = math.fsum(group) / len(group)
        std = math.sqrt(math.fsum((reward - mean) ** 2 for reward in group) / (len(group) - 1))
        advantages.extend((reward - mean) / (std + eps) if normalize_std else reward - mean for reward in group)
    return advantages


def log_softmax_ref(logits: list[Tensor]) -> list[Tensor]:
    """log p_e = z_e - log sum_j exp z_j, with the max subtracted first so that exp never overflows."""
    # A constant shift leaves log-softmax unchanged, so taking the max as a plain float loses no gradient.
    top = max(logit.item() for logit in logits)
    log_normaliser = top + torch.log(sum(torch.exp(logit - top) for logit in logits))
    return [logit - log_normaliser for logit in logits]


def router_shift_ratio_ref(router_logits: Tensor, old_topk_idx: Tensor, old_topk_logprobs: Tensor, mask: Tensor | None = None) -> list[list[Tensor]]:
    """gamma_{i,t} = exp(-(1/L) sum_l (1/K) sum_k |log p_l(e_k) - old log p_l(e_k)|), 1 at masked tokens; B x T 0-d tensors."""
    n_layers, batch, n_tokens, _ = router_logits.shape
    top_k = old_topk_idx.shape[-1]
    gamma = []
    for i in range(batch):
        row = []
        for t in range(n_tokens):
            if mask is not None and not bool(mask[i, t]):
                row.append(torch.tensor(1.0, dtype=torch.float64))
                continue
            total_shift = 0.0
            for layer in range(n_layers):
                log_probs = log_softmax_ref(list(router_logits[layer, i, t].double().unbind()))
                layer_shift = 0.0
                for k in range(top_k):
                    expert = int(old_topk_idx[layer, i, t, k])
                    layer_shift = layer_shift + abs(log_probs[expert] - float(old_topk_logprobs[layer, i, t, k]))
                total_shift = total_shift + layer_shift / top_k
            row.append(torch.exp(-total_shift / n_layers))
        gamma.append(row)
    return gamma


def rescaled_log_ratios_ref(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, router_shift: Tensor | None, gamma_min: float) -> list[list[Tensor]]:
    """Per sequence, the valid tokens' log w~ = log pi - log pi_old + log max(gamma, gamma_min), gamma a constant (stop-gradient)."""
    batch, n_tokens = mask.shape
    log_ratios = []
    for i in range(batch):
        row = []
        for t in range(n_tokens):
            if not bool(mask[i, t]):
                continue
            log_ratio = logprobs[i, t].double() - float(old_logprobs[i, t])
            if router_shift is not None:
                log_ratio = log_ratio + math.log(max(float(router_shift[i, t]), gamma_min))
            row.append(log_ratio)
        log_ratios.append(row)
    return log_ratios


def grpo_terms_ref(log_ratios: list[list[Tensor]], advantages: list[float], clip_low: float, clip_high: float,
                   token_weights: list[list[float]] | None = None) -> list[Tensor]:
    """(1/|y_i|) sum_t rho_t min(w~ A_i, clip(w~, 1 - clip_low, 1 + clip_high) A_i), per sequence; rho = 1 if None."""
    terms = []
    for i, (row, advantage) in enumerate(zip(log_ratios, advantages)):
        term = torch.tensor(0.0, dtype=torch.float64)
        for t, log_ratio in enumerate(row):
            ratio = torch.exp(log_ratio)
            rho = 1.0 if token_weights is None else token_weights[i][t]
            term = term + rho * torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantage)
        terms.append(term / len(row) if row else term)
    return terms


def gspo_terms_ref(log_ratios: list[list[Tensor]], advantages: list[float], clip_low: float, clip_high: float) -> list[Tensor]:
    """min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i) with s_i = exp(mean_t log w~), per sequence."""
    terms = []
    for row, advantage in zip(log_ratios, advantages):
        if not row:
            terms.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        sequence_ratio = torch.exp(sum(row) / len(row))
        terms.append(torch.minimum(sequence_ratio * advantage, torch.clamp(sequence_ratio, 1 - clip_low, 1 + clip_high) * advantage))
    return terms


def gmpo_terms_ref(log_ratios: list[list[Tensor]], advantages: list[float], clip_low: float, clip_high: float) -> list[Tensor]:
    """sgn(A_i) prod_t |min(w~ A_i, clip(w~, e^-clip_low, e^clip_high) A_i)|^(1/|y_i|): docs/rspo.md's first GMPO form."""
    terms = []
    for row, advantage in zip(log_ratios, advantages):
        # A_i = 0 makes every factor 0; the product form's term is then 0 (and its |.|^(1/n) has no gradient there).
        if not row or advantage == 0:
            terms.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        product = torch.tensor(1.0, dtype=torch.float64)
        for log_ratio in row:
            ratio = torch.exp(log_ratio)
            clipped = torch.clamp(ratio, math.exp(-clip_low), math.exp(clip_high))
            product = product * torch.abs(torch.minimum(ratio * advantage, clipped * advantage)) ** (1 / len(row))
        terms.append(math.copysign(1.0, advantage) * product)
    return terms


SEQUENCE_TERMS_REF = {"grpo": grpo_terms_ref, "gspo": gspo_terms_ref, "gmpo": gmpo_terms_ref, "rspo": gmpo_terms_ref}


def sequence_terms_ref(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    router_shift: Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    gamma_min: float = DEFAULT_GAMMA_MIN,
    weight: Tensor | None = None,
) -> list[Tensor]:
    """The B summands of J = (1/B) sum_i term_i for loss `name`; a sequence with no valid token gives 0.
    `weight`: GRPO's per-token weights (B, T), each valid token's clipped term times its weight; the other
    losses' per-sequence weights (B,), each term times its weight."""
    default_low, default_high = DEFAULT_CLIPS[name]
    log_ratios = rescaled_log_ratios_ref(logprobs, old_logprobs, mask, router_shift, gamma_min)
    clips = (default_low if clip_low is None else clip_low, default_high if clip_high is None else clip_high)
    advantages = [float(advantage) for advantage in advantages]
    if name == "grpo":
        token_weights = None if weight is None else [
            [float(weight[i, t]) for t in range(mask.shape[1]) if bool(mask[i, t])] for i in range(mask.shape[0])]
        return grpo_terms_ref(log_ratios, advantages, *clips, token_weights=token_weights)
    terms = SEQUENCE_TERMS_REF[name](log_ratios, advantages, *clips)
    return terms if weight is None else [term * float(rho) for term, rho in zip(terms, weight)]


def objective_ref(name: str, **inputs) -> Tensor:
    """J = (1/B) sum_i term_i: every sequence counts once in B, including those without valid tokens."""
    terms = sequence_terms_ref(name, **inputs)
    return sum(terms) / len(terms)


def clip_kink_distance_ref(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    router_shift: Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    gamma_min: float = DEFAULT_GAMMA_MIN,
) -> float:
    """Smallest log-space distance from a clip boundary over valid tokens (sequences for GSPO) with A_i != 0.

    The objective has a kink there, so float32 and float64 may legitimately disagree on which side a
    point falls; property tests keep their draws away from it.
    """
    default_low, default_high = DEFAULT_CLIPS[name]
    low = default_low if clip_low is None else clip_low
    high = default_high if clip_high is None else clip_high
    boundaries = (-low, high) if name in ("gmpo", "rspo") else (math.log(1 - low), math.log(1 + high))
    distance = math.inf
    log_ratios = rescaled_log_ratios_ref(logprobs, old_logprobs, mask, router_shift, gamma_min)
    for row, advantage in zip(log_ratios, advantages):
        if not row or float(advantage) == 0:
            continue
        points = [math.fsum(float(log_ratio) for log_ratio in row) / len(row)] if name == "gspo" else [float(log_ratio) for log_ratio in row]
        distance = min([distance] + [abs(point - boundary) for point in points for boundary in boundaries])
    return distance


def metrics_ref(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    router_shift: Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    gamma_min: float = DEFAULT_GAMMA_MIN,
) -> dict[str, float]:
    """docs/rspo.md "Metrics" for a batch with >= 1 valid token, every A_i != 0 and (GSPO) every sequence non-empty.

    A clip counts where it is active and changes the objective: the upper bound when A_i > 0 and the ratio is
    above it, the lower bound when A_i < 0 and the ratio is below it (GMPO: the log-ratio against -clip_low,
    clip_high). ratio_mean is the mean of w~ over valid tokens (GSPO: of s_i over sequences).
    """
    default_low, default_high = DEFAULT_CLIPS[name]
    low = default_low if clip_low is None else clip_low
    high = default_high if clip_high is None else clip_high
    log_low, log_high = (-low, high) if name in ("gmpo", "rspo") else (math.log(1 - low), math.log(1 + high))
    rescaled = [[float(log_ratio) for log_ratio in row] for row in rescaled_log_ratios_ref(logprobs, old_logprobs, mask, router_shift, gamma_min)]
    plain = [[float(log_ratio) for log_ratio in row] for row in rescaled_log_ratios_ref(logprobs, old_logprobs, mask, None, gamma_min)]
    signs = [math.copysign(1.0, float(advantage)) for advantage in advantages]
    # GSPO clips one point per sequence, the others one per token.
    points = [([math.fsum(row) / len(row)] if row else []) if name == "gspo" else row for row in rescaled]
    n_points = sum(len(row) for row in points)
    metrics = {
        "clip_frac_low": sum(sign < 0 and point < log_low for row, sign in zip(points, signs) for point in row) / n_points,
        "clip_frac_high": sum(sign > 0 and point > log_high for row, sign in zip(points, signs) for point in row) / n_points,
        "ratio_mean": math.fsum(math.exp(point) for row in points for point in row) / n_points,
        "approx_kl": math.fsum(math.expm1(log_ratio) - log_ratio for row in plain for log_ratio in row) / sum(map(len, plain)),
    }
    return metrics


def router_shift_metrics_ref(gamma: Tensor, mask: Tensor, gamma_min: float) -> dict[str, float]:
    """docs/rspo.md "Metrics": γ over valid tokens (at least one): mean, min, share floored (γ < γ_min)."""
    gammas = [float(gamma[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if bool(mask[i, t])]
    return {"gamma_mean": math.fsum(gammas) / len(gammas), "gamma_lowest": min(gammas),
            "gamma_floored_frac": sum(value < gamma_min for value in gammas) / len(gammas)}


def routing_consistency_ref(router_logits: Tensor, old_topk_idx: Tensor, mask: Tensor) -> float:
    """Share of (valid token, layer) pairs whose K highest-logit experts are, as a set, the old ones."""
    n_layers, batch, n_tokens, n_experts = router_logits.shape
    top_k = old_topk_idx.shape[-1]
    same = total = 0
    for layer in range(n_layers):
        for i in range(batch):
            for t in range(n_tokens):
                if not mask[i][t]:
                    continue
                logits = [float(router_logits[layer, i, t, e]) for e in range(n_experts)]
                ranked = sorted(range(n_experts), key=lambda e: -logits[e])
                same += set(ranked[:top_k]) == {int(e) for e in old_topk_idx[layer, i, t]}
                total += 1
    return same / total if total else 0.0


def zero_variance_groups_ref(rewards: list[float], group_size: int) -> int:
    groups = [rewards[start:start + group_size] for start in range(0, len(rewards), group_size)]
    return sum(all(r == group[0] for r in group) for group in groups)


# ---------------------------------------------------------------------------------------------------
# Rollout corrections: the behaviour policy mu against pi_old (docs/rspo.md, "Rollout corrections")
# ---------------------------------------------------------------------------------------------------

def rollout_log_ratios_ref(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> list[list[float]]:
    """Per sequence, the valid tokens' delta = log pi_old - log mu, in float64."""
    return [[float(old_logprobs[i, t]) - float(rollout_logprobs[i, t]) for t in range(mask.shape[1]) if bool(mask[i, t])]
            for i in range(mask.shape[0])]


def _per_position(mask: Tensor, per_row: list[list], fill) -> list[list]:
    """Spread each row's per-valid-token values back over its T positions, `fill` at padding."""
    rows = []
    for i, values in enumerate(per_row):
        it = iter(values)
        rows.append([next(it) if bool(mask[i, t]) else fill for t in range(mask.shape[1])])
    return rows


def truncated_is_weights_ref(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: str, cap: float) -> list[list[float]]:
    """token: min(pi_old / mu, C) per token; sequence: min(prod_t pi_old / mu, C) on every token of the row. 0 at padding."""
    weights = []
    for deltas in rollout_log_ratios_ref(old_logprobs, rollout_logprobs, mask):
        if level == "token":
            weights.append([min(math.exp(delta), cap) for delta in deltas])
        else:
            weights.append([min(math.exp(math.fsum(deltas)), cap)] * len(deltas))
    return _per_position(mask, weights, 0.0)


def rollout_keep_mask_ref(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: str, low: float, high: float) -> list[list[bool]]:
    """token: keep when low <= pi_old / mu <= high; sequence: every token of a row whose geometric-mean ratio is inside."""
    keep = []
    for deltas in rollout_log_ratios_ref(old_logprobs, rollout_logprobs, mask):
        if level == "token":
            keep.append([low <= math.exp(delta) <= high for delta in deltas])
        else:
            inside = bool(deltas) and low <= math.exp(math.fsum(deltas) / len(deltas)) <= high
            keep.append([inside] * len(deltas))
    return _per_position(mask, keep, False)


def rollout_mismatch_metrics_ref(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, router_logits: Tensor,
                                 rollout_topk_idx: Tensor) -> dict[str, float]:
    """Mean and max |delta|, k3 KL(mu || pi_old) = mean (r - 1) - log r with r = pi_old / mu, and the shares of
    (token, layer) top-K sets under pi_old's router that differ from the rollout's, and of tokens with any."""
    deltas = [delta for row in rollout_log_ratios_ref(old_logprobs, rollout_logprobs, mask) for delta in row]
    n = max(len(deltas), 1)
    metrics = {"rollout_logprob_diff_mean": math.fsum(abs(d) for d in deltas) / n,
               "rollout_logprob_diff_max": max((abs(d) for d in deltas), default=0.0),
               "rollout_kl": math.fsum(math.expm1(d) - d for d in deltas) / n}
    n_layers, batch, n_tokens, _ = router_logits.shape
    top_k = rollout_topk_idx.shape[-1]
    differing_sets, flipped_tokens = 0, 0
    for i in range(batch):
        for t in range(n_tokens):
            if not bool(mask[i, t]):
                continue
            flips = 0
            for layer in range(n_layers):
                logits = [float(z) for z in router_logits[layer, i, t]]
                own = set(sorted(range(len(logits)), key=lambda e: -logits[e])[:top_k])
                flips += own != {int(e) for e in rollout_topk_idx[layer, i, t]}
            differing_sets += flips
            flipped_tokens += flips > 0
    metrics["rollout_routing_mismatch"] = differing_sets / (n * n_layers)
    metrics["rollout_tokens_flipped"] = flipped_tokens / n
    return metrics
