"""toy_moe.cli's Lightning pieces: MetricsCSV (metrics.csv as CSVLogger writes it, whole across resumes and
interrupted writes) and StepProgressBar (one bar in the run's own steps, quiet on other ranks, stopped on any
exit), on a tiny supervised model."""
import re
import signal
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from minirspo.report import read_metrics, read_rows
from toy_moe.cli import MetricsCSV, StepProgressBar


# --- MetricsCSV ---------------------------------------------------------------------------------------------
def log_all(logger, rows) -> None:
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)


# the RL loop's kind of rows: a metric only on some steps (accuracy), one that first appears late (gamma),
# floats, tensors and an int, and a last row of its own
ROWS = [(0, {"loss": 0.5, "accuracy": 0.25}), (1, {"loss": torch.tensor(0.125)}),
        (2, {"loss": 1 / 3, "gamma": 0.75, "count": 7}), (3, {"accuracy": 0.5})]


def test_metrics_csv_writes_what_lightning_s_csv_logger_writes(tmp_path):
    # sorted columns, `step`, empty cells for absent metrics, the values' text: the format every shipped
    # metrics.csv and minirspo.report read
    ours = MetricsCSV(tmp_path / "metrics.csv")
    lightnings = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    log_all(ours, ROWS)
    log_all(lightnings, ROWS)
    assert (tmp_path / "metrics.csv").read_bytes() == (tmp_path / "csv" / "metrics.csv").read_bytes()
    assert read_rows(tmp_path / "metrics.csv")[0] == {"accuracy": "0.25", "count": "", "gamma": "", "loss": "0.5",
                                                      "step": "0"}


def test_a_column_first_logged_later_leaves_the_earlier_rows_empty(tmp_path):
    logger = MetricsCSV(tmp_path / "metrics.csv")
    logger.log_metrics({"loss": 0.5}, step=0)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["loss,step", "0.5,0"]  # live: written at once
    logger.log_metrics({"loss": 0.25, "accuracy": 1.0}, step=1)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["accuracy,loss,step", ",0.5,0", "1.0,0.25,1"]


def test_a_resume_keeps_the_earlier_steps_rows_and_drops_the_ones_it_redoes(tmp_path):
    path = tmp_path / "metrics.csv"
    log_all(MetricsCSV(path), ROWS)
    earlier = read_rows(path)
    resumed = MetricsCSV(path, keep_steps_before=2)  # a checkpoint after step 1: steps 2 and 3 are redone
    resumed.save()  # Lightning saves every logger as fit starts: the rows to redo leave at once
    assert read_rows(path) == [{"accuracy": "0.25", "loss": "0.5", "step": "0"},
                               {"accuracy": "", "loss": "0.125", "step": "1"}]
    resumed.log_metrics({"loss": 2.0}, step=2)
    rows = read_rows(path)
    assert [row["step"] for row in rows] == ["0", "1", "2"]
    # the kept rows are the earlier ones cell for cell, under the columns the file has now (gamma and count went
    # with the rows that had them)
    assert rows[:2] == [{name: row[name] for name in rows[0]} for row in earlier[:2]]
    assert rows[2] == {"accuracy": "", "loss": "2.0", "step": "2"}
    # a fresh run (nothing kept) starts the file over
    MetricsCSV(path).log_metrics({"loss": 3.0}, step=0)
    assert read_rows(path) == [{"loss": "3.0", "step": "0"}]


def test_a_resume_past_the_last_row_keeps_the_file_as_it_is(tmp_path):
    path = tmp_path / "metrics.csv"
    log_all(MetricsCSV(path), ROWS)
    written = path.read_bytes()
    MetricsCSV(path, keep_steps_before=4).save()
    assert path.read_bytes() == written


class Unwritable:
    """A value whose text fails: the write stops in the middle of the file, as a kill would stop it."""

    def __str__(self):
        raise RuntimeError("write interrupted")


def test_an_interrupted_write_leaves_the_previous_complete_file(tmp_path):
    path = tmp_path / "metrics.csv"
    logger = MetricsCSV(path)
    log_all(logger, ROWS)
    complete = path.read_bytes()
    with pytest.raises(RuntimeError, match="write interrupted"):  # after a new header and the four rows
        logger.log_metrics({"new_metric": Unwritable()}, step=4)
    assert path.read_bytes() == complete
    assert read_metrics(path)["step"] == [0.0, 1.0, 2.0, 3.0]


