"""The comparison grid on a two-run tiny grid: it trains, writes figures and a table that agrees with the
runs' own CSVs, and a second invocation skips finished runs."""
import math

import pytest
import torch

from minirspo.compare import main, run_summary
from minirspo.config import parse_config
from minirspo.report import read_metrics, smoothed
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.pretrain import save_toy_checkpoint

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
        assert read_metrics(out / "runs" / run / "metrics.csv")["step"] == [0.0, 1.0, 2.0]
        # each run writes its resolved config as `python -m minirspo.train` does, and it reruns the run
        config = parse_config(["--config", str(out / "runs" / run / "config.yaml")])
        assert (config.loss, config.lr, config.seed, config.max_steps, config.out) == (
            run.split("-")[0], 1e-3, 0, 3, str(out / "runs" / run))
    for metric in ("reward_mean", "accuracy", "entropy", "routing_consistency", "gamma_mean", "clip_frac"):
        assert (out / f"{metric}.png").stat().st_size > 5_000


def test_table_numbers_equal_what_the_csvs_hold(grid):
    out, _ = grid
    rows = [line.split("|")[1:-1] for line in (out / "results.md").read_text().splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["grpo", "rspo"]
    for row in rows:
        metrics = read_metrics(out / "runs" / f"{row[0].strip()}-lr0.001-seed0" / "metrics.csv")
        final_accuracy = [v for v in metrics["accuracy"] if not math.isnan(v)][-1]
        assert row[2].strip() == f"{final_accuracy:.3f} ± 0.000"
        summary = run_summary(metrics, threshold=0.2)
        assert row[4].strip() == f"{int(summary['collapsed'])}/1"
        assert row[5].strip() == f"{int(summary['accuracy_collapsed'])}/1"


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
    with pytest.raises(SystemExit, match="no finished run"):
        main(["--report-only", "--preset", "smoke", "--out", str(out / "empty")])


def test_bad_run_flags_are_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "smoke", "--out", str(tmp_path / "out"), "--", "--n-prompts", "0"])
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and "--n-prompts" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_collapse_and_threshold_are_read_off_the_smoothed_reward():
    steps = [float(s) for s in range(20)]
    rising = {"step": steps, "reward_mean": [s / 20 for s in range(20)], "accuracy": [0.1] * 19 + [0.7]}
    summary = run_summary(rising, threshold=0.5)
    # the 5-step trailing mean first reaches 0.5 at step 12: (8 + 9 + 10 + 11 + 12) / 5 / 20 = 0.5
    assert summary == {"final_accuracy": 0.7, "steps_to_threshold": 12.0, "collapsed": 0.0,
                       "accuracy_collapsed": 0.0}
    peak_then_zero = {"step": steps, "reward_mean": [0.8] * 10 + [0.0] * 10, "accuracy": [0.5] * 20}
    assert run_summary(peak_then_zero, threshold=0.5)["collapsed"] == 1.0
    # the format reward keeps a forgetful policy's reward near 0.1: only its accuracy shows the collapse
    forgot = {"step": steps, "reward_mean": [0.15] * 10 + [0.1] * 10, "accuracy": [0.3] * 10 + [0.0] * 10}
    summary = run_summary(forgot, threshold=0.5)
    assert math.isnan(summary["steps_to_threshold"])
    assert (summary["collapsed"], summary["accuracy_collapsed"]) == (0.0, 1.0)
    assert smoothed([1.0, 3.0, 5.0], width=2) == [1.0, 2.0, 4.0]
