"""Property tests of minirspo.loss against the naive float64 references of tests/reference.py (docs/rspo.md).

Notation: B batch (sequences), T tokens, E experts, K top-k, L MoE layers, G group size.

Tolerances. loss.py computes in float32 and the references in float64 from the same float32 inputs, so every
gap is float32 rounding (unit roundoff u = 6e-8). The largest log-ratio drawn is 50 and T <= 6, so a
sum of log-ratios is off by at most ~T * 50 * u = 2e-5 absolute, hence exp() of it by 2e-5 relative:
rtol = 1e-4 leaves a 5x margin. Points within 1e-4 (log space) of a clip boundary are rejected with
`assume`, since float32 and float64 may fall on different sides of that kink.
"""

import math
from typing import NamedTuple

import pytest
import torch
from einops import rearrange
from hypothesis import assume, given
from hypothesis import strategies as st

from minirspo.loss import (
    group_advantages,
    gmpo_loss,
    grpo_loss,
    gspo_loss,
    policy_loss,
    router_logprobs_at,
    router_shift_metrics,
    router_shift_ratio,
    routing_consistency,
    rspo_loss,
    zero_variance_groups,
)
import reference  # tests/reference.py: pytest puts this folder on sys.path

LOSSES = {"grpo": grpo_loss, "gspo": gspo_loss, "gmpo": gmpo_loss, "rspo": rspo_loss}
RTOL = 1e-4  # float32 vs float64, see the module docstring
KINK_MARGIN = 1e-4  # log-space distance from a clip boundary; 5x the worst float32 error of a log-ratio
EXTREME_LOG_RATIO = 50.0  # e^50 = 5e21 is far from float32's 3e38 limit, yet far outside every clip band


class Case(NamedTuple):
    name: str  # "grpo" | "gspo" | "gmpo" | "rspo"
    inputs: dict  # the loss's keyword arguments: logprobs, old_logprobs, advantages, mask, router_shift, ...


# ---------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------

def float32s(low: float, high: float):
    """Floats exactly representable in float32, so that loss.py and the reference see the same numbers."""
    return st.floats(low, high, width=32)


@st.composite
def rewards_by_group(draw, max_groups: int = 3, max_group_size: int = 4):
    """(rewards, group_size): rewards on a 1/8 grid, so equal-reward groups (A = 0) come up often."""
    group_size = draw(st.integers(2, max_group_size))
    n_groups = draw(st.integers(1, max_groups))
    rewards = draw(st.lists(st.integers(-8, 8), min_size=n_groups * group_size, max_size=n_groups * group_size))
    return [reward / 8 for reward in rewards], group_size


@st.composite
def policy_cases(
    draw,
    names=tuple(LOSSES),
    router_shift: bool | None = None,
    nonzero_advantages: bool = False,
    nonempty_rows: bool = False,
    default_clips: bool | None = None,
):
    """A loss name and its inputs: ragged masks (all-masked rows included), advantages from groups (zero-variance
    ones included), log-ratios at one of several scales with occasional +-50, optional router shift below and
    above the floor, and either the paper's clip defaults or drawn asymmetric ones."""
    name = draw(st.sampled_from(names))
    rewards, group_size = draw(rewards_by_group())
    batch = len(rewards)
    advantages = reference.group_advantages_ref(rewards, group_size)
    if nonzero_advantages:
        advantages = [advantage if advantage != 0 else draw(st.sampled_from([-1.0, 1.0])) for advantage in advantages]
    n_tokens = draw(st.integers(1, 6))
    mask = [draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)) for _ in range(batch)]
    if nonempty_rows:
        mask = [row if any(row) else [True] + row[1:] for row in mask]
    # 1e-4 keeps GSPO inside its 3e-4 band; 0.05 and 0.5 straddle the GRPO/GMPO bands; 3 is far outside.
    scale = draw(st.sampled_from([1e-4, 0.05, 0.5, 3.0]))
    with_extremes = draw(st.booleans())
    log_ratios = []
    for _ in range(batch * n_tokens):
        kind = draw(st.integers(0, 9)) if with_extremes else 9
        log_ratios.append(-EXTREME_LOG_RATIO if kind == 0 else EXTREME_LOG_RATIO if kind == 1 else scale * draw(float32s(-1, 1)))
    old_logprobs = torch.tensor(draw(st.lists(float32s(-8, 0), min_size=batch * n_tokens, max_size=batch * n_tokens)))
    old_logprobs = rearrange(old_logprobs, "(b t) -> b t", b=batch)  # (B, T)
    logprobs = old_logprobs + rearrange(torch.tensor(log_ratios), "(b t) -> b t", b=batch)  # (B, T)
    inputs = dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=torch.tensor(advantages, dtype=torch.float32), mask=torch.tensor(mask))
    if name == "rspo" or (router_shift if router_shift is not None else draw(st.booleans())):
        # gamma = 1 (router did not move), just above and well below the 0.8 floor.
        gammas = draw(st.lists(st.one_of(st.just(1.0), float32s(0.25, 1.0)), min_size=batch * n_tokens, max_size=batch * n_tokens))
        inputs["router_shift"] = rearrange(torch.tensor(gammas), "(b t) -> b t", b=batch)  # (B, T)
    if not (default_clips if default_clips is not None else draw(st.booleans())):
        # Asymmetric bands and a different floor catch swapped or ignored keyword arguments.
        band = reference.DEFAULT_CLIPS[name][1]
        inputs["clip_low"] = band * draw(st.sampled_from([0.5, 1.5]))
        inputs["clip_high"] = band * draw(st.sampled_from([0.75, 2.0]))
        inputs["gamma_min"] = draw(st.sampled_from([0.5, 0.9]))
    return Case(name, inputs)


