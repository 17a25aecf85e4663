"""A run folder (--out) is the record of one run: nothing mixes two runs into it, nothing loses one.

A folder is *used* when it holds any of RECORD (config.yaml, metrics.csv, checkpoints/). Before any work:

- `--resume` must continue the same run: the folder's config.yaml, read back as `--config` would read it
  (keys an older file lacks take today's defaults, so fields added since never break a resume), must equal
  this command's configuration in everything but MAY_CHANGE. Otherwise it is refused in one line naming
  each flag that differs, and nothing in the folder is touched: without this check a resume with other
  flags appends a second run's rows to the first one's metrics.csv, and one onto another model dies in a
  state_dict traceback after config.yaml was already rewritten.
- A fresh run into a used folder is refused unless `--overwrite`, which first deletes everything a run
  writes there (RUN_OUTPUTS). Deleting checkpoints/ matters most: Lightning saves beside an existing
  last.ckpt as last-v1.ckpt, and a later --resume would continue the *old* run's last.ckpt.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from minirspo.config import RLConfig, parse_config
from toy_moe.cli import UsageError, as_plain_data, differences

RECORD = ("config.yaml", "metrics.csv", "checkpoints")
# What a run writes into --out (train.run; metrics.csv.tmp is left by a run killed while writing metrics.csv),
# and what earlier versions wrote there (hparams.yaml, metrics.before-resume.csv): a fresh run with --overwrite
# starts without any of it.
RUN_OUTPUTS = (*RECORD, "metrics.csv.tmp", "curves.png", "tensorboard", "hparams.yaml", "metrics.before-resume.csv")
# Settings a resume may change: how long it goes on, how often it saves and evaluates, how much it says;
# resume and overwrite are what this command does, not settings, and out is the folder itself.
MAY_CHANGE = ("max_steps", "checkpoint_every", "eval_every", "verbose", "resume", "overwrite", "out")


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoints" / "last.ckpt"


def is_used(out: str | Path) -> bool:
    return any((Path(out) / name).exists() for name in RECORD)


def check_run_folder(config: RLConfig) -> None:
    """Refuse (UsageError) a run that would mix with or silently replace the run already in config.out."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: got '{out}', which is a file; expected a folder")
    if config.resume and config.overwrite:
        raise UsageError("--resume and --overwrite: choose one (continue the run in --out, or start it over)")
    if config.resume:
        check_same_run(config)
    elif is_used(out) and not config.overwrite:
        held = ", ".join(name for name in RECORD if (out / name).exists())
        raise UsageError(f"--out {out}: already holds a run ({held}); continue it with --resume, start it over "
                         "with --overwrite, or give another --out")


def check_same_run(config: RLConfig) -> None:
    """--resume: the checkpoint exists and the folder's config.yaml equals `config` but for MAY_CHANGE."""
    out, checkpoint = Path(config.out), checkpoint_path(config.out)
    if not checkpoint.is_file():
        raise UsageError(f"--resume: no checkpoint at {checkpoint} to continue from; start without --resume, "
                         "or give the --out of an earlier run")
    recorded_path = out / "config.yaml"
    if not recorded_path.is_file():
        raise UsageError(f"--resume: {out} has a checkpoint but no config.yaml to show which run it belongs to; "
                         "start over with --overwrite")
    try:
        recorded = parse_config(["--config", str(recorded_path)])
    except UsageError as error:
        raise UsageError(f"--resume: {recorded_path} no longer reads as a configuration ({error})") from None
    mine, theirs = as_plain_data(config), as_plain_data(recorded)
    changed = [name for name in differences(theirs, mine) if name.split(".")[0] not in MAY_CHANGE]
    if changed:
        flags = "; ".join(f"--{name.replace('_', '-')} {value(theirs, name)} -> {value(mine, name)}"
                          for name in changed)
        may = ", ".join(f"--{name.replace('_', '-')}" for name in MAY_CHANGE[:4])
        raise UsageError(f"--resume: {out} holds a run with other settings ({flags}); a resume may change only "
                         f"{may}: give the run's own settings, or a new --out for a new run")


def value(plain: dict, dotted: str) -> str:
    """The value at a dotted key of a plain-data config, as a flag would spell it."""
    for key in dotted.split("."):
        plain = plain[key]
    return " ".join(map(str, plain)) if isinstance(plain, list) else str(plain)


def clear_run_folder(out: str | Path) -> None:
    """Delete what a run writes into `out` (RUN_OUTPUTS), leaving anything else there (compare's train.log)."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
