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
# # Tutorial 3 — Inside an MoE: top-K routing, load balance, and router shift
#
# The toy policy of minirspo (`toy_moe.ToyMoE`) is a 4-layer decoder whose every feed-forward block is a
# Mixture-of-Experts layer: a linear **router** scores E = 8 experts per token, the K = 2 best ones run,
# and their outputs are mixed by the renormalised router probabilities (the **gates**).
#
# RL changes the router along with everything else. When it does, a token that the rollout sent to
# experts {3, 5} may now go to {3, 6}: the old log-probability of that token was computed by a different
# network than the one being trained, and its importance ratio says less than it seems. RSPO measures this
# **router shift** per token and turns it into a weight γ ∈ (0, 1]. Here we look at all three things on
# the real toy model, after one real RL update.
#
# The model is first warm-started on `a+b=` text for a minute (cached in `runs/warmstart/`, which
# tutorial 4 reuses). `MINIRSPO_FAST=1` shortens the warm start; the figures then show a barely trained
# model.

# %%
import copy
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt
import torch

from minirspo.loss import (group_advantages, policy_loss, router_logprobs_at, router_shift_ratio,
                           routing_consistency)
from minirspo.policy import ToyPolicy
from minirspo.tasks import make_task, score
from minirspo.warmstart import tutorial_warm_start
from toy_moe.checkpoint import load_toy_checkpoint

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
# The default run's warm start: pretraining stops once ~10% of held-out a+b= answers are right, not all.
model, tokenizer = load_toy_checkpoint(tutorial_warm_start(HERE, FAST))
policy = ToyPolicy(model, tokenizer)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.n_moe_layers} MoE layers, "
      f"E = {model.config.n_experts}, K = {model.config.top_k}")

# %% [markdown]
# ## 1. Top-K routing of one token
#
# Feed the prompt `12+34=` and look at the router of every layer at its last token. p = softmax over all
# E experts (float32); the two largest p pick the experts; their gates are those two p divided by their
# sum, so they add up to 1 (Mixtral, Qwen-MoE). Assignment 3 asks you to write exactly this.

# %%
prompt_ids, prompt_mask = policy.encode_prompts(["12+34="])
with torch.no_grad():
    out = model(prompt_ids, prompt_mask)
probs = out.router_logits[:, 0, -1].softmax(dim=-1)            # (L, E): the last prompt token, every layer
top_probs, top_experts = probs.topk(model.config.top_k, dim=-1)  # (L, K) each
gates = top_probs / top_probs.sum(dim=-1, keepdim=True)          # (L, K)
figure, axes = plt.subplots(1, model.n_moe_layers, figsize=(12, 2.8), sharey=True)
for layer, axis in enumerate(axes):
    chosen = set(top_experts[layer].tolist())
    colors = ["tab:orange" if e in chosen else "tab:grey" for e in range(model.config.n_experts)]
    axis.bar(range(model.config.n_experts), probs[layer], color=colors)
    axis.set(title=f"layer {layer}", xlabel="expert")
    print(f"layer {layer}: experts {top_experts[layer].tolist()}, p {top_probs[layer].numpy().round(3)}, "
          f"gates {gates[layer].numpy().round(3)}")
axes[0].set_ylabel("router probability p")
figure.suptitle("router of each MoE layer at the '=' of 12+34= (orange: the top-2 that run)")
figure.tight_layout()
figure.savefig(HERE / "03_topk_routing.png", dpi=110)

# %% [markdown]
# ## 2. Load balance
#
# If the router sent every token to the same two experts, the other six would be dead weight. Training
# adds the Switch Transformer load-balance loss E · Σ_e f_e P_e (f_e: share of the routed (token, expert)
# pairs that go to e, P_e: mean router probability of e), which is 1 when the load is perfectly even and
# grows as it concentrates. Here is the load over a batch of arithmetic problems with their answers.

# %%
task = make_task("arithmetic")
problems = task.sample(64 if FAST else 512, seed=1, split="train")
texts = [tokenizer.encode_example(p.prompt, p.answer) for p in problems]
width = max(len(prompt) + len(answer) for prompt, answer in texts)
ids = torch.full((len(texts), width), tokenizer.pad_id)                                   # (B, T)
for row, (prompt, answer) in enumerate(texts):
    ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
with torch.no_grad():
    out = model(ids, ids != tokenizer.pad_id)
load = out.expert_counts / out.expert_counts.sum(dim=-1, keepdim=True)                     # (L, E)
print(f"load-balance loss {float(out.aux_loss):.3f} (1 = perfectly even)")
figure, axis = plt.subplots(figsize=(6, 3))
image = axis.imshow(load, cmap="viridis", vmin=0)
axis.set(xlabel="expert", ylabel="MoE layer", title="share of routed tokens per expert (even = 1/8)")
figure.colorbar(image, ax=axis)
figure.tight_layout()
figure.savefig(HERE / "03_expert_load.png", dpi=110)

