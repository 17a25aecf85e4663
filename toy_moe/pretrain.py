"""Supervised warm start of the toy MoE with Lightning, so that RL starts from a policy that sometimes wins.

Notation: B batch, P prompt columns (left-padded), A answer columns (right-padded, EOS included),
T = P + A - 1 input positions (the last token is only a target), V vocab.

Each example is a (prompt, answer) pair of plain text. A row is `<pads> <|bos|><|user|> prompt <|assistant|>
answer <|eos|> <pads>`; the loss is next-token cross-entropy on the answer tokens and EOS only, plus the
router terms `aux_loss_coef * aux_loss + z_loss_coef * z_loss`. AdamW with a linear warm-up and a cosine
decay. Every `eval_every` steps, greedy decoding on a held-out slice of the examples (their prompts never
appear in training) gives the exact-match accuracy `val/accuracy`.

Outputs in out_dir: `model.pt` (what the RL loop loads, see `load_toy_checkpoint`), `checkpoints/last.ckpt`
(for --resume), `logs/version_*/metrics.csv`.

Examples:
    # 20k arithmetic examples from the RL tasks, then the default run (1-2 minutes on 2 CPU cores)
    mkdir -p runs && python -c "from minirspo.tasks import ArithmeticTask
    for p in ArithmeticTask().sample(20000, seed=0): print(p.prompt, p.answer, sep='\\t')" > runs/arith.tsv
    python -m toy_moe.pretrain --data runs/arith.tsv --out-dir runs/warm_arith
    # longer, then continue the same run further
    python -m toy_moe.pretrain --data runs/arith.tsv --out-dir runs/warm_arith --max-steps 1500 --resume
    # a smaller model, on a GPU
    python -m toy_moe.pretrain --data runs/arith.tsv --out-dir runs/warm_gpu --model.d-model 64 --accelerator gpu

Measured with the default config on those 20k `a+b=` examples (operands 0..99), seed 0: on 2 uncontended
Xeon cores (taskset on a GPU host), 600 steps took 83 s of fit (97 s wall with start-up) at 11.4k real
tokens/s in training steps, and the held-out greedy accuracy was 3% at step 100, 12% at 200, 76% at 300,
97% at 400 and 100% at 600. On an H100, 27 s and 98.4%. Accuracy jumps late: pick a warm start by step or
accuracy, not by wall time.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader

from toy_moe.cli import add_config_flags, config_from_flags
from toy_moe.generate import generate
from toy_moe.model import ToyMoE, ToyMoEConfig, ToyMoEOutput
from toy_moe.tokenizer import RANKS_PATH, ToyTokenizer, load_tokenizer, parse_ranks


@dataclass
class PretrainConfig:
    """Optimiser defaults are the CPU prototype's warm start (AdamW, lr 2e-3, batch 128, 50 warm-up steps),
    which took a 3.4M-parameter toy MoE to 62% greedy accuracy on `a+b=` in about 60 s on 2 cores."""

    model: ToyMoEConfig = field(default_factory=ToyMoEConfig)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine ends at 10% of lr (Chinchilla, Hoffmann et al. 2022)
    weight_decay: float = 0.01  # torch's AdamW default
    grad_clip: float = 1.0  # global gradient-norm clip (GPT-3, Brown et al. 2020)
    batch_size: int = 128
    warmup_steps: int = 50
    max_steps: int = 600  # ~80 s on 2 CPU cores, to ~100% on a+b= (measurements in the module docstring)
    eval_every: int = 100  # steps between held-out greedy evaluations and checkpoints
    eval_examples: int = 256  # distinct prompts held out of training for evaluation
    # Stop at the first evaluation whose held-out greedy accuracy reaches this (None: train to max_steps).
    # Accuracy on a+b= jumps from ~10% to ~90% within ~100 steps, at a step that depends on the seed and
    # the machine's float arithmetic, so a warm start is chosen by accuracy, not by a fixed step count.
    stop_at_accuracy: float | None = None
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"  # a Lightning precision string
    tokenizer: str | None = None  # ranks file; None = the shipped toy_moe/data/toy_moe.tiktoken
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_examples", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_at_accuracy is not None and not 0.0 < self.stop_at_accuracy <= 1.0:
            raise ValueError(f"PretrainConfig.stop_at_accuracy must be in (0, 1] or None, got {self.stop_at_accuracy}")
        if self.warmup_steps < 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"PretrainConfig needs warmup_steps >= 0, lr > 0 and 0 <= min_lr_ratio <= 1, got "
                f"{self.warmup_steps}, {self.lr}, {self.min_lr_ratio}"
            )


class Batch(NamedTuple):
    input_ids: Tensor  # (B, T) int64, each row shifted left by one against `targets`
    attention_mask: Tensor  # (B, T) bool, True on real tokens
    targets: Tensor  # (B, T) int64, the next token at each position
    loss_mask: Tensor  # (B, T) bool, True where the target is an answer token or EOS
    prompt_ids: Tensor  # (B, P) int64, the left-padded prompts alone (what greedy evaluation continues)
    prompt_mask: Tensor  # (B, P) bool
    answers: tuple[str, ...]  # the reference answers, as text


class EncodedExample(NamedTuple):
    prompt_ids: list[int]
    answer_ids: list[int]  # answer tokens + EOS
    answer: str


def read_examples(path: Path | str) -> list[tuple[str, str]]:
    """`prompt<TAB>answer` per line; a line without exactly one tab is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file not found: {path}")
    examples = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        columns = line.split("\t")
        if len(columns) != 2:
            raise ValueError(f"{path}:{line_number}: expected 'prompt<TAB>answer', got {line!r}")
        examples.append((columns[0], columns[1]))
    return examples


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Left-pad the prompts and right-pad the answers, so every answer starts in the same column."""
    prompt_len = max(len(example.prompt_ids) for example in examples)
    answer_len = max(len(example.answer_ids) for example in examples)
    rows, real, answer = [], [], []
    for example in examples:
        left, right = prompt_len - len(example.prompt_ids), answer_len - len(example.answer_ids)
        n_real = len(example.prompt_ids) + len(example.answer_ids)
        rows.append([pad_id] * left + example.prompt_ids + example.answer_ids + [pad_id] * right)
        real.append([False] * left + [True] * n_real + [False] * right)
        answer.append([False] * prompt_len + [True] * len(example.answer_ids) + [False] * right)
    tokens, real, answer = torch.tensor(rows), torch.tensor(real), torch.tensor(answer)  # (B, P + A) each
    return Batch(
        input_ids=tokens[:, :-1],  # (B, T)
        attention_mask=real[:, :-1],  # (B, T)
        targets=tokens[:, 1:],  # (B, T)
        loss_mask=answer[:, 1:],  # (B, T)
        prompt_ids=tokens[:, :prompt_len],  # (B, P)
        prompt_mask=real[:, :prompt_len],  # (B, P)
        answers=tuple(example.answer for example in examples),
    )


def split_held_out(
    examples: Sequence[EncodedExample], n_held_out: int
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """(train, held out): one example for each of the first `n_held_out` distinct prompts is held out, and
    no example with such a prompt is trained on."""
    first_by_prompt = {}
    for example in examples:
        first_by_prompt.setdefault(tuple(example.prompt_ids), example)
    held_out = list(first_by_prompt.values())[:n_held_out]
    held_out_prompts = {tuple(example.prompt_ids) for example in held_out}
    return [example for example in examples if tuple(example.prompt_ids) not in held_out_prompts], held_out


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear from 1/warmup_steps to 1, then a cosine down to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmStart(L.LightningModule):
    def __init__(self, config: PretrainConfig, tokenizer: ToyTokenizer, max_new_tokens: int):
        super().__init__()
        self.save_hyperparameters({"config": asdict(config), "max_new_tokens": max_new_tokens})
        self.config, self.tokenizer, self.max_new_tokens = config, tokenizer, max_new_tokens
        self.model = ToyMoE(config.model)
        # Greedy decoding may stop only at EOS; the other specials would make no sense inside an answer.
        self.banned_tokens = tuple(token for token in tokenizer.special_ids if token != tokenizer.eos_id)
        self.train_seconds, self.train_tokens, self.step_started = 0.0, 0, 0.0

    def sft_loss(self, batch: Batch) -> tuple[Tensor, Tensor, ToyMoEOutput]:
        """(total loss, answer cross-entropy, model output) for one batch."""
        output = self.model(batch.input_ids, batch.attention_mask)
        answer_logits = output.logits[batch.loss_mask].float()  # (answer tokens in the batch, V)
        cross_entropy = F.cross_entropy(answer_logits, batch.targets[batch.loss_mask])
        return cross_entropy + self.model.router_loss(output), cross_entropy, output

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.step_started = time.perf_counter()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, cross_entropy, output = self.sft_loss(batch)
        metrics = {"train/loss": loss, "train/ce": cross_entropy}
        metrics |= {"train/aux_loss": output.aux_loss, "train/z_loss": output.z_loss}
        self.log_dict(metrics, batch_size=len(batch.answers))
        return loss

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        # forward + backward + optimiser step of this batch; data loading and evaluation are excluded
        self.train_seconds += time.perf_counter() - self.step_started
        self.train_tokens += int(batch.attention_mask.sum())
        self.log("train/tokens_per_s", self.train_tokens / self.train_seconds, prog_bar=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        _, cross_entropy, _ = self.sft_loss(batch)
        rollout = generate(
            self.model, batch.prompt_ids, batch.prompt_mask, max_new_tokens=self.max_new_tokens, temperature=0.0,
            stop_tokens=(self.tokenizer.eos_id,), banned_tokens=self.banned_tokens, pad_id=self.tokenizer.pad_id,
        )
        responses = [self.tokenizer.decode_response(row) for row in rollout.tokens]
        correct = torch.tensor([response == answer for response, answer in zip(responses, batch.answers)])  # (B,)
        metrics = {"val/ce": cross_entropy, "val/accuracy": correct.float().mean()}
        self.log_dict(metrics, batch_size=len(batch.answers), prog_bar=True)

    def configure_optimizers(self):
        config = self.config
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        multiplier = partial(
            warmup_cosine,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class StopAtAccuracy(L.Callback):
    """Stop training after the first evaluation whose held-out greedy accuracy reaches `target`."""

    def __init__(self, target: float):
        self.target = target

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and float(trainer.callback_metrics["val/accuracy"]) >= self.target:
            trainer.should_stop = True


def save_toy_checkpoint(model: ToyMoE, tokenizer_path: Path | str | None, path: Path | str) -> Path:
    """A small self-contained `model.pt`: config as a dict, state_dict, and the tokenizer's ranks text."""
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else RANKS_PATH
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {"config": asdict(model.config), "state_dict": state, "tokenizer_ranks": tokenizer_path.read_text()}
    torch.save(payload, path)
    return path