@st.composite
def router_cases(draw, masked: bool | None = None):
    """Router logits of a new and an old policy, the old top-K experts and their old log-probs, and a mask."""
    n_layers, batch, n_tokens = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, n_experts))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    # Logits up to ~30 in magnitude (peaked routers), moved by a small to large step.
    old_logits = draw(st.sampled_from([1.0, 8.0, 30.0])) * torch.randn(n_layers, batch, n_tokens, n_experts, generator=generator)  # (L, B, T, E)
    new_logits = old_logits + draw(st.sampled_from([0.1, 0.5, 3.0])) * torch.randn(old_logits.shape, generator=generator)  # (L, B, T, E)
    old_topk_idx, old_topk_logprobs = rollout_router_record(old_logits, top_k)
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens), min_size=batch, max_size=batch))) if (masked if masked is not None else draw(st.booleans())) else None
    return new_logits, old_topk_idx, old_topk_logprobs, mask


def rollout_router_record(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a rollout keeps: the top-K experts of each token and their float32 log-probs, (L, B, T, K) each."""
    old_topk_idx = router_logits.topk(top_k, dim=-1).indices  # (L, B, T, K)
    return old_topk_idx, torch.log_softmax(router_logits.float(), dim=-1).gather(-1, old_topk_idx)  # (L, B, T, K)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def gradient(loss: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """d loss / d wrt, zeros where the loss does not depend on `wrt` at all."""
    if not loss.requires_grad:
        return torch.zeros_like(wrt)
    (grad,) = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    return grad


def run_loss(case: Case, **overrides):
    """loss.py's loss and its gradient w.r.t. logprobs."""
    inputs = {**case.inputs, **overrides}
    logprobs = inputs.pop("logprobs").detach().clone().requires_grad_()
    output = LOSSES[case.name](logprobs=logprobs, **inputs)
    return output, gradient(output.loss, logprobs)


def run_reference(case: Case):
    """The reference's loss -J, its scale (1/B) sum_i |term_i| and its gradient w.r.t. logprobs, in float64."""
    logprobs = case.inputs["logprobs"].double().requires_grad_()
    terms = reference.sequence_terms_ref(case.name, **{**case.inputs, "logprobs": logprobs})
    loss = -sum(terms) / len(terms)
    scale = sum(abs(term.item()) for term in terms) / len(terms)
    return loss.item(), scale, gradient(loss, logprobs)


def assert_loss_close(got: torch.Tensor, want: float, scale: float, rtol: float = RTOL):
    """|got - want| <= rtol * (1/B) sum_i |term_i|: relative to the summands, since their signs may cancel."""
    assert torch.isfinite(got), got
    assert abs(got.item() - want) <= rtol * scale + 1e-30, (got.item(), want, scale)


def assert_gradient_close(got: torch.Tensor, want: torch.Tensor):
    """Element-wise relative: each token's gradient is one product (no cancellation), exactly 0 when clipped/masked."""
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=1e-30)


def away_from_kinks(case: Case):
    assume(reference.clip_kink_distance_ref(case.name, **case.inputs) > KINK_MARGIN)


# ---------------------------------------------------------------------------------------------------
# Losses against the reference
# ---------------------------------------------------------------------------------------------------

