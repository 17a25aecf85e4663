"""Supervised warm start of the toy MoE with Lightning, so that RL starts from a policy that sometimes wins.

Notation: B batch, P prompt columns (left-padded), A answer columns (right-padded, EOS included),
T = P + A - 1 input positions (the last token is only a target), V vocab.

Each example is a (prompt, answer) pair of plain text. A row is `<pads> <|bos|><|user|> prompt <|assistant|>
answer <|eos|> <pads>`; the loss is next-token cross-entropy on the answer tokens and EOS only, plus the
router terms `aux_loss_coef * aux_loss + z_loss_coef * z_loss`. AdamW with a linear warm-up and a cosine
decay. Every `eval_every` steps, greedy decoding on a held-out slice of the examples (their prompts never
appear in training) gives the exact-match accuracy `val/accuracy`.

Outputs in out_dir: `model.pt` (what the RL loop loads, see `toy_moe.checkpoint`), `checkpoints/last.ckpt`
(for --resume), `logs/version_*/metrics.csv`, and from the command line `config.yaml` (the resolved flags;
`--config FILE` runs them again, flags after it overriding the file). The console shows one progress bar in
optimiser steps and a one-line result; --verbose adds Lightning's own messages.

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

import math
import re
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NamedTuple, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader

from toy_moe.checkpoint import save_toy_checkpoint
from toy_moe.cli import StepProgressBar, UsageError, fail, parse_flags, quiet_console, write_config
from toy_moe.generate import generate
from toy_moe.model import ToyMoE, ToyMoEConfig, ToyMoEOutput
from toy_moe.tokenizer import ToyTokenizer, load_tokenizer


Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]  # Lightning's accelerator names
Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]  # Lightning's


@dataclass
class PretrainConfig:
    """Optimiser defaults are the CPU prototype's warm start (AdamW, lr 2e-3, batch 128, 50 warm-up steps),
    which took a 3.4M-parameter toy MoE to 62% greedy accuracy on `a+b=` in about 60 s on 2 cores."""

    model: ToyMoEConfig = field(default_factory=ToyMoEConfig)
    """the toy MoE's shape and router losses"""
    lr: float = 2e-3  # peak AdamW learning rate, > 0
    min_lr_ratio: float = 0.1  # the cosine ends at 10% of lr (Chinchilla, Hoffmann et al. 2022)
    weight_decay: float = 0.01  # AdamW weight decay (torch's default)
    grad_clip: float = 1.0  # global gradient-norm clip, > 0 (GPT-3, Brown et al. 2020)
    batch_size: int = 128  # examples per optimiser step
    warmup_steps: int = 50  # optimiser steps of linear warm-up before the cosine decay
    max_steps: int = 600  # optimiser steps; 600: ~80 s on 2 CPU cores, to ~100% on a+b= (module docstring)
    eval_every: int = 100  # steps between held-out greedy evaluations and checkpoints
    eval_examples: int = 256  # distinct prompts held out of training for evaluation
    # Accuracy on a+b= jumps from ~10% to ~90% within ~100 steps, at a step that depends on the seed and the
    # CPU's float arithmetic, so a warm start for RL is chosen by accuracy, not by a fixed step count.
    stop_at_accuracy: float | None = None
    """stop at the first evaluation whose held-out greedy accuracy exceeds this; None: train to max_steps"""
    seed: int = 0  # seeds the initialisation and the order of the examples
    accelerator: Accelerator = "cpu"  # Lightning accelerator
    devices: int = 1  # processes (one per GPU)
    precision: Precision = "32-true"  # Lightning precision
    tokenizer: str | None = None  # BPE ranks file; None = the shipped toy_moe/data/toy_moe.tiktoken
    progress_bar: bool = True  # a progress bar in optimiser steps

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_examples", "devices"):
            if not getattr(self, name) >= 1:
                raise UsageError(f"PretrainConfig.{name}: got {getattr(self, name)!r}; expected a whole number >= 1")
        for name, ok, accepted in (("warmup_steps", self.warmup_steps >= 0, "a whole number >= 0"),
                                   ("lr", self.lr > 0, "a number > 0"),
                                   ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "a number in [0, 1]"),
                                   ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
                                   ("grad_clip", self.grad_clip > 0, "a number > 0"),
                                   ("stop_at_accuracy", self.stop_at_accuracy is None or 0 <= self.stop_at_accuracy < 1,
                                    "None or a number in [0, 1)")):
            if not ok:
                raise UsageError(f"PretrainConfig.{name}: got {getattr(self, name)!r}; expected {accepted}")


