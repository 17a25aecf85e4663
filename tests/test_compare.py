"""The comparison grid on a two-run tiny grid: it trains, writes figures and a table that agrees with the
runs' own CSVs, and a second invocation skips finished runs."""
import dataclasses
import math
import re

import pytest
import torch

from minirspo.compare import PRESETS, ROUTER_FREE, Preset, Run, main, run_args, train_flags
from minirspo.config import parse_config, validate
from minirspo.report import crash_step, crash_window, read_metrics, run_summary, smoothed
from toy_moe.model import ToyMoE, ToyMoEConfig
from minirspo.warmstart import warm_start, warm_start_dir
from toy_moe.checkpoint import save_toy_checkpoint

TINY = ToyMoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=32, max_seq_len=64)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    torch.manual_seed(0)
    checkpoint = save_toy_checkpoint(ToyMoE(TINY), None, root / "model.pt")
    argv = ["--preset", "smoke", "--out", str(root / "out"), "--jobs", "2", "--variants", "grpo", "rspo",
            "--lrs", "1e-3", "--", "--model", f"toy:{checkpoint}", "--max-steps", "3", "--n-prompts", "4", "--group-size", "4",
            "--minibatch-size", "8", "--eval-size", "8", "--eval-every", "1", "--max-new-tokens", "4"]
    main(argv)
    return root / "out", argv


def test_grid_writes_every_run_figure_and_table(grid):
    out, _ = grid
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert runs == ["grpo-lr0.001-seed0", "rspo-lr0.001-seed0"]
    for run in runs:
        assert (out / "runs" / run / "done.json").is_file()
        assert read_metrics(out / "runs" / run / "metrics.csv")["step"] == [0.0, 1.0, 2.0, 3.0]
        # each run writes its resolved config as `python -m minirspo.train` does, and it reruns the run
        config = parse_config(["--config", str(out / "runs" / run / "config.yaml")])
        assert (config.loss, config.lr, config.seed, config.max_steps, config.out) == (
            run.split("-")[0], 1e-3, 0, 3, str(out / "runs" / run))
    for metric in ("reward_mean", "accuracy", "entropy", "routing_consistency", "gamma_mean", "clip_frac"):
        assert (out / f"{metric}.png").stat().st_size > 5_000


def test_table_numbers_equal_what_the_csvs_hold(grid):
    out, _ = grid
    table = (out / "results.md").read_text().split("\n\n")[0]  # the crash table, if any, follows a blank line
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["grpo", "rspo"]
    for row in rows:
        metrics = read_metrics(out / "runs" / f"{row[0].strip()}-lr0.001-seed0" / "metrics.csv")
        accuracy = [v for v in metrics["accuracy"] if not math.isnan(v)]
        assert row[2].strip() == f"{accuracy[-1]:.3f} ± 0.000" and row[3].strip() == f"{min(accuracy):.3f} ± 0.000"
        summary = run_summary(metrics, gain=0.1)
        assert [cell.strip() for cell in row[5:]] == [
            f"{int(summary[key])}/1" for key in ("collapsed", "accuracy_collapsed", "crashed")]


def test_a_second_invocation_skips_finished_runs(grid, capsys):
    out, argv = grid
    before = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/metrics.csv")}
    main(argv)
    assert "0 runs trained" in capsys.readouterr().out
    assert before == {path: path.stat().st_mtime_ns for path in out.glob("runs/*/metrics.csv")}


def test_report_only_uses_the_finished_runs_and_trains_nothing(grid, capsys):
    out, argv = grid
    (out / "results.md").unlink()
    main(["--report-only", *argv[:argv.index("--")]])
    assert "0 runs trained" in capsys.readouterr().out and (out / "results.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--report-only", "--preset", "smoke", "--out", str(out / "empty")])
    assert exit_info.value.code == 2 and "no finished run" in capsys.readouterr().err


def test_key_plots_only_the_named_variants(grid, monkeypatch):
    out, argv = grid
    plotted = {}
    monkeypatch.setattr("minirspo.report.plot_metric",
                        lambda curves, metric, path, colours: plotted.__setitem__(path.name, sorted(curves)))
    main(["--report-only", *argv[:argv.index("--")]])
    assert "accuracy_key.png" not in plotted and plotted["accuracy.png"] == [("grpo", 1e-3), ("rspo", 1e-3)]
    main(["--report-only", "--key", "rspo", *argv[:argv.index("--")]])
    assert plotted["accuracy_key.png"] == [("rspo", 1e-3)]


