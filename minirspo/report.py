"""Read a run's metrics.csv back, summarise it in a rich table and plot its curves to PNG; for a grid of
runs (`python -m minirspo.compare`), the results table, the crash analysis and the figures across seeds."""
import csv
import math
import statistics
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


# --- a grid of runs (python -m minirspo.compare): its table, crash analysis and figures ------------------
METRICS = ("reward_mean", "accuracy", "entropy", "routing_consistency", "gamma_mean", "clip_frac")
# The paper's diagnostic, read around each crash: does routing drift, or a clipping burst, come first?
DIAGNOSTICS = ("reward_mean", "clip_frac", "gamma_mean", "gamma_floored_frac", "routing_consistency")


def run_summary(metrics: dict[str, list[float]], gain: float) -> dict[str, float]:
    """Final held-out accuracy, the first step whose smoothed reward is `gain` above the run's start (the
    mean of its first 5 steps; NaN if never), and whether the run collapsed: its smoothed reward ended below
    half of its peak. One sampled batch is too noisy to call a start, a peak or a collapse, hence the 5-step
    trailing mean. The gain is relative because the presets start anywhere from 0.15 to 0.35 mean reward."""
    width = 5
    steps, reward = zip(*[(s, r) for s, r in zip(metrics["step"], metrics["reward_mean"]) if not math.isnan(r)])
    reward = smoothed(list(reward), width)  # (the final policy's evaluation row has no reward)
    accuracy = [v for v in metrics["accuracy"] if not math.isnan(v)]
    start = reward[min(width, len(reward)) - 1]  # the trailing mean there covers the first `width` steps
    reached = next((step for step, r in zip(steps, reward) if r >= start + gain), math.nan)
    # A well-formed wrong answer still earns 0.1, so a policy that forgot every sum keeps a reward near 0.1
    # and may never "halve" it; held-out accuracy (first evaluation = the warm start) shows that collapse.
    return {"final_accuracy": accuracy[-1], "lowest_accuracy": min(accuracy), "steps_to_gain": reached,
            "collapsed": float(reward[-1] < 0.5 * max(reward)),
            "accuracy_collapsed": float(accuracy[-1] < 0.5 * max(accuracy)),
            "crashed": float(crash_step(metrics) is not None)}


def crash_step(metrics: dict[str, list[float]]) -> float | None:
    """The first evaluation whose held-out accuracy is below half the warm start's (the first evaluation, at
    step 0), or None: a crash, whether or not the run recovers by its end."""
    evaluated = [(step, a) for step, a in zip(metrics["step"], metrics["accuracy"]) if not math.isnan(a)]
    return next((step for step, a in evaluated[1:] if a < 0.5 * evaluated[0][1]), None)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def results_table(summaries: dict[tuple[str, float], list[dict[str, float]]], gain: float) -> str:
    lines = [f"| variant | lr | final held-out accuracy (mean ± std) | lowest held-out accuracy | steps to reward ≥ "
             f"start + {gain:g} (mean, reached/runs) | reward collapsed/runs | accuracy collapsed/runs | crashed/runs |",
             "|---|---|---|---|---|---|---|---|"]
    for (variant, lr), rows in summaries.items():
        reached = [r["steps_to_gain"] for r in rows if not math.isnan(r["steps_to_gain"])]
        steps = f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(rows)})" if reached else f"— (0/{len(rows)})"
        counts = [f"{sum(int(r[key]) for r in rows)}/{len(rows)}" for key in ("collapsed", "accuracy_collapsed", "crashed")]
        lines.append(f"| {variant} | {lr:g} | {_mean_std([r['final_accuracy'] for r in rows])} | "
                     f"{_mean_std([r['lowest_accuracy'] for r in rows])} | {steps} | {' | '.join(counts)} |")
    return "\n".join(lines)


def crash_window(curves: dict[tuple[str, float], list[dict[str, list[float]]]], before: int = 10, after: int = 10
                 ) -> dict[tuple[str, float], dict[str, list[float]]]:
    """Per variant and lr, the mean over its crashed runs of each DIAGNOSTICS metric at steps crash + k,
    k = −before..after (NaN where no crashed run has that step): does router drift or clipping lead?"""
    windows = {}
    for key, runs in curves.items():
        crashed = [(m, crash_step(m)) for m in runs if crash_step(m) is not None]
        if not crashed:
            continue
        windows[key] = {"runs": [float(len(crashed))]}
        for metric in DIAGNOSTICS:
            column = []
            for offset in range(-before, after + 1):
                values = [m[metric][m["step"].index(c + offset)] for m, c in crashed
                          if metric in m and c + offset in m["step"]]
                values = [v for v in values if not math.isnan(v)]
                column.append(statistics.fmean(values) if values else math.nan)
            windows[key][metric] = column
    return windows


