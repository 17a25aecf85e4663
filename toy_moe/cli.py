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
- `MetricsCSV` is a run's live metrics.csv (CSVLogger's format): a resume keeps the rows of the steps before
  the ones it redoes, and every write replaces the file atomically.
- `StepProgressBar` is a rich progress bar counting the run's own steps (k/N across epochs and resumes), with
  the few metrics the run chooses and no validation bar.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
import tyro
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

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
    # tyro prints its error framed and wrapped to shutil.get_terminal_size(), cutting long tokens (paths) in
    # two; a very wide "terminal" keeps every line whole. tyro 1.0.17 offers no public way to get the text or
    # to give the width (console_outputs=False prints nothing at all; its error hook, tyro._errors, is
    # private), and get_terminal_size reads only $COLUMNS or the real terminal, so COLUMNS is set for the call.
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


# --- Lightning: metrics.csv and the progress bar -------------------------------------------------------
class MetricsCSV(Logger):
    """A run's metrics.csv, in the format Lightning's CSVLogger writes, kept whole across resumes and kills.

    Format (what minirspo.report and the shipped metrics.csv files read): a header of every metric name logged
    plus `step`, sorted; one row per `log_metrics` call, in the order logged, with the step it was logged at;
    an empty cell where a row lacks a metric. A value is written as `str(value)` (a tensor as its `.item()`).

    `keep_steps_before=k` starts the file from the rows of an existing metrics.csv whose step is below k: a
    resumed run redoes steps k and after, so their rows, logged before the interruption, go. With 0 (a fresh
    run) nothing is read, and the first write replaces whatever file is there.

    Every write rewrites the whole file into `metrics.csv.tmp` beside it and renames that over metrics.csv
    (`os.replace`, atomic), so a reader, or a kill at any moment, finds the previous complete file or the new
    one, never half of one (a crash of the whole machine is another matter: nothing is fsync'ed). Each
    `log_metrics` writes at once, so the file is live. Only process 0 writes."""

    def __init__(self, path: Path | str, keep_steps_before: int = 0):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.unwritten = False  # whether self.rows differ from the file
        if keep_steps_before > 0 and self.path.is_file():
            with open(self.path, newline="") as handle:
                earlier = [{name: text for name, text in row.items() if text != ""} for row in csv.DictReader(handle)]
            self.rows = [row for row in earlier if int(row["step"]) < keep_steps_before]
            self.unwritten = len(self.rows) < len(earlier)  # the redone steps' rows leave at the first save

    @property
    def name(self) -> str:
        return "metrics.csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # a run's settings are its config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {name: value.item() if isinstance(value, torch.Tensor) else value for name, value in metrics.items()}
        self.rows.append(row | {"step": len(self.rows) if step is None else step})
        self.unwritten = True
        self.save()

    @rank_zero_only
    def save(self) -> None:
        # The whole file each time: a run logs hundreds to a few thousand rows of about half a kilobyte, a
        # write of a megabyte or two at most, once per step that takes seconds.
        if not self.unwritten:
            return
        columns = sorted({name for row in self.rows for name in row})
        partial = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(partial, self.path)
        self.unwritten = False


class StepProgressBar(ProgressBar):
    """One bar in the run's own steps, k/N, continuing across epochs and after a resume; `metrics(trainer)`
    gives the few values it shows (name -> text). Validation runs without a bar of its own (its result shows
    in the metrics).

    `steps_done(trainer)` counts the steps: `trainer.global_step` counts optimiser steps, which is the
    run's unit for a supervised run but not for RL, where one step makes several optimiser steps.

    Built on Lightning's public ProgressBar hooks and drawn with rich.progress. Lightning calls `disable()` on
    every process but rank 0, which then draws nothing. While the bar is live, rich routes sys.stdout and
    sys.stderr through its display, so a line printed meanwhile with print() (to either), or with rich through
    `print` here, appears above the bar instead of on its line. The bar stops, leaving its last state on
    screen, when fit ends and on any exception, Ctrl-C included (Lightning calls `on_exception` for both)."""

    def __init__(self, description: str, total: int, steps_done: Callable[[Any], int],
                 metrics: Callable[[Any], dict[str, str]]):
        super().__init__()
        self.description, self.total, self.steps_done, self.metrics = description, total, steps_done, metrics
        self.enabled = True
        self.progress: Progress | None = None  # live from on_train_start to the end of fit
        self.task: TaskID | None = None

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    @property
    def is_enabled(self) -> bool:  # LightningModule.print asks, to print through the bar
        return self.enabled

    @property
    def is_disabled(self) -> bool:
        return not self.enabled

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        return self.metrics(trainer)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print with rich (markup, Console.print's arguments): above the bar while it is live, else to stderr.
        Code that prints while the bar is live with a Console of its own must print through this instead: rich
        sends only writes to sys.stdout and sys.stderr through the live display, and another Console writes
        straight to the terminal, onto the bar's line."""
        (self.progress.console if self.progress is not None else Console(stderr=True)).print(*args, **kwargs)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.is_disabled:
            return
        # A resumed run starts at the step its checkpoint restored (global_step is restored before this hook).
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), "•", TimeRemainingColumn(), TextColumn("{task.fields[shown]}"),
                                 console=Console(), refresh_per_second=2)  # the clocks tick in whole seconds
        self.task = self.progress.add_task(self.description, total=self.total, shown="")
        self.progress.start()
        self.show(trainer, pl_module)

    def show(self, trainer, pl_module) -> None:
        """Draw the steps done so far and the chosen metrics (nothing when the bar is not live)."""
        if self.progress is not None:
            shown = " ".join(f"{name}: {value}" for name, value in self.get_metrics(trainer, pl_module).items())
            self.progress.update(self.task, completed=self.steps_done(trainer), shown=shown)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.show(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:  # a fresh accuracy, after the step's batch ended
        self.show(trainer, pl_module)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()  # a final refresh, then stdout and stderr are given back
            self.progress = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.stop()
