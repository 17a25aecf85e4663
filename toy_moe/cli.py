"""What the `python -m` entry points share: flags from typed configs, config.yaml, one-line errors, a quiet console.

Used by `python -m toy_moe.pretrain` and `python -m minirspo.train` (toy_moe never imports minirspo, so the
shared pieces live here, below both).

- Flags come from tyro: every dataclass field is a `--dashed-name` flag (nested configs as `--model.d-model`),
  the field's comment or docstring is its help, `Literal` types list their choices, booleans are switches
  (`--resume`, `--no-resume`).
- `--config FILE` reads a config.yaml that an earlier run wrote: its values are spliced into the command line
  where `--config` stands, so every flag after it overrides the file.
- A bad flag ends the program with one line on stderr (tyro's framed message, flattened), exit status 2;
  a bad key or value that came from a config file names the file.
- `run_main` ends a program whose reader went away (`--help | head -3`) quietly, without a traceback.
- Lightning's start-up chatter, tips and library deprecation warnings are silenced unless `--verbose`.
- `StepProgressBar` is Lightning's RichProgressBar counting the run's own steps (k/N across epochs and
  resumes), with the few metrics the run chooses and no validation bar.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import tyro
import yaml
from lightning.pytorch.callbacks import RichProgressBar

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input, reported as one line naming the flag, what was given and what is accepted."""


def fail(error: Exception | str, status: int = 2) -> None:
    """Print `error: ...` as one line on stderr and exit with `status` (argparse's usage-error code)."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(status)


# --- flags ----------------------------------------------------------------------------------------------
def parse_flags(flags_class: type[T], argv: Sequence[str] | None, *, prog: str, description: str,
                default: T | None = None) -> T:
    """`flags_class` from the command line (`--config FILE` expanded first); a bad flag raises UsageError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    description = unwrap(description)
    if "-h" in argv or "--help" in argv:  # help goes to stdout, framed and wrapped for the terminal
        return tyro.cli(flags_class, args=argv, prog=prog, description=description, default=default)
    typed = set(argv)
    argv, origins = expand_config_files(argv)
    captured = io.StringIO()
    # tyro frames its error message and wraps it to the terminal; a very wide "terminal" keeps every line whole
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(flags_class, args=argv, prog=prog, description=description, default=default)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        message = one_line(captured.getvalue()) or f"bad command line: {' '.join(argv)}"
        raise UsageError(name_config_file(message, origins, typed)) from None
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns


def unwrap(text: str) -> str:
    """A docstring's prose paragraphs as one line each (the terminal wraps them); indented lines (examples,
    lists) stay as they are. tyro joins a line to the one before only when it starts with a letter."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        if lines and lines[-1] and line[:1].strip() and not lines[-1][:1].isspace():
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.rstrip())
    return "\n".join(lines)


def one_line(framed: str) -> str:
    """tyro's framed error message as one line: its first paragraph, plus the flag it suggests, if any.
    The frame is box-drawing characters on a UTF-8 stdout and plain indentation otherwise; either way the
    first line is the title, and rules of ─ or - separate the paragraphs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", framed)  # colour codes
    lines = [line.strip().strip("│").strip() for line in text.splitlines()]
    paragraphs: list[list[str]] = [[]]
    for line in [line for line in lines if line][1:]:  # [0] is the title ("Value error")
        if set(line) <= set("─-╭╮╰╯"):
            paragraphs.append([])
        else:
            paragraphs[-1].append(line)
    paragraphs = [paragraph for paragraph in paragraphs if paragraph]
    if not paragraphs:
        return ""
    message = " ".join(paragraphs[0]).split(" Got errors:")[0]
    for paragraph in paragraphs[1:]:
        if paragraph[0].startswith("Perhaps you meant") and len(paragraph) > 1:
            message += f" (did you mean {paragraph[1].split()[0]}?)"
    return message


def name_config_file(message: str, origins: dict[str, Path], typed: set[str]) -> str:
    """`message` prefixed by `--config FILE: ` when the first flag it names came from FILE, not the command
    line ("Unrecognized options: --foo" says nothing of where --foo was written)."""
    for flag in re.findall(r"--[\w.-]+", message):
        if flag in origins and flag not in typed:
            return f"--config {origins[flag]}: {message}"
    return message


