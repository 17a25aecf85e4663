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
# # Tutorial 1 — From REINFORCE to GRPO, on a bandit you can solve by hand
#
# An LM answering a prompt is, from far enough away, a bandit: it pulls an "arm" (a response), a verifier
# pays a reward, and we want more probability on the arms that pay. This tutorial builds GRPO's three
# ingredients on a 4-armed bandit, each checked against a number worked out by hand:
#
# 1. the policy gradient (REINFORCE) and why a baseline helps,
# 2. GRPO's **group advantages**, `minirspo.loss.group_advantages`,
# 3. **importance ratios and clipping**, which make it safe to take several optimiser steps on one batch:
#    `minirspo.loss.grpo_loss`.
#
# It runs in well under a minute; `MINIRSPO_FAST=1` (what the test suite sets) only shortens the loops.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt
import torch

from minirspo.loss import group_advantages, grpo_loss

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
torch.set_num_threads(1)  # tensors of a few entries: extra threads only add start-up cost

# %% [markdown]
# ## The bandit
#
# Arm a pays reward 1 with probability q_a and 0 otherwise, like a verifier that says right or wrong.
# The policy is a softmax over four logits θ, π = softmax(θ), and it starts uniform.

# %%
success = torch.tensor([0.2, 0.4, 0.6, 0.8])  # q_a
n_arms = len(success)


