"""RL on a Mixture-of-Experts LM with RSPO (or GRPO / GSPO / GMPO): `python -m minirspo.train`.

With no arguments it warm-starts the toy MoE on the arithmetic task (a supervised run of about a minute,
cached under --warmstart-dir), then runs RSPO on it for --max-steps RL steps, all on the CPU in about
10 minutes, and ends with a summary table. Everything goes to --out:
    config.yaml      the resolved configuration (--config FILE reruns it)
    metrics.csv      one row per RL step (accuracy, before the step, on evaluation steps) and a last row, step
                     --max-steps, with the final policy's accuracy; also TensorBoard when installed
    curves.png       reward, accuracy, entropy, γ, routing consistency and clip fraction against step
    checkpoints/     last.ckpt (every --checkpoint-every steps and on Ctrl-C) for --resume

Examples:
    python -m minirspo.train                                   # RSPO on arithmetic, CPU, ~10 min
    python -m minirspo.train --loss grpo --out runs/grpo       # the token-level baseline
    python -m minirspo.train --loss grpo --router-shift        # RS weighting as a plug-in on GRPO
    python -m minirspo.train --loss gmpo --routing-replay      # the paper's routing-replay baseline
    python -m minirspo.train --loss gmpo --freeze-router       # ... and router freezing
    python -m minirspo.train --task countdown --lr 3e-4 --max-steps 300
    python -m minirspo.train --out runs/rspo --resume          # continue after Ctrl-C, bit-exactly
    python -m minirspo.train --model toy:runs/warmstart/arithmetic-1a2b3c4d/model.pt --max-steps 20
    python -m minirspo.train --accelerator gpu --precision bf16-mixed --n-prompts 128
    python -m minirspo.train --model hf:PATH --accelerator gpu --precision bf16-mixed   # a local HF MoE
    python -m minirspo.train --model hf:PATH --strategy fsdp2 --devices 8 --precision bf16-mixed  # README
    python -m minirspo.train --config runs/rspo/config.yaml --seed 1 --out runs/rspo-seed1  # one flag changed

The console shows the warm start (its own progress bar and one-line result), then one bar in RL steps
(k/N, with reward, held-out accuracy and γ) and the summary table; --verbose adds Lightning's own messages.
Every run writes its resolved configuration to OUT/config.yaml; --config FILE runs it again, and flags
after --config override the file. An OUT that holds a run is its record: --resume continues it only with
the same settings, and a new run goes elsewhere or starts it over with --overwrite. Bad input is refused
in one line before anything starts.
"""
import dataclasses
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from torch.utils.data import DataLoader, IterableDataset

from minirspo.config import CheckedRun, RLConfig, parse_config, validate
from minirspo.distributed import build_strategy
from minirspo.module import RLModule
from minirspo.policy import HFPolicy, Policy, ToyPolicy
from minirspo.report import plot_curves, read_metrics, summary_table
from minirspo.run_folder import check_run_folder, checkpoint_path, clear_run_folder
from minirspo.warmstart import warm_start
from toy_moe.checkpoint import load_toy_checkpoint
from toy_moe.cli import MetricsCSV, StepProgressBar, UsageError, fail, quiet_console, run_main, write_config


class _Ticks(IterableDataset):
    """The RL loop makes its own data; Lightning only needs something to iterate until max_steps."""

    def __iter__(self):
        while True:
            yield 0


class LatestMetrics(Logger):
    """Keeps the latest value of every metric the RL loop logs (held-out accuracy only comes every
    --eval-every steps), for the progress bar."""

    def __init__(self):
        super().__init__()
        self.latest: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "latest"

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.latest.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def rl_progress_bar(config: RLConfig, latest: LatestMetrics) -> StepProgressBar:
    """One bar in RL steps: one RL step makes `updates_per_step` optimiser steps (trainer.global_step)."""
    def shown(trainer) -> dict[str, str]:
        names = {"reward_mean": "reward", "accuracy": "acc", "gamma_mean": "γ"}
        return {label: f"{latest.latest[name]:.3f}" for name, label in names.items() if name in latest.latest}
    return StepProgressBar("RL", config.max_steps, lambda trainer: trainer.global_step // config.updates_per_step,
                           shown)


