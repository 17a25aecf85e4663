"""The paper's comparison in miniature: `python -m minirspo.compare`.

A grid of RL runs — losses × learning rates × seeds, with RS as a plug-in on GRPO and GSPO, routing
replay and router freezing as the stabilisers RSPO is weighed against, and RSPO at several γ_min
(including the adaptive `auto`) — every run with the same budget (`--max-steps` RL steps from the same
warm start). Runs go out as `python -m minirspo.train` subprocesses, `--jobs` at a time with one torch
thread each. A run that finished is skipped when the grid is started again; one that was interrupted
resumes from its last checkpoint.

Writes to --out: `runs/NAME/` (each run's metrics.csv, curves.png, checkpoints), one figure per metric
(`reward_mean.png`, `accuracy.png`, ...: mean across seeds with a min–max band, one panel per lr) and
`results.md` (final held-out accuracy mean ± std, steps to a reward threshold, collapse counts: runs whose
smoothed reward, or whose held-out accuracy, ended below half of its peak). Every run writes its resolved
configuration to `runs/NAME/config.yaml`, as `python -m minirspo.train` does.

Examples:
    python -m minirspo.compare                          # the CPU grid, about 80 minutes on 2 cores
    python -m minirspo.compare --preset gpu             # sized for one GPU, about 10 minutes
    python -m minirspo.compare --preset smoke --out /tmp/grid      # two short runs, to try it out
    python -m minirspo.compare --variants rspo grpo --lrs 1e-4 2e-4 --seeds 0 1 2
    python -m minirspo.compare -- --task countdown      # arguments after -- go to every run
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from minirspo.config import parse_config, validate  # noqa: E402
from minirspo.report import read_metrics, smoothed  # noqa: E402
from minirspo.warmstart import warm_start  # noqa: E402
from toy_moe.entrypoint import UsageError, fail, quiet_console  # noqa: E402

# What each variant adds to `python -m minirspo.train`; the paper's Countdown study and its baselines.
VARIANTS = {
    "grpo": ["--loss", "grpo"],
    "gspo": ["--loss", "gspo"],
    "gmpo": ["--loss", "gmpo"],
    "rspo": ["--loss", "rspo"],
    "grpo+rs": ["--loss", "grpo", "--router-shift"],
    "gspo+rs": ["--loss", "gspo", "--router-shift"],
    "grpo+replay": ["--loss", "grpo", "--routing-replay"],
    "grpo+freeze": ["--loss", "grpo", "--freeze-router"],
    "rspo γmin=0.6": ["--loss", "rspo", "--gamma-min", "0.6"],
    "rspo γmin=0.9": ["--loss", "rspo", "--gamma-min", "0.9"],
    "rspo γmin=auto": ["--loss", "rspo", "--gamma-min", "auto"],
}
METRICS = ("reward_mean", "accuracy", "entropy", "routing_consistency", "gamma_mean", "clip_frac")


@dataclass
class Preset:
    variants: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    train_args: tuple[str, ...]   # the same budget for every run


PRESETS = {
    # 8 variants × 3 seeds = 24 runs of 300 steps at the default run's settings (lr 1e-4, where RL learns:
    # docs/default_run.md): about 80 minutes on 2 cores. --lrs 1e-4 2e-4 adds the lr where runs start to swing.
    "cpu": Preset(("grpo", "gspo", "gmpo", "rspo", "grpo+rs", "grpo+replay", "grpo+freeze", "rspo γmin=auto"),
                  (1e-4,), (0, 1, 2),
                  ("--max-steps", "300", "--eval-every", "25", "--eval-size", "200", "--checkpoint-every", "50")),
    "gpu": Preset(tuple(VARIANTS), (1e-4, 3e-4, 1e-3), (0, 1, 2),
                  ("--max-steps", "150", "--eval-every", "10", "--eval-size", "500", "--accelerator", "gpu",
                   "--n-prompts", "64")),
    "smoke": Preset(("grpo", "rspo"), (1e-4,), (0,),
                    ("--max-steps", "4", "--eval-every", "2", "--eval-size", "32", "--n-prompts", "8",
                     "--minibatch-size", "16")),
}


@dataclass
class Run:
    variant: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.replace(' ', '_').replace('=', '')}-lr{self.lr:g}-seed{self.seed}"


def train_command(run: Run, run_dir: Path, train_args: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "minirspo.train", *VARIANTS[run.variant], "--lr", str(run.lr),
            "--seed", str(run.seed), "--out", str(run_dir), *train_args, *(["--resume"] if resume else [])]


def run_grid(runs: list[Run], out: Path, train_args: list[str], jobs: int) -> list[Run]:
    """Run what is not finished yet, `jobs` at a time; return the runs that were launched."""
    pending = [run for run in runs if not (out / "runs" / run.name / "done.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    active: list[tuple[Run, subprocess.Popen, float]] = []
    queue = list(pending)
    with Progress(console=Console(stderr=True)) as progress:
        bar = progress.add_task(f"{len(runs) - len(pending)} of {len(runs)} runs already done", total=len(pending))
        while queue or active:
            while queue and len(active) < jobs:
                run = queue.pop(0)
                run_dir = out / "runs" / run.name
                run_dir.mkdir(parents=True, exist_ok=True)
                resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
                with open(run_dir / "train.log", "a") as log:
                    process = subprocess.Popen(train_command(run, run_dir, train_args, resume), env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
                active.append((run, process, time.perf_counter()))
            time.sleep(0.5)
            for entry in [entry for entry in active if entry[1].poll() is not None]:
                run, process, started = entry
                active.remove(entry)
                if process.returncode:
                    raise RuntimeError(f"run {run.name} failed (exit {process.returncode}); see "
                                       f"{out / 'runs' / run.name / 'train.log'}")
                (out / "runs" / run.name / "done.json").write_text(json.dumps(
                    {"variant": run.variant, "lr": run.lr, "seed": run.seed,
                     "seconds": time.perf_counter() - started}))
                progress.advance(bar)
    return pending


def run_summary(metrics: dict[str, list[float]], threshold: float) -> dict[str, float]:
    """Final held-out accuracy, first step whose smoothed reward reaches `threshold` (NaN if never), and
    whether the run collapsed: its smoothed reward ended below half of its peak. One sampled batch is too
    noisy to call a peak or a collapse, hence the 5-step trailing mean."""
    reward = smoothed(metrics["reward_mean"])
    accuracy = [v for v in metrics["accuracy"] if not math.isnan(v)]
    reached = next((step for step, r in zip(metrics["step"], reward) if r >= threshold), math.nan)
    # A well-formed wrong answer still earns 0.1, so a policy that forgot every sum keeps a reward near 0.1
    # and may never "halve" it; held-out accuracy (first evaluation = the warm start) shows that collapse.
    return {"final_accuracy": accuracy[-1], "steps_to_threshold": reached,
            "collapsed": float(reward[-1] < 0.5 * max(reward)),
            "accuracy_collapsed": float(accuracy[-1] < 0.5 * max(accuracy))}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def results_table(summaries: dict[tuple[str, float], list[dict[str, float]]], threshold: float) -> str:
    lines = [f"| variant | lr | final held-out accuracy (mean ± std) | steps to reward ≥ {threshold} "
             f"(mean, reached/runs) | reward collapsed/runs | accuracy collapsed/runs |", "|---|---|---|---|---|---|"]
    for (variant, lr), rows in summaries.items():
        reached = [r["steps_to_threshold"] for r in rows if not math.isnan(r["steps_to_threshold"])]
        steps = f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(rows)})" if reached else f"— (0/{len(rows)})"
        collapsed = sum(int(r["collapsed"]) for r in rows)
        forgot = sum(int(r["accuracy_collapsed"]) for r in rows)
        lines.append(f"| {variant} | {lr:g} | {_mean_std([r['final_accuracy'] for r in rows])} | {steps} | "
                     f"{collapsed}/{len(rows)} | {forgot}/{len(rows)} |")
    return "\n".join(lines)


def plot_metric(curves: dict[tuple[str, float], list[dict[str, list[float]]]], metric: str, path: Path) -> None:
    """Mean across seeds with a min–max band; one panel per learning rate, one colour per variant."""
    lrs = sorted({lr for _, lr in curves})
    figure, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4.2), squeeze=False, sharey=True)
    colours = dict(zip(VARIANTS, plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]))
    for axis, lr in zip(axes[0], lrs):
        for (variant, run_lr), runs in curves.items():
            if run_lr != lr:
                continue
            steps, columns = _aligned(runs, metric)
            if not steps:
                continue
            mean = [statistics.fmean(c) for c in columns]
            axis.plot(steps, mean, label=variant, color=colours[variant], marker="o" if metric == "accuracy" else None,
                      markersize=3)
            axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colours[variant],
                              alpha=0.15)
        axis.set_title(f"{metric} — lr {lr:g}", fontsize=10)
        axis.set_xlabel("RL step")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _aligned(runs: list[dict[str, list[float]]], metric: str) -> tuple[list[float], list[list[float]]]:
    """Steps where every seed logged `metric`, with the seeds' values at each."""
    per_run = [{s: v for s, v in zip(m["step"], m.get(metric, [])) if not math.isnan(v)} for m in runs]
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    return steps, [[values[s] for values in per_run] for s in steps]


