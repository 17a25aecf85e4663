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
# # Tutorial 2 — Sequence-level ratios: GRPO, GSPO and GMPO
#
# A response is a sequence of tokens, each with its own importance ratio w_t = π_θ(y_t) / π_old(y_t),
# but the reward belongs to the whole sequence. How should the token ratios be combined?
#
# * **GRPO** clips every token ratio and averages them: (1/|y|) Σ_t min(w_t Â, clip(w_t, 1 ± 0.2) Â).
# * **GSPO** (arXiv 2507.18071) forms one sequence ratio, the geometric mean s = exp((1/|y|) Σ_t log w_t),
#   and clips *it*, in a very narrow band (1 − 3e-4, 1 + 4e-4).
# * **GMPO** (arXiv 2507.20673) clips each token in log space, log w_t ∈ [−0.4, 0.4] on the side the sign
#   of Â selects, and then takes the geometric mean: J = Â · exp((1/|y|) Σ_t clip(log w_t)).
#   RSPO is GMPO with router-shift weighting (tutorials 3 and 4).
#
# All three live in `minirspo.loss`; this tutorial feeds them hand-made log-ratios and looks at what comes
# out: one outlier token, then responses of different lengths. Runs in well under a minute.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files next to this tutorial
import matplotlib.pyplot as plt
import torch

from minirspo.loss import gmpo_loss, grpo_loss, gspo_loss

FAST = os.environ.get("MINIRSPO_FAST") == "1"
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
LOSSES = {"GRPO": grpo_loss, "GSPO": gspo_loss, "GMPO": gmpo_loss}
COLORS = {"GRPO": "tab:blue", "GSPO": "tab:orange", "GMPO": "tab:green"}

# %% [markdown]
# ## 1. One response, by hand
#
# Four tokens with log-ratios (0.1, −0.1, 0.3, 2.0): the last token's probability went up e² ≈ 7.4 times
# since the rollout, the kind of outlier a rare token produces. Each loss is −J for a batch of one
# sequence; its gradient with respect to the token log-probs is what reaches the network.

# %%
def objective_and_token_gradients(loss, log_ratios: torch.Tensor, advantage: float) -> tuple[float, list[float]]:
    """J and dJ/d log π_θ(y_t) for one sequence (B = 1) with the given token log-ratios (T,)."""
    logprobs = log_ratios.clone().view(1, -1).requires_grad_(True)  # (1, T); old log-probs are 0
    out = loss(logprobs, torch.zeros_like(logprobs), torch.tensor([advantage]),
               torch.ones_like(logprobs, dtype=torch.bool))
    (gradient,) = torch.autograd.grad(-out.loss, logprobs)
    return float(-out.loss.detach()), gradient.view(-1).tolist()


log_ratios = torch.tensor([0.1, -0.1, 0.3, 2.0])
for advantage in (1.0, -1.0):
    for name, loss in LOSSES.items():
        objective, gradient = objective_and_token_gradients(loss, log_ratios, advantage)
        print(f"Â = {advantage:+.0f}  {name}:  J = {objective:+.3f}   dJ/dlogπ per token = "
              f"{[round(g, 3) for g in gradient]}")

# %% [markdown]
# Check a few numbers by hand:
#
# * GRPO, Â = +1: ratios e^(0.1, −0.1, 0.3, 2) = (1.105, 0.905, 1.350, 7.389), capped at 1.2 →
#   J = (1.105 + 0.905 + 1.2 + 1.2) / 4 = 1.103; the two capped tokens get no gradient.
# * GRPO, Â = −1: now only ratios *below* 0.8 are clipped, so the outlier stays: J = −(1.105 + 0.905 +
#   1.350 + 7.389) / 4 = −2.687, and the outlier's gradient is −7.389 / 4 — seven times any other token's.
#   A negative-advantage response with one outlier token is pushed down mostly through that one token.
# * GSPO: s = exp(mean log w) = exp(0.575) = 1.78, far outside its band: for Â = +1 it is capped at
#   1 + 4e-4 (J = 1.0004, no gradient at all); for Â = −1, J = −1.78 and every token gets the same
#   gradient −1.78 / 4.
# * GMPO, Â = +1: log-ratios capped at 0.4 → mean (0.1 − 0.1 + 0.3 + 0.4) / 4 = 0.175, J = e^0.175 = 1.19;
#   for Â = −1 nothing is clipped (only log w < −0.4 would be), J = −e^0.575 = −1.78, like GSPO.
#
# The geometric mean turns a factor of 7.4 on one token into a factor of 7.4^(1/4) = 1.65 on the sequence,
# and shares the gradient equally among the tokens.