@given(policy_cases())
def test_loss_and_gradient_match_reference(case):
    away_from_kinks(case)
    output, grad = run_loss(case)
    want, scale, want_grad = run_reference(case)
    assert_loss_close(output.loss, want, scale)
    assert_gradient_close(grad, want_grad)


@given(policy_cases(nonzero_advantages=True, nonempty_rows=True))
def test_metrics_match_reference(case):
    # docs/rspo.md pins the clip fractions down only where A != 0 (with A = 0 nothing changes the objective) and,
    # for GSPO, counts sequences: with every row non-empty "share of sequences" has one meaning.
    away_from_kinks(case)
    metrics = run_loss(case)[0].metrics
    want = reference.metrics_ref(case.name, **case.inputs)
    assert set(metrics) == set(want)  # the loss's own metrics only: the loop computes γ's once, from γ
    for key, value in want.items():
        assert metrics[key].ndim == 0 and not metrics[key].requires_grad, key
        # Shares are counts over at most 36 points: exact up to float32 division. The k3 estimator
        # (w - 1) - log w cancels to ~u per token for tiny log-ratios, hence its absolute 1e-6.
        assert math.isclose(float(metrics[key]), value, rel_tol=RTOL, abs_tol=1e-6), (key, float(metrics[key]), value)


@given(policy_cases())
def test_policy_loss_dispatches_by_name(case):
    direct, grad = run_loss(case)
    logprobs = case.inputs["logprobs"].clone().requires_grad_()
    by_name = policy_loss(case.name, **{**case.inputs, "logprobs": logprobs})
    # the same function on the same tensors: bit for bit on any CPU (same ops, same order)
    assert torch.equal(by_name.loss, direct.loss)
    assert torch.equal(gradient(by_name.loss, logprobs), grad)


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------

@given(policy_cases(default_clips=True))
def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_policy_gradient(case):
    # w = 1, gamma = 1: no clip is active, so J = (1/B) sum_i A_i [|y_i| > 0] and dJ/dlogprob = A_i / (B |y_i|).
    mask, advantages = case.inputs["mask"], case.inputs["advantages"].double()
    on_policy = dict(logprobs=case.inputs["old_logprobs"], router_shift=torch.ones(mask.shape) if case.name == "rspo" else None)
    output, grad = run_loss(case, **on_policy)
    lengths = mask.sum(dim=1)  # (B,)
    batch = mask.shape[0]
    want_loss = -float((advantages * (lengths > 0)).sum()) / batch
    # w = 1 exactly, so each term is A_i times a few exact or once-rounded factors; the float32 mean over
    # B <= 12 of them is off by <= (B + 3) u = 9e-7 of (1/B) sum |A_i| in the worst case: rtol 1e-6.
    assert_loss_close(output.loss, want_loss, float(advantages.abs().sum()) / batch, rtol=1e-6)
    want_grad = torch.where(mask, -rearrange(advantages / (batch * lengths.clamp(min=1)), "b -> b 1"), 0.0)  # (B, T)
    # each element is A_i / (B |y_i|) times exp(0) = 1: <= 3 roundings (3u = 2e-7 relative); exactly 0
    # where A_i = 0 or masked, which atol 1e-12 (far below any nonzero |A|/(B T) >= 1e-3) keeps exact.
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-12)
    if mask.any():
        assert float(output.metrics["clip_frac_low"]) == 0 and float(output.metrics["clip_frac_high"]) == 0
        assert float(output.metrics["approx_kl"]) == 0 and float(output.metrics["ratio_mean"]) == 1


@given(policy_cases(names=("grpo", "gspo", "gmpo"), router_shift=False))
def test_router_shift_of_ones_equals_router_shift_off(case):
    off, off_grad = run_loss(case)
    on, on_grad = run_loss(case, router_shift=torch.ones(case.inputs["mask"].shape))
    # log max(1, γ_min) = log 1 = 0 exactly and x + 0 = x exactly, so every later op sees the same bits
    assert torch.equal(on.loss, off.loss)
    assert torch.equal(on_grad, off_grad)
    assert on.metrics.keys() == off.metrics.keys()
    for key, value in off.metrics.items():
        assert torch.equal(on.metrics[key], value), key


