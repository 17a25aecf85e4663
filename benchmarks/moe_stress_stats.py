"""Every number docs/results/moe_stress.md states about the preset's grid (routers ×100), regenerated from the
shipped per-run files: docs/results/moe_stress/x100/runs/*/metrics.csv and x100/final_1000.csv.

    python benchmarks/moe_stress_stats.py            # markdown on stdout: the page's tables and checks

What it prints, and the definitions the page uses:
- per variant: final held-out accuracy (the run's own 200 problems, and the final policy on 1000), the
  mean of the evaluations after the start (steps 5–60), the lowest (the start included), crashed (an
  evaluation below half the warm start's, report.crash_step), how many crashed runs end below their warm
  start, and how many runs end collapsed (final below half their best: report.run_summary);
- the paired comparisons (minirspo.stats): final accuracy on 1000 problems, the primary endpoint, seed by
  seed; Holm's correction over the RS family (every comparison that adds RS to a base loss);
- the diagnostics the page reads: approx-KL over RL steps 0–4, entropy over steps 0–59, the load-balance
  loss (logged with its coefficient at 0: it measures the expert load, it does not train it) and its
  timing against the crashes.
Reads files only; trains nothing.
"""
import argparse
import csv
import math
import statistics
from pathlib import Path

from minirspo.report import crash_step, read_metrics, run_summary
from minirspo.stats import Paired, holm, paired

GRID = Path("docs/results/moe_stress/x100")
NAMES = {"grpo": "GRPO", "grpo+replay": "GRPO + routing replay", "grpo+freeze": "GRPO + frozen router",
         "dense": "dense", "gmpo": "GMPO", "rspo": "RSPO (γ_min 0.8)", "rspo_gmin0.6": "RSPO, γ_min 0.6",
         "rspo_gmin0.9": "RSPO, γ_min 0.9", "rspo_gminauto": "RSPO, γ_min auto", "grpo+rs": "GRPO + RS",
         "gspo": "GSPO", "gspo+rs": "GSPO + RS", "gmpo_shifted": "GMPO, shifted clip",
         "grpo+aux": "GRPO + load-balance loss"}
# (first, second): the comparisons the page reads; RS_FAMILY are those that add RS to a base loss, the
# family Holm's correction runs over (read together, they are one question: does RS help?).
# RSPO − shifted-clip GMPO asks whether RS's gain is more than the clip window its floor moves (RS with γ ≡ 0.8).
RS_FAMILY = (("rspo", "gmpo"), ("rspo_gminauto", "gmpo"), ("gspo+rs", "gspo"),
             ("rspo_gmin0.6", "gmpo"), ("rspo_gmin0.9", "gmpo"), ("grpo+rs", "grpo"), ("rspo", "gmpo_shifted"))
OTHERS = (("grpo+freeze", "grpo"), ("grpo+replay", "grpo"), ("gmpo", "grpo"), ("gspo", "grpo"),
          ("gmpo_shifted", "gmpo"), ("grpo+aux", "grpo"))
LOAD_COLLAPSED = 3.0  # load-balance loss: 1 at a balanced load; the frozen router's stays at 1.1–1.4


def load(grid: Path) -> dict[str, dict[int, dict]]:
    """{variant: {seed: run}}, a run being its metrics (report.read_metrics) plus its 1000-problem numbers."""
    final = {row["run"]: row for row in csv.DictReader(open(grid / "final_1000.csv", newline=""))}
    runs: dict[str, dict[int, dict]] = {}
    for folder in sorted((grid / "runs").iterdir()):
        variant, _, seed = folder.name.rpartition("-seed")
        variant = variant.rsplit("-lr", 1)[0]
        metrics = read_metrics(folder / "metrics.csv")
        runs.setdefault(variant, {})[int(seed)] = {
            **metrics, "final_1000": float(final[folder.name]["final_accuracy_1000"]),
            "warm_1000": float(final[folder.name]["warm_start_accuracy_1000"])}
    return runs


def evaluations(run: dict) -> list[tuple[float, float]]:
    """(step, held-out accuracy on 200 problems); the first is the warm start (step 0)."""
    return [(step, a) for step, a in zip(run["step"], run["accuracy"]) if not math.isnan(a)]


