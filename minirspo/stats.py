"""Paired statistics for comparing two arms run on the same seeds (the same warm start per seed).

A grid's seeds pair naturally: seed s of arm A and seed s of arm B share a warm start, the prompts and the
sampling seed, so the per-seed difference A_s − B_s removes the warm start's spread (0.19–0.46 held-out
accuracy in docs/results/moe_stress.md), which would otherwise swamp a 0.05 effect. Everything here works
on those differences:

- `paired_t`: Student's paired t (scipy.stats.ttest_rel) — assumes the differences are roughly normal;
- `sign_test`: the exact two-sided sign test (scipy.stats.binomtest) — assumes only that they are
  independent; it cannot reach p < 0.05 with fewer than 6 seeds (6/6 gives 2·2⁻⁶ = 0.03125);
- `holm`: Holm's step-down correction, for a family of comparisons read together;
- `seeds_for_power`: how many seeds a paired t-test needs to detect the observed effect size with 80%
  power at α 0.05 — planned from the observed effect, which overstates a small sample's true effect, so
  it is a lower bound on what a confirmatory grid needs, not a promise.

Nothing here reads files: docs/results/moe_stress.md's numbers come from benchmarks/moe_stress_stats.py.
"""
import math
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats


def differences(first: list[float], second: list[float]) -> list[float]:
    """first_s − second_s seed by seed. Refuses what a paired test cannot use: unequal lengths (a seed
    missing from one arm), fewer than 2 pairs (no spread, so no t), and NaN (a run with no such number)."""
    if len(first) != len(second):
        raise ValueError(f"paired arms need the same seeds: {len(first)} values against {len(second)}")
    if len(first) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {len(first)}")
    if any(math.isnan(v) for v in (*first, *second)):
        raise ValueError("a paired value is NaN: every seed needs a number in both arms")
    return [a - b for a, b in zip(first, second)]


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test on `diffs`, n − 1 degrees of freedom.

    Differences of zero spread have no standard error: identical nonzero ones are the limit t → ±∞,
    p → 0 (every seed moved by exactly the same amount), and all-zero ones carry no evidence (t NaN,
    p 1). scipy returns NaN for both, so they are decided here."""
    spread = statistics.stdev(diffs)
    if spread == 0:
        mean = statistics.fmean(diffs)
        return (math.copysign(math.inf, mean), 0.0) if mean else (math.nan, 1.0)
    result = scipy_stats.ttest_1samp(diffs, 0.0)  # = ttest_rel(first, second): the same test on A − B
    return float(result.statistic), float(result.pvalue)


def sign_test(diffs: list[float]) -> tuple[int, int, int, float]:
    """(seeds where first is higher, lower, level; exact two-sided sign-test p). Ties (a difference of
    exactly 0) are dropped, the usual convention: they say nothing about the direction. With no untied
    seed there is no evidence either way, p = 1."""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    ties = len(diffs) - wins - losses
    p = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return wins, losses, ties, float(p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given (Holm 1979). The i-th smallest of m p-values is scaled
    by m − i (i from 0), kept at least as large as the one before it, and capped at 1. An adjusted p below
    α rejects that comparison with the family-wise error held at α, under any dependence between them."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def paired_t_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs when the differences' mean is `effect` standard
    deviations (Cohen's d_z): the chance that |t| exceeds the critical value, t being noncentral t with
    n − 1 degrees of freedom and noncentrality d_z·√n."""
    df, noncentrality = n - 1, abs(effect) * math.sqrt(n)
    critical = scipy_stats.t.ppf(1 - alpha / 2, df)
    return float(scipy_stats.nct.sf(critical, df, noncentrality) + scipy_stats.nct.cdf(-critical, df, noncentrality))


def seeds_for_power(effect: float, power: float = 0.8, alpha: float = 0.05, most: int = 100_000) -> float:
    """The fewest seeds (≥ 2) whose paired t-test reaches `power` at `alpha` for effect size `effect` (d_z);
    inf for no effect (d_z = 0) or one that needs more than `most` seeds. An infinite d_z (differences of
    zero spread) needs the t-test's minimum, 2."""
    if effect == 0 or math.isnan(effect):
        return math.inf
    if math.isinf(effect):
        return 2
    low, high = 2, 2
    while paired_t_power(effect, high, alpha) < power:  # power grows with n: double, then bisect
        if high >= most:
            return math.inf
        low, high = high, min(2 * high, most)
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if paired_t_power(effect, middle, alpha) < power else (low, middle)
    return high


@dataclass(frozen=True)
class Paired:
    """One paired comparison, first − second over n seeds."""
    n: int
    mean: float         # mean of the per-seed differences
    std: float          # their sample standard deviation (n − 1)
    t: float            # paired t
    p_t: float          # its two-sided p
    wins: int           # seeds where first > second
    losses: int         # seeds where first < second
    ties: int
    p_sign: float       # exact two-sided sign-test p (ties dropped)
    seeds_needed: float  # seeds for 80% power at α 0.05 with the observed d_z = mean / std


def paired(first: list[float], second: list[float]) -> Paired:
    """Every statistic above for first − second, seed by seed (lists in the same seed order)."""
    diffs = differences(first, second)
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    t, p_t = paired_t(diffs)
    wins, losses, ties, p_sign = sign_test(diffs)
    effect = mean / std if std else (math.copysign(math.inf, mean) if mean else 0.0)
    return Paired(len(diffs), mean, std, t, p_t, wins, losses, ties, p_sign, seeds_for_power(effect))
