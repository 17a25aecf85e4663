"""Read a run's metrics.csv back, summarise it in a rich table and plot its curves to PNG."""
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, they never open windows
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

CURVES = (("reward_mean", "reward (sampled)"), ("accuracy", "held-out greedy accuracy"),
          ("entropy", "token entropy (nats)"), ("gamma_mean", "router-shift ratio γ (mean)"),
          ("routing_consistency", "routing consistency"), ("clip_frac", "clip fraction"))


# Columns renamed since: metrics.csv files written before (docs/results/) read under today's names.
RENAMED_COLUMNS = {"gamma_min": "gamma_lowest"}  # the smallest γ, which read as the floor --gamma-min


def read_metrics(path: Path | str) -> dict[str, list[float]]:
    """metrics.csv -> {column: values by step}. A step logged twice (a run resumed from an earlier
    checkpoint re-logs the steps after it) keeps its last row; empty cells read as NaN."""
    by_step: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {RENAMED_COLUMNS.get(key, key): float(value) if value not in ("", None) else math.nan
                      for key, value in row.items()}
            by_step.setdefault(int(values["step"]), {}).update(
                {key: value for key, value in values.items() if not math.isnan(value)})
    steps = sorted(by_step)
    columns = sorted({key for row in by_step.values() for key in row})
    return {column: [by_step[step].get(column, math.nan) for step in steps] for column in columns}


def read_rows(path: Path | str) -> list[dict[str, str]]:
    """metrics.csv's rows as written, one dict of column -> text per row."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path | str, rows: list[dict[str, str]], columns: list[str]) -> None:
    """Write `rows` under the header `columns` (a metrics.csv, or a copy of its rows)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def merge_metrics(earlier: Path | str, later: Path | str) -> None:
    """Prepend the rows of `earlier` that come before `later`'s first step, then delete `earlier`.

    A resumed run copies its earlier rows aside (`earlier`) before Lightning's CSVLogger deletes metrics.csv,
    and moves them back at once (train.keep_rows_before); this recovers them if it was killed in between.
    Rows past the checkpoint (logged before an interruption, then redone) are dropped, so every step appears
    once."""
    if not Path(later).is_file():
        Path(earlier).replace(later)
        return
    later_rows = read_rows(later)
    first = min((int(row["step"]) for row in later_rows), default=None)
    rows = [row for row in read_rows(earlier) if first is None or int(row["step"]) < first] + later_rows
    write_rows(later, rows, list(dict.fromkeys(key for row in rows for key in row)))
    Path(earlier).unlink()


def smoothed(values: list[float], width: int = 5) -> list[float]:
    """Trailing mean over `width` steps (fewer at the start)."""
    return [sum(values[max(0, i - width + 1):i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _window_mean(values: list[float], first: bool, width: int = 10) -> float:
    values = _finite(values)
    window = values[:width] if first else values[-width:]
    return sum(window) / len(window) if window else math.nan


def summary_table(metrics: dict[str, list[float]], title: str) -> Table:
    """Start vs end of a run: means over the first and last 10 logged steps (accuracy: first and last eval)."""
    table = Table(title=title)
    for column in ("metric", "start", "end"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    accuracy = _finite(metrics.get("accuracy", []))
    if accuracy:
        table.add_row("held-out greedy accuracy", f"{accuracy[0]:.3f}", f"{accuracy[-1]:.3f}")
    for name, label in CURVES:
        if name != "accuracy" and name in metrics:
            table.add_row(label + " (10-step mean)", f"{_window_mean(metrics[name], True):.3f}",
                          f"{_window_mean(metrics[name], False):.3f}")
    steps, seconds = metrics["step"], _finite(metrics.get("seconds", []))
    table.add_row("steps / wall time of RL steps", f"{int(steps[0])}", f"{int(steps[-1])} / {sum(seconds):.0f} s")
    rollouts = _finite(metrics.get("rollout_seconds", []))
    if rollouts and sum(seconds):
        table.add_row("  of which sampling the rollouts", "", f"{sum(rollouts):.0f} s ({sum(rollouts) / sum(seconds):.0%})")
    evaluations = _finite(metrics.get("eval_seconds", []))
    if evaluations:  # timed apart from the RL steps, so that `seconds` compares steps alone
        table.add_row("wall time of held-out evaluation", "", f"{sum(evaluations):.0f} s ({len(evaluations)} evals)")
    return table


def plot_curves(metrics: dict[str, list[float]], path: Path | str, title: str = "") -> Path:
    """One panel per curve in CURVES against RL step."""
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    steps = metrics["step"]
    for axis, (name, label) in zip(axes.flat, CURVES):
        values = metrics.get(name, [])
        points = [(s, v) for s, v in zip(steps, values) if not math.isnan(v)]
        if name == "accuracy" and points:
            axis.plot(*zip(*points), marker="o", markersize=3)
        elif points:  # one sampled batch per step is noisy: the raw curve faint, a 10-step trailing mean on top
            x, y = zip(*points)
            axis.plot(x, y, alpha=0.3, color="tab:blue")
            axis.plot(x, smoothed(list(y), width=10), color="tab:blue", label="10-step mean")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("RL step")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
