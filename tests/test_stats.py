"""minirspo.stats against values with known answers: closed forms, a textbook data set, hand-built families.

Tolerances. Everything here is float64. Against a closed form evaluated in float64 the bound is 1e-12
relative: scipy's t and binomial tails are accurate to ~1e-15 relative (Boost/cephes incomplete beta),
and the closed forms take < 10 float64 operations (~1e-15 each), so 1e-12 is a 100× margin; a wrong
formula (wrong degrees of freedom, one-sided instead of two-sided p) moves p by 10% or more. Against a
value printed in a book or by R to k significant digits, the bound is half a unit of the last printed
digit — the rounding of the print, nothing more.
"""
import importlib.util
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from minirspo.stats import differences, holm, paired, paired_t, paired_t_power, seeds_for_power, sign_test

CLOSED_FORM = 1e-12  # relative; see the module docstring

# Student (1908) / Cushny & Peebles (1905): extra hours of sleep under two drugs, 10 patients (R's `sleep`
# data set). R: t.test(extra ~ group, data = sleep, paired = TRUE) prints t = -4.0621, df = 9,
# p-value = 0.002833, mean difference -1.58; here drug 2 − drug 1, so t is positive.
SLEEP_DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_matches_students_sleep_data():
    result = paired(SLEEP_DRUG_2, SLEEP_DRUG_1)
    assert result.n == 10
    assert result.mean == pytest.approx(1.58, abs=1e-12)  # exact decimal data; float64 sum of 10 terms
    assert result.t == pytest.approx(4.0621, abs=0.5e-4)  # R prints 5 significant digits
    assert result.p_t == pytest.approx(0.002833, abs=0.5e-6)
    assert (result.wins, result.losses, result.ties) == (9, 0, 1)  # patient 5: -0.1 under both drugs


def test_paired_t_with_two_degrees_of_freedom_has_a_closed_form():
    # Differences 1, 2, 3: mean 2, sd 1, t = 2/(1/√3) = 2√3. Student's t with 2 df has the cdf
    # F(t) = 1/2 + t / (2√(t² + 2)), so the two-sided p is 1 − t/√(t² + 2) = 1 − 2√3/√14.
    t, p = paired_t([1.0, 2.0, 3.0])
    assert t == pytest.approx(2 * math.sqrt(3), rel=CLOSED_FORM)
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=CLOSED_FORM)


def test_paired_t_is_the_same_test_on_either_order_with_the_sign_flipped():
    forward, backward = paired(SLEEP_DRUG_2, SLEEP_DRUG_1), paired(SLEEP_DRUG_1, SLEEP_DRUG_2)
    assert backward.t == pytest.approx(-forward.t, rel=CLOSED_FORM)
    assert backward.p_t == pytest.approx(forward.p_t, rel=CLOSED_FORM)
    assert (backward.wins, backward.losses) == (forward.losses, forward.wins)


def test_sign_test_six_of_six_is_two_to_the_minus_five():
    # Two-sided: P(6 of 6) + P(0 of 6) = 2 · 2⁻⁶ = 0.03125 — the smallest p six seeds can give.
    assert sign_test([0.1] * 6) == (6, 0, 0, pytest.approx(0.03125, rel=CLOSED_FORM))
    assert sign_test([-0.1] * 6)[3] == pytest.approx(0.03125, rel=CLOSED_FORM)


def test_sign_test_five_of_six_and_ties():
    # 5 of 6: 2 · (C(6,5) + C(6,6)) / 2⁶ = 2 · 7/64 = 0.21875.
    assert sign_test([1, 1, 1, 1, 1, -1])[3] == pytest.approx(14 / 64, rel=CLOSED_FORM)
    # A tie is dropped, not counted against: 5 wins, 1 tie is 5 of 5, p = 2 · 2⁻⁵ = 0.0625.
    assert sign_test([1, 1, 1, 1, 1, 0]) == (5, 0, 1, pytest.approx(0.0625, rel=CLOSED_FORM))
    assert sign_test([0.0, 0.0, 0.0]) == (0, 0, 3, 1.0)  # nothing untied: no evidence


def test_holm_on_a_hand_built_family():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (monotone).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=CLOSED_FORM)
    # Capped at 1, and a family of one is left alone.
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0], rel=CLOSED_FORM)
    assert holm([0.03]) == [0.03]
    assert holm([]) == []


