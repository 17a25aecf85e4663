# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 5 — Scaling out: a Hugging Face MoE, and FSDP2 on two processes
#
# Nothing in `minirspo.loss` knows which model produced its inputs: it takes token log-probs and, per MoE
# layer, router logits and the old top-K routing. `minirspo.policy.HFPolicy` produces exactly those for a
# Hugging Face MoE (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral) by hooking each layer's router ("gate"), and
# `--strategy fsdp2` shards the same training step over processes.
#
# This tutorial needs no download: `make_tiny_hf_checkpoint` writes a small random Qwen3-MoE with the toy
# tokenizer. We
#
# 1. teach it the answer format of `a+b=` for a few seconds, so that rewards differ within a group;
# 2. take one RSPO step by hand on it — the same functions as on the toy model in tutorial 3;
# 3. train it with `python -m minirspo.train --strategy fsdp2 --devices 2` on two CPU processes.
#
# Needs the `hf` extra (transformers). Runs in about a minute; `MINIRSPO_FAST=1` shortens it.

# %%
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt
import torch

from minirspo.loss import group_advantages, router_logprobs_at, router_shift_metrics, router_shift_ratio, rspo_loss
from minirspo.policy import HFPolicy
from minirspo.report import read_metrics
from minirspo.tasks import make_task, score
from minirspo.testing import make_tiny_hf_checkpoint

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
RUNS = HERE / "runs"
torch.manual_seed(0)

# %% [markdown]
# ## 1. A Hugging Face MoE checkpoint, taught the answer format
#
# Two decoder layers, 8 experts, top-2 with renormalised gates. From random weights every response is
# gibberish, every reward is 0 and every advantage is 0: no learning signal. A short supervised run on
# (prompt, answer) pairs fixes that. It uses `HFPolicy.score`, the forward the RL loop trains with: the
# log-probs of given response tokens after given prompts.

# %%
checkpoint = make_tiny_hf_checkpoint(RUNS / "tiny-qwen3-moe", "qwen3_moe", hidden_size=64, n_layers=2,
                                     n_heads=2, n_experts=8, top_k=2, expert_hidden=64, norm_topk_prob=True)
policy = HFPolicy.from_pretrained(checkpoint)
lm_config = policy.model.lm.config
print(f"{lm_config.model_type}: {sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M parameters, "
      f"{lm_config.num_hidden_layers} MoE layers × {lm_config.num_experts} experts, "
      f"top-{lm_config.num_experts_per_tok}")

task = make_task("arithmetic")
tokenizer = policy.tokenizer


