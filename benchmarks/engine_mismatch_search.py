"""The search of docs/results/engine_mismatch.md: does GRPO degrade or crash when its rollouts come from a
low-precision engine (bf16, fp8) where the same run with float32 rollouts does not? One learning rate for every
weight (no router-lr lever).

    .venv/bin/python benchmarks/engine_mismatch_search.py                      # the whole search, 2 runs at a time
    .venv/bin/python benchmarks/engine_mismatch_search.py --report-only        # the table from the shipped runs
    .venv/bin/python benchmarks/engine_mismatch_search.py --controls           # R2, frozen, MIS, GSPO in the regime

Settings: model shape {default toy (L4 E8 K2, F 256), fine (L8 E32 K4, F 128: the same active width)} ×
rollout precision {32, bf16, fp8} × optimiser steps per rollout {4 (the default: 4 minibatches of 64), 16
(minibatches of 32, 2 epochs, as the router-stress preset)}, GRPO at lr 1e-4, seed 0 (one seed: a search, not a
result), ≤ 100 RL steps from the warm start `python -m minirspo.train` makes for that shape, held-out accuracy on
1000 problems every 20 steps and of the final policy. Runs go out through minirspo.compare's scheduler (resumable:
a finished run is skipped, an interrupted one resumes) into --out/runs/SETTING-lr0.0001-seed0/.
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirspo.compare import Run, run_grid  # noqa: E402
from minirspo.config import parse_config  # noqa: E402
from minirspo.report import read_metrics  # noqa: E402
from minirspo.warmstart import warm_start  # noqa: E402

SHAPES = {"default": [],
          "fine": ["--pretrain.model.n-layers", "8", "--pretrain.model.n-experts", "32", "--pretrain.model.top-k", "4",
                   "--pretrain.model.expert-hidden", "128"]}
UPDATES = {4: [], 16: ["--minibatch-size", "32", "--ppo-epochs", "2"]}
PRECISIONS = ("32", "bf16", "fp8")
COMMON = ["--loss", "grpo", "--lr", "1e-4", "--seed", "0", "--max-steps", "100", "--eval-every", "20",
          "--eval-size", "1000", "--checkpoint-every", "20"]


def settings(task: str) -> dict[str, list[str]]:
    """Setting name -> its train flags."""
    task_args = [] if task == "arithmetic" else ["--task", task, "--max-new-tokens", "16"]
    return {f"{task}_{shape}_u{updates}_{precision}": [*COMMON, *task_args, *shape_args, *update_args,
                                                        "--rollout-precision", precision]
            for shape, shape_args in SHAPES.items() for updates, update_args in UPDATES.items()
            for precision in PRECISIONS}


# In the regime of largest mismatch (fine toy, 16 updates per rollout, fp8 rollouts): one seed each of R2, the
# frozen router, MIS and GSPO beside GRPO, as issue 25 asks of the search.
CONTROLS = {"routing_replay_r2": ["--routing-replay"], "frozen_router": ["--freeze-router"],
            "mis_token": ["--rollout-mask", "token"], "gspo": ["--loss", "gspo"]}


def controls(task: str) -> dict[str, list[str]]:
    regime = settings(task)[f"{task}_fine_u16_fp8"]
    return {f"{task}_fine_u16_fp8_{name}": [*regime, *flags] for name, flags in CONTROLS.items()}


def table(out: Path, grid: dict[str, list[str]]) -> str:
    """One row per setting: accuracy (start, final, lowest, mean over the run), crash, and the mismatch."""
    rows = ["| setting | acc start | acc final | acc lowest | acc mean | crash | sets differ | tokens flip | "
            "KL(μ‖π_old) | clip frac | entropy (last 10) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name in grid:
        path = out / "runs" / f"{name}-lr0.0001-seed0" / "metrics.csv"
        if not path.is_file():
            rows.append(f"| {name} | not run yet |||||||||")
            continue
        m = read_metrics(path)
        logged = lambda name: [v for v in m.get(name, []) if not math.isnan(v)]  # noqa: E731  (NaN: not logged that step)
        mean = lambda name: statistics.fmean(logged(name)) if logged(name) else math.nan  # noqa: E731
        accuracy = logged("accuracy")
        crash = "yes" if min(accuracy) < accuracy[0] / 2 else "no"
        last = logged("entropy")[-10:]
        rows.append(f"| {name} | {accuracy[0]:.3f} | {accuracy[-1]:.3f} | {min(accuracy):.3f} | "
                    f"{statistics.fmean(accuracy):.3f} | {crash} | {mean('rollout_routing_mismatch'):.2%} | "
                    f"{mean('rollout_tokens_flipped'):.1%} | {mean('rollout_kl'):.1e} | {mean('clip_frac'):.3f} | "
                    f"{statistics.fmean(last):.2f} |")
    return "\n".join(rows).replace("nan%", "—").replace("nan", "—")


def figure(out: Path, grid: dict[str, list[str]], task: str) -> Path:
    """accuracy-TASK.png: held-out accuracy against RL step, one panel per shape and updates per rollout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys(name.rsplit("_", 1)[0] for name in grid))  # the grid's order: shape, then updates
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True, squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for precision, colour in zip(PRECISIONS, ("black", "tab:blue", "tab:red")):
            path = out / "runs" / f"{panel}_{precision}-lr0.0001-seed0" / "metrics.csv"
            if path.is_file():
                m = read_metrics(path)
                points = [(step, a) for step, a in zip(m["step"], m["accuracy"]) if not math.isnan(a)]
                axis.plot(*zip(*points), marker="o", markersize=3, color=colour, label=f"rollouts {precision}")
        axis.set(title=panel.removeprefix(f"{task}_").replace("_u", ", updates/rollout "), xlabel="RL step")
    axes[0][0].set_ylabel("held-out accuracy (1000 problems)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / f"accuracy-{task}.png"
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/engine_mismatch/search"))
    parser.add_argument("--task", choices=("arithmetic", "countdown"), default="arithmetic")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--only", nargs="+", default=None, help="run these settings only")
    parser.add_argument("--controls", action="store_true",
                        help="instead: R2, frozen router, MIS and GSPO, one seed each, in the fine/16/fp8 regime")
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs there are")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs: got {args.jobs}; expected a whole number >= 1")
    grid = controls(args.task) if args.controls else settings(args.task)
    if args.only:
        unknown = sorted(set(args.only) - set(grid))
        if unknown:
            parser.error(f"--only: no setting {', '.join(unknown)}; the settings are {', '.join(grid)}")
        grid = {name: grid[name] for name in args.only}
    if not args.report_only:
        for flags in {tuple(flags[flags.index("--seed"):]) for flags in grid.values()}:  # one warm start per shape
            warm_start(parse_config([*flags, "--out", str(args.out / "warm")]))
        runs = [Run(name, 1e-4, 0) for name in grid]
        run_grid(runs, args.out, {run.name: grid[run.variant] for run in runs}, args.jobs)
    text = table(args.out, grid)
    kind = "controls" if args.controls else "table"
    (args.out / f"{kind}-{args.task}.md").write_text(text + "\n")
    if not args.controls:
        figure(args.out, grid, args.task)
    print(text)


if __name__ == "__main__":
    main()