def test_zero_variance_differences():
    same = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # every seed +0.1, up to float rounding of the inputs
    assert same.mean == pytest.approx(0.1, rel=1e-12)
    diffs = [0.1, 0.1, 0.1]  # exactly equal: no standard error, the t → ∞ limit
    assert paired_t(diffs) == (math.inf, 0.0)
    assert paired_t([-0.1, -0.1]) == (-math.inf, 0.0)
    t, p = paired_t([0.0, 0.0, 0.0])  # no difference at all: no evidence
    assert math.isnan(t) and p == 1.0
    level = paired([0.3, 0.4], [0.3, 0.4])
    assert level.ties == 2 and level.p_sign == 1.0 and level.seeds_needed == math.inf
    assert seeds_for_power(math.inf) == 2


def test_refuses_what_a_paired_test_cannot_use():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired([0.5], [0.4])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        differences([], [])
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.5, 0.6, 0.7], [0.4, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        paired([0.5, math.nan], [0.4, 0.5])


def test_seeds_for_power_matches_the_textbook_sample_size():
    # Cohen (1988) / R's pwr.t.test(d = 0.5, power = 0.8, type = "paired"): n = 33.37, so 34 pairs; the
    # power just below and at the answer brackets 0.8.
    assert seeds_for_power(0.5) == 34
    assert paired_t_power(0.5, 33) < 0.8 <= paired_t_power(0.5, 34)
    assert seeds_for_power(-0.5) == 34  # two-sided: the sign of the effect does not matter
    # Larger effects need fewer seeds, never fewer than 2; no effect needs infinitely many.
    assert seeds_for_power(1.0) < seeds_for_power(0.5) and seeds_for_power(50.0) == 2
    assert seeds_for_power(0.0) == math.inf


def test_power_agrees_with_a_simulation():
    # Independent check of the noncentral-t power: draw 20,000 grids of n = 8 normal differences with
    # d_z = 1 and count how often |t| passes the critical value. The count is binomial: its standard
    # error at power ≈ 0.8 is √(0.8·0.2/20000) = 0.0028; 4 standard errors (0.012) bound it with a
    # false-failure chance of 6e-5 (and the seed is fixed). A one-sided or central-t power is off by > 0.05.
    n, trials, effect = 8, 20_000, 1.0
    draws = np.random.default_rng(0).normal(effect, 1.0, size=(trials, n))
    t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / math.sqrt(n))
    critical = 2.364624251592785  # scipy.stats.t.ppf(0.975, 7); printed tables give 2.365
    simulated = float(np.mean(np.abs(t) > critical))
    assert paired_t_power(effect, n) == pytest.approx(simulated, abs=4 * math.sqrt(0.8 * 0.2 / trials))


def test_paired_std_is_the_sample_std_of_the_differences():
    result = paired(SLEEP_DRUG_2, SLEEP_DRUG_1)
    diffs = [a - b for a, b in zip(SLEEP_DRUG_2, SLEEP_DRUG_1)]
    assert result.std == pytest.approx(statistics.stdev(diffs), rel=CLOSED_FORM)
    assert result.std == pytest.approx(1.229995, abs=0.5e-6)  # R: sd(sleep$extra[11:20] - sleep$extra[1:10])


def test_the_router_stress_page_numbers_regenerate_from_the_shipped_runs():
    # docs/results/moe_stress.md quotes benchmarks/moe_stress_stats.py; if a shipped run or the script's
    # definitions change, the page's numbers must be regenerated. Printed to 2–3 decimals there, so half a
    # unit of the last printed digit is the tolerance.
    path = Path(__file__).parents[1] / "benchmarks/moe_stress_stats.py"
    spec = importlib.util.spec_from_file_location("moe_stress_stats", path)
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    runs = page.load(Path(__file__).parents[1] / page.GRID)
    outcomes = [page.outcome(run) for seeds in runs.values() for run in seeds.values()]
    crashed = [o for o in outcomes if o["crashed"]]
    assert (len(outcomes), len(crashed), sum(o["below_start_200"] for o in crashed)) == (69, 28, 20)
    rspo = paired(*page.comparison(runs, "rspo", "gmpo", "final_1000")[1:])
    assert (rspo.n, rspo.wins, rspo.p_sign) == (6, 6, pytest.approx(0.03125, rel=CLOSED_FORM))
    assert rspo.mean == pytest.approx(0.074, abs=0.5e-3) and rspo.t == pytest.approx(2.18, abs=0.5e-2)
    assert rspo.p_t == pytest.approx(0.081, abs=0.5e-3)
    # the control that would explain RS's gain another way: GMPO with the clip window RS's floor moves
    shifted = paired(*page.comparison(runs, "rspo", "gmpo_shifted", "final_1000")[1:])
    assert (shifted.n, shifted.wins, shifted.losses) == (6, 1, 5) and shifted.mean == pytest.approx(-0.005, abs=0.5e-3)