@given(policy_cases(names=("gmpo",), router_shift=True))
def test_rspo_is_gmpo_with_router_shift(case):
    router_shift = case.inputs["router_shift"]
    rspo, rspo_grad = run_loss(case._replace(name="rspo"))
    gmpo, gmpo_grad = run_loss(case)
    # rspo_loss calls gmpo_loss with the same arguments: bit for bit
    assert torch.equal(rspo.loss, gmpo.loss)
    assert torch.equal(rspo_grad, gmpo_grad)
    # With gamma = 1 everywhere, RSPO is plain GMPO.
    ones = torch.ones_like(router_shift)
    rspo_ones, rspo_ones_grad = run_loss(case._replace(name="rspo"), router_shift=ones)
    gmpo_off, gmpo_off_grad = run_loss(case, router_shift=None)
    # log w + log 1 = log w exactly (see test_router_shift_of_ones_equals_router_shift_off)
    assert torch.equal(rspo_ones.loss, gmpo_off.loss)
    assert torch.equal(rspo_ones_grad, gmpo_off_grad)


@given(policy_cases(), st.sampled_from([-math.inf, math.inf, math.nan, -1e30, 1e30, -50.0]))
def test_padding_content_changes_nothing(case, garbage):
    output, grad = run_loss(case)
    padding = ~case.inputs["mask"]
    dirty = {key: torch.where(padding, garbage, case.inputs[key]) for key in ("logprobs", "old_logprobs")}
    dirty_output, dirty_grad = run_loss(case, **dirty)
    # torch.where drops padding before any arithmetic, so every later op sees the same bits: exact
    assert torch.equal(dirty_output.loss, output.loss)
    assert torch.equal(dirty_grad, grad)
    for key, value in output.metrics.items():
        torch.testing.assert_close(dirty_output.metrics[key], value, rtol=0, atol=0, equal_nan=True)


@given(policy_cases(), st.randoms(use_true_random=False))
def test_permuting_sequences_permutes_gradients_and_keeps_loss(case, random):
    batch = case.inputs["mask"].shape[0]
    order = list(range(batch))
    random.shuffle(order)
    permuted = {key: value[order] if isinstance(value, torch.Tensor) else value for key, value in case.inputs.items()}
    output, grad = run_loss(case)
    permuted_output, permuted_grad = run_loss(Case(case.name, permuted))
    scale = run_reference(case)[1]
    # Only the order of the float32 sum over sequences changes: B <= 12 roundings of the summands.
    assert_loss_close(permuted_output.loss, output.loss.item(), scale, rtol=1e-5)
    # A token's gradient depends only on its own row, reduced over the same T values in the same order;
    # even a kernel that vectorised a row by its address could move it only by the float32 error of the
    # row's log-ratio sum (RTOL, see the module docstring). 0 stays 0 (clipped, masked or A = 0).
    torch.testing.assert_close(permuted_grad, grad[order], rtol=RTOL, atol=1e-30)


@given(policy_cases())
def test_extreme_log_ratios_and_empty_rows_give_finite_loss_and_gradient(case):
    mask = case.inputs["mask"].clone()
    mask[0] = False  # at least one all-masked row
    extreme = torch.full(mask.shape, EXTREME_LOG_RATIO) * torch.where(torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)  # (B, T)
    output, grad = run_loss(case, mask=mask, logprobs=case.inputs["old_logprobs"] + extreme)
    assert torch.isfinite(output.loss) and torch.isfinite(grad).all()
    assert (grad[0] == 0).all()
    everything_masked, everything_masked_grad = run_loss(case, mask=torch.zeros_like(mask))
    assert everything_masked.loss.item() == 0 and (everything_masked_grad == 0).all()


@given(policy_cases())
def test_bfloat16_inputs_agree_with_float32(case):
    # Same values in both dtypes (rounded to bfloat16 once): loss.py computes in float32 whatever the input
    # dtype, so the losses may differ only by float32 rounding (a bfloat16 computation would miss by ~2^-8).
    # autograd returns the gradient of a bfloat16 leaf in bfloat16: one rounding, 2^-9 relative.
    low_precision = {key: value.to(torch.bfloat16) if isinstance(value, torch.Tensor) and value.is_floating_point() else value for key, value in case.inputs.items()}
    same_values = {key: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value for key, value in low_precision.items()}
    away_from_kinks(Case(case.name, same_values))
    bf16_output, bf16_grad = run_loss(Case(case.name, low_precision))
    float32_output, float32_grad = run_loss(Case(case.name, same_values))
    scale = run_reference(Case(case.name, same_values))[1]
    assert_loss_close(bf16_output.loss, float32_output.loss.item(), scale, rtol=1e-5)
    torch.testing.assert_close(bf16_grad.float(), float32_grad.bfloat16().float(), rtol=2**-8, atol=1e-30)


# ---------------------------------------------------------------------------------------------------
# Router shift ratio
# ---------------------------------------------------------------------------------------------------

