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
# # Tutorial 4 — RSPO end to end, next to GRPO
#
# Two short RL runs on the toy MoE, from the same warm start, on the same prompts: one with GRPO (the
# token-level baseline of tutorial 1), one with RSPO (GMPO's geometric mean with the router-shift weight
# of tutorial 3). Both are `minirspo.train.run(RLConfig(...))` — the same function as
# `python -m minirspo.train` — and both log reward, held-out accuracy, entropy, γ, routing consistency and
# clip fraction to a `metrics.csv` per run.
#
# Each RL step samples 8 answers to each of 32 `a+b=` problems and makes 4 optimiser steps on them (one
# per minibatch of 64), so minibatches 2–4 are off-policy: that is where the router shifts and where RSPO's
# weight acts. Everything else is the default run's (`python -m minirspo.train`: sampling at temperature
# 0.7, lr 1e-4, advantages r − mean; docs/default_run.md has the sweep behind them), so both losses learn.
# The warm start is shared with tutorial 3 (`runs/warmstart/`; it is trained here first if tutorial 3 has
# not run). Two runs of 150 steps show the mechanics, not the paper's result: for that, run the grid
# `python -m minirspo.compare` (about 80 minutes on 2 cores).

# %%
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt

from minirspo.config import RLConfig
from minirspo.report import CURVES, read_metrics
from minirspo.train import run
from minirspo.warmstart import tutorial_pretrain

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
# The same warm start as tutorial 3 (so the cached checkpoint is shared).
WARM_START = tutorial_pretrain(FAST)  # the warm start tutorial 3 made (shorter in fast mode)
# fast: 2 steps of 4 problems × 8 answers in 2 minibatches (still one off-policy minibatch per step)
n_steps, n_prompts, minibatch = (2, 4, 16) if FAST else (150, 32, 64)

# %% [markdown]
# ## The two runs
#
# Everything but the loss is the same. The learning rate is the default 1e-4, where the sweep in
# docs/default_run.md learned on every seed (2e-4 swung, 1e-3 collapsed; try those too, with `lr=` below).

# %%
def rl_config(loss: str) -> RLConfig:
    out = HERE / "runs" / f"tutorial4-{loss}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time the tutorial is executed
    return RLConfig(task="arithmetic", loss=loss, lr=1e-4, n_prompts=n_prompts, group_size=8,
                    minibatch_size=minibatch, max_steps=n_steps, eval_every=max(n_steps // 6, 1),
                    eval_size=16 if FAST else 200, checkpoint_every=n_steps, accelerator="cpu",
                    out=str(out), warmstart_dir=str(HERE / "runs" / "warmstart"), pretrain=WARM_START)


metrics = {loss: read_metrics(run(rl_config(loss))) for loss in ("grpo", "rspo")}

# %% [markdown]
# ## The curves
#
# One panel per metric, both runs on the same axes: the per-step values faintly, a running mean over 5 steps
# boldly. γ and routing consistency are measured for GRPO too (it just does not use them), so the two router
# panels compare like with like.

# %%
def running_mean(values: list[float], width: int = 5) -> list[float]:
    return [sum(values[max(0, i - width + 1): i + 1]) / len(values[max(0, i - width + 1): i + 1])
            for i in range(len(values))]


figure, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
for axis, (name, label) in zip(axes.flat, CURVES):
    for loss, color in (("grpo", "tab:blue"), ("rspo", "tab:red")):
        points = [(step, value) for step, value in zip(metrics[loss]["step"], metrics[loss].get(name, []))
                  if value == value]  # NaN (not logged at this step) != itself
        if not points:
            continue
        steps, values = zip(*points)
        if name == "accuracy":  # evaluated every few steps only
            axis.plot(steps, values, color=color, marker="o", markersize=3, label=loss.upper())
        else:
            axis.plot(steps, values, color=color, alpha=0.25)
            axis.plot(steps, running_mean(list(values)), color=color, label=loss.upper())
    axis.set_title(label, fontsize=10)
    axis.grid(alpha=0.3)
for axis in axes[-1]:
    axis.set_xlabel("RL step")
axes[0, 0].legend()
figure.suptitle("GRPO vs RSPO on a+b=, same warm start and prompts")
figure.tight_layout()
figure.savefig(HERE / "04_grpo_vs_rspo.png", dpi=110)

for loss, values in metrics.items():
    accuracy = [a for a in values["accuracy"] if a == a]
    print(f"{loss.upper()}: held-out greedy accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}, "
          f"mean reward of the last 5 steps {sum(values['reward_mean'][-5:]) / len(values['reward_mean'][-5:]):.3f}, "
          f"mean γ {sum(values['gamma_mean']) / len(values['gamma_mean']):.4f}")

# %% [markdown]
# How to read it:
#
# * **reward** is noisy step to step: each step draws 32 new problems, and over the first 20 steps from this
#   warm start the sampled reward swung between about 0.15 and 0.22 (measured on one run), as large as
#   what 50 steps of learning add. Judge trends by the running mean and by the **held-out accuracy** (200 fixed problems,
#   greedy decoding), and do not rank GRPO and RSPO on one short run: `python -m minirspo.compare` runs
#   several seeds and learning rates for that;
# * **γ** is below 1 for both: the router moves within every RL step whatever the loss. Only RSPO uses
#   it — each token's ratio is multiplied by max(γ, 0.8), so tokens whose routing moved push less. At this
#   learning rate γ stays close to 1; raise `lr` and watch it fall;
# * **entropy** (of the next-token distribution, per response token) is the early warning of trouble: a
#   policy collapsing onto one answer drives it towards 0, one coming apart drives it up;
# * **routing consistency** is the share of (token, layer) pairs whose top-2 experts are the same as in
#   the rollout, averaged over the four minibatches (the first is always 100%);
# * **clip fraction** differs by construction: GRPO clips ratios at 1 ± 0.2 per token, RSPO clips log-ratios
#   at ±0.4 on one side.
#
# Next: tutorial 5 runs the same loss on a Hugging Face MoE checkpoint and sharded over two processes.