def pull(arms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Binary rewards (B,) for the arms pulled (B,)."""
    return (torch.rand(arms.shape, generator=generator) < success[arms]).float()


# %% [markdown]
# ## 1. The policy gradient, by hand and by autograd
#
# The objective is the expected reward J(θ) = Σ_a π_a q_a. For a softmax, ∂ log π_a / ∂θ = e_a − π, so
#
#     ∇J = Σ_a π_a q_a (e_a − π) = π ⊙ (q − J).
#
# At the uniform start π = 1/4 and J = 0.5, so ∇J = (q − 0.5) / 4 = (−0.075, −0.025, 0.025, 0.075).

# %%
theta = torch.zeros(n_arms, requires_grad=True)
expected_reward = (theta.softmax(0) * success).sum()
(autograd_gradient,) = torch.autograd.grad(expected_reward, theta)
by_hand = (success - 0.5) / 4
print("by hand :", by_hand.tolist())
print("autograd:", autograd_gradient.tolist())
assert torch.allclose(autograd_gradient, by_hand)

# %% [markdown]
# An LM cannot sum over all responses, so REINFORCE estimates the gradient from G samples:
# ∇J ≈ (1/G) Σ_i r_i ∇ log π(a_i). Subtracting a baseline b from r_i changes no direction on average
# (E[∇ log π] = 0) and can shrink the noise a lot. GRPO's baseline is the mean reward **of the group**, the
# G responses to the same prompt, and GRPO also divides by the group's standard deviation.
#
# Both change the *scale* of the estimate (the group mean contains the sample itself, which shrinks it by
# (G − 1)/G; the std rescales it), so we judge each estimator by its *direction*: the cosine between one
# group's estimate and the exact ∇J. 1 is perfect; an all-equal group gives a zero estimate (cosine 0).

# %%
group_size = 8
n_estimates = 500 if FAST else 4000
generator = torch.Generator().manual_seed(0)
probs = torch.full((n_arms,), 1 / n_arms)
arms = torch.multinomial(probs, n_estimates * group_size, replacement=True, generator=generator)
rewards = pull(arms, generator)
score_function = torch.nn.functional.one_hot(arms, n_arms) - probs  # ∇ log π(a) = e_a − π, (n·G, A)

grouped_rewards = rewards.view(n_estimates, group_size)                          # (n, G)
estimators = {
    "REINFORCE: r": grouped_rewards,
    "baseline: r − group mean": grouped_rewards - grouped_rewards.mean(1, keepdim=True),
    "GRPO: (r − mean) / std": group_advantages(rewards, group_size).view(n_estimates, group_size),
}
figure, axis = plt.subplots(figsize=(7, 3.5))
for name, weights in estimators.items():
    estimates = (weights.view(-1, 1) * score_function).view(n_estimates, group_size, n_arms).mean(1)  # (n, A)
    cosine = torch.nn.functional.cosine_similarity(estimates, by_hand.expand_as(estimates), dim=1)     # (n,)
    print(f"{name:26s} mean estimate {[round(v, 3) for v in estimates.mean(0).tolist()]}, "
          f"mean cosine to ∇J {cosine.mean():.2f}")
    axis.hist(cosine.numpy(), bins=30, range=(-1, 1), histtype="step", linewidth=1.5, label=name)
axis.set_xlabel("cosine(estimate from one group of 8, exact ∇J)")
axis.set_ylabel("groups")
axis.legend(fontsize=8, loc="upper left")
figure.tight_layout()
figure.savefig(HERE / "01_gradient_estimates.png", dpi=110)

# %% [markdown]
# Plain REINFORCE points the right way on average, but one group of 8 often points elsewhere: every
# rewarded sample pushes its own arm up, good arm or not. With the group mean as a baseline, a sample is
# pushed up only if it did better than its siblings, and the estimates line up with ∇J far more often.
# The std division rescales, it does not turn the estimate.

# %% [markdown]
# ## 2. Group advantages, by hand
#
# A group of G = 4 responses to one prompt scores rewards (1, 0, 0, 0). Its mean is 0.25 and its standard
# deviation (with Bessel's correction, as `torch.std`) is √((0.75² + 3 · 0.25²) / 3) = 0.5, so
#
#     Â = (r − 0.25) / 0.5 = (1.5, −0.5, −0.5, −0.5).
#
# A group whose rewards are all equal teaches nothing — every response was as good as its siblings — and
# gets Â = 0 exactly.

# %%
rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of four
advantages = group_advantages(rewards, group_size=4)
print(advantages.view(2, 4))
assert torch.allclose(advantages[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
assert advantages[4:].eq(0).all()

# %% [markdown]
# ## 3. Importance ratios and clipping
#
# Sampling is the expensive part of RL for an LM, so each batch of responses is used for several optimiser
# steps. After the first step the policy π_θ is no longer the π_old that sampled the batch; the
# **importance ratio** w = π_θ(a) / π_old(a) reweights each sample so that the objective still measures
# π_θ. PPO-style clipping stops the optimiser from running away with a ratio that has already moved far:
#
#     per token:  min( w Â , clip(w, 1 − ε, 1 + ε) Â ),   ε = 0.2
#
# A picture says it best. For one token with Â = +1 the objective stops rewarding w beyond 1.2; with
# Â = −1 it stops penalising w below 0.8. Where the clip bites, the gradient is zero. The curves below come
# straight from `grpo_loss` (it returns −J, the loss to minimise).

# %%
ratios = torch.linspace(0.3, 2.0, 400)
figure, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
for advantage, color in ((1.0, "tab:green"), (-1.0, "tab:red")):
    log_ratio = ratios.log().view(-1, 1).requires_grad_(True)              # (B, T) with T = 1 token
    out = grpo_loss(log_ratio, torch.zeros_like(log_ratio), torch.full((len(ratios),), advantage),
                    torch.ones_like(log_ratio, dtype=torch.bool))
    # the loss is a mean over B sequences: scale by B to read each sequence's own objective
    objective = -out.loss * len(ratios)
    (gradient,) = torch.autograd.grad(objective, log_ratio)
    per_sequence = ratios.clamp(max=1.2) if advantage > 0 else -ratios.clamp(min=0.8)
    assert torch.isclose(objective, per_sequence.sum(), rtol=1e-5)
    axes[0].plot(ratios, per_sequence, color=color, label=f"Â = {advantage:+.0f}")
    axes[1].plot(ratios, gradient.squeeze(1) / ratios, color=color, label=f"Â = {advantage:+.0f}")
axes[0].set(title="clipped objective of one token", xlabel="ratio w")
axes[1].set(title="its gradient d objective / dw", xlabel="ratio w")
for axis in axes:
    axis.axvspan(0.8, 1.2, color="grey", alpha=0.15)
    axis.legend()
figure.tight_layout()
figure.savefig(HERE / "01_clipping.png", dpi=110)

# %% [markdown]
# ## 4. Putting it together: learning the bandit
#
# Each RL step samples a group of G = 8 pulls from π_old, scores them, computes Â, and takes
# `epochs` optimiser steps on `grpo_loss`. With one step per batch, w = 1 exactly and GRPO's loss is
# REINFORCE with Â in place of r. Reusing the batch (8 steps per batch) squeezes more out of each sample;
# without clipping (ε = ∞) the repeated steps keep pushing the same eight samples, with clipping a sample
# stops pushing once its ratio has left [0.8, 1.2].
#
# We run it at a moderate step size (SGD, lr 0.5) and at a large one (lr 2), the regime where RL on LMs
# gets into trouble, and plot the probability of the best arm, averaged over independent runs, against the
# number of pulls. The printout also counts the runs that end up stuck on a worse arm.

# %%
def train(advantage_of, epochs: int, clip: float, steps: int, seed: int, lr: float) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(n_arms, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=lr)
    best_arm_probability = []
    for _ in range(steps):
        with torch.no_grad():
            old_log_probs = theta.log_softmax(0)
            arms = torch.multinomial(old_log_probs.exp(), group_size, replacement=True, generator=generator)
        rewards = pull(arms, generator)
        advantages = advantage_of(rewards)
        old_logprobs = old_log_probs[arms].view(-1, 1)                   # (G, 1): one "token" per response
        for _ in range(epochs):
            logprobs = theta.log_softmax(0)[arms].view(-1, 1)            # (G, 1)
            out = grpo_loss(logprobs, old_logprobs, advantages, torch.ones_like(logprobs, dtype=torch.bool),
                            clip_low=clip, clip_high=clip)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        best_arm_probability.append(float(theta.detach().softmax(0)[-1]))
    return best_arm_probability


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    return group_advantages(rewards, group_size)


variants = {
    "REINFORCE (Â = r), 1 step per batch": (lambda rewards: rewards, 1, 0.2),
    "GRPO Â, 1 step per batch": (grpo_advantages, 1, 0.2),
    "GRPO Â, 8 steps per batch, no clip": (grpo_advantages, 8, float("inf")),
    "GRPO Â, 8 steps per batch, clip 0.2": (grpo_advantages, 8, 0.2),
}
n_seeds, n_steps = (3, 10) if FAST else (16, 30)
figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for axis, lr in zip(axes, (0.5, 2.0)):
    for name, (advantage_of, epochs, clip) in variants.items():
        curves = torch.tensor([train(advantage_of, epochs, clip, n_steps, seed, lr) for seed in range(n_seeds)])
        final = curves[:, -1]
        print(f"lr {lr}  {name:38s} P(best arm) after {n_steps * group_size} pulls: mean {final.mean():.2f}, "
              f"runs stuck below 0.5: {int((final < 0.5).sum())}/{n_seeds}")
        axis.plot(torch.arange(1, n_steps + 1) * group_size, curves.mean(0), label=name)
    axis.set(title=f"SGD lr {lr}", xlabel="pulls (samples drawn)", ylim=(0, 1))
axes[0].set_ylabel("P(best arm), mean over runs")
axes[0].legend(fontsize=8)
figure.tight_layout()
figure.savefig(HERE / "01_bandit_learning.png", dpi=110)

# %% [markdown]
# What to take away:
#
# * the group mean is a free baseline, and dividing by the group std makes the step size independent of
#   how rewards are scaled;
# * at a moderate step size, several steps per batch learn more per sample than one;
# * at a large step size, reusing a batch without clipping drives many runs onto a worse arm for good,
#   while the clipped runs keep learning: clipping bounds how far one batch can move the policy.
#
# Tutorial 2 asks what a "ratio" should be when a response is a sequence of tokens rather than one arm.