@given(router_cases())
def test_router_shift_ratio_and_its_gradient_match_reference(router):
    new_logits, old_topk_idx, old_topk_logprobs, mask = router
    # |.| has a kink where a log-prob did not move. Keep such terms further away than the float32 error of a
    # router log-prob, ~3u per nat of |log p| (1e-6 (1 + |log p|) is a 5x margin), unless their expert
    # dominates (p > 1 - 2e-6): a wrong side of the kink then moves the gradient by 2 (1 - p) < 4e-6, inside
    # the gradient tolerance below. Peaked routers would be rejected throughout otherwise.
    new_logprobs = torch.log_softmax(new_logits.double(), dim=-1).gather(-1, old_topk_idx)  # (L, B, T, K)
    near_kink = (new_logprobs - old_topk_logprobs.double()).abs() < 1e-6 * (1 + new_logprobs.abs())  # (L, B, T, K)
    assume(not (near_kink & (new_logprobs < math.log1p(-2e-6))).any())
    logits = new_logits.clone().requires_grad_()
    gamma = router_shift_ratio(logits, old_topk_idx, old_topk_logprobs, mask)  # (B, T)
    logits64 = new_logits.double().requires_grad_()
    want = torch.stack([torch.stack(row) for row in reference.router_shift_ratio_ref(logits64, old_topk_idx, old_topk_logprobs, mask)])  # (B, T)
    # gamma = exp(-mean shift): the shift is off by ~1e-5 at most, so gamma by 1e-5 relative.
    torch.testing.assert_close(gamma.double(), want, rtol=RTOL, atol=1e-6)
    if mask is not None:
        assert (gamma[~mask] == 1).all()
    # dgamma/dz = -gamma/(LK) sum_k sign(moved_k) (onehot - p): its K terms may cancel, so an absolute 1e-5
    # (the float32 error of softmax probabilities of logits up to ~100) on elements bounded by 2.
    torch.testing.assert_close(gradient(gamma.sum(), logits).double(), gradient(want.sum(), logits64), rtol=RTOL, atol=1e-5)


@given(router_cases(), st.integers(0, 2**32 - 1))
def test_router_shift_ratio_is_one_exactly_when_router_did_not_move(router, seed):
    old_logits, _, _, mask = router
    n_layers, batch, n_tokens, n_experts = old_logits.shape
    top_k = torch.randint(1, n_experts + 1, (), generator=torch.Generator().manual_seed(seed)).item()
    old_topk_idx, old_topk_logprobs = rollout_router_record(old_logits, top_k)
    assert (router_shift_ratio(old_logits, old_topk_idx, old_topk_logprobs, mask) == 1).all()
    # Lower one activated expert's logit by 100 at one (layer, token): its log-prob falls by tens of nats
    # whether or not it dominated (a small nudge to a dominant expert would vanish in float32).
    layer, i, t = (int(torch.randint(size, (), generator=torch.Generator().manual_seed(seed + size))) for size in (n_layers, batch, n_tokens))
    moved_logits = old_logits.clone()
    moved_logits[layer, i, t, old_topk_idx[layer, i, t, 0]] -= 100
    gamma = router_shift_ratio(moved_logits, old_topk_idx, old_topk_logprobs, mask)  # (B, T)
    others = torch.ones_like(gamma, dtype=torch.bool)
    others[i, t] = False
    assert (gamma[others] == 1).all()
    assert gamma[i, t] == 1 if mask is not None and not mask[i, t] else gamma[i, t] < 1


@given(router_cases(), st.integers(0, 2**32 - 1))
def test_router_shift_ratio_ignores_a_constant_added_per_token(router, seed):
    new_logits, old_topk_idx, old_topk_logprobs, mask = router
    shift = 20 * (2 * torch.rand(new_logits.shape[:-1], generator=torch.Generator().manual_seed(seed)) - 1)  # (L, B, T)
    shifted = new_logits + rearrange(shift, "l b t -> l b t 1")  # (L, B, T, E)
    # Rounding z + c (|z + c| <= ~150) moves each logit by <= 8e-6, so each router log-prob by <= 2e-5 (plus
    # ~1e-5 of log-softmax rounding), and gamma by no more than that: atol 1e-4 is a 3x margin.
    torch.testing.assert_close(
        router_shift_ratio(shifted, old_topk_idx, old_topk_logprobs, mask),
        router_shift_ratio(new_logits, old_topk_idx, old_topk_logprobs, mask),
        rtol=0, atol=1e-4,
    )


