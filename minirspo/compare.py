"""The paper's comparison in miniature: `python -m minirspo.compare`.

A grid of RL runs — losses × learning rates × seeds, with RS as a plug-in on GRPO and GSPO, routing
replay and router freezing as the stabilisers RSPO is weighed against, and RSPO at several γ_min
(including the adaptive `auto`) — every run with the same budget (`--max-steps` RL steps from the same
warm start). The warm starts come first (one per seed and model), those not cached trained `--jobs` at a
time; then the runs go out as `python -m minirspo.train` subprocesses, `--jobs` at a time with one torch
thread each. A run that finished is skipped when the grid is started again; one that was interrupted
resumes from its last checkpoint (refused, before anything starts, if the grid's flags for it changed), and
one interrupted before its first checkpoint starts over (--overwrite).

Writes to --out: `runs/NAME/` (each run's metrics.csv, curves.png, checkpoints), one figure per metric
(`reward_mean.png`, `accuracy.png`, ...: mean across seeds with a min–max band, one panel per lr; with --key,
`accuracy_key.png` of the named variants alone) and
`results.md` (final and lowest held-out accuracy mean ± std, steps to a reward gain over the start, collapse counts:
runs whose smoothed reward, or whose held-out accuracy, ended below half of its peak; crash counts: runs
with an evaluation below half the warm start's accuracy, recovered or not). Around each crash the paper's
diagnostics — clip fraction, γ and its floored share, routing consistency — are averaged over the crashed
runs on steps counted from the crash (`crash_window.png` and a table in `results.md`), to see whether router
drift or clipping comes first. Every run writes its resolved configuration to `runs/NAME/config.yaml`, as
`python -m minirspo.train` does.

Examples:
    python -m minirspo.compare                          # the CPU grid, about 80 minutes on 2 cores
    python -m minirspo.compare --preset gpu             # sized for one GPU, about 10 minutes
    python -m minirspo.compare --preset moe-stress      # where the router crashes GRPO: 36 runs, ~1 h on 2 cores
    python -m minirspo.compare --preset engine-mismatch --out docs/results/engine_mismatch/grid   # ~4.5 h, resumable
    python -m minirspo.compare --preset smoke --out /tmp/grid      # two short runs, to try it out
    python -m minirspo.compare --variants rspo grpo --lrs 1e-4 2e-4 --seeds 0 1 2
    python -m minirspo.compare -- --task countdown      # arguments after -- go to every run
"""
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from minirspo.config import RLConfig, parse_config, refuse, validate  # noqa: E402
from minirspo.report import read_metrics, write_grid_results  # noqa: E402
from minirspo.run_folder import check_run_folder, checkpoint_path  # noqa: E402
from minirspo.warmstart import warm_start, warm_start_dir  # noqa: E402
from toy_moe.cli import UsageError, fail, parse_flags, quiet_console, run_main  # noqa: E402

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
    "rspo_gmin0.6": ["--loss", "rspo", "--gamma-min", "0.6"],  # ASCII names: they are typed and name folders
    "rspo_gmin0.9": ["--loss", "rspo", "--gamma-min", "0.9"],
    "rspo_gminauto": ["--loss", "rspo", "--gamma-min", "auto"],
    # the control with no router: every MoE layer replaced by a dense SwiGLU of the same active width (F·K)
    "dense": ["--loss", "grpo", "--pretrain.model.moe-layers"],
    # GMPO's clip window moved as RS's floor moves it: RS with γ ≡ 0.8 up to a constant factor on the objective
    "gmpo_shifted": ["--loss", "gmpo", "--clip-low", "0.177", "--clip-high", "0.623"],
    # the Switch load-balance loss on during RL, at the toy's pretraining α (toy_moe.model: 0.01)
    "grpo+aux": ["--loss", "grpo", "--aux-loss-coef", "0.01"],
}
PAPER_VARIANTS = tuple(VARIANTS)  # the paper's study and its controls
# The engine-mismatch arms (docs/results/engine_mismatch.md): rollouts from an fp8 engine copy, each with a role
FP8 = ["--rollout-precision", "fp8"]
VARIANTS |= {
    "grpo_r32": ["--loss", "grpo", "--rollout-precision", "32"],                   # no mismatch at all
    "grpo_fp8": [*VARIANTS["grpo"], *FP8],                                         # the base
    "grpo_fp8_tis": [*VARIANTS["grpo"], *FP8, "--rollout-is", "token"],            # corrects the ratio
    "grpo_fp8_r3": [*VARIANTS["grpo"], *FP8, "--rollout-routing-replay"],          # removes the flips
    "gmpo_fp8": [*VARIANTS["gmpo"], *FP8],
    "gmpo_fp8_shifted": [*VARIANTS["gmpo_shifted"], *FP8],
    "rspo_fp8": [*VARIANTS["rspo"], *FP8],                                         # γ against π_old (the paper)
    "rspo_fp8_vs_rollout": [*VARIANTS["rspo"], *FP8, "--gamma-reference", "rollout"],
    "rspo_fp8_r3": [*VARIANTS["rspo"], *FP8, "--rollout-routing-replay"],
    "dense_fp8": [*FP8, *VARIANTS["dense"]],  # mismatch, no routing (the dense switch last: it takes a list)
}
ROUTER_FREE = {"dense", "dense_fp8"}  # variants that get none of a preset's router_args
COLOURS = dict(zip(VARIANTS, itertools.cycle(plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])))  # 20, reused