def test_only_process_0_writes(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    log_all(MetricsCSV(path), ROWS)
    written = path.read_bytes()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    resumed = MetricsCSV(path, keep_steps_before=2)  # another process of a resumed run
    resumed.save()
    resumed.log_metrics({"loss": 0.5}, step=2)
    assert path.read_bytes() == written


# --- StepProgressBar ----------------------------------------------------------------------------------------
class Tiny(L.LightningModule):
    """A linear fit of y = 2x, three batches an epoch; `at_step` maps a step to what it does first."""

    def __init__(self, at_step=None):
        super().__init__()
        self.layer, self.at_step = torch.nn.Linear(1, 1), at_step or {}

    def training_step(self, batch, batch_idx):
        if self.global_step in self.at_step:
            self.at_step[self.global_step]()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(bar, max_steps=6, at_step=None, ckpt_path=None, tmp_path=None):
    x = torch.linspace(0, 1, 6).unsqueeze(1)  # (6, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 2 * x), batch_size=2)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[bar],
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(at_step), data, ckpt_path=ckpt_path)
    return trainer


def recording_bar(total=6, steps_done=lambda trainer: trainer.global_step):
    """A bar that records what it draws after each update: (k, N, the metrics' text, how many bars)."""
    def shown(trainer) -> dict[str, str]:
        metrics = trainer.callback_metrics
        return {"loss": f"{float(metrics['train_loss']):.3f}"} if "train_loss" in metrics else {}
    bar = StepProgressBar("toy", total, steps_done, shown)
    bar.seen = []
    show = bar.show

    def record(trainer, pl_module):
        show(trainer, pl_module)
        if bar.progress is not None:
            task = bar.progress.tasks[0]
            bar.seen.append((int(task.completed), int(task.total), task.fields["shown"], len(bar.progress.tasks)))
    bar.show = record
    return bar


def test_one_bar_counts_the_run_s_steps_across_epochs_and_a_resume(tmp_path, capsys):
    bar = recording_bar()
    trainer = fit(bar, max_steps=4, tmp_path=tmp_path)  # two epochs of three batches
    assert trainer.progress_bar_callback is bar  # Lightning added no bar of its own
    assert [(k, n, bars) for k, n, _, bars in bar.seen] == [(0, 6, 1), (1, 6, 1), (2, 6, 1), (3, 6, 1), (4, 6, 1)]
    assert bar.seen[0][2] == "" and all(re.fullmatch(r"loss: \d\.\d{3}", shown) for _, _, shown, _ in bar.seen[1:])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert "toy" in capsys.readouterr().out  # the bar's last state, left on screen
    resumed = recording_bar()
    fit(resumed, max_steps=6, ckpt_path=tmp_path / "last.ckpt", tmp_path=tmp_path)
    assert [k for k, *_ in resumed.seen] == [4, 5, 6]  # from 4 of 6, not from 0
    out = capsys.readouterr().out
    assert "6/6" in out and "Epoch" not in out


def test_other_processes_draw_nothing(tmp_path, capsys, monkeypatch):
    # Lightning disables the bar in `setup` on every process but rank 0
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda trainer: False))
    bar = recording_bar()
    fit(bar, tmp_path=tmp_path)
    assert bar.is_disabled and bar.seen == [] and bar.progress is None
    assert capsys.readouterr().out == ""


def test_the_bar_stops_on_an_exception_and_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal: while live, it owns stdout and stderr
    streams = sys.stdout, sys.stderr

    def fail():
        assert (sys.stdout, sys.stderr) != streams  # the bar is live here
        raise RuntimeError("boom")
    bar = recording_bar()
    with pytest.raises(RuntimeError, match="boom"):
        fit(bar, at_step={2: fail}, tmp_path=tmp_path)
    assert bar.progress is None and (sys.stdout, sys.stderr) == streams

    def ctrl_c():
        raise KeyboardInterrupt
    sigint = signal.getsignal(signal.SIGINT)
    bar = recording_bar()
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C: on_exception, then exit status 1
            fit(bar, at_step={2: ctrl_c}, tmp_path=tmp_path)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C once it has seen one
    assert bar.progress is None and (sys.stdout, sys.stderr) == streams


def test_lines_printed_while_the_bar_is_live_have_lines_of_their_own(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal, cursor moves and all
    bar = recording_bar()
    prints = {1: lambda: print("a print"), 2: lambda: print("a print to stderr", file=sys.stderr),
              3: lambda: bar.print("[yellow]a rich notice")}
    fit(bar, at_step=prints, tmp_path=tmp_path)
    captured = capsys.readouterr()
    lines = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", captured.out))  # colours, cursor moves
    for text in ("a print", "a print to stderr", "a rich notice"):  # not glued to the end of the bar's line
        assert text in lines, captured.out
    assert captured.err == ""
