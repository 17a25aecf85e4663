"""Every number docs/results/engine_mismatch.md states about the engine-mismatch grid (issue 25, part 2),
regenerated from the shipped per-run files: docs/results/engine_mismatch/grid/runs/*/metrics.csv.

    python benchmarks/engine_mismatch_stats.py            # markdown on stdout: the page's tables

The grid (`python -m minirspo.compare --preset engine-mismatch`): the fine toy (L 8, E 32, K 4, F 128), 16
updates per rollout, lr 1e-4 for every weight, rollouts from an fp8 copy of the weights, 100 RL steps,
held-out accuracy on the same 1000 problems every 10 steps (step 0 is the warm start, step 100 the final
policy). Seeds pair the arms: seed s is one warm start (and one for the dense control) shared by every arm.

What it prints:
- per arm: final held-out accuracy (the primary endpoint), the mean of the evaluations after the start
  (steps 10–100), the lowest (the start included), crashed (an evaluation below half the warm start's,
  report.crash_step) and ended below its warm start; and, as means over RL steps 0–99, the engine's
  mismatch (routing sets that differ, tokens with a flip, KL(μ‖π_old)), the clip fraction, the entropy and
  the load-balance loss (logged at coefficient 0: it measures the expert load, it does not train it);
- the paired comparisons (minirspo.stats) of the final accuracy, seed by seed, with Holm's correction over
  the RS family (RSPO − GMPO, RSPO with γ against the rollout − GMPO, RSPO + R3 − GRPO + R3, RSPO − GMPO with
  the shifted clip window), and the seeds a difference of the observed size needs for 80% power.
Only seeds that every compared arm finished enter a comparison. Reads files only; trains nothing.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

from moe_stress_stats import evaluations, paired_table, window  # noqa: E402  (benchmarks/ is the script's folder)

from minirspo.report import crash_step, read_metrics
from minirspo.stats import paired

GRID = Path("docs/results/engine_mismatch/grid")
# each arm's role (docs/results/engine_mismatch.md); the preset's order
NAMES = {"grpo_r32": "GRPO, float32 rollouts", "grpo_fp8": "GRPO, fp8 rollouts", "grpo_fp8_tis": "GRPO + TIS",
         "grpo_fp8_r3": "GRPO + R3", "gmpo_fp8": "GMPO", "gmpo_fp8_shifted": "GMPO, shifted clip",
         "rspo_fp8": "RSPO (γ vs π_old)", "rspo_fp8_vs_rollout": "RSPO (γ vs rollout)", "rspo_fp8_r3": "RSPO + R3",
         "dense_fp8": "dense, fp8 rollouts"}
RS_FAMILY = (("rspo_fp8", "gmpo_fp8"), ("rspo_fp8_vs_rollout", "gmpo_fp8"), ("rspo_fp8_r3", "grpo_fp8_r3"),
             ("rspo_fp8", "gmpo_fp8_shifted"))
OTHERS = (("grpo_fp8", "grpo_r32"), ("grpo_fp8_tis", "grpo_fp8"), ("grpo_fp8_r3", "grpo_fp8"),
          ("gmpo_fp8", "grpo_fp8"), ("gmpo_fp8_shifted", "gmpo_fp8"))
OVER_TRAINING = {"rollout_routing_mismatch": "sets differ", "rollout_tokens_flipped": "tokens flipped",
                 "rollout_kl": "KL(μ‖π_old)", "clip_frac": "clip frac", "entropy": "entropy", "aux_loss": "load-balance"}
LAST_STEP = 99  # RL steps 0..99; row 100 is the final policy's evaluation


def load(grid: Path) -> dict[str, dict[int, dict]]:
    """{arm: {seed: metrics}} of the runs that finished (done.json), in the preset's arm order; each run's
    metrics also carry "warm_start", the digest of the warm start it began from (done.json), where known."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in sorted((grid / "runs").iterdir()):
        if not (folder / "done.json").is_file():
            continue
        arm, _, seed = folder.name.rpartition("-seed")
        started = json.loads((folder / "done.json").read_text()).get("warm_start_sha256")
        runs.setdefault(arm.rsplit("-lr", 1)[0], {})[int(seed)] = read_metrics(folder / "metrics.csv") | {
            "warm_start": started}
    return {arm: runs[arm] for arm in NAMES if arm in runs}


