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
# # Tutorial 6 — When the sampler is not the trainer: engine mismatch, R3, TIS and RS
#
# Every RL stack at scale samples its rollouts with an inference engine (vLLM, SGLang) that holds its own copy
# of the weights, in bf16 or even fp8, while the trainer scores in float32. Three policies are then in play:
#
# - **μ**, the behaviour policy: the engine's copy, which the tokens were sampled from;
# - **π_old**, the trainer's own scoring of those tokens before the update;
# - **π_θ**, the policy being updated.
#
# On identical weights μ ≠ π_old: the copy's rounding moves every logit a little, and on a Mixture-of-Experts
# model it also sends some tokens to *other experts*. That routing flip is the router shift that breaks MoE RL
# in practice (R3, arXiv 2510.11370: ~10% of routing decisions on Qwen3-30B-A3B). Here we make it happen on the
# toy MoE with minirspo's own engine (`minirspo.rollout`), count the flips layer by layer, remove them with
# rollout routing replay (R3), and look at what truncated importance sampling (TIS) and RS do to the ratios.
#
# The model is the default warm start (cached in `runs/warmstart/`, shared with tutorials 3 and 4);
# `MINIRSPO_FAST=1` shortens it, and the numbers then come from a barely trained model.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt
import torch

from minirspo.loss import (rollout_keep_mask, rollout_mismatch_metrics, router_shift_ratio, routing_flips,
                           truncated_is_weights)
from minirspo.policy import ToyPolicy
from minirspo.rollout import BuiltinEngine
from minirspo.tasks import make_task
from minirspo.warmstart import tutorial_warm_start
from toy_moe.checkpoint import load_toy_checkpoint

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
model, tokenizer = load_toy_checkpoint(tutorial_warm_start(HERE, FAST))
trainer = ToyPolicy(model.eval(), tokenizer)
problems = make_task("arithmetic").eval_set(64 if FAST else 512)
prompt_ids, prompt_mask = trainer.encode_prompts([p.prompt for p in problems])             # (B, P)
print(f"{len(problems)} held-out prompts; L = {model.n_moe_layers} MoE layers, E = {model.config.n_experts}, "
      f"K = {model.config.top_k}")

# %% [markdown]
# ## 1. Sample with the engine, score with the trainer
#
# `BuiltinEngine(policy, precision)` is the RL loop's behaviour policy. At `"32"` it samples with the trainer's
# own model; at `"bf16"` with a copy of every weight in bf16; at `"fp8"` with the matrices quantized to float8
# e4m3 (one power-of-two scale per output channel), computed in bf16. While it samples it records, per
# response token, log μ of the sampled token and, per MoE layer, the K experts it routed the token to. The
# trainer then scores the same tokens in float32, as π_old — the RL loop does exactly this every step.

# %%
def rollout(precision: str):
    """The engine's samples and the trainer's scoring of them (no gradient)."""
    engine = BuiltinEngine(trainer, precision)
    engine.sync()  # builds the copy (the loop refreshes it after every step's updates)
    samples = engine.sample(prompt_ids, prompt_mask, max_new_tokens=8, temperature=0.7, top_p=1.0,
                            generator=torch.Generator().manual_seed(0), record="routing")
    with torch.no_grad():
        old = trainer.score(prompt_ids, prompt_mask, samples.tokens, samples.mask, temperature=0.7)
    return samples, old


results = {precision: rollout(precision) for precision in ("32", "bf16", "fp8")}
for precision, (samples, old) in results.items():
    m = rollout_mismatch_metrics(old.logprobs, samples.logprobs, samples.mask, old.router_logits, samples.topk_idx)
    print(f"{precision:>4}: |log π_old − log μ| mean {float(m['rollout_logprob_diff_mean']):.1e}, "
          f"KL(μ‖π_old) {float(m['rollout_kl']):.1e}, (token, layer) sets that differ "
          f"{float(m['rollout_routing_mismatch']):.2%}, tokens with a flip {float(m['rollout_tokens_flipped']):.1%}")

# %% [markdown]
# At 32 the engine *is* the trainer: the gaps are float32 noise (a KV-cache decode against a full forward) and
# no token flips. In bf16 and fp8 the log-probs move by 10⁻³–10⁻², and some tokens go to other experts.

# %% [markdown]
# ## 2. Count the flips layer by layer
#
# A flip in layer ℓ changes what layer ℓ + 1 sees, so flips compound with depth (docs/results/rollout_mismatch.md
# has the table for deeper and finer toys).

# %%
def flips_per_layer(samples, old) -> torch.Tensor:
    """Share of response tokens whose top-K set in each layer differs between μ and π_old's own router: (L,)."""
    flips = routing_flips(old.router_logits, samples.topk_idx, samples.mask)                 # (L, B, N)
    return flips.float().sum(dim=(1, 2)) / samples.mask.sum()                                # (L,)