def write_results(runs: list[Run], out: Path, threshold: float) -> str:
    curves: dict[tuple[str, float], list[dict[str, list[float]]]] = {}
    for run in runs:
        curves.setdefault((run.variant, run.lr), []).append(read_metrics(out / "runs" / run.name / "metrics.csv"))
    for metric in METRICS:
        plot_metric(curves, metric, out / f"{metric}.png")
    summaries = {key: [run_summary(m, threshold) for m in metrics] for key, metrics in curves.items()}
    table = results_table(summaries, threshold)
    (out / "results.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m minirspo.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="grid and budget (default: cpu)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="override the preset's variants")
    parser.add_argument("--lrs", nargs="+", type=float, help="override the preset's learning rates")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the preset's seeds")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs in parallel (default: CPU cores)")
    # the toy warm start samples ~0.15 mean reward (mostly 0.1 for a well-formed wrong sum): 0.2 is a real gain
    parser.add_argument("--reward-threshold", type=float, default=0.2, help="for 'steps to threshold' (0.2)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="results folder (runs/compare)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: figures and table from the runs of the grid that already finished")
    args = parser.parse_args(ours)
    preset = PRESETS[args.preset]
    try:  # the flags every run gets, checked once before any run starts (each run writes its config.yaml)
        run_config = parse_config([*preset.train_args, *train_args], prog="python -m minirspo.compare --")
        if not args.report_only:
            validate(dataclasses.replace(run_config, resume=False))
    except UsageError as error:
        fail(error)
    quiet_console(run_config.verbose)
    runs = [Run(v, lr, s) for v in args.variants or preset.variants for lr in args.lrs or preset.lrs
            for s in args.seeds or preset.seeds]
    train_args = [*preset.train_args, *train_args]
    started, launched = time.perf_counter(), []
    if args.report_only:
        runs = [run for run in runs if (args.out / "runs" / run.name / "done.json").is_file()]
        if not runs:
            raise SystemExit(f"--report-only: no finished run of this grid in {args.out / 'runs'}")
    else:
        if not run_config.model:  # one warm start per seed (--seed seeds it), before the runs race to train it
            for seed in sorted({run.seed for run in runs}):
                warm_start(dataclasses.replace(run_config, seed=seed))
        launched = run_grid(runs, args.out, train_args, args.jobs)
    table = write_results(runs, args.out, args.reward_threshold)
    Console().print(table)
    Console().print(f"{len(launched)} runs trained in {time.perf_counter() - started:.0f} s; "
                    f"{len(runs) - len(launched)} were already done. Results in {args.out}")


if __name__ == "__main__":
    main()