def plot_crash_window(windows, before: int, path: Path, colours: dict[str, tuple]) -> None:
    """One panel per diagnostic, x = RL steps relative to the crash (the first evaluation below half the start)."""
    figure, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4.2 * len(DIAGNOSTICS), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], DIAGNOSTICS):
        for (variant, lr), window in windows.items():
            offsets = range(-before, len(window[metric]) - before)
            axis.plot(offsets, window[metric], color=colours[variant],
                      label=f"{variant} lr {lr:g} ({int(window['runs'][0])} runs)")
        axis.axvline(0, color="grey", linewidth=0.8)
    _finish(figure, axes, DIAGNOSTICS, "RL steps from the crash", path)


def _finish(figure, axes, titles, xlabel: str, path: Path) -> None:
    """Title, label and grid each panel, legend the last, save and close."""
    for axis, title in zip(axes[0], titles):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_metric(curves: dict[tuple[str, float], list[dict[str, list[float]]]], metric: str, path: Path,
                colours: dict[str, tuple]) -> None:
    """Mean across seeds with a min–max band; one panel per learning rate, one colour per variant."""
    lrs = sorted({lr for _, lr in curves})
    figure, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4.2), squeeze=False, sharey=True)
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
    _finish(figure, axes, [f"{metric} — lr {lr:g}" for lr in lrs], "RL step", path)


def _aligned(runs: list[dict[str, list[float]]], metric: str) -> tuple[list[float], list[list[float]]]:
    """Steps where every seed logged `metric`, with the seeds' values at each."""
    per_run = [{s: v for s, v in zip(m["step"], m.get(metric, [])) if not math.isnan(v)} for m in runs]
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    return steps, [[values[s] for values in per_run] for s in steps]


def write_grid_results(curves: dict[tuple[str, float], list[dict[str, list[float]]]], out: Path, gain: float,
                       colours: dict[str, tuple], key_variants: tuple[str, ...] = ()) -> str:
    """results.md and the figures of a grid's runs, `curves[(variant, lr)]` one metrics dict per seed; with
    `key_variants`, also accuracy_key.png: those variants' held-out accuracy. Returns the results table."""
    for metric in METRICS:
        plot_metric(curves, metric, out / f"{metric}.png", colours)
    if key_variants:
        plot_metric({(variant, lr): metrics for (variant, lr), metrics in curves.items() if variant in key_variants},
                    "accuracy", out / "accuracy_key.png", colours)
    summaries = {key: [run_summary(m, gain) for m in metrics] for key, metrics in curves.items()}
    table = results_table(summaries, gain)
    windows = crash_window(curves, before=CRASH_WINDOW, after=CRASH_WINDOW)
    if windows:
        plot_crash_window(windows, CRASH_WINDOW, out / "crash_window.png", colours)
    (out / "results.md").write_text(table + "\n" + crash_table(windows))
    return table


CRASH_WINDOW = 10  # RL steps shown either side of a crash


def crash_table(windows) -> str:
    """The crash window as text: each diagnostic's mean over the 5 steps before the crash and the 5 after."""
    if not windows:
        return ""
    lines = ["", "Around the crashes (mean over crashed runs; steps −5..−1 → 0..4 from the first evaluation below "
             "half the warm start's accuracy; crash_window.png shows ±10):", "",
             "| variant | lr | crashed runs | " + " | ".join(DIAGNOSTICS) + " |", "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
    for (variant, lr), window in windows.items():
        cells = []
        for metric in DIAGNOSTICS:
            before = [v for v in window[metric][CRASH_WINDOW - 5:CRASH_WINDOW] if not math.isnan(v)]
            after = [v for v in window[metric][CRASH_WINDOW:CRASH_WINDOW + 5] if not math.isnan(v)]
            cells.append(" → ".join(f"{statistics.fmean(v):.3f}" if v else "—" for v in (before, after)))
        lines.append(f"| {variant} | {lr:g} | {int(window['runs'][0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