BAD_INPUT = [
    (["--", "--n-prompts", "0"], "--n-prompts"),   # a run's own flag
    (["--jobs", "0"], "--jobs: got 0; expected a whole number >= 1"),  # would wait for a free slot forever
    (["--lrs", "-1"], "--lrs: got -1.0; expected numbers > 0"),  # the flag typed, not the --lr each run gets
    (["--lrs", "1e-4", "0"], "--lrs: got 0.0; expected numbers > 0"),  # every value is checked, not the first
    (["--lrs", "fast"], "--lrs: Could not find valid parse for arguments: ['fast']"),
    (["--lr", "1e-4"], "Unrecognized options: --lr, 1e-4 (did you mean --lrs?)"),
    (["--seeds", "-1"], "--seeds: got -1; expected whole numbers >= 0"),
    (["--seeds", "1.5"], "--seeds: Could not find valid parse for arguments: ['1.5']"),
    (["--reward-gain", "0"], "--reward-gain: got 0.0; expected a number > 0"),
    (["--reward-gain", "nan"], "--reward-gain: got nan; expected a number > 0"),
    (["--variants", "ppo"], "invalid choice 'ppo' for argument '--variants'"),
    (["--key", "dense"], "--key: dense is not a variant of this grid (grpo, rspo)"),
    (["--lrs"], "--lrs: got no value"),  # not silently the preset's
    (["--seeds", "--jobs", "1"], "--seeds: got no value"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[" ".join(flags) for flags, _ in BAD_INPUT])
def test_bad_input_is_one_line_before_any_run(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "smoke", "--out", str(tmp_path / "out"), *flags])
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_warm_starts_train_in_parallel_as_they_would_one_at_a_time(tmp_path, capsys):
    # two seeds' warm starts in two worker processes of one thread each; the same warm start trained here with
    # one thread is the same computation, so the checkpoints must agree bit for bit
    from minirspo.compare import warm_starts
    from minirspo.config import RLConfig
    from toy_moe.pretrain import PretrainConfig
    pretrain = PretrainConfig(model=TINY, max_steps=4, eval_every=4, eval_examples=16, batch_size=16, progress_bar=False)
    configs = [RLConfig(seed=seed, warmstart_dir=str(tmp_path / "pool"), pretrain=pretrain) for seed in (0, 1)]
    warm_starts(configs, jobs=2)
    assert capsys.readouterr().out.count("ready:") == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = warm_start(dataclasses.replace(configs[1], warmstart_dir=str(tmp_path / "alone")))
    finally:
        torch.set_num_threads(threads)
    pooled = torch.load(warm_start_dir(configs[1]) / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(pooled[name], value) for name, value in
               torch.load(alone, weights_only=False)["state_dict"].items())
    assert not torch.equal(pooled["embed.weight"], torch.load(warm_start_dir(configs[0]) / "model.pt",
                                                             weights_only=False)["state_dict"]["embed.weight"])


def test_the_grid_runs_seed_by_seed(grid, tmp_path, monkeypatch):
    # every arm of seed 0 before any of seed 1: a grid stopped part-way leaves whole seeds to pair
    _, argv = grid
    launched = []
    monkeypatch.setattr("minirspo.compare.run_grid", lambda runs, *rest: launched.extend(runs) or [])
    monkeypatch.setattr("minirspo.compare.write_results", lambda *args, **kwargs: "")
    main(["--out", str(tmp_path / "out"), "--seeds", "0", "1", *argv[argv.index("--variants"):]])
    assert [(run.seed, run.variant) for run in launched] == [(0, "grpo"), (0, "rspo"), (1, "grpo"), (1, "rspo")]