# %% [markdown]
# ## 2. One outlier token in a response of 16
#
# Now sweep the outlier: 15 tokens with log-ratio 0 and one with log-ratio x. The plot shows the gradient
# on the outlier token (what the network receives through it) and on each ordinary token.

# %%
n_tokens = 16
outliers = torch.linspace(-3, 3, 61 if FAST else 241)
figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for axis, advantage in zip(axes, (1.0, -1.0)):
    for name, loss in LOSSES.items():
        on_outlier, on_others = [], []
        for x in outliers:
            log_ratios = torch.zeros(n_tokens)
            log_ratios[0] = x
            _, gradient = objective_and_token_gradients(loss, log_ratios, advantage)
            on_outlier.append(abs(gradient[0]))
            on_others.append(abs(gradient[1]))
        axis.plot(outliers, on_outlier, color=COLORS[name], label=f"{name}: outlier token")
        axis.plot(outliers, on_others, color=COLORS[name], linestyle=":", label=f"{name}: each other token")
    axis.set(title=f"Â = {advantage:+.0f}", xlabel="log-ratio x of the outlier token", yscale="log",
             ylim=(1e-3, 2))
axes[0].set_ylabel("|dJ / d log π(token)|  (0 is off the scale)")
axes[1].legend(fontsize=8)
figure.tight_layout()
figure.savefig(HERE / "02_outlier_token.png", dpi=110)

# %% [markdown]
# Reading the picture:
#
# * **GRPO** treats the outlier on its own. With Â = +1 it is clipped beyond 1.2 (gradient 0); with Â = −1
#   it is *not* clipped when its ratio grows, and its gradient grows like e^x / 16 — at x = 3 it is 20 times
#   an ordinary token's. One token dominates the update.
# * **GSPO** has no token-level view: once the sequence ratio leaves its narrow band the whole response
#   is clipped, and inside it every token gets the same gradient.
# * **GMPO** clips the outlier in log space at ±0.4 (the side set by Â's sign) and otherwise lets it move
#   the sequence ratio by only e^(x/16): the gradient stays within a few percent of an ordinary token's.

# %% [markdown]
# ## 3. Why length matters: how often does the clip fire?
#
# After the first minibatch of a step, every token's log-ratio carries some noise from the updates in
# between. Model that as log w_t ~ N(0, σ²), independent across tokens, with random-sign advantages, and
# measure the share of the objective that the clip switches off (`clip_frac_low + clip_frac_high` in the
# losses' metrics: tokens for GRPO and GMPO, sequences for GSPO) as the responses get longer.

# %%
lengths = [1, 2, 4, 8, 16, 32, 64, 128]
noise_levels = (0.001, 0.01, 0.3)
n_sequences = 400 if FAST else 4000
generator = torch.Generator().manual_seed(0)
figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for axis, noise in zip(axes, noise_levels):
    for name, loss in LOSSES.items():
        clipped = []
        for length in lengths:
            log_ratios = noise * torch.randn(n_sequences, length, generator=generator)     # (B, T)
            advantages = torch.randn(n_sequences, generator=generator).sign()              # (B,)
            out = loss(log_ratios, torch.zeros_like(log_ratios), advantages,
                       torch.ones_like(log_ratios, dtype=torch.bool))
            clipped.append(float(out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]))
        axis.plot(lengths, clipped, marker="o", color=COLORS[name], label=name)
        print(f"σ = {noise:<6} {name}: clipped share by length {dict(zip(lengths, [round(c, 3) for c in clipped]))}")
    axis.set(title=f"token log-ratio noise σ = {noise}", xlabel="response length |y|", xscale="log")
axes[0].set_ylabel("share clipped (tokens; sequences for GSPO)")
axes[0].legend()
figure.tight_layout()
figure.savefig(HERE / "02_clipping_by_length.png", dpi=110)

# %% [markdown]
# The token-level clips (GRPO, GMPO) fire at the same rate whatever the length: each token is judged
# alone. GSPO's sequence ratio averages |y| noisy log-ratios, so its spread shrinks like σ / √|y|, and its
# clip fires less often on long responses than on short ones. That is why GSPO's band is so narrow
# (3e-4 / 4e-4, not 0.2): the ratio it clips is an average that barely moves. With a wider band it would
# almost never fire; with this one, a short response is clipped sooner than a long one at the same
# per-token drift.
#
# What to take away:
#
# * token ratios are noisy and occasionally extreme; an arithmetic mean (GRPO) lets one token dominate,
#   a geometric mean (GSPO, GMPO) shares the sequence's credit across its tokens;
# * GMPO keeps a token-level clip, so it still stops a token that has moved too far, and its clip rate does
#   not depend on the length;
# * the router-shift weight of RSPO multiplies into exactly these token ratios, log w̃ = log w + log γ̃,
#   before GMPO's clip (tutorials 3 and 4, and assignment 2).