figure, axis = plt.subplots(figsize=(6, 3))
layers = torch.arange(model.n_moe_layers)
axis.set_xticks(layers.tolist())
for offset, precision in zip((-0.2, 0.2), ("bf16", "fp8")):
    axis.bar(layers + offset, 100 * flips_per_layer(*results[precision]), width=0.4, label=precision)
axis.set(xlabel="MoE layer", ylabel="tokens routed differently (%)", title="engine against trainer, same weights")
axis.legend()
figure.tight_layout()
figure.savefig(HERE / "06_flips_per_layer.png", dpi=110)

# %% [markdown]
# ## 3. R3 removes them
#
# Rollout routing replay (`--rollout-routing-replay`) makes the trainer's scoring and every update route each
# token to the experts the *engine* chose; the gates still come from the trainer's own router at those experts,
# so the router keeps learning. The routing the trainer computes with is then the rollout's, exactly.

# %%
samples, old = results["fp8"]
with torch.no_grad():
    replayed = trainer.score(prompt_ids, prompt_mask, samples.tokens, samples.mask, routing=samples.routing,
                             temperature=0.7)
valid = samples.mask[None, :, :, None]                                                      # (1, B, N, 1)


def experts_used(topk_idx: torch.Tensor) -> torch.Tensor:
    """Each valid (layer, token)'s expert set in a comparable form: sorted, 0 at padding. (L, B, N, K)"""
    return topk_idx.sort(-1).values.masked_fill(~valid, 0)


rollout_sets = experts_used(samples.topk_idx)
for name, scores in (("the trainer's own routing", old), ("replayed (R3)", replayed)):
    differing = (experts_used(scores.topk_idx) != rollout_sets).any(-1).sum()
    print(f"{name}: {int(differing)} (layer, token) sets differ from the rollout's")
print(f"log-prob gap with R3: mean {float((replayed.logprobs - samples.logprobs)[samples.mask].abs().mean()):.1e} "
      f"(without: {float((old.logprobs - samples.logprobs)[samples.mask].abs().mean()):.1e}): what is left is "
      "the rounding of the experts' own weights, which no replay removes")

# %% [markdown]
# ## 4. What TIS, MIS and RS do to the ratios
#
# With δ = log π_old − log μ per token:
# - **TIS** (`--rollout-is token`) multiplies each token's clipped term by min(e^δ, C), C = 2: tokens the
#   engine over-sampled (δ < 0) count less;
# - **MIS / IcePop** (`--rollout-mask token`) drops the tokens whose e^δ lies outside [0.5, 2];
# - **RS** measures how far the router moved on the rollout's experts, γ = exp(−mean |Δ log p|). Against
#   π_old (the paper) γ = 1 before any update; against the rollout (`--gamma-reference rollout`) γ < 1
#   already, on exactly the tokens whose routing the engine saw differently.

# %%
delta = (old.logprobs - samples.logprobs)[samples.mask]                                    # (valid tokens,)
tis = truncated_is_weights(old.logprobs, samples.logprobs, samples.mask, level="token", cap=2.0)[samples.mask]
kept = rollout_keep_mask(old.logprobs, samples.logprobs, samples.mask, level="token")[samples.mask]
gamma = router_shift_ratio(old.router_logits, samples.topk_idx, samples.topk_logprobs, samples.mask)[samples.mask]
print(f"TIS weight: mean {float(tis.mean()):.4f}, range {float(tis.min()):.3f}–{float(tis.max()):.3f}; "
      f"MIS keeps {float(kept.float().mean()):.1%} of tokens; γ against the rollout: mean {float(gamma.mean()):.4f}, "
      f"lowest {float(gamma.min()):.3f}")
figure, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].hist(delta.numpy(), bins=60, color="tab:blue")
axes[0].set(xlabel="log π_old − log μ (fp8 engine)", ylabel="tokens", yscale="log", title="the ratio TIS corrects")
axes[1].hist(gamma.numpy(), bins=60, color="tab:orange")
axes[1].set(xlabel="γ against the rollout", ylabel="tokens", yscale="log", title="RS's weight before any update")
figure.tight_layout()
figure.savefig(HERE / "06_ratios.png", dpi=110)

# %% [markdown]
# ## What to take away
#
# - A low-precision engine is a second policy. Its log-prob gaps are small on average, but its routing flips
#   compound with depth and expert count.
# - R3 makes the trainer compute with the rollout's routing. TIS and MIS reweight or drop tokens by how far μ
#   is from π_old. RS measured against the rollout (`--gamma-reference rollout`) sees the engine's flips from
#   the first minibatch on.
# - Whether any of this changes what RL learns is an experiment, not a tutorial: docs/results/ has it, with
#   its controls and statistics.
