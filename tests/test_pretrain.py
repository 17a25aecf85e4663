"""toy_moe.pretrain: a short warm start lowers the answer loss, checkpoints round-trip, runs resume, flags parse."""
import csv
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minirspo.tasks import ArithmeticTask
from toy_moe.checkpoint import load_toy_checkpoint, save_toy_checkpoint
from toy_moe.cli import UsageError, parse_flags
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.pretrain import (
    PretrainConfig,
    PretrainFlags,
    main,
    pretrain,
    read_examples,
    warmup_cosine,
)
from toy_moe.tokenizer import load_tokenizer

TINY_MODEL = ToyMoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=64, max_seq_len=32)
TINY_RUN = PretrainConfig(
    model=TINY_MODEL, lr=1e-2, batch_size=32, warmup_steps=5, max_steps=40, eval_every=20, eval_examples=32,
    progress_bar=False,
)
EXAMPLES = [(problem.prompt, problem.answer) for problem in ArithmeticTask(max_operand=9).sample(400, seed=0)]


def answer_cross_entropy(model: ToyMoE, examples) -> float:
    """Mean CE of answer + EOS given the prompt, one unpadded row at a time: independent of the batching code."""
    tokenizer = load_tokenizer()
    losses = []
    with torch.no_grad():
        for prompt, answer in examples:
            prompt_ids, answer_ids = tokenizer.encode_example(prompt, answer)
            ids = torch.tensor([prompt_ids + answer_ids])  # (1, T)
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # (answer tokens, V)
            losses.append(F.cross_entropy(logits, torch.tensor(answer_ids), reduction="none"))
    return torch.cat(losses).mean().item()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("warm_start")
    return pretrain(EXAMPLES, TINY_RUN, out_dir), out_dir


