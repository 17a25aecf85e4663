"""The toy MoE's `model.pt`: what a warm start hands to the RL loop, and what `--model toy:FILE` reads.

A small self-contained file: the model's config as a dict, its state_dict and the tokenizer's ranks text,
so a checkpoint loads without the run that wrote it. It lives apart from `toy_moe.pretrain` (the supervised
training script) so that code which only reads models — the RL policy, the config checks, benchmarks —
does not import a training loop to do so.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.tokenizer import RANKS_PATH, ToyTokenizer, parse_ranks


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