def load_toy_checkpoint(path: Path | str) -> tuple[ToyMoE, ToyTokenizer]:
    """The model (on CPU, in eval mode) and tokenizer that `save_toy_checkpoint` wrote to `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy MoE checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = ToyMoE(ToyMoEConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    tokenizer = ToyTokenizer(parse_ranks(payload["tokenizer_ranks"], source=f"{path}:tokenizer_ranks"))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, model only {model.config.vocab_size}")
    return model.eval(), tokenizer


def pretrain(
    examples: Iterable[tuple[str, str]], config: PretrainConfig, out_dir: Path | str, *, resume: bool = False
) -> Path:
    """Train on (prompt, answer) pairs and write `out_dir/model.pt`; return its path. The first
    `config.eval_examples` distinct prompts are held out (every example with such a prompt is left out of
    training). `resume=True` continues from `out_dir/checkpoints/last.ckpt` up to `config.max_steps`."""
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoints" / "last.ckpt"
    if resume and not checkpoint.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
    L.seed_everything(config.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size only {config.model.vocab_size}")
    encoded = [EncodedExample(*tokenizer.encode_example(prompt, answer), answer) for prompt, answer in examples]
    train, held_out = split_held_out(encoded, config.eval_examples)
    if len(train) < config.batch_size:
        raise ValueError(
            f"examples: {len(train)} training examples remain after holding out {len(held_out)} prompts, fewer "
            f"than batch_size={config.batch_size}; give more examples or lower eval_examples"
        )
    longest = max(len(example.prompt_ids) + len(example.answer_ids) for example in encoded)
    if longest > config.model.max_seq_len:
        raise ValueError(f"examples: the longest has {longest} tokens, model.max_seq_len={config.model.max_seq_len}")

    batches = partial(collate, pad_id=tokenizer.pad_id)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True, collate_fn=batches)
    eval_loader = DataLoader(held_out, batch_size=config.batch_size, collate_fn=batches)
    # the longest reference answer + EOS: a longer response cannot match any reference exactly
    module = WarmStart(config, tokenizer, max_new_tokens=max(len(example.answer_ids) for example in held_out))
    callbacks = [LearningRateMonitor(logging_interval="step"),
                 ModelCheckpoint(dirpath=checkpoint.parent, every_n_train_steps=config.eval_every, save_last=True)]
    if config.stop_at_accuracy is not None:
        callbacks.append(StopAtAccuracy(config.stop_at_accuracy))
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        precision=config.precision,
        max_steps=config.max_steps,
        val_check_interval=config.eval_every,
        check_val_every_n_epoch=None,  # count eval_every in steps across epochs
        num_sanity_val_steps=0,
        gradient_clip_val=config.grad_clip,
        log_every_n_steps=min(10, config.eval_every),
        logger=CSVLogger(out_dir, name="logs"),
        callbacks=callbacks + ([RichProgressBar()] if config.progress_bar else []),
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    with warnings.catch_warnings():
        # batches are tokenized up front and collated in microseconds: worker processes would only add start-up
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        started = time.perf_counter()
        # weights_only=False: our own checkpoint, which also holds the optimiser, loop and callback states
        trainer.fit(module, train_loader, eval_loader, ckpt_path=checkpoint if resume else None, weights_only=False)
        fit_seconds = time.perf_counter() - started
        if trainer.global_step % config.eval_every:
            trainer.validate(module, eval_loader, verbose=False)
    trainer.save_checkpoint(checkpoint, weights_only=False)
    model_path = save_toy_checkpoint(module.model, config.tokenizer, out_dir / "model.pt")
    accuracy = float(trainer.callback_metrics["val/accuracy"])
    print(
        f"pretrain: step {trainer.global_step}, fit {fit_seconds:.1f} s, "
        f"{module.train_tokens / max(module.train_seconds, 1e-9):.0f} tokens/s in training steps, "
        f"greedy accuracy {accuracy:.1%} on {len(held_out)} held-out prompts -> {model_path}"
    )
    return model_path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m toy_moe.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="examples, one 'prompt<TAB>answer' per line")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/pretrain"), help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.ckpt")
    add_config_flags(parser, PretrainConfig)
    values = vars(parser.parse_args(argv))
    config = config_from_flags(PretrainConfig, values)
    return pretrain(read_examples(values["data"]), config, values["out_dir"], resume=values["resume"])


if __name__ == "__main__":
    main()
