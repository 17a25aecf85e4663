"""The one door between the RL loop and a model: generate rollouts, score tokens, replay or freeze routing.

    base.py      the `Policy` interface, its `Scores`, and the helpers every implementation shares
    toy.py       `ToyPolicy`: the from-scratch toy_moe model
    hf.py        `HFPolicy`: a local Hugging Face MoE (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral) or dense LM
    kv_cache.py  `GrowingCache`: the KV cache of HFPolicy's decode loop, appended in place

`load_policy("toy:PATH" | "hf:PATH")` picks one. Tiny offline HF checkpoints for tests, tutorials and
benchmarks are in `minirspo.testing`.
"""
from pathlib import Path

from minirspo.policy.base import Policy, Samples, Scores
from minirspo.policy.hf import HF_MOE_FAMILIES, HFPolicy
from minirspo.policy.toy import ToyPolicy

__all__ = ["HF_MOE_FAMILIES", "HFPolicy", "Policy", "Samples", "Scores", "ToyPolicy", "load_policy"]


def load_policy(spec: str, *, logprob_chunk_tokens: int = 4096) -> Policy:
    """`toy:PATH` (a toy_moe checkpoint, see toy_moe.pretrain) or `hf:PATH` (a local Hugging Face model
    directory: config, weights, tokenizer) -> a Policy. Clear errors for a bad spec or a missing path."""
    kind, _, path = spec.partition(":")
    if kind not in ("toy", "hf") or not path:
        raise ValueError(f"model spec must be 'toy:PATH' or 'hf:PATH', got {spec!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    if kind == "hf":
        return HFPolicy.from_pretrained(path, logprob_chunk_tokens=logprob_chunk_tokens)
    from toy_moe.checkpoint import load_toy_checkpoint
    model, tokenizer = load_toy_checkpoint(path)
    return ToyPolicy(model, tokenizer)