@given(router_cases(masked=True), st.sampled_from([-math.inf, math.inf, math.nan, -1e30, 1e30]))
def test_router_padding_content_changes_nothing_at_valid_tokens(router, garbage):
    new_logits, old_topk_idx, old_topk_logprobs, mask = router
    padding = rearrange(~mask, "b t -> 1 b t 1")
    logits = new_logits.clone().requires_grad_()
    gamma = router_shift_ratio(logits, old_topk_idx, old_topk_logprobs, mask)  # (B, T)
    dirty_logits = torch.where(padding, garbage, new_logits).requires_grad_()  # (L, B, T, E)
    dirty_gamma = router_shift_ratio(dirty_logits, old_topk_idx, torch.where(padding, garbage, old_topk_logprobs), mask)  # (B, T)
    # each token's γ and gradient come from its own logits only (log-softmax per token): exact at valid tokens
    assert torch.equal(dirty_gamma, gamma)
    dirty_grad, grad = gradient(dirty_gamma.sum(), dirty_logits), gradient(gamma.sum(), logits)  # (L, B, T, E)
    assert torch.equal(dirty_grad[:, mask], grad[:, mask])
    if math.isfinite(garbage):
        # gamma is the constant 1 at a masked token. (A non-finite router logit at padding may leave NaN in
        # that padding's own gradient: routers never produce one, unlike the -inf token log-probs above.)
        assert (dirty_grad[:, ~mask] == 0).all()


@given(policy_cases(router_shift=False), st.integers(1, 3), st.integers(2, 6), st.data())
def test_no_gradient_reaches_the_router_through_the_loss(case, n_layers, n_experts, data):
    batch, n_tokens = case.inputs["mask"].shape
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    old_logits = torch.randn(n_layers, batch, n_tokens, n_experts, generator=generator)  # (L, B, T, E)
    old_topk_idx, old_topk_logprobs = rollout_router_record(old_logits, data.draw(st.integers(1, n_experts)))
    logits = (old_logits + torch.randn(old_logits.shape, generator=generator)).requires_grad_()  # (L, B, T, E)
    gamma = router_shift_ratio(logits, old_topk_idx, old_topk_logprobs, case.inputs["mask"])  # (B, T)
    assert gamma.requires_grad  # gamma itself is differentiable...
    logprobs = case.inputs["logprobs"].clone().requires_grad_()
    output = LOSSES[case.name](**{**case.inputs, "logprobs": logprobs, "router_shift": gamma})
    (router_grad,) = torch.autograd.grad(output.loss, logits, allow_unused=True)
    assert router_grad is None or (router_grad == 0).all()  # ...but the loss uses sg[gamma]


# ---------------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------------

@given(rewards_by_group(), st.booleans())
def test_group_advantages_match_reference(rewards_and_group_size, normalize_std):
    rewards, group_size = rewards_and_group_size
    got = group_advantages(torch.tensor(rewards), group_size, normalize_std=normalize_std)
    want = torch.tensor(reference.group_advantages_ref(rewards, group_size, normalize_std=normalize_std), dtype=torch.float64)
    # Rewards on a 1/8 grid: the float32 mean and std are exact to ~u, and |A| <= sqrt(G - 1) < 2.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@given(st.floats(-1e3, 1e3, allow_subnormal=False), st.integers(2, 8), st.booleans())
def test_group_advantages_of_equal_rewards_are_exactly_zero(reward, group_size, normalize_std):
    # Arbitrary floats: mean(r, ..., r) may differ from r by an ulp, which (0 + eps) would magnify.
    rewards = torch.tensor([reward] * group_size + [reward + 1.0] + [reward - 1.0] * (group_size - 1))  # (2G,)
    got = group_advantages(rewards, group_size, normalize_std=normalize_std)
    assert (got[:group_size] == 0).all()
    assert (got[group_size:] != 0).all()


@pytest.mark.parametrize("group_size", [0, 1])
def test_group_advantages_reject_groups_smaller_than_two(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size)