# --- config.yaml ----------------------------------------------------------------------------------------
def expand_config_files(argv: list[str]) -> tuple[list[str], dict[str, Path]]:
    """Replace each `--config FILE` (or `--config=FILE`) by the flags that FILE's values stand for; also
    return which file each of those flags came from."""
    expanded, origins, rest = [], {}, list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--config" or token.startswith("--config="):
            if token == "--config" and not rest:
                raise UsageError("--config: expected a FILE (a config.yaml written by an earlier run)")
            path = Path(token.partition("=")[2] if "=" in token else rest.pop(0))
            flags = config_file_flags(path)
            origins |= {flag: path for flag in flags if flag.startswith("--")}
            expanded += flags
        else:
            expanded.append(token)
    return expanded, origins


def config_file_flags(path: str | Path) -> list[str]:
    """The command-line flags equivalent to a config.yaml: `n_prompts: 8` -> `--n-prompts 8`, nested
    mappings as `--pretrain.max-steps`, booleans as switches, lists as several values."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: {'is a directory' if path.is_dir() else 'no such file'}; "
                         "expected a config.yaml written by an earlier run")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: not valid YAML ({type(error).__name__})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    return _as_flags(values, prefix="")


def _as_flags(values: dict, prefix: str) -> list[str]:
    flags = []
    for key, value in values.items():
        name = prefix + str(key).replace("_", "-")
        if isinstance(value, dict):
            flags += _as_flags(value, prefix=f"{name}.")
        elif isinstance(value, bool):  # tyro's switches: --resume / --no-resume, --model.no-router-fp32
            flags.append(f"--{name}" if value else f"--{prefix}no-{name.removeprefix(prefix)}")
        elif isinstance(value, (list, tuple)):
            flags += [f"--{name}", *map(str, value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


def as_plain_data(config: Any) -> Any:
    """A (nested) dataclass, or a dict of them, as dicts, lists and scalars, which yaml.safe_dump writes."""
    if dataclasses.is_dataclass(config):
        return {field.name: as_plain_data(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, dict):
        return {key: as_plain_data(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [as_plain_data(item) for item in config]
    return config


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted names (`lr`, `pretrain.model.n_heads`) whose values differ between two configs given as
    plain data (`as_plain_data`), nested mappings compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [name for key in dict.fromkeys([*old, *new])
                for name in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def write_config(config: Any, path: Path | str, rerun: str, rerun_flags: str = "") -> Path:
    """Write `config` to `path` as YAML, headed by the command that reruns it (`rerun --config path`, then
    `rerun_flags`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# The resolved configuration of this run. Rerun it with:\n#   {rerun} --config {path}{rerun_flags}\n"
    path.write_text(header + yaml.safe_dump(as_plain_data(config), sort_keys=False, allow_unicode=True))
    return path


# --- console --------------------------------------------------------------------------------------------
def run_main(main: Callable[[], Any]) -> None:
    """Run a program's `main`. If the reader of its output goes away (`--help | head -3`), end quietly with
    status 1 instead of a BrokenPipeError traceback; stdout then points at devnull, so that the interpreter's
    last flush at exit does not fail again (the recipe of Python's `signal` module documentation)."""
    try:
        try:
            main()
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def quiet_console(verbose: bool) -> None:
    """Unless `verbose`: no Lightning start-up lines ("GPU available", tips, "`Trainer.fit` stopped") and no
    library warnings (deprecations inside Lightning and torch, data-loader advice that does not apply)."""
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


class StepProgressBar(RichProgressBar):
    """One bar in the run's own steps, k/N, continuing across epochs and after a resume; `metrics(trainer)`
    gives the few values it shows. Validation runs without a bar of its own (its result shows in the metrics).

    `steps_done(trainer)` counts the steps: `trainer.global_step` counts optimiser steps, which is the
    run's unit for a supervised run but not for RL, where one step makes several optimiser steps."""

    def __init__(self, description: str, total: int, steps_done: Callable[[Any], int],
                 metrics: Callable[[Any], dict[str, str]]):
        super().__init__()
        self.description, self.total, self.steps_done, self.metrics = description, total, steps_done, metrics

    @property
    def total_train_batches(self) -> int:
        return self.total

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's "Epoch 0/-2"
        return self.description

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None:  # one bar for the whole run, not one per epoch
            super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, self.steps_done(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, self.steps_done(trainer))

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        return self.metrics(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        pass

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        pass