# %% [markdown]
# ## 3. Router shift after one RL update
#
# Now one RL step, done by hand with the package's pieces (the training loop, `minirspo.module`, does the
# same):
#
# 1. sample G = 8 answers to each of 32 problems (the rollout) and reward them;
# 2. score the rollout with the training forward *before* any update: the old policy's token log-probs,
#    the K experts each response token was routed to in every layer, and the old router's log-probs at
#    those experts — (L, B, N, K) numbers, never the full (L, B, N, E);
# 3. take one AdamW step on the GMPO loss, and score again.
#
# γ then compares, per token, the new router's log-probs at the *old* top-K experts with the old ones:
#
#     γ = exp( −(1/L) Σ_ℓ (1/K) Σ_k | log p_new(e_k) − log p_old(e_k) | )
#
# Before the update γ is exactly 1 — the first minibatch of every RL step is on-policy. We repeat the
# update at three learning rates from the same starting point.

# %%
n_prompts, group_size = (8, 4) if FAST else (32, 8)
problems = task.sample(n_prompts, seed=2, split="train")
repeated = [p for p in problems for _ in range(group_size)]
prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in repeated])
model.eval()
rollout = policy.generate(prompt_ids, prompt_mask, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
rewards = score(task, repeated, policy.decode_responses(rollout.tokens, rollout.mask))
advantages = group_advantages(rewards, group_size)
print(f"rollout: mean reward {rewards.mean():.2f}, {int((advantages != 0).sum())} of {len(advantages)} "
      "responses carry a learning signal")

model.train()
with torch.no_grad():
    old = policy.score(prompt_ids, prompt_mask, rollout.tokens, rollout.mask)
old_topk_logprobs = router_logprobs_at(old.router_logits, old.topk_idx)                   # (L, B, N, K)
gamma_before = router_shift_ratio(old.router_logits, old.topk_idx, old_topk_logprobs, rollout.mask)
assert gamma_before.eq(1).all(), "γ must be exactly 1 before any update"

start = copy.deepcopy(model.state_dict())
learning_rates = (1e-4, 1e-3, 1e-2)
gamma_by_lr = {}
for lr in learning_rates:
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    new = policy.score(prompt_ids, prompt_mask, rollout.tokens, rollout.mask)
    loss = policy_loss("gmpo", logprobs=new.logprobs, old_logprobs=old.logprobs, advantages=advantages,
                       mask=rollout.mask).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        new = policy.score(prompt_ids, prompt_mask, rollout.tokens, rollout.mask)
        per_layer = torch.stack([                                                          # (L, B, N)
            router_shift_ratio(new.router_logits[[layer]], old.topk_idx[[layer]], old_topk_logprobs[[layer]],
                               rollout.mask)
            for layer in range(model.n_moe_layers)])
        gamma = router_shift_ratio(new.router_logits, old.topk_idx, old_topk_logprobs, rollout.mask)  # (B, N)
        consistency = routing_consistency(new.router_logits, old.topk_idx, rollout.mask)
    gamma_by_lr[lr] = per_layer[:, rollout.mask]                                           # (L, valid tokens)
    valid = gamma[rollout.mask]
    print(f"lr {lr:g}: γ mean {valid.mean():.4f}, 5th percentile {valid.quantile(0.05):.4f}, "
          f"share below γ_min = 0.8: {(valid < 0.8).float().mean():.3f}, "
          f"(token, layer) pairs whose top-2 set changed: {1 - float(consistency):.1%}")
model.load_state_dict(start)

figure, axes = plt.subplots(1, model.n_moe_layers, figsize=(13, 3), sharey=True)
for layer, axis in enumerate(axes):
    for lr in learning_rates:
        axis.hist(gamma_by_lr[lr][layer].numpy(), bins=50, range=(0.0, 1.0), histtype="step", linewidth=1.5,
                  label=f"lr {lr:g}")
    axis.axvline(0.8, color="black", linestyle="--", linewidth=1)
    axis.set(title=f"layer {layer}", xlabel="γ of this layer alone", yscale="log")
axes[0].set_ylabel("response tokens")
axes[0].legend(fontsize=8, loc="upper left")
figure.suptitle("router shift after one AdamW step (dashed: the floor γ_min = 0.8)")
figure.tight_layout()
figure.savefig(HERE / "03_router_shift.png", dpi=110)

# %% [markdown]
# What the numbers say:
#
# * one optimiser step is enough to move the router: even at the smallest learning rate γ < 1 for most
#   tokens, and a few percent of the (token, layer) pairs already route to a different top-2 set;
# * the larger the step, the lower γ and the more top-2 sets change — the routing instability the paper
#   is about. At the largest learning rate here most tokens would fall below the floor. Some layers move
#   more than others;
# * RSPO multiplies each token's ratio by max(γ, 0.8) with no gradient through γ: tokens whose routing
#   moved count less, and none counts less than 0.8 of its ratio.
#
# Tutorial 4 trains with this weight on, next to plain GRPO.
