"""Property tests of the rollout corrections in minirspo.loss (TIS, MIS, the mismatch metrics and the losses'
stop-gradient weights) against the naive float64 loops of tests/reference.py, plus hand-built cases with known
answers.

Notation: B sequences, T tokens, L MoE layers, E experts, K top-k; δ = log π_old − log μ per token.

Tolerances. loss.py works in float32 from the same float32 inputs the float64 references read, so each gap is
float32 rounding (u = 6e-8): δ is one float32 subtraction (off by <= u·|δ|), a sequence's Σ δ adds <= T = 6 of
them up to |δ| <= 50 (off by <= 6·50·u = 2e-5 absolute), and exp() turns an absolute error in its argument into
the same relative error: rtol 1e-4 leaves a 5x margin. A keep/drop decision (MIS) can only differ when δ lies
within that error of a bound, so drawn cases closer than 1e-4 (log space) to a bound are rejected.
"""
import math

import pytest
import torch
from einops import rearrange
from hypothesis import assume, given
from hypothesis import strategies as st

from minirspo.loss import rollout_keep_mask, rollout_mismatch_metrics, truncated_is_weights
import reference  # tests/reference.py

RTOL = 1e-4          # float32 against float64, see the module docstring
BOUND_MARGIN = 1e-4  # log-space distance from an MIS bound; 5x the worst float32 error of a sequence's mean δ
EXTREME = 50.0       # e^50 = 5e21: far outside every cap and bound, far inside float32


@st.composite
def rollout_cases(draw):
    """(old_logprobs, rollout_logprobs, mask): ragged masks with all-masked rows, one-token sequences, δ at one
    of several scales with occasional ±50."""
    batch, n_tokens = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens),
                                      min_size=batch, max_size=batch)))                     # (B, T)
    scale = draw(st.sampled_from([1e-3, 0.05, 0.5, 3.0]))
    extremes = draw(st.booleans())
    deltas = [draw(st.sampled_from([-EXTREME, EXTREME])) if extremes and draw(st.integers(0, 4)) == 0
              else scale * draw(st.floats(-1, 1, width=32)) for _ in range(batch * n_tokens)]
    old = torch.tensor(draw(st.lists(st.floats(-8, 0, width=32), min_size=batch * n_tokens,
                                     max_size=batch * n_tokens)))
    old = rearrange(old, "(b t) -> b t", b=batch)                                           # (B, T)
    rollout = old - rearrange(torch.tensor(deltas), "(b t) -> b t", b=batch)                 # (B, T) float32
    return old, rollout, mask


@given(rollout_cases(), st.sampled_from(["token", "sequence"]), st.sampled_from([1.0, 2.0, 5.0]))
def test_truncated_is_weights_match_reference(case, level, cap):
    old, rollout, mask = case
    got = truncated_is_weights(old, rollout, mask, level=level, cap=cap)
    want = torch.tensor(reference.truncated_is_weights_ref(old, rollout, mask, level, cap), dtype=torch.float64)
    assert got.dtype == torch.float32 and not got.requires_grad and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=0)
    assert (got[~mask] == 0).all() and (got <= cap).all()


@given(rollout_cases(), st.sampled_from(["token", "sequence"]), st.sampled_from([(0.5, 2.0), (0.9, 1.1), (1.0, 1.0)]))
def test_rollout_keep_mask_matches_reference(case, level, bounds):
    old, rollout, mask = case
    low, high = bounds
    for deltas in reference.rollout_log_ratios_ref(old, rollout, mask):
        points = deltas if level == "token" else [math.fsum(deltas) / len(deltas)] if deltas else []
        assume(all(min(abs(p - math.log(low)), abs(p - math.log(high))) > BOUND_MARGIN for p in points))
    got = rollout_keep_mask(old, rollout, mask, level=level, low=low, high=high)
    assert got.dtype == torch.bool
    assert got.tolist() == reference.rollout_keep_mask_ref(old, rollout, mask, level, low, high)