def test_short_run_lowers_the_answer_loss(tiny_run):
    model_path, out_dir = tiny_run
    torch.manual_seed(TINY_RUN.seed)
    initial = answer_cross_entropy(ToyMoE(TINY_MODEL).eval(), EXAMPLES[:64])
    trained_model, _ = load_toy_checkpoint(model_path)
    trained = answer_cross_entropy(trained_model, EXAMPLES[:64])
    # At init the logits are near uniform, so CE ~ ln(512) = 6.2. An answer is 1-2 digits + EOS, 11 symbols,
    # so learning only which tokens answers use gives CE <= ln(11) = 2.4; this run measured ~1.6 (seed 0).
    # The bound, half the initial CE (~3.1), sits between: it fails if the answer tokens are not learned.
    assert initial > 5.0
    assert trained < 0.5 * initial
    with open(next(out_dir.glob("logs/version_*/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    accuracies = [float(row["val/accuracy"]) for row in rows if row["val/accuracy"]]
    assert len(accuracies) == TINY_RUN.max_steps // TINY_RUN.eval_every
    assert all(0.0 <= accuracy <= 1.0 for accuracy in accuracies)


def test_resume_continues_to_the_new_max_steps(tiny_run):
    _, out_dir = tiny_run
    longer = replace(TINY_RUN, max_steps=TINY_RUN.max_steps + 10)
    pretrain(EXAMPLES, longer, out_dir, resume=True)
    checkpoint = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == longer.max_steps


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        pretrain(EXAMPLES, TINY_RUN, tmp_path, resume=True)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = ToyMoE(replace(TINY_MODEL, moe_layers=(1,))).eval()  # a dense layer too, and a tuple in the config
    loaded, tokenizer = load_toy_checkpoint(save_toy_checkpoint(model, None, tmp_path / "model.pt"))
    ids = torch.randint(0, TINY_MODEL.vocab_size, (3, 9))  # (B, T)
    mask = torch.ones_like(ids, dtype=torch.bool).index_fill(1, torch.tensor([0, 1]), False)  # (B, T) left pads
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)
    assert loaded.config == model.config
    assert tokenizer.encode("3 7 12>33:") == load_tokenizer().encode("3 7 12>33:")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_toy_checkpoint(tmp_path / "nowhere.pt")


def parse_pretrain_flags(argv: list[str]) -> PretrainFlags:
    return parse_flags(PretrainFlags, argv, prog="python -m toy_moe.pretrain", description="")


def test_every_config_field_is_a_flag():
    flags = ["--data", "x.tsv", "--lr", "1e-3", "--model.d-model", "64", "--model.moe-layers", "0", "2",
             "--model.no-norm-topk-prob", "--tokenizer", "None", "--accelerator", "cpu", "--no-progress-bar"]
    config = parse_pretrain_flags(flags).pretrain_config()
    expected_model = ToyMoEConfig(d_model=64, moe_layers=(0, 2), norm_topk_prob=False)
    assert config == PretrainConfig(model=expected_model, lr=1e-3, accelerator="cpu", progress_bar=False)
    assert parse_pretrain_flags(["--data", "x.tsv"]).pretrain_config() == PretrainConfig()


@pytest.mark.parametrize("argv, flag", [(["--max-steps", "0"], "--max-steps"), (["--lr", "-1"], "--lr"),
                                        (["--model.top-k", "9"], "--model.top-k"),
                                        (["--precision", "8-bit"], "--precision"), ([], "--data")],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    data = tmp_path / "pairs.tsv"
    data.write_text("1+1=\t2\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*(["--data", str(data)] if flag != "--data" else []), "--out-dir", str(tmp_path / "out"), *argv])
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and flag in errors[0], errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [(["--tokenizer", "missing.tiktoken"], "--tokenizer"),
                                        (["--batch-size", "64"], "--batch-size"),
                                        (["--model.max-seq-len", "8"], "--model.max-seq-len")],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_what_the_examples_refuse_names_the_flag_and_writes_nothing(tmp_path, capsys, argv, flag):
    # 40 examples, 8 prompts held out: fewer left than a batch of 64; each example takes more than 8 tokens
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{p}\t{a}\n" for p, a in EXAMPLES[:40]))
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data), "--out-dir", str(tmp_path / "out"), "--eval-examples", "8", "--batch-size", "16",
              *argv])
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {flag}:"), errors
    assert not (tmp_path / "out").exists()  # refused before config.yaml is written


def test_the_run_writes_its_config_and_config_reruns_it(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{prompt}\t{answer}\n" for prompt, answer in EXAMPLES))
    out = tmp_path / "warm"
    tiny = ["--model.d-model", "32", "--model.n-layers", "2", "--model.n-heads", "2", "--model.n-experts", "4",
            "--model.expert-hidden", "64", "--model.max-seq-len", "32", "--batch-size", "32", "--eval-examples", "32"]
    main(["--data", str(data), "--out-dir", str(out), "--max-steps", "2", "--eval-every", "2", "--no-progress-bar",
          *tiny])
    written = parse_pretrain_flags(["--config", str(out / "config.yaml")])
    assert written.pretrain_config() == replace(PretrainConfig(model=TINY_MODEL),
                                                max_steps=2, eval_every=2, progress_bar=False, batch_size=32,
                                                eval_examples=32)
    assert (written.data, written.out_dir) == (data, out)
    # later flags override the file
    assert parse_pretrain_flags(["--config", str(out / "config.yaml"), "--max-steps", "9"]).max_steps == 9
    with pytest.raises(UsageError, match="--config"):
        parse_pretrain_flags(["--config", str(tmp_path)])


def test_help_shows_example_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m toy_moe.pretrain --data" in capsys.readouterr().out


def test_data_file_errors_name_the_line(tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("1+1=\t2\nno tab here\n")
    with pytest.raises(ValueError, match="pairs.tsv:2"):
        read_examples(data)
    with pytest.raises(FileNotFoundError, match="absent.tsv"):
        read_examples(tmp_path / "absent.tsv")


def test_warmup_then_cosine_schedule():
    multipliers = [warmup_cosine(step, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) for step in range(101)]
    # Python floats (float64) of a closed form: pytest.approx's default rel 1e-6 is ~10^10 ulps of slack
    assert multipliers[0] == pytest.approx(0.1) and multipliers[9] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in zip(multipliers[9:], multipliers[10:]))
    assert multipliers[100] == pytest.approx(0.1)


def test_stop_at_accuracy_ends_at_the_first_evaluation_above_it(tmp_path):
    # One correct answer of the 32 held-out prompts (1/32 = 0.031) exceeds 0.02: a run that learns any
    # single-digit sum stops there; max_steps is far beyond what the 40-step run above needs for that.
    config = replace(TINY_RUN, max_steps=400, eval_every=5, stop_at_accuracy=0.02)
    pretrain(EXAMPLES, config, tmp_path)
    with open(next(tmp_path.glob("logs/version_*/metrics.csv"))) as file:
        rows = [row for row in csv.DictReader(file) if row["val/accuracy"]]
    accuracies = [float(row["val/accuracy"]) for row in rows]
    assert accuracies[-1] > config.stop_at_accuracy                     # it stopped on the threshold ...
    assert all(accuracy <= config.stop_at_accuracy for accuracy in accuracies[:-1])  # ... the first time
    assert int(rows[-1]["step"]) + 1 < config.max_steps                  # and early
