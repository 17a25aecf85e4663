"""The Countdown table of docs/results/moe_stress.md, regenerated from the shipped per-run files:
docs/results/moe_stress/countdown/runs/*/metrics.csv.

    python benchmarks/countdown_stats.py            # markdown on stdout

The grid (its command is on the page): GRPO, GSPO, GMPO and RSPO at the default settings on Countdown-lite,
seeds 0-2, 100 RL steps, held-out accuracy on 200 problems every 10 steps and of the final policy (step 100).
Per variant, mean ± std over the seeds: held-out accuracy at the start and the end, the lowest evaluation
(the start included), crashes (an evaluation below half the start, report.crash_step), the sampled reward
over the first and the last 10 RL steps, and γ, routing consistency and the clip fraction over the run (GSPO's
clip fraction counts sequences). Then the paired differences of the final accuracy (minirspo.stats), three
seeds: a direction, not a test. Reads files only; trains nothing.
"""
import argparse
import statistics
from pathlib import Path

from moe_stress_stats import evaluations, mean_std, window  # noqa: E402  (benchmarks/ is the script's folder)

from minirspo.report import crash_step, read_metrics
from minirspo.stats import paired

GRID = Path("docs/results/moe_stress/countdown")
NAMES = {"grpo": "GRPO", "gspo": "GSPO", "gmpo": "GMPO", "rspo": "RSPO"}
PAIRS = (("rspo", "gmpo"), ("gmpo", "grpo"), ("gspo", "grpo"))


def load(grid: Path) -> dict[str, dict[int, dict]]:
    """{variant: {seed: metrics}} of the finished runs, in NAMES' order."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in sorted((grid / "runs").iterdir()):
        if (folder / "done.json").is_file():
            variant, _, seed = folder.name.rpartition("-seed")
            runs.setdefault(variant.rsplit("-lr", 1)[0], {})[int(seed)] = read_metrics(folder / "metrics.csv")
    return {variant: runs[variant] for variant in NAMES if variant in runs}


def outcome(run: dict) -> dict[str, float]:
    """One run's numbers; its RL steps are 0..last, and the row after them is the final policy's evaluation."""
    evaluated = [accuracy for _, accuracy in evaluations(run)]
    last = int(max(run["step"])) - 1
    return {"start": evaluated[0], "final": evaluated[-1], "lowest": min(evaluated),
            "crashed": float(crash_step(run) is not None),
            "reward_first": window(run, "reward_mean", 0, 9),
            "reward_last": window(run, "reward_mean", last - 9, last),
            **{name: window(run, name, 0, last) for name in ("gamma_mean", "routing_consistency", "clip_frac")}}


def table(runs: dict[str, dict[int, dict]]) -> str:
    lines = ["| variant | seeds | held-out accuracy, start → final | lowest | crashed | sampled reward, first → last "
             "10 steps | γ mean | routing consistency | clip fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, seeds in runs.items():
        rows = [outcome(run) for run in seeds.values()]
        column = lambda key: [row[key] for row in rows]  # noqa: E731
        lines.append(f"| {NAMES[variant]} | {len(rows)} | {mean_std(column('start'))} → **{mean_std(column('final'))}** "
                     f"| {mean_std(column('lowest'))} | {sum(column('crashed')):.0f}/{len(rows)} "
                     f"| {statistics.fmean(column('reward_first')):.3f} → {statistics.fmean(column('reward_last')):.3f} | "
                     + " | ".join(f"{statistics.fmean(column(key)):.3f}"
                                  for key in ("gamma_mean", "routing_consistency", "clip_frac")) + " |")
    lines += ["", "| paired, final accuracy | seeds | mean ± std | t (p) | higher / lower / level |", "|---|---|---|---|---|"]
    for first, second in PAIRS:
        if first in runs and second in runs:
            seeds = sorted(set(runs[first]) & set(runs[second]))
            r = paired([outcome(runs[first][s])["final"] for s in seeds], [outcome(runs[second][s])["final"] for s in seeds])
            lines.append(f"| {NAMES[first]} − {NAMES[second]} | {r.n} | {r.mean:+.3f} ± {r.std:.3f} | {r.t:.2f} ({r.p_t:.2f}) "
                         f"| {r.wins} / {r.losses} / {r.ties} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=GRID, help="compare's --out folder, with runs/")
    grid = parser.parse_args(argv).grid
    runs = load(grid) if (grid / "runs").is_dir() else {}
    if not runs:
        parser.exit(2, f"error: --grid: no finished run in {grid / 'runs'}\n")
    print(table(runs))


if __name__ == "__main__":
    main()