def test_group_advantages_reject_batch_not_divisible_by_group():
    with pytest.raises(ValueError, match="group_size|rewards"):
        group_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def valid_inputs(batch: int = 4, n_tokens: int = 3) -> dict:
    return dict(
        logprobs=torch.zeros(batch, n_tokens),
        old_logprobs=torch.zeros(batch, n_tokens),
        advantages=torch.ones(batch),
        mask=torch.ones(batch, n_tokens, dtype=torch.bool),
        router_shift=torch.ones(batch, n_tokens),
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(
    "argument, bad_value",
    [
        ("old_logprobs", torch.zeros(4, 2)),
        ("logprobs", torch.zeros(4)),
        ("mask", torch.ones(3, 3, dtype=torch.bool)),
        ("advantages", torch.ones(5)),
        ("advantages", torch.ones(4, 3)),  # token-level advantages would broadcast silently
        ("router_shift", torch.ones(4, 2)),
    ],
)
def test_losses_reject_mismatched_shapes(name, argument, bad_value):
    with pytest.raises(ValueError, match=argument):
        LOSSES[name](**{**valid_inputs(), argument: bad_value})


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_reject_a_mask_that_is_not_boolean(name):
    with pytest.raises((ValueError, TypeError), match="mask"):
        LOSSES[name](**{**valid_inputs(), "mask": torch.full((4, 3), 0.5)})


def test_rspo_requires_router_shift():
    with pytest.raises(ValueError, match="router_shift"):
        rspo_loss(**{**valid_inputs(), "router_shift": None})
    with pytest.raises(ValueError, match="router_shift"):
        policy_loss("rspo", **{**valid_inputs(), "router_shift": None})


def test_policy_loss_rejects_unknown_name_listing_the_choices():
    with pytest.raises(ValueError) as error:
        policy_loss("ppo", **valid_inputs())
    assert all(name in str(error.value) for name in LOSSES)


def valid_router_inputs(n_layers: int = 2, batch: int = 4, n_tokens: int = 3, n_experts: int = 4, top_k: int = 2) -> dict:
    router_logits = torch.randn(n_layers, batch, n_tokens, n_experts, generator=torch.Generator().manual_seed(0))  # (L, B, T, E)
    old_topk_idx, old_topk_logprobs = rollout_router_record(router_logits, top_k)
    return dict(router_logits=router_logits, old_topk_idx=old_topk_idx, old_topk_logprobs=old_topk_logprobs, mask=torch.ones(batch, n_tokens, dtype=torch.bool))


@pytest.mark.parametrize(
    "named, bad_values",
    [
        ("router_logits", dict(router_logits=torch.zeros(4, 3, 4))),
        # T = 2 in the rollout record, 3 in the router logits: either argument may carry the blame.
        ("old_topk_idx|router_logits", dict(old_topk_idx=torch.zeros(2, 4, 2, 2, dtype=torch.int64), old_topk_logprobs=torch.zeros(2, 4, 2, 2))),
        ("old_topk_idx", dict(old_topk_idx=torch.zeros(2, 4, 3, 5, dtype=torch.int64), old_topk_logprobs=torch.zeros(2, 4, 3, 5))),  # K = 5 > E = 4
        ("old_topk_logprobs", dict(old_topk_logprobs=torch.zeros(2, 4, 3, 3))),
        ("mask", dict(mask=torch.ones(4, 2, dtype=torch.bool))),
    ],
)
def test_router_shift_ratio_rejects_mismatched_shapes(named, bad_values):
    with pytest.raises(ValueError, match=named):
        router_shift_ratio(**{**valid_router_inputs(), **bad_values})


def test_router_shift_ratio_rejects_float_expert_indices():
    inputs = valid_router_inputs()
    with pytest.raises((TypeError, ValueError), match="old_topk_idx"):
        router_shift_ratio(**{**inputs, "old_topk_idx": inputs["old_topk_idx"].float()})


def test_router_shift_ratio_rejects_a_mask_that_is_not_boolean():
    with pytest.raises((TypeError, ValueError), match="mask"):
        router_shift_ratio(**{**valid_router_inputs(), "mask": torch.full((4, 3), 0.5)})


# ---------------------------------------------------------------------------------------------------
# Routing record and routing metrics
# ---------------------------------------------------------------------------------------------------

@given(router_cases())
def test_router_logprobs_at_is_the_log_softmax_at_those_experts(router):
    new_logits, old_topk_idx, _, _ = router
    got = router_logprobs_at(new_logits, old_topk_idx)
    want = torch.stack([torch.stack(reference.log_softmax_ref(list(token))) for token in
                        rearrange(new_logits.double(), "l b t e -> (l b t) e")])  # (L·B·T, E)
    want = want.gather(-1, rearrange(old_topk_idx, "l b t k -> (l b t) k"))
    # log p = z - logsumexp(z): the float32 logsumexp of logits up to ~150 (30 · randn) is off by a few u of
    # it, <= ~1e-5 absolute; rtol covers the large |log p| of experts far below the top.
    torch.testing.assert_close(rearrange(got.double(), "l b t k -> (l b t) k"), want, rtol=RTOL, atol=1e-5)


FLOORS = [0.5, 0.75, 0.875]  # exact in float32, so "γ < γ_min" means the same in float32 and float64


@given(st.lists(st.lists(st.one_of(st.just(1.0), st.sampled_from(FLOORS), float32s(0.25, 1.0)), min_size=1, max_size=6), min_size=1, max_size=6).filter(lambda rows: len({len(row) for row in rows}) == 1),
       st.sampled_from(FLOORS), st.integers(0, 2**32 - 1))
def test_router_shift_metrics_match_reference(gammas, gamma_min, seed):
    # γ exactly at the floor is drawn too: it is not floored (γ < γ_min is strict)
    gamma = torch.tensor(gammas)  # (B, T)
    mask = torch.rand(gamma.shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[0, 0] = True  # at least one valid token
    got = router_shift_metrics(gamma, mask, gamma_min)
    want = reference.router_shift_metrics_ref(gamma, mask, gamma_min)
    assert set(got) == set(want)
    # min and the floored share are exact (a value and a count over <= 36 tokens, one division); the mean
    # sums <= 36 values in (0, 1] in float32: off by <= 36 u relative (2e-6), so RTOL is a 50x margin.
    assert float(got["gamma_lowest"]) == want["gamma_lowest"]
    assert math.isclose(float(got["gamma_floored_frac"]), want["gamma_floored_frac"], rel_tol=1e-6)
    assert math.isclose(float(got["gamma_mean"]), want["gamma_mean"], rel_tol=RTOL)


@given(router_cases(masked=True))
def test_routing_consistency_matches_reference(router):
    new_logits, old_topk_idx, _, mask = router
    got = float(routing_consistency(new_logits, old_topk_idx, mask))
    # Counts of pairs over at most 3·3·4 = 36: exact in float32 up to the final division.
    assert got == pytest.approx(reference.routing_consistency_ref(new_logits, old_topk_idx, mask), abs=1e-6)


@given(router_cases(masked=True))
def test_routing_consistency_is_one_for_the_old_router_itself(router):
    new_logits, old_topk_idx, _, mask = router
    shuffled = old_topk_idx.flip(-1)  # order within the K experts does not matter, only the set
    assert float(routing_consistency(new_logits, new_logits.topk(old_topk_idx.shape[-1], dim=-1).indices.flip(-1),
                                     mask)) == (1.0 if mask.any() else 0.0)
    assert float(routing_consistency(new_logits, shuffled, mask)) == float(routing_consistency(new_logits, old_topk_idx, mask))


@given(rewards_by_group())
def test_zero_variance_groups_match_reference(rewards_and_group_size):
    rewards, group_size = rewards_and_group_size
    assert int(zero_variance_groups(torch.tensor(rewards), group_size)) == \
        reference.zero_variance_groups_ref(rewards, group_size)


@given(policy_cases(), st.data())
def test_weighted_losses_and_their_gradients_match_reference(case, data):
    # A rollout correction's stop-gradient weight: per token for GRPO, per sequence for the others (0 included:
    # a masked-out sequence), multiplying each clipped term; the reference multiplies term by term.
    away_from_kinks(case)
    batch, n_tokens = case.inputs["mask"].shape
    shape = (batch, n_tokens) if case.name == "grpo" else (batch,)
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0]) | float32s(0, 2), min_size=math.prod(shape),
                                 max_size=math.prod(shape)))
    weight = torch.tensor(weights).reshape(shape).requires_grad_()  # a gradient must not reach the weight's graph
    output, grad = run_loss(case, weight=weight)
    logprobs = case.inputs["logprobs"].double().requires_grad_()
    terms = reference.sequence_terms_ref(case.name, **{**case.inputs, "logprobs": logprobs, "weight": weight.detach()})
    want = -sum(terms) / len(terms)
    scale = sum(abs(term.item()) for term in terms) / len(terms)
    assert_loss_close(output.loss, want.item(), scale)
    assert_gradient_close(grad, gradient(want, logprobs))
    assert weight.grad is None and not gradient(output.loss, weight).any()


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_reject_a_weight_of_the_wrong_shape(name):
    inputs = valid_inputs()
    if name == "rspo":
        inputs["router_shift"] = torch.ones(4, 3)
    wrong = torch.ones(4) if name == "grpo" else torch.ones(4, 3)  # GRPO weighs tokens, the others sequences
    with pytest.raises(ValueError, match="weight"):
        LOSSES[name](**inputs, weight=wrong)