def name_flags(message: str, prefix: str = "") -> str:
    """Config field names in an error message as the flags that set them: `PretrainConfig.max_steps` ->
    `--{prefix}max-steps`, `ToyMoEConfig.top_k` -> `--{prefix}model.top-k` (tyro's "Error parsing X:" dropped)."""
    message = re.sub(r"^Error parsing [\w.-]+: (?=(PretrainConfig|ToyMoEConfig)\.)", "", message)
    return re.sub(r"\b(PretrainConfig|ToyMoEConfig)\.(\w+)", lambda match: "--" + prefix + (
        "model." if match[1] == "ToyMoEConfig" else "") + match[2].replace("_", "-"), message)


def check_accelerator(accelerator: str, flag: str = "accelerator") -> None:
    """Refuse an accelerator this machine does not have, before any work starts (Lightning would refuse it
    only once the Trainer is built)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator
    available = {"gpu": CUDAAccelerator.is_available() or MPSAccelerator.is_available(),
                 "cuda": CUDAAccelerator.is_available(), "mps": MPSAccelerator.is_available(),
                 "tpu": XLAAccelerator.is_available()}
    if not available.get(accelerator, True):
        usable = ["auto", "cpu", *(name for name, ok in available.items() if ok)]
        raise UsageError(f"--{flag}: got {accelerator!r}, which this machine does not have; "
                         f"usable here: {', '.join(usable)}")


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
        raise FileNotFoundError(f"--data: {path} {'is a folder' if path.is_dir() else 'not found'}; expected a "
                                "file of 'prompt<TAB>answer' lines")
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
            record=False,
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


def progress_metrics(trainer: L.Trainer) -> dict[str, str]:
    """What the progress bar shows: the latest held-out greedy accuracy and the training loss."""
    metrics = trainer.callback_metrics
    shown = {"loss": f"{float(metrics['train/ce']):.3f}"} if "train/ce" in metrics else {}
    if "val/accuracy" in metrics:
        shown["accuracy"] = f"{float(metrics['val/accuracy']):.1%}"
    return shown


def pretrain(
    examples: Iterable[tuple[str, str]], config: PretrainConfig, out_dir: Path | str, *, resume: bool = False,
    record: Callable[[], Any] | None = None,
) -> Path:
    """Train on (prompt, answer) pairs and write `out_dir/model.pt`; return its path. The first
    `config.eval_examples` distinct prompts are held out (every example with such a prompt is left out of
    training). `resume=True` continues from `out_dir/checkpoints/last.ckpt` up to `config.max_steps`.
    `record` runs once the examples passed their checks, before training: where a caller writes its
    config.yaml, so that refused input leaves no file behind."""
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
            f"--batch-size: got {config.batch_size}, but only {len(train)} training examples remain after holding "
            f"out the examples of {len(held_out)} prompts (--eval-examples {config.eval_examples}); give more "
            "examples, or lower --batch-size or --eval-examples"
        )
    longest = max(len(example.prompt_ids) + len(example.answer_ids) for example in encoded)
    if longest > config.model.max_seq_len:
        raise ValueError(f"--model.max-seq-len: got {config.model.max_seq_len}, but the longest example takes "
                         f"{longest} tokens; give at least {longest}")
    if record is not None:
        record()

    batches = partial(collate, pad_id=tokenizer.pad_id)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True, collate_fn=batches)
    eval_loader = DataLoader(held_out, batch_size=config.batch_size, collate_fn=batches)
    # the longest reference answer + EOS: a longer response cannot match any reference exactly
    module = WarmStart(config, tokenizer, max_new_tokens=max(len(example.answer_ids) for example in held_out))
    callbacks = [LearningRateMonitor(logging_interval="step"),
                 ModelCheckpoint(dirpath=checkpoint.parent, every_n_train_steps=config.eval_every, save_last=True)]
    if config.stop_at_accuracy is not None:  # patience past the run: only the threshold stops it
        callbacks.append(EarlyStopping("val/accuracy", mode="max", stopping_threshold=config.stop_at_accuracy,
                                       patience=config.max_steps, check_on_train_epoch_end=False))
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
        callbacks=callbacks + ([StepProgressBar("pretrain", config.max_steps, lambda trainer: trainer.global_step,
                                                progress_metrics)] if config.progress_bar else []),
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
    model_path = out_dir / "model.pt"
    if trainer.is_global_zero:  # one file and one line per run, not one per process
        save_toy_checkpoint(module.model, config.tokenizer, model_path)
        accuracy = float(trainer.callback_metrics["val/accuracy"])
        print(f"pretrain: step {trainer.global_step}, fit {fit_seconds:.1f} s, "
              f"{module.train_tokens / max(module.train_seconds, 1e-9):.0f} tokens/s in training steps, "
              f"greedy accuracy {accuracy:.1%} on {len(held_out)} held-out prompts -> {model_path}")
    return model_path


@dataclass
class PretrainFlags(PretrainConfig):
    """The command line of `python -m toy_moe.pretrain`: the PretrainConfig fields and where the run reads
    and writes."""

    data: Path = field(kw_only=True)
    """examples, one 'prompt<TAB>answer' per line"""
    out_dir: Path = Path("runs/pretrain")
    """model.pt, config.yaml, checkpoints/last.ckpt, logs/"""
    resume: bool = False
    """continue from OUT_DIR/checkpoints/last.ckpt up to --max-steps"""
    verbose: bool = False
    """also show Lightning's own messages and library warnings"""
    config: Path | None = None
    """a config.yaml written by an earlier run: its values, with the flags after --config overriding them"""

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(**{name: getattr(self, name) for name in PretrainConfig.__dataclass_fields__})


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse and check everything first (one line and exit 2 on bad input), then train."""
    try:
        flags = parse_flags(PretrainFlags, argv, prog="python -m toy_moe.pretrain", description=__doc__)
        quiet_console(flags.verbose)
        check_accelerator(flags.accelerator)
        if flags.out_dir.exists() and not flags.out_dir.is_dir():
            raise UsageError(f"--out-dir: got '{flags.out_dir}', which is a file; expected a folder")
        if flags.resume and not (flags.out_dir / "checkpoints" / "last.ckpt").is_file():
            raise UsageError(f"--resume: no checkpoint at {flags.out_dir / 'checkpoints' / 'last.ckpt'} to "
                             "continue from (start without --resume)")
        if flags.tokenizer is not None and not Path(flags.tokenizer).is_file():
            raise UsageError(f"--tokenizer: {flags.tokenizer} not found; expected a BPE ranks file "
                             "(python -m toy_moe.tokenizer writes one), or None for the shipped one")
        examples = read_examples(flags.data)
        if not examples:
            raise UsageError(f"--data: {flags.data} holds no examples; expected 'prompt<TAB>answer' lines")
        record = partial(write_config, dataclasses.replace(flags, config=None), flags.out_dir / "config.yaml",
                         rerun="python -m toy_moe.pretrain")
        return pretrain(examples, flags.pretrain_config(), flags.out_dir, resume=flags.resume, record=record)
    except (UsageError, FileNotFoundError, ValueError) as error:
        fail(name_flags(str(error)))


if __name__ == "__main__":
    main()