def window(run: dict, metric: str, first: int, last: int) -> float:
    """Mean of a per-step metric over RL steps first..last (the final evaluation row has no such value)."""
    values = [v for step, v in zip(run["step"], run[metric]) if first <= step <= last and not math.isnan(v)]
    return statistics.fmean(values)


def outcome(run: dict) -> dict[str, float]:
    """The per-run numbers the page's tables are made of: report.run_summary's (its lowest counts the warm
    start, so a run that never fell below it has its start as its lowest; "collapsed" is the older criterion,
    final accuracy below half the run's best), the mean of the evaluations after the start, and whether the
    run ended below its warm start."""
    summary = run_summary(run, gain=0.1)  # (the gain only sets steps_to_gain, unused here)
    evaluated = evaluations(run)
    return {"final_200": summary["final_accuracy"], "final_1000": run["final_1000"],
            "mean_heldout": statistics.fmean(a for _, a in evaluated[1:]), "lowest": summary["lowest_accuracy"],
            "crashed": summary["crashed"], "collapsed": summary["accuracy_collapsed"],
            "below_start_200": float(summary["final_accuracy"] < evaluated[0][1]),
            "below_start_1000": float(run["final_1000"] < run["warm_1000"])}


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def variant_table(runs: dict[str, dict[int, dict]]) -> str:
    lines = ["| variant | seeds | final (200, in the run) | final (1000) | mean held-out, steps 5–60 | lowest | crashed "
             "| crashed and ended below its warm start (200 / 1000 problems) | ended collapsed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, seeds in runs.items():
        rows = [outcome(run) for run in seeds.values()]
        crashed = [r for r in rows if r["crashed"]]
        count = lambda rs, key: int(sum(r[key] for r in rs))  # noqa: E731
        lines.append(f"| {NAMES[variant]} | {len(rows)} | " + " | ".join(
            mean_std([r[key] for r in rows]) for key in ("final_200", "final_1000", "mean_heldout", "lowest"))
            + f" | {len(crashed)}/{len(rows)} | {count(crashed, 'below_start_200')} / {count(crashed, 'below_start_1000')}"
            f" of {len(crashed)} | {count(rows, 'collapsed')}/{len(rows)} |")
    return "\n".join(lines)


def comparison(runs: dict, first: str, second: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """The seeds both arms ran, and each arm's `key` on them in seed order (paired by warm start)."""
    seeds = sorted(set(runs[first]) & set(runs[second]))
    return seeds, [outcome(runs[first][s])[key] for s in seeds], [outcome(runs[second][s])[key] for s in seeds]


def present(pairs: tuple[tuple[str, str], ...], runs: dict) -> tuple[tuple[str, str], ...]:
    """The comparisons whose two arms both have runs (a grid being extended has some arms only)."""
    return tuple(pair for pair in pairs if pair[0] in runs and pair[1] in runs)


def paired_table(results: dict[tuple[str, str], Paired], over_run: dict[tuple[str, str], Paired],
                 family: tuple[tuple[str, str], ...], names: dict[str, str]) -> list[str]:
    """The markdown table of paired comparisons, in `results`' order: the final accuracy's statistics, Holm's
    correction of the paired-t and sign-test p over `family` (the RS comparisons), and the paired mean
    over the run (`over_run`)."""
    holm_t = dict(zip(family, holm([results[pair].p_t for pair in family])))
    holm_sign = dict(zip(family, holm([results[pair].p_sign for pair in family])))
    lines = ["| comparison | seeds | final (1000), paired mean ± std | paired t (p) | higher / lower / level, sign-test p "
             "| Holm p over the RS family: t / sign | seeds for 80% power | mean held-out over the run, paired |",
             "|---|---|---|---|---|---|---|---|"]
    for pair, r in results.items():
        adjusted = f"{holm_t[pair]:.2f} / {holm_sign[pair]:.2f}" if pair in holm_t else "(not RS)"
        needed = "∞" if math.isinf(r.seeds_needed) else f"{r.seeds_needed:.0f}"
        p_t = "—" if math.isnan(r.p_t) else f"{r.p_t:.3f}" if r.p_t >= 0.001 else "< 0.001"
        lines.append(f"| {names[pair[0]]} − {names[pair[1]]} | {r.n} | {r.mean:+.3f} ± {r.std:.3f} | {r.t:.2f} ({p_t})"
                     f" | {r.wins} / {r.losses} / {r.ties}, {r.p_sign:.3f} | {adjusted} | {needed} "
                     f"| {over_run[pair].mean:+.3f} ± {over_run[pair].std:.3f} |")
    return lines


def statistics_table(runs: dict[str, dict[int, dict]]) -> str:
    """Paired statistics of the final accuracy on 1000 problems (and of the mean over the run), with Holm's
    correction over the RS family, of the paired-t p and of the sign-test p."""
    family, others = present(RS_FAMILY, runs), present(OTHERS, runs)
    results = {pair: paired(*comparison(runs, *pair, "final_1000")[1:]) for pair in family + others}
    over_run = {pair: paired(*comparison(runs, *pair, "mean_heldout")[1:]) for pair in family + others}
    lines = paired_table(results, over_run, family, NAMES)
    six = [pair for pair in family if results[pair].n == 6]
    lines.append(f"\nHolm over the 6-seed RS comparisons alone ({', '.join(a for a, _ in six)}): t "
                 + ", ".join(f"{p:.3f}" for p in holm([results[pair].p_t for pair in six])) + "; sign "
                 + ", ".join(f"{p:.3f}" for p in holm([results[pair].p_sign for pair in six])))
    for pair in family[:2]:
        _, a, b = comparison(runs, *pair, "final_1000")
        diffs = [x - y for x, y in zip(a, b)]
        largest = max(range(len(diffs)), key=lambda i: diffs[i])
        rest = diffs[:largest] + diffs[largest + 1:]
        lines.append(f"{NAMES[pair[0]]} − {NAMES[pair[1]]}, seed by seed: " + ", ".join(f"{d:+.3f}" for d in diffs)
                     + f"; the largest (seed {largest}) is {diffs[largest] / sum(diffs):.0%} of the sum, "
                     f"the mean without it {statistics.fmean(rest):+.3f}")
    return "\n".join(lines)


def moving(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """Every MoE run whose router learns from the reward alone: all but the frozen router, the dense model and
    the arm whose load-balance loss trains the router too (its own line in `load_collapse`)."""
    return [run for variant, seeds in runs.items() if variant not in ("grpo+freeze", "dense", "grpo+aux")
            for run in seeds.values()]


def diagnostics(runs: dict[str, dict[int, dict]]) -> str:
    lines = []
    grpo, frozen = runs["grpo"], runs["grpo+freeze"]
    kl_grpo = [window(grpo[s], "approx_kl", 0, 4) for s in sorted(grpo)]
    kl_frozen = [window(frozen[s], "approx_kl", 0, 4) for s in sorted(frozen)]
    kl_moving = [window(run, "approx_kl", 0, 4) for run in moving(runs)]
    lines.append(f"- approx-KL, RL steps 0–4: GRPO {statistics.fmean(kl_grpo):.3f}, frozen router "
                 f"{statistics.fmean(kl_frozen):.3f} ({statistics.fmean(kl_grpo) / statistics.fmean(kl_frozen):.1f}×; "
                 f"seed by seed " + ", ".join(f"{g / f:.1f}×" for g, f in zip(kl_grpo, kl_frozen)) + "); all "
                 f"{len(kl_moving)} moving-router runs {statistics.fmean(kl_moving):.3f} "
                 f"({statistics.fmean(kl_moving) / statistics.fmean(kl_frozen):.1f}×); dense "
                 f"{statistics.fmean(window(r, 'approx_kl', 0, 4) for r in runs['dense'].values()):.3f}")
    lower = total = 0
    parts = []
    for first, second in present(RS_FAMILY, runs):
        seeds = sorted(set(runs[first]) & set(runs[second]))
        diffs = [window(runs[first][s], "entropy", 0, 59) - window(runs[second][s], "entropy", 0, 59) for s in seeds]
        lower, total = lower + sum(d < 0 for d in diffs), total + len(diffs)
        parts.append(f"{NAMES[first]} − {NAMES[second]} {sum(d < 0 for d in diffs)}/{len(diffs)} "
                     f"(mean {statistics.fmean(diffs):+.3f})")
    lines.append(f"- entropy, mean over RL steps 0–59, lower with RS than without in {lower} of {total} seed pairings: "
                 + "; ".join(parts))
    for first, last in ((0, 4), (0, 9)):
        parts = []
        for a, b in RS_FAMILY[:3]:
            diffs = [window(runs[a][s], "aux_loss", first, last) - window(runs[b][s], "aux_loss", first, last)
                     for s in sorted(runs[a])]
            parts.append(f"{NAMES[a]} − {NAMES[b]} lower on {sum(d < 0 for d in diffs)}/{len(diffs)} seeds "
                         f"(mean {statistics.fmean(diffs):+.2f})")
        lines.append(f"- load-balance loss, mean over RL steps {first}–{last}: " + "; ".join(parts))
    lines.append(load_collapse(runs))
    return "\n".join(lines)


def load_collapse(runs: dict[str, dict[int, dict]]) -> str:
    """When the expert load collapses (the load-balance loss first ≥ LOAD_COLLAPSED) against when the run
    crashes, and whether it tells crashing runs from the others."""
    collapse_steps, crashed, calm = [], [], []
    for run in moving(runs):
        collapse_steps.append(next((s for s, v in zip(run["step"], run["aux_loss"]) if v >= LOAD_COLLAPSED), math.inf))
        (crashed if crash_step(run) is not None else calm).append(window(run, "aux_loss", 0, 9))
    crash_steps = [crash_step(run) for run in moving(runs) if crash_step(run) is not None]
    frozen = [window(run, "aux_loss", 0, 59) for run in runs["grpo+freeze"].values()]
    first = [run["aux_loss"][0] for run in moving(runs)]
    balanced = ""
    if "grpo+aux" in runs:  # the load-balance loss on (α 0.01): does a balanced load prevent the crash?
        trained = list(runs["grpo+aux"].values())
        highest = [max(v for step, v in zip(run["step"], run["aux_loss"]) if step <= 59) for run in trained]
        balanced = (f". With the load-balance loss trained (GRPO + load-balance loss, α 0.01) it never passes "
                    f"{LOAD_COLLAPSED:g} (highest {min(highest):.2f}–{max(highest):.2f}; mean over steps 0–59 "
                    f"{min(window(r, 'aux_loss', 0, 59) for r in trained):.2f}–"
                    f"{max(window(r, 'aux_loss', 0, 59) for r in trained):.2f}), and "
                    f"{sum(crash_step(r) is not None for r in trained)} of its {len(trained)} runs crash anyway")
    return (f"- expert load: the load-balance loss, {min(first):.2f}–{max(first):.2f} at step 0, passes "
            f"{LOAD_COLLAPSED:g} (1 = balanced) by step "
            f"{max(collapse_steps):.0f} in all {len(collapse_steps)} moving-router runs (median step "
            f"{statistics.median(collapse_steps):.0f}); the crashes are first seen at steps "
            f"{min(crash_steps):.0f}–{max(crash_steps):.0f} (the first evaluations, every 5 steps). Mean over "
            f"steps 0–9: crashed runs {statistics.fmean(crashed):.2f} (n {len(crashed)}), moving-router runs that "
            f"did not crash {statistics.fmean(calm):.2f} (n {len(calm)}); the frozen router "
            f"{min(frozen):.2f}–{max(frozen):.2f} over steps 0–59{balanced}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=GRID, help="a folder with runs/ and final_1000.csv")
    runs = load(parser.parse_args(argv).grid)
    print("## Per variant\n\n" + variant_table(runs))
    print("\n## Paired comparisons (final policy, 1000 problems)\n\n" + statistics_table(runs))
    print("\n## Diagnostics\n\n" + diagnostics(runs))


if __name__ == "__main__":
    main()
