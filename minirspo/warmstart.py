"""The supervised warm start RL begins from: the toy MoE trained on the task's own (prompt, answer) text.

RL needs a policy that sometimes wins: from a random init every group scores 0 and carries no gradient.
The checkpoint is cached under `warmstart_dir/TASK-HASH/model.pt`, HASH covering the task and the whole
pretrain config, so changing any pretrain flag trains a new one and identical runs share it.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

from rich.console import Console

from minirspo.config import RLConfig
from toy_moe.entrypoint import write_config
from toy_moe.pretrain import pretrain

WARM_START_EXAMPLES = 20_000  # (prompt, answer) pairs drawn from the task's train split


def warm_start(config: RLConfig) -> Path:
    """Path of the cached warm-start checkpoint for `config`, pretraining it first if it is missing."""
    settings = json.dumps({"task": config.task, "task_options": config.task_options,
                           **dataclasses.asdict(config.pretrain)}, sort_keys=True)
    out_dir = Path(config.warmstart_dir) / f"{config.task}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
    if (out_dir / "model.pt").is_file():
        Console(soft_wrap=True).print(f"[bold]warm start:[/] {out_dir / 'model.pt'} (trained earlier with these "
                                      "settings)")
    else:
        Console(soft_wrap=True).print(f"[bold]warm start:[/] supervised pretraining of the toy MoE on {config.task}, "
                                      f"{config.pretrain.max_steps} steps -> {out_dir}")
        settings_only = {"task": config.task, "task_options": config.task_options, "seed": config.seed,
                         "warmstart_dir": config.warmstart_dir, "pretrain": config.pretrain}
        write_config(settings_only, out_dir / "config.yaml", rerun="python -m minirspo.train")
        problems = config.build_task().sample(WARM_START_EXAMPLES, seed=config.seed, split="train")
        pretrain([(p.prompt, p.answer) for p in problems], config.pretrain, out_dir)
    return out_dir / "model.pt"
