"""The supervised warm start RL begins from: the toy MoE trained on the task's own (prompt, answer) text.

RL needs a policy that sometimes wins: from a random init every group scores 0 and carries no gradient.
The checkpoint is cached under `warmstart_dir/TASK-HASH/model.pt`, HASH covering the task, the seed and the
whole pretrain config, so changing any of them trains a new one and identical runs share it. `--seed` seeds
the warm start too (its examples and its initialisation), so seeds 0, 1, 2 are independent runs end to end.

The default run stops pretraining at the first evaluation whose held-out greedy accuracy exceeds
`--pretrain.stop-at-accuracy` (docs/default_run.md): on `a+b=` accuracy jumps from ~10% to ~90% within ~100
steps, at a step that varies with the seed (140 to 410 steps were measured), so a fixed step count gives
starts anywhere from 5% to 90%, and RL needs a start that is right on a few problems and wrong on most.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

from rich.console import Console

from minirspo.config import RLConfig
from minirspo.tasks import Task
from toy_moe.cli import write_config
from toy_moe.pretrain import PretrainConfig, pretrain

WARM_START_EXAMPLES = 20_000  # (prompt, answer) pairs drawn from the task's train split


def until(pretrain: PretrainConfig) -> str:
    """How long the warm start trains, in words."""
    if pretrain.stop_at_accuracy is None:
        return f"{pretrain.max_steps} steps"
    return f"until held-out greedy accuracy passes {pretrain.stop_at_accuracy:.0%} (at most {pretrain.max_steps} steps)"


def warm_start_dir(config: RLConfig) -> Path:
    """Where `config`'s warm start is cached: one folder per task, seed and pretrain config."""
    pretrain_config = dataclasses.replace(config.pretrain, seed=config.seed)
    settings = json.dumps({"task": config.task, "task_options": config.task_options,
                           **dataclasses.asdict(pretrain_config)}, sort_keys=True)
    return Path(config.warmstart_dir) / f"{config.task}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"


def warm_start(config: RLConfig, task: Task | None = None) -> Path:
    """Path of the cached warm-start checkpoint for `config`, pretraining it first if it is missing (on examples
    of `task`, `config.build_task()` unless the caller has built it already)."""
    pretrain_config = dataclasses.replace(config.pretrain, seed=config.seed)
    out_dir = warm_start_dir(config)
    if (out_dir / "model.pt").is_file():
        Console(soft_wrap=True).print(f"[bold]warm start:[/] {out_dir / 'model.pt'} (trained earlier with these "
                                      "settings)")
    else:
        Console(soft_wrap=True).print(f"[bold]warm start:[/] supervised pretraining of the toy MoE on {config.task}, "
                                      f"{until(pretrain_config)} -> {out_dir}")
        settings_only = {"task": config.task, "task_options": config.task_options, "seed": config.seed,
                         "warmstart_dir": config.warmstart_dir, "pretrain": pretrain_config}
        problems = (task or config.build_task()).sample(WARM_START_EXAMPLES, seed=config.seed, split="train")
        pretrain([(p.prompt, p.answer) for p in problems], pretrain_config, out_dir,
                 record=lambda: write_config(settings_only, out_dir / "config.yaml", rerun="python -m minirspo.train"))
    return out_dir / "model.pt"


def tutorial_warm_start(folder: Path, fast: bool) -> Path:
    """The checkpoint tutorials 3, 4 and 6 start from, cached in folder/runs/warmstart so that they share it: the
    default run's warm start, or with `fast` (MINIRSPO_FAST=1, what the tests run) 20 steps of it."""
    return warm_start(RLConfig(task="arithmetic", warmstart_dir=str(Path(folder) / "runs" / "warmstart"),
                               pretrain=tutorial_pretrain(fast)))


def tutorial_pretrain(fast: bool) -> PretrainConfig:
    """The default run's warm start (until ~10% of held-out a+b= answers are right), or 20 steps of it."""
    return (PretrainConfig(max_steps=20, eval_every=20, eval_examples=64, progress_bar=False) if fast
            else RLConfig().pretrain)