def answer_tokens(answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded answer ids + EOS (B, N) and their mask."""
    encoded = [tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for answer in answers]
    width = max(len(ids) for ids in encoded)
    tokens = torch.full((len(encoded), width), tokenizer.pad_token_id)                     # (B, N)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens, torch.arange(width)[None, :] < torch.tensor([len(ids) for ids in encoded])[:, None]


optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
policy.model.train()
for step in range(30 if FAST else 100):
    batch = task.sample(64, seed=1000 + step, split="train")
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in batch])
    tokens, mask = answer_tokens([p.answer for p in batch])
    logprobs = policy.score(prompt_ids, prompt_mask, tokens, mask).logprobs                # (B, N)
    loss = -logprobs.sum() / mask.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"supervised: answer cross-entropy {float(loss.detach()):.2f} nats per token after {step + 1} steps")

# %% [markdown]
# ## 2. One RSPO step by hand on the HF model
#
# The rollout: 8 answers to each of 16 problems, sampled by a KV-cache decode loop over the model's own
# decoder, which returns tokens and mask only. We split it into two minibatches and score both with the training forward
# before any update (the old policy): that forward's gate hooks record the top-2 experts of every response
# token. The first minibatch is
# on-policy (γ = 1 exactly); after its update the second one is not, and RSPO weights its tokens by γ.

# %%
problems = task.sample(16, seed=7, split="train")
repeated = [p for p in problems for _ in range(8)]
prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in repeated])
policy.model.eval()
rollout = policy.generate(prompt_ids, prompt_mask, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
policy.model.train()
rewards = score(task, repeated, policy.decode_responses(rollout.tokens, rollout.mask))
advantages = group_advantages(rewards, group_size=8)
values, counts = rewards.unique(return_counts=True)
print("rewards:", ", ".join(f"{count} × {value:g}" for value, count in zip(values.tolist(), counts.tolist())),
      f"— {int((advantages != 0).sum())} of {len(advantages)} responses carry a learning signal")

halves = [slice(0, 64), slice(64, 128)]
with torch.no_grad():
    old = [policy.score(prompt_ids[h], prompt_mask[h], rollout.tokens[h], rollout.mask[h]) for h in halves]
optimizer = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
for half, old_scores in zip(halves, old):
    mask = rollout.mask[half]
    old_topk_logprobs = router_logprobs_at(old_scores.router_logits, old_scores.topk_idx)   # (L, B, N, K)
    new = policy.score(prompt_ids[half], prompt_mask[half], rollout.tokens[half], mask)
    gamma = router_shift_ratio(new.router_logits.detach(), old_scores.topk_idx, old_topk_logprobs, mask)
    out = rspo_loss(new.logprobs, old_scores.logprobs, advantages[half], mask, router_shift=gamma)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    shift = router_shift_metrics(gamma, mask, gamma_min=0.8)  # γ's statistics: the loss returns only its own
    print(f"minibatch {half.start // 64 + 1}: loss {float(out.loss.detach()):+.4f}, γ mean "
          f"{float(shift['gamma_mean']):.4f}, min {float(shift['gamma_lowest']):.4f}, "
          f"floored (γ < 0.8) {float(shift['gamma_floored_frac']):.3f}")
    per_layer = [router_shift_ratio(new.router_logits[[layer]].detach(), old_scores.topk_idx[[layer]],
                                    old_topk_logprobs[[layer]], mask)[mask] for layer in range(len(new.router_logits))]

figure, axes = plt.subplots(1, len(per_layer), figsize=(9, 3), sharey=True)
for layer, (axis, values) in enumerate(zip(axes, per_layer)):
    axis.hist(values.numpy(), bins=40, range=(0.0, 1.0), color="tab:purple")
    axis.axvline(0.8, color="black", linestyle="--", linewidth=1)
    axis.set(title=f"MoE layer {layer}", xlabel="γ of this layer alone")
axes[0].set_ylabel("response tokens")
figure.suptitle("Qwen3-MoE (tiny): router shift on the second minibatch (dashed: γ_min = 0.8)")
figure.tight_layout()
figure.savefig(HERE / "05_hf_router_shift.png", dpi=110)

# %% [markdown]
# ## 3. The same training step, sharded over two processes (FSDP2)
#
# `--strategy fsdp2` wraps every decoder layer and then the whole model with PyTorch's `fully_shard`
# (Lightning's `ModelParallelStrategy`): each process keeps half of every parameter, gradient and Adam
# state, and gathers a layer's full weights only while it computes that layer. On CPUs the processes talk
# through gloo; on GPUs through NCCL. Each process samples its own share of the prompts — whole groups, so
# advantages never need the other process — and the gradients are averaged, which makes a two-process step
# equal to a one-process step on the same batch (`tests/test_distributed.py` checks this to float rounding).
#
# The command is the one you would run on a GPU node, with `--accelerator cpu --devices 2`. Lightning starts
# the second process itself.

# %%
sft_checkpoint = RUNS / "tiny-qwen3-moe-sft"
policy.model.lm.save_pretrained(sft_checkpoint)
tokenizer.save_pretrained(sft_checkpoint)
# 16 prompts × 8 answers per step, 8 prompts per process, in 4 minibatches of 32; fast: one small step.
# Three new tokens hold any a+b= answer (at most 198).
n_steps, n_prompts, minibatch = (1, 4, 8) if FAST else (8, 16, 32)
out = RUNS / "tutorial5-fsdp2"
command = [sys.executable, "-m", "minirspo.train", "--model", f"hf:{sft_checkpoint}", "--loss", "rspo",
           "--strategy", "fsdp2", "--accelerator", "cpu", "--devices", "2", "--max-steps", str(n_steps),
           "--n-prompts", str(n_prompts), "--group-size", "8", "--minibatch-size", str(minibatch),
           "--max-new-tokens", "3", "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", str(n_steps),
           "--eval-size", "32", "--checkpoint-every", str(n_steps), "--out", str(out)]
print(" ".join(command[1:]))
finished = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
print(finished.stdout[-2500:])
assert finished.returncode == 0, finished.stderr[-4000:]

metrics = read_metrics(out / "metrics.csv")
for name in ("reward_mean", "gamma_mean", "routing_consistency", "clip_frac", "loss"):
    print(f"{name:20s}", " ".join(f"{value:7.4f}" for value in metrics[name]))

# %% [markdown]
# The metrics are means over both processes. γ < 1 and routing consistency < 1 show the router moving
# between the minibatches of a step, on a model the loss has never seen before — which is the point: the
# loss, the router-shift ratio and the training loop are the same code for the toy model, a Hugging Face
# checkpoint, one process or many. For a real checkpoint on GPUs, see docs/scaling.md
# (`--precision bf16-mixed`, `--activation-checkpointing`, several nodes).