class StopOnInterrupt(Callback):
    """First Ctrl-C: finish the current RL step, save last.ckpt, stop. A second Ctrl-C aborts at once.

    Stopping between steps keeps the checkpoint exact: a step cut in half would have applied some of its
    minibatch updates and not others."""

    def __init__(self, checkpoint: Path):
        self.checkpoint, self.requested, self.previous = checkpoint, False, None

    def on_train_start(self, trainer, pl_module):
        def request_stop(signum, frame):
            signal.signal(signal.SIGINT, self.previous)
            self.requested = True
            # through the bar, above its line: a Console of our own would write onto that line
            trainer.progress_bar_callback.print("[yellow]Ctrl-C: finishing this RL step, then saving a checkpoint "
                                                "(Ctrl-C again to abort)")
        self.previous = signal.signal(signal.SIGINT, request_stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.requested:
            trainer.save_checkpoint(self.checkpoint)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        signal.signal(signal.SIGINT, self.previous)


def open_policy(config: RLConfig, checked: CheckedRun) -> Policy:
    """The policy to train: the toy --model that `validate` loaded, an HF --model (its weights load here, after
    every check), or the toy warm-started for this config (trained first if it is not cached)."""
    if checked.model is None:
        return ToyPolicy(*load_toy_checkpoint(warm_start(config, checked.task)))
    if checked.model.toy is not None:
        return ToyPolicy(*checked.model.toy)
    return HFPolicy.from_pretrained(checked.model.hf_dir, logprob_chunk_tokens=config.logprob_chunk_tokens)


def run(config: RLConfig) -> Path:
    """Check `config` (UsageError on bad input), train with it, and return the path of metrics.csv."""
    checked = validate(config)
    out, checkpoint = Path(config.out), checkpoint_path(config.out)
    console = Console(soft_wrap=True, quiet=rank_zero_only.rank != 0)  # one process speaks (torchrun, srun)
    # Process 0 owns the folder; the others (started by Lightning's launcher or torchrun) find it written.
    if rank_zero_only.rank == 0:
        check_run_folder(config)
        if config.overwrite:
            clear_run_folder(out)
        # resume and overwrite are what this command did, not settings: --config FILE must not repeat them
        write_config(dataclasses.replace(config, resume=False, overwrite=False), out / "config.yaml",
                     rerun="python -m minirspo.train", rerun_flags=" --out NEW_FOLDER (or --resume to continue it)")
    policy = open_policy(config, checked)
    module = RLModule(policy, config, checked.task)
    title = f"{config.loss}{' + RS' if config.router_shift and config.loss != 'rspo' else ''} on {config.task}"
    done = (torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
            // config.updates_per_step if config.resume else 0)
    optimiser_steps = f"{config.updates_per_step} optimiser step" + ("s" if config.updates_per_step > 1 else "")
    console.print(f"[bold]RL:[/] {title}, steps {done + 1}..{config.max_steps} (each: {config.n_prompts} prompts × "
                  f"{config.group_size} responses, {optimiser_steps}) -> {out}")
    if config.aux_loss_coef == 0 and policy.is_moe:  # docs/scaling.md: the run says so
        console.print("router load-balance loss is off during RL (--aux-loss-coef 0)")

    latest = LatestMetrics()
    # A resume redoes the steps from `done` on; metrics.csv keeps the rows of the steps before them (all of them,
    # the final row included, when nothing is left to train).
    redo_from = 0 if not config.resume else done if done < config.max_steps else done + 1
    csv_logger = MetricsCSV(out / "metrics.csv", keep_steps_before=redo_from)  # live: a row as it is logged
    loggers = [csv_logger, latest]
    try:
        loggers.append(TensorBoardLogger(out, name="tensorboard", version=""))
    except ModuleNotFoundError:
        pass
    updates = config.updates_per_step
    trainer = L.Trainer(
        accelerator=config.accelerator, devices=config.devices, precision=config.precision,
        strategy=build_strategy(config, policy), num_nodes=config.num_nodes,
        max_steps=config.max_steps * updates, logger=loggers, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoint.parent, every_n_train_steps=config.checkpoint_every * updates,
                                   save_last=True, save_top_k=0),
                   StopOnInterrupt(checkpoint), rl_progress_bar(config, latest)],
        default_root_dir=out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        # checkpoints are taken after a whole RL step, which is the state a resume needs
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        trainer.fit(module, DataLoader(_Ticks(), batch_size=None), ckpt_path=checkpoint if config.resume else None)
    metrics_path = out / "metrics.csv"
    if trainer.is_global_zero:
        metrics = read_metrics(metrics_path)
        plot_curves(metrics, out / "curves.png", title=title)
        console.print(summary_table(metrics, title=f"{title}: {out}"))
    return metrics_path


def main(argv: list[str] | None = None) -> None:
    """Parse and check every flag and file first (one line and exit 2 on bad input: `run` checks before any
    work), then train."""
    try:
        config = parse_config(argv, description=__doc__)
    except UsageError as error:
        fail(error)
    quiet_console(config.verbose)
    torch.set_float32_matmul_precision("high")
    try:
        run(config)
    except (FileNotFoundError, ValueError) as error:  # UsageError, or found only once work began: still one line
        fail(error)


if __name__ == "__main__":
    run_main(main)