def test_done_json_names_the_warm_start_a_run_began_from(tmp_path):
    # runs pair by seed because they share a warm start; its digest in done.json lets a grid resumed on another
    # machine (which would retrain the warm start into another model) be checked
    import hashlib
    import json
    tiny_warm_start = ["--pretrain.max-steps", "2", "--pretrain.eval-every", "2", "--pretrain.eval-examples", "16",
                       "--pretrain.batch-size", "16", "--pretrain.stop-at-accuracy", "None", "--pretrain.model.d-model", "32",
                       "--pretrain.model.n-heads", "2", "--pretrain.model.n-layers", "1", "--pretrain.model.n-experts", "4"]
    main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--jobs", "1", "--variants", "grpo", "--", *tiny_warm_start,
          "--warmstart-dir", str(tmp_path / "warm"), "--max-steps", "1", "--n-prompts", "4", "--group-size", "2",
          "--minibatch-size", "8", "--eval-size", "4", "--eval-every", "1", "--max-new-tokens", "4"])
    (model,) = (tmp_path / "warm").glob("*/model.pt")
    done = json.loads((tmp_path / "out" / "runs" / "grpo-lr0.0001-seed0" / "done.json").read_text())
    assert done["warm_start_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_run_resumes_from_its_checkpoint_or_starts_over(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("loss: rspo\n")  # killed before its first checkpoint
    assert train_flags(["--lr", "1"], run_dir) == ["--lr", "1", "--out", str(run_dir), "--overwrite"]
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert train_flags([], run_dir)[-1] == "--resume"


def test_a_grid_whose_flags_changed_is_refused_before_it_resumes_a_run(grid, tmp_path, capsys):
    import shutil
    out, argv = grid
    for run in ("grpo-lr0.001-seed0", "rspo-lr0.001-seed0"):  # interrupted copies: checkpoints, no done.json
        shutil.copytree(out / "runs" / run, tmp_path / "runs" / run, ignore=shutil.ignore_patterns("done.json"))
    changed = [*argv[:argv.index("--out")], "--out", str(tmp_path), *argv[argv.index("--out") + 2:], "--n-prompts", "8"]
    with pytest.raises(SystemExit) as exit_info:
        main(changed)
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and "--n-prompts 4 -> 8" in errors[0], errors
    assert not (tmp_path / "runs" / "grpo-lr0.001-seed0" / "done.json").exists()


def test_shipped_metrics_read_under_today_s_column_names():
    # docs/results/ keeps metrics.csv files from before `gamma_min` (the smallest γ, not the floor --gamma-min)
    # was renamed `gamma_lowest`: report and compare read them under the new name
    import csv
    from pathlib import Path
    path = Path(__file__).parent.parent / "docs/results/moe_stress/x100/runs/grpo-lr0.0001-seed0/metrics.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "gamma_min" in rows[0] and "gamma_lowest" not in rows[0]
    metrics = read_metrics(path)
    assert "gamma_min" not in metrics
    logged = {float(row["step"]): float(row["gamma_min"]) for row in rows if row["gamma_min"]}
    assert logged and {step: value for step, value in zip(metrics["step"], metrics["gamma_lowest"])
                       if not math.isnan(value)} == logged


def test_variant_names_are_plain_words_that_name_the_shipped_run_folders():
    # typed on a command line and used as folder names: no spaces, quotes or γ
    from pathlib import Path

    from minirspo.compare import VARIANTS
    assert all(re.fullmatch(r"[a-z0-9_.+]+", variant) for variant in VARIANTS), list(VARIANTS)
    shipped = Path(__file__).parent.parent / "docs/results/moe_stress/x100/runs"
    names = {Run(variant, 1e-4, seed).name for variant in VARIANTS for seed in range(6)}
    assert {path.name for path in shipped.iterdir()} <= names  # compare --report-only reads them


def test_collapse_and_gain_are_read_off_the_smoothed_reward():
    steps = [float(s) for s in range(20)]
    rising = {"step": steps, "reward_mean": [s / 20 for s in range(20)], "accuracy": [0.1] * 19 + [0.7]}
    summary = run_summary(rising, gain=0.4)
    # the start is the first 5 steps' mean, (0 + 1 + 2 + 3 + 4) / 5 / 20 = 0.1; the 5-step trailing mean first
    # reaches 0.1 + 0.4 at step 12: (8 + 9 + 10 + 11 + 12) / 5 / 20 = 0.5
    assert summary == {"final_accuracy": 0.7, "lowest_accuracy": 0.1, "steps_to_gain": 12.0, "collapsed": 0.0,
                       "accuracy_collapsed": 0.0, "crashed": 0.0}
    peak_then_zero = {"step": steps, "reward_mean": [0.8] * 10 + [0.0] * 10, "accuracy": [0.5] * 20}
    assert run_summary(peak_then_zero, gain=0.4)["collapsed"] == 1.0
    # the format reward keeps a forgetful policy's reward near 0.1: only its accuracy shows the collapse
    forgot = {"step": steps, "reward_mean": [0.15] * 10 + [0.1] * 10, "accuracy": [0.3] * 10 + [0.0] * 10}
    summary = run_summary(forgot, gain=0.4)
    assert math.isnan(summary["steps_to_gain"])
    assert (summary["collapsed"], summary["accuracy_collapsed"]) == (0.0, 1.0)
    assert smoothed([1.0, 3.0, 5.0], width=2) == [1.0, 2.0, 4.0]


def test_a_crash_is_the_first_evaluation_below_half_the_start_and_its_window_is_aligned_on_it():
    nan = math.nan
    steps = [float(s) for s in range(12)]
    # evaluated every 3 steps; 0.4 at the start, 0.25 at step 3 (not below 0.2), 0.15 at step 6: the crash
    accuracy = [0.4, nan, nan, 0.25, nan, nan, 0.15, nan, nan, 0.35, nan, nan]
    recovered = {"step": steps, "accuracy": accuracy, "reward_mean": [0.5] * 12,
                 "clip_frac": [s / 100 for s in range(12)], "gamma_mean": [1 - s / 100 for s in range(12)],
                 "gamma_floored_frac": [0.0] * 12, "routing_consistency": [0.9] * 12}
    assert crash_step(recovered) == 6.0
    assert run_summary(recovered, gain=0.4)["crashed"] == 1.0
    assert run_summary(recovered, gain=0.4)["accuracy_collapsed"] == 0.0  # it ended at 0.35
    steady = {**recovered, "accuracy": [0.4, nan, nan, 0.3, nan, nan, 0.21, nan, nan, 0.2, nan, nan]}
    assert crash_step(steady) is None
    # a second crashed run, 2 steps later: the window averages the two runs at equal offsets from their crash
    later = {**recovered, "accuracy": [0.4, nan, nan, 0.25, nan, nan, 0.3, nan, 0.1, 0.35, nan, nan],
             "clip_frac": [0.0] * 12}
    windows = crash_window({("grpo", 1e-3): [recovered, steady, later]}, before=2, after=1)
    assert set(windows) == {("grpo", 1e-3)} and windows[("grpo", 1e-3)]["runs"] == [2.0]
    # offsets −2..1: run 1 at steps 4..7 (clip 0.04..0.07), run 2 at steps 6..9 (clip 0); means of two float64
    # values of order 1 are exact to ~1e-16, so 1e-12 only absorbs the decimal constants' rounding
    assert windows[("grpo", 1e-3)]["clip_frac"] == pytest.approx([0.02, 0.025, 0.03, 0.035], abs=1e-12)
    gamma = windows[("grpo", 1e-3)]["gamma_mean"]  # 1 − step/100 averaged over steps 4..7 and 6..9
    assert gamma == pytest.approx([1 - 0.05, 1 - 0.06, 1 - 0.07, 1 - 0.08], abs=1e-12)


def test_router_args_go_to_every_variant_with_a_router_and_not_to_the_dense_control():
    preset = Preset(("grpo", "dense"), (1e-4,), (0,), ("--max-steps", "5"), router_args=("--router-lr-scale", "3"))
    moe, dense = (run_args(Run(variant, 1e-4, 7), preset, ["--eval-size", "8"]) for variant in ("grpo+replay", "dense"))
    assert moe == ["--loss", "grpo", "--routing-replay", "--lr", "0.0001", "--seed", "7", "--max-steps", "5",
                   "--router-lr-scale", "3", "--eval-size", "8"]
    assert dense == ["--loss", "grpo", "--pretrain.model.moe-layers", "--lr", "0.0001", "--seed", "7",
                     "--max-steps", "5", "--eval-size", "8"]
    config = parse_config(dense)
    assert config.pretrain.model.moe_layers == () and config.router_lr_scale == 1.0


def test_every_run_of_the_moe_stress_preset_is_valid():
    # the one preset with router_args and the dense control (compare checks every preset's runs when it starts)
    preset = PRESETS["moe-stress"]
    for variant in preset.variants:
        config = parse_config(run_args(Run(variant, preset.lrs[0], preset.seeds[0]), preset, []))
        validate(config)
        assert (config.pretrain.model.moe_layers == ()) == (variant in ROUTER_FREE)