@given(rollout_cases(), st.integers(1, 3), st.integers(2, 6), st.data())
def test_rollout_mismatch_metrics_match_reference(case, n_layers, n_experts, data):
    old, rollout, mask = case
    top_k = data.draw(st.integers(1, n_experts))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    router_logits = torch.randn(n_layers, *mask.shape, n_experts, generator=generator)       # (L, B, T, E), no ties
    moved = router_logits + data.draw(st.sampled_from([0.0, 0.3, 3.0])) * torch.randn(router_logits.shape, generator=generator)
    rollout_topk = moved.topk(top_k, dim=-1).indices                                         # (L, B, T, K)
    got = rollout_mismatch_metrics(old, rollout, mask, router_logits, rollout_topk)
    want = reference.rollout_mismatch_metrics_ref(old, rollout, mask, router_logits, rollout_topk)
    assert set(got) == set(want)
    for name in ("rollout_routing_mismatch", "rollout_tokens_flipped"):  # counts over <= 72 items: exact up to one division
        assert got[name].item() == pytest.approx(want[name], rel=1e-6, abs=0), name
    for name in ("rollout_logprob_diff_mean", "rollout_logprob_diff_max"):
        assert got[name].item() == pytest.approx(want[name], rel=RTOL, abs=0), name
    # k3 = (r − 1) − log r cancels to ~u·(|r − 1| + |log r|) per token near r = 1: relative to those magnitudes
    deltas = [d for row in reference.rollout_log_ratios_ref(old, rollout, mask) for d in row]
    k3_scale = sum(abs(math.expm1(d)) + abs(d) for d in deltas) / max(len(deltas), 1)
    assert abs(got["rollout_kl"].item() - want["rollout_kl"]) <= RTOL * k3_scale + 1e-30


def test_truncated_is_by_hand():
    # π_old/μ = e^{0.5}, e^{-1}, e^{2} on three tokens of one sequence and padding after them
    old = torch.tensor([[0.0, -1.0, 0.0, -7.0]])
    rollout = torch.tensor([[-0.5, 0.0, -2.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    token = truncated_is_weights(old, rollout, mask, level="token", cap=2.0)
    assert token[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 2.0, 0.0], rel=1e-6)
    sequence = truncated_is_weights(old, rollout, mask, level="sequence", cap=10.0)  # Π = e^{1.5} = 4.48 < 10
    assert sequence[0].tolist() == pytest.approx([math.exp(1.5)] * 3 + [0.0], rel=1e-6)
    # a long sequence whose product overflows float32 (e^{300}) is capped, not inf
    assert truncated_is_weights(torch.zeros(1, 6), torch.full((1, 6), -EXTREME), torch.ones(1, 6, dtype=torch.bool),
                                level="sequence", cap=2.0).tolist() == [[2.0] * 6]


def test_masked_importance_sampling_by_hand():
    # ratios e^{0.1}, e^{-1}, e^{1}: with bounds 0.5, 2 the last two lie outside (e^{±1} = 0.37, 2.72)
    old = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    rollout = torch.tensor([[-0.1, 0.0, -1.0], [-0.1, 0.1, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert rollout_keep_mask(old, rollout, mask, level="token").tolist() == [[True, False, False], [True, True, False]]
    # geometric means: row 0 e^{0.1/3 − 1/3 + 1/3} = e^{0.033} (kept), row 1 e^{0} (kept, padding still False)
    assert rollout_keep_mask(old, rollout, mask, level="sequence").tolist() == [[True, True, True], [True, True, False]]
    assert rollout_keep_mask(old, rollout, mask, level="sequence", low=0.99, high=1.01).tolist() == [
        [False, False, False], [True, True, False]]


def test_mismatch_is_zero_when_the_rollout_is_the_old_policy():
    logprobs = -torch.rand(3, 5)
    router_logits = torch.randn(2, 3, 5, 4)
    metrics = rollout_mismatch_metrics(logprobs, logprobs.clone(), torch.ones(3, 5, dtype=torch.bool), router_logits,
                                       router_logits.topk(2, dim=-1).indices.flip(-1))  # the same sets, other order
    assert all(value.item() == 0 for value in metrics.values()), metrics


@pytest.mark.parametrize("call", [
    lambda: truncated_is_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), level="word"),
    lambda: truncated_is_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), cap=0.0),
    lambda: rollout_keep_mask(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), low=2.0, high=1.0),
    lambda: rollout_keep_mask(torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(2, 3)),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()