@dataclass
class Preset:
    variants: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    train_args: tuple[str, ...]   # the same budget for every run
    router_args: tuple[str, ...] = ()  # flags for every variant with a router (not the dense control)


PRESETS = {
    # 8 variants × 3 seeds = 24 runs of 300 steps at the default run's settings (lr 1e-4, where RL learns:
    # docs/default_run.md): about 80 minutes on 2 cores. --lrs 1e-4 2e-4 adds the lr where runs start to swing.
    "cpu": Preset(("grpo", "gspo", "gmpo", "rspo", "grpo+rs", "grpo+replay", "grpo+freeze", "rspo_gminauto"),
                  (1e-4,), (0, 1, 2),
                  ("--max-steps", "300", "--eval-every", "25", "--eval-size", "200", "--checkpoint-every", "50")),
    "gpu": Preset(PAPER_VARIANTS, (1e-4, 3e-4, 1e-3), (0, 1, 2),
                  ("--max-steps", "150", "--eval-every", "10", "--eval-size", "500", "--accelerator", "gpu",
                   "--n-prompts", "64")),
    # The router-stress regime of docs/results/moe_stress.md: fine-grained experts (E 32, K 4, F 128: the active
    # width of E 8, K 2, F 256), a 30%-plus warm start, 16 off-policy-heavy updates per rollout (minibatches
    # of 32, 2 epochs), every weight at the default run's lr 1e-4 and the routers alone at 100× (1e-2), so only
    # the router is pushed: the frozen router and the dense model learn here; GRPO crashes. (Until 2026-12-01
    # the preset ran every weight at 2e-4 with routers at 30×, where the dense model dipped too: same page.)
    # Four heads, as when its results were made (the default warm start has eight since). Some variants have
    # seeds 3-5 too (`--seeds 3 4 5 --variants ...`, the commands in that page).
    "moe-stress": Preset(PAPER_VARIANTS, (1e-4,), (0, 1, 2),
                         ("--pretrain.model.n-heads", "4", "--pretrain.model.n-experts", "32",
                          "--pretrain.model.top-k", "4", "--pretrain.model.expert-hidden", "128",
                          "--pretrain.stop-at-accuracy", "0.3",
                          "--minibatch-size", "32", "--ppo-epochs", "2", "--max-steps", "60", "--eval-every", "5",
                          "--eval-size", "200", "--checkpoint-every", "20"),
                         router_args=("--router-lr-scale", "100")),
    # The engine-mismatch grid (issue 25, part 2): 10 arms × 6 seeds with paired warm starts, ≤ 100 RL steps, in
    # the regime of largest mismatch the search found (docs/results/engine_mismatch.md): the fine toy (L 8, E 32,
    # K 4, F 128), 16 updates per rollout, one lr for every weight. ~9 min a run on one core: ~4.5 h on 2 cores,
    # resumable across sessions.
    "engine-mismatch": Preset(("grpo_r32", "grpo_fp8", "grpo_fp8_tis", "grpo_fp8_r3", "gmpo_fp8", "gmpo_fp8_shifted",
                               "rspo_fp8", "rspo_fp8_vs_rollout", "rspo_fp8_r3", "dense_fp8"), (1e-4,), tuple(range(6)),
                              ("--pretrain.model.n-layers", "8", "--pretrain.model.n-experts", "32",
                               "--pretrain.model.top-k", "4", "--pretrain.model.expert-hidden", "128",
                               "--minibatch-size", "32", "--ppo-epochs", "2", "--max-steps", "100",
                               "--eval-every", "10", "--eval-size", "1000", "--checkpoint-every", "10")),
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
        return f"{self.variant}-lr{self.lr:g}-seed{self.seed}"


def run_args(run: Run, preset: Preset, extra: list[str]) -> list[str]:
    """The flags of one run, but --out and --resume: variant, lr, seed, the preset's budget, then `extra`."""
    router_args = () if run.variant in ROUTER_FREE else preset.router_args
    return [*VARIANTS[run.variant], "--lr", str(run.lr), "--seed", str(run.seed), *preset.train_args,
            *router_args, *extra]


def train_flags(args: list[str], run_dir: Path) -> list[str]:
    """All the run's flags: it resumes from its checkpoint, or starts over (a run killed before its first
    checkpoint left a config.yaml and metrics rows of steps it will redo)."""
    again = "--resume" if checkpoint_path(run_dir).is_file() else "--overwrite"
    return [*args, "--out", str(run_dir), again]


def run_grid(runs: list[Run], out: Path, args_of: dict[str, list[str]], jobs: int,
             starts: dict[str, Path] | None = None) -> list[Run]:
    """Run what is not finished yet, `jobs` at a time; return the runs that were launched. `starts`: the warm
    start (model.pt) each run begins from, whose digest done.json records: runs are paired by seed because
    they share a warm start, and one retrained on another machine (a resumed grid on a fresh clone) is
    another model that only its digest tells apart."""
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
                with open(run_dir / "train.log", "a") as log:
                    process = subprocess.Popen([sys.executable, "-m", "minirspo.train", *train_flags(args_of[run.name], run_dir)], env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
                active.append((run, process, time.perf_counter()))
            time.sleep(0.5)
            for entry in [entry for entry in active if entry[1].poll() is not None]:
                run, process, started = entry
                active.remove(entry)
                if process.returncode:
                    raise RuntimeError(f"run {run.name} failed (exit {process.returncode}); see "
                                       f"{out / 'runs' / run.name / 'train.log'}")
                start = (starts or {}).get(run.name)
                (out / "runs" / run.name / "done.json").write_text(json.dumps(
                    {"variant": run.variant, "lr": run.lr, "seed": run.seed,
                     "seconds": time.perf_counter() - started}
                    | ({"warm_start_sha256": file_sha256(start)} if start else {})))
                progress.advance(bar)
    return pending


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def warm_starts(configs: list[RLConfig], jobs: int) -> None:
    """Every warm start the grid needs (one per seed and model; the dense control has its own), made before
    the runs race to train it. Those not cached train `jobs` at a time, each in a process of one torch thread
    (as the runs get) that shows no bar of its own (several live bars would garble one another); a line
    says when each is ready. One at a time, a warm start trains here and shows its bar."""
    needed = {warm_start_dir(config): config for config in configs if not config.model}
    missing = [config for folder, config in needed.items() if not (folder / "model.pt").is_file()]
    if jobs == 1 or len(missing) < 2:
        for config in needed.values():
            warm_start(config)
        return
    console = Console(soft_wrap=True)
    console.print(f"[bold]warm starts:[/] {len(missing)} to train, {min(jobs, len(missing))} at a time "
                  f"({len(needed) - len(missing)} trained earlier)")
    with ProcessPoolExecutor(min(jobs, len(missing)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(warm_start_alone, config) for config in missing]
        for done, future in enumerate(as_completed(futures), 1):
            console.print(f"warm start {done}/{len(missing)} ready: {future.result()}")


def warm_start_alone(config: RLConfig) -> Path:
    """`warm_start` in a worker process: one torch thread, Lightning quiet, its bar and result line dropped."""
    torch.set_num_threads(1)
    quiet_console(verbose=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return warm_start(config)


def write_results(runs: list[Run], out: Path, gain: float, key_variants: tuple[str, ...] = ()) -> str:
    """results.md and the figures (minirspo.report.write_grid_results) of the runs' metrics.csv files."""
    curves: dict[tuple[str, float], list[dict[str, list[float]]]] = {}
    for run in runs:
        curves.setdefault((run.variant, run.lr), []).append(read_metrics(out / "runs" / run.name / "metrics.csv"))
    return write_grid_results(curves, out, gain, COLOURS, key_variants)


# --help's "(default: )" of an empty tuple, said in words
PRESETS_OWN = tyro.conf.arg(help_behavior_hint="(default: the preset's)")


@dataclass
class GridFlags:
    """compare's own flags; those after `--` go to every run unchanged."""

    preset: Literal[tuple(PRESETS)] = "cpu"
    """grid and budget"""
    variants: Annotated[tuple[Literal[tuple(VARIANTS)], ...], PRESETS_OWN] = ()
    """override the preset's variants"""
    lrs: Annotated[tuple[float, ...], PRESETS_OWN] = ()
    """override the preset's learning rates, each > 0"""
    seeds: Annotated[tuple[int, ...], PRESETS_OWN] = ()
    """override the preset's seeds, each >= 0"""
    jobs: int = os.cpu_count() or 1
    """runs in parallel, >= 1; the number of CPU cores unless given"""
    # a right answer is worth 1.0 and a well-formed wrong one 0.1: +0.1 mean reward is ~11 points of sampled accuracy
    reward_gain: float = 0.1
    """'steps to reward ≥ start + gain': the first step whose 5-step mean reward is this much (> 0) above the mean
    of the run's first 5 steps"""
    out: Path = Path("runs/compare")
    """results folder"""
    key: Annotated[tuple[Literal[tuple(VARIANTS)], ...], tyro.conf.arg(help_behavior_hint="(default: none)")] = ()
    """also plot these variants' held-out accuracy alone, to accuracy_key.png (twelve variants in one panel are
    hard to read)"""
    report_only: bool = False
    """train nothing: figures and table from the runs of the grid that already finished"""


def check_flags(flags: GridFlags, argv: list[str]) -> None:
    """The ranges that tyro's types do not say; a refusal names the flag as typed (--lrs, not each run's --lr)."""
    for name in ("variants", "lrs", "seeds", "key"):  # given with no value, a list flag would mean the preset's
        if f"--{name}" in argv and not getattr(flags, name):
            raise UsageError(f"--{name}: got no value; give one or more, or leave --{name} out for the preset's")
    for name, values, ok, accepted in (
            ("lrs", flags.lrs, lambda lr: lr > 0, "expected numbers > 0"),
            ("seeds", flags.seeds, lambda seed: seed >= 0, "expected whole numbers >= 0"),
            # with no free slot the grid would wait forever
            ("jobs", [flags.jobs], lambda jobs: jobs >= 1, "expected a whole number >= 1"),
            ("reward_gain", [flags.reward_gain], lambda gain: gain > 0, "expected a number > 0")):
        for value in values:
            if not ok(value):  # `not`, so that nan is refused too
                refuse(name, value, accepted)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        flags = parse_flags(GridFlags, ours, prog="python -m minirspo.compare", description=__doc__)
        check_flags(flags, ours)
        preset = PRESETS[flags.preset]
        # seed by seed: a grid stopped part-way leaves whole seeds, every arm of each, to compare paired
        runs = [Run(v, lr, s) for s in flags.seeds or preset.seeds for lr in flags.lrs or preset.lrs
                for v in flags.variants or preset.variants]
        args_of = {run.name: run_args(run, preset, train_args) for run in runs}
        configs = check_grid(runs, flags, args_of)
    except UsageError as error:
        fail(error)
    quiet_console(configs[0].verbose)
    started, launched = time.perf_counter(), []
    if flags.report_only:
        runs = [run for run in runs if (flags.out / "runs" / run.name / "done.json").is_file()]
        if not runs:
            fail(f"--report-only: no finished run of this grid in {flags.out / 'runs'}")
    else:
        warm_starts(configs, flags.jobs)
        starts = {run.name: warm_start_dir(config) / "model.pt" for run, config in zip(runs, configs) if not config.model}
        launched = run_grid(runs, flags.out, args_of, flags.jobs, starts)
    table = write_results(runs, flags.out, flags.reward_gain, flags.key)
    Console().print(table)
    Console().print(f"{len(launched)} runs trained in {time.perf_counter() - started:.0f} s; "
                    f"{len(runs) - len(launched)} were already done. Results in {flags.out}")


def check_grid(runs: list[Run], flags: GridFlags, args_of: dict[str, list[str]]) -> list:
    """Every run's configuration, checked before any warm start or run: its flags and model, and that its
    folder holds nothing it would mix with (a run that resumes must have been started with the same flags)."""
    if flags.out.exists() and not flags.out.is_dir():
        raise UsageError(f"--out: got '{flags.out}', which is a file; expected a folder")
    missing = [variant for variant in flags.key if variant not in {run.variant for run in runs}]
    if missing:
        raise UsageError(f"--key: {', '.join(missing)} is not a variant of this grid "
                         f"({', '.join(dict.fromkeys(run.variant for run in runs))})")
    configs = []
    for run in runs:
        run_dir = flags.out / "runs" / run.name
        config = parse_config(train_flags(args_of[run.name], run_dir), prog="python -m minirspo.compare --")
        if not flags.report_only and not (run_dir / "done.json").is_file():
            validate(config)
            check_run_folder(config)
        configs.append(config)
    return configs


if __name__ == "__main__":
    run_main(main)