def outcome(run: dict) -> dict[str, float]:
    """One run's endpoints: the final and warm-start accuracy (1000 problems), the mean of the evaluations
    after the start, the lowest (start included), crashed, ended below its start; and the means over
    training of OVER_TRAINING's metrics (NaN where the run logs none: float32 rollouts record no mismatch)."""
    evaluated = evaluations(run)
    start, final = evaluated[0][1], evaluated[-1][1]
    has_router = "gamma_mean" in run  # the dense control logs a load-balance loss of 0: no experts to balance
    means = {name: window(run, name, 0, LAST_STEP) if name in run and any(not math.isnan(v) for v in run[name])
             and (has_router or name != "aux_loss") else math.nan for name in OVER_TRAINING}
    return {"final": final, "start": start, "mean_heldout": statistics.fmean(a for _, a in evaluated[1:]),
            "lowest": min(a for _, a in evaluated), "crashed": float(crash_step(run) is not None),
            "below_start": float(final < start), **means}


def shown(values: list[float], digits: int = 3) -> str:
    """mean ± std (sample) of the values a run logged; "—" where none did."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "—"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def arm_table(runs: dict[str, dict[int, dict]]) -> str:
    lines = ["| arm | seeds | start | final (1000) | mean held-out, steps 10–100 | lowest | crashed | ended below start |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, seeds in runs.items():
        rows = [outcome(run) for run in seeds.values()]
        lines.append(f"| {NAMES[arm]} | {len(rows)} | " + " | ".join(
            shown([r[key] for r in rows]) for key in ("start", "final", "mean_heldout", "lowest"))
            + f" | {sum(r['crashed'] for r in rows):.0f}/{len(rows)} | {sum(r['below_start'] for r in rows):.0f}/{len(rows)} |")
    lines += ["", "Over RL steps 0–99, mean ± std across seeds of each run's mean:", "",
              "| arm | " + " | ".join(OVER_TRAINING.values()) + " |", "|---|" + "---|" * len(OVER_TRAINING)]
    for arm, seeds in runs.items():
        rows = [outcome(run) for run in seeds.values()]
        lines.append(f"| {NAMES[arm]} | " + " | ".join(shown([r[key] for r in rows], 4) for key in OVER_TRAINING) + " |")
    return "\n".join(lines)


def same_start(a: dict, b: dict) -> bool:
    """Whether two runs began from the same warm start: the pairing. A seed's warm start retrained on another
    machine is another model (a grid resumed on a fresh clone), so a pair whose digests differ is no pair."""
    return a["warm_start"] is None or b["warm_start"] is None or a["warm_start"] == b["warm_start"]


def comparison(runs: dict, first: str, second: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """The seeds both arms finished from the same warm start, and each arm's `key` on them in seed order."""
    seeds = sorted(s for s in set(runs.get(first, {})) & set(runs.get(second, {}))
                   if same_start(runs[first][s], runs[second][s]))
    return seeds, [outcome(runs[first][s])[key] for s in seeds], [outcome(runs[second][s])[key] for s in seeds]


def statistics_table(runs: dict[str, dict[int, dict]]) -> str:
    """Paired statistics of the final accuracy (and of the mean over the run), with Holm's correction over
    the RS family of the paired-t p and of the sign-test p."""
    pairs = [pair for pair in RS_FAMILY + OTHERS if len(comparison(runs, *pair, "final")[0]) >= 2]
    results = {pair: paired(*comparison(runs, *pair, "final")[1:]) for pair in pairs}
    over_run = {pair: paired(*comparison(runs, *pair, "mean_heldout")[1:]) for pair in pairs}
    lines = paired_table(results, over_run, tuple(pair for pair in RS_FAMILY if pair in results), NAMES)
    for pair in pairs:
        _, a, b = comparison(runs, *pair, "final")
        lines.append(f"\n{NAMES[pair[0]]} − {NAMES[pair[1]]}, seed by seed: "
                     + ", ".join(f"{x - y:+.3f}" for x, y in zip(a, b)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=GRID, help="a folder with runs/ (compare's --out)")
    grid = parser.parse_args(argv).grid
    if not (grid / "runs").is_dir():
        parser.exit(2, f"error: --grid: {grid} has no runs/ folder; expected compare's --out\n")
    runs = load(grid)
    if not runs:
        parser.exit(2, f"error: --grid: no finished run in {grid / 'runs'}\n")
    print("## Per arm\n\n" + arm_table(runs))
    print("\n## Paired comparisons (final policy, 1000 problems)\n\n" + statistics_table(runs))


if __name__ == "__main__":
    main()
