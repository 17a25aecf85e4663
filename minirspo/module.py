"""The RL loop as a LightningModule with manual optimisation: one `training_step` is one RL step.

Notation: B sequences on this rank (n_prompts / world × G), P prompt tokens, N response tokens,
S = P + N, L MoE layers, E experts, K experts per token, G responses per prompt, M minibatch size.

One RL step:
 1. sample this step's prompts (seeded by (seed, step), so a resumed run sees the same prompts) and G
    responses to each with the current policy: no gradient, KV cache (`Policy.generate`);
 2. reward each response with the task's verifier and compute group advantages (a group whose rewards
    are all equal gets Â = 0, hence no gradient, and is counted in `zero_variance_frac`); with
    `--resample-rounds` such flat groups are first replaced by groups of fresh prompts (`collect_rollouts`);
 3. score every minibatch but the first with the training forward, without gradient and before any
    update: the *old* policy's per-token log-probs and routing (top-K experts and the router log-probs
    at them, (L, B, N, K));
 4. `ppo_epochs` passes of optimiser steps over the minibatches with the chosen loss. The first
    minibatch is exactly on-policy (ratio 1, γ 1): no update came before its first training forward,
    so that forward, detached, *is* its old policy, and scoring it a second time would only repeat it
    (except under routing replay, whose training forward needs the old routing as input). Every later
    minibatch is off-policy, which is where the router shifts and RS weighting acts; further epochs
    reuse the stored old values.

Where this departs from "keep the rollout's log-probs as the old policy" (and why): step 3 re-scores
the rollout with the training forward instead of keeping the log-probs and routing recorded while
sampling, so the sampler records nothing but tokens. A KV-cache decode and a full forward differ in
the last float bits (the prototype measured 5e-7 on token log-probs and 8e-6 on router log-probs),
enough to make γ < 1 and ratios ≠ 1 on a minibatch that is in truth on-policy, and a sampler such as
vLLM differs far more. verl re-scores for the same reason. Only (L, B, N, K) of routing is kept, never
(L, B, N, E).

Router diagnostics (γ statistics and routing consistency) are measured for every loss by default, so runs
compare on one footing; `--no-router-diagnostics` skips them where the loss does not use γ (RS losses
and --gamma-min auto always compute it), which is what "RSPO vs GMPO step time" must compare. Each row's
`seconds` is the RL step alone, `rollout_seconds` the part of it spent sampling and rewarding the rollouts;
held-out evaluation is timed apart (`eval_seconds`). The accuracy in the
row of step s is the policy's after s RL steps (measured before step s); the final policy, after the last
step's updates, gets a row of its own at step max_steps.

Distributed: prompts are split across ranks by whole groups, so advantages never need another rank;
each rank's loss is a mean over its B sequences and DDP/FSDP average gradients, which equals the
single-process mean over the global batch.
"""
import copy
import time
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from minirspo.config import RLConfig, check_router_flags
from minirspo.distributed import clip_grad_norm, parallelize
from minirspo.loss import (group_advantages, policy_loss, rollout_keep_mask, rollout_mismatch_metrics,
                           router_logprobs_at, router_shift_metrics, router_shift_ratio, routing_consistency,
                           truncated_is_weights, zero_variance_groups)
from minirspo.policy import Policy, Samples
from minirspo.rollout import join_rollouts, make_engine, rows_of
from minirspo.tasks import REWARD_CORRECT, Problem, Task, score


class Group(NamedTuple):
    problem: Problem
    samples: Samples  # G rows: tokens (G, N_r) up to and including the stop token, and what the sampler recorded
    rewards: Tensor   # (G,)

    @property
    def is_flat(self) -> bool:
        """All G rewards equal: Â = 0 for every response, so the group adds no gradient."""
        return bool((self.rewards == self.rewards[0]).all())


class Minibatch(NamedTuple):
    prompt_ids: Tensor   # (M, P)
    prompt_mask: Tensor  # (M, P) bool
    tokens: Tensor       # (M, N)
    mask: Tensor         # (M, N) bool, valid response tokens
    advantages: Tensor   # (M,)
    rollout: Samples     # the same M rows as the sampler recorded them (log μ, its routing), where it recorded them


class OldPolicy(NamedTuple):
    """What an update compares with; router state only where it is used: L·M·N·K·12 bytes for γ (int64
    experts + float32 log-probs), L·M·S·K·8 bytes for routing replay, nothing otherwise."""
    logprobs: Tensor       # (M, N) log π_old of each response token
    topk_idx: Tensor | None       # (L, M, N, K) experts π_old activated at each response token (None: no γ)
    topk_logprobs: Tensor | None  # (L, M, N, K) π_old's router log-probs at those experts (None: no γ)
    routing: Tensor | None        # (L, M, S, K) π_old's experts at every position (None: no routing replay)
    ref_logprobs: Tensor | None   # (M, N) reference-model log-probs when kl_coef > 0
    rollout_mismatch: dict[str, Tensor]  # μ against π_old on this minibatch (loss.rollout_mismatch_metrics), or {}


AUTO_GAMMA_MIN_START = 0.8           # --gamma-min auto starts at the fixed default
AUTO_GAMMA_MIN_RANGE = (0.5, 0.99)   # and stays where a floor still means something
AUTO_GAMMA_MIN_RATE = 0.1            # EMA rate per off-policy minibatch: ~10 minibatches to settle


def step_seed(seed: int, step: int) -> int:
    """The seed of one RL step's prompts and samples: a function of (seed, step) only, so resuming is exact."""
    return seed * 1_000_003 + step


class RLModule(L.LightningModule):
    def __init__(self, policy: Policy, config: RLConfig, task: Task | None = None):
        """`task`: the task `validate` built (train passes it); built from `config` when not given."""
        super().__init__()
        check_router_flags(config, policy.is_moe, "this model")  # a UsageError (a ValueError) on a dense model
        self.automatic_optimization = False
        self.policy, self.config = policy, config
        self.model = policy.model.train()  # checkpoints load in eval mode; generation toggles it per call
        self.task = task if task is not None else config.build_task()
        self.eval_problems = self.task.eval_set(config.eval_size)
        self.clip = {name: value for name, value in (("clip_low", config.clip_low),
                                                     ("clip_high", config.clip_high)) if value is not None}
        # The floor γ_min is state, so that a checkpoint holds it and --gamma-min auto resumes exactly.
        self.register_buffer("gamma_floor", torch.tensor(AUTO_GAMMA_MIN_START if config.gamma_min == "auto"
                                                         else float(config.gamma_min)))
        # γ is computed where the loss or the adaptive floor needs it, and for the diagnostics unless they are off
        self.measures_router_shift = policy.is_moe and (config.uses_router_shift or config.gamma_min == "auto"
                                                        or config.router_diagnostics)
        # R2 feeds π_old's routing into the training forward, so that forward cannot be its own old policy, and
        # --old-logprobs rollout has μ for every minibatch; otherwise (R3 included: its routing comes from the
        # rollout) the first minibatch trains from the parameters π_old scores with, so its forward is π_old.
        self.first_minibatch_is_its_own_old = not config.routing_replay and config.old_logprobs == "trainer"
        self.engine = make_engine(policy, config.rollout_engine, config.rollout_precision, seed=config.seed)  # μ
        self.reference = None
        if config.kl_coef > 0:  # the KL anchor is the policy as it was when RL started
            self.reference = copy.deepcopy(policy)
            self.reference_model = self.reference.model.requires_grad_(False).eval()

    def configure_model(self):
        parallelize(self)  # fsdp2 sharding and activation checkpointing (minirspo.distributed)

    def teardown(self, stage: str) -> None:
        self.engine.close()  # a vLLM engine or a low-precision copy goes with the run (one engine alive at a time)

    # --- optimiser --------------------------------------------------------------------------------
    def configure_optimizers(self):
        # fused: one kernel for all parameters (a 14M-parameter step takes 10 ms instead of 90 ms on one CPU core,
        # benchmarks/README.md); sharded (DTensor) parameters keep PyTorch's default implementation
        params = list(self.model.parameters())
        fused = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)
        groups = [{"params": params}]  # group 0 is the one whose lr is logged
        if self.config.router_lr_scale != 1.0:  # the routers in a group of their own, at lr × router_lr_scale
            routers = self.policy.router_weights
            router_ids = {id(p) for p in routers}
            groups = [{"params": [p for p in params if id(p) not in router_ids]},
                      {"params": routers, "lr": self.config.lr * self.config.router_lr_scale}]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                      fused=fused or None)
        warmup = max(self.config.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]

    # --- one RL step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        cfg = self.config
        step = self.global_step // cfg.updates_per_step
        row, eval_seconds = {}, 0.0  # row: this step's metrics; "accuracy" is the policy's before the step
        if cfg.eval_every and step % cfg.eval_every == 0:  # the policy after `step` RL steps
            row["accuracy"], eval_seconds = self.timed_evaluation()
        started = time.perf_counter()
        minibatches, rollout_stats = self.collect_rollouts(step)
        rollout_seconds = time.perf_counter() - started  # the rollout's tokens are on the host: no pending GPU work
        # the old policy of every minibatch, scored before any update; the first one's comes from its own
        # first training forward (update(mb, None)), exact because nothing has been updated before it
        old = [None if i == 0 and self.first_minibatch_is_its_own_old else self.score_old(mb)
               for i, mb in enumerate(minibatches)]
        updates = []
        for _ in range(cfg.ppo_epochs):
            for i, mb in enumerate(minibatches):
                metrics, old[i] = self.update(mb, old[i])  # the on-policy minibatch's old policy comes back
                updates.append(metrics)
        for name in updates[0]:
            row[name] = torch.stack([u[name] for u in updates]).mean()
        for name in old[0].rollout_mismatch:  # over the step's minibatches: the mean of means, the max of maxima
            values = torch.stack([o.rollout_mismatch[name] for o in old])
            row[name] = values.amax() if name.endswith("_max") else values.mean()
        row |= rollout_stats
        row = self.mean_over_ranks(row)
        row["seconds"], row["rollout_seconds"] = time.perf_counter() - started, rollout_seconds
        if "accuracy" in row:
            row["eval_seconds"] = eval_seconds
        for logger in self.loggers:
            logger.log_metrics(row, step=step)
        self.log_dict({"reward": row["reward_mean"], "γ": row.get("gamma_mean", 1.0)}, prog_bar=True, logger=False)
        if step == cfg.max_steps - 1:  # the final policy, after the last step's updates: a row of its own
            accuracy, eval_seconds = self.timed_evaluation()
            for logger in self.loggers:
                logger.log_metrics(self.mean_over_ranks({"accuracy": accuracy}) | {"eval_seconds": eval_seconds},
                                   step=cfg.max_steps)

    def mean_over_ranks(self, row: dict[str, Tensor | float]) -> dict[str, float]:
        return {name: float(self.trainer.strategy.reduce(torch.as_tensor(value, device=self.device).float(),
                                                         reduce_op="mean")) for name, value in row.items()}

    def timed_evaluation(self) -> tuple[Tensor, float]:
        """Held-out accuracy and the seconds it took (logged as eval_seconds, apart from the step's own)."""
        started = time.perf_counter()
        return self.evaluate(), time.perf_counter() - started

    def collect_rollouts(self, step: int) -> tuple[list[Minibatch], dict[str, Tensor]]:
        """This step's minibatches of G responses to each of this rank's prompts, and the rollout stats.

        With --resample-rounds R > 0 (DAPO's dynamic sampling, Yu et al. 2025), a prompt group whose G
        rewards are all equal (Â = 0, no gradient) is replaced by a group of a fresh prompt, for up to R
        more rounds of sampling; groups still flat after that fill the batch, so its shape never changes.
        `reward_mean` and `zero_variance_frac` describe the first round, i.e. the policy itself, not the
        filtered batch."""
        cfg, policy = self.config, self.policy
        world, rank = self.trainer.world_size, self.global_rank
        started = time.perf_counter()
        self.engine.sync()  # the trainer's weights after the last step's updates (or a resume) reach the sampler
        stats = {"rollout_sync_seconds": torch.tensor(time.perf_counter() - started)}
        if cfg.n_prompts % world or cfg.minibatch_size % world:
            raise ValueError(f"n_prompts={cfg.n_prompts} and minibatch_size={cfg.minibatch_size} must split "
                             f"evenly over {world} processes")
        per_rank, G = cfg.n_prompts // world, cfg.group_size
        generator = torch.Generator(device=self.device).manual_seed(step_seed(cfg.seed, step) + rank)
        groups, spare = [], []   # spare: informative groups of later rounds, in sampling order
        for round_ in range(1 + cfg.resample_rounds):
            # round 0 draws the prompts a run without resampling draws; later rounds draw fresh ones
            problems = self.task.sample(cfg.n_prompts, seed=step_seed(cfg.seed, step) + round_ * 2**40,
                                        split="train")[rank * per_rank:(rank + 1) * per_rank]  # whole groups per rank
            sampled = self.sample_groups(problems, generator)
            if round_ == 0:
                groups = sampled
                rewards = torch.cat([group.rewards for group in groups])                   # (B,)
                stats |= {"reward_mean": rewards.mean(),
                          "zero_variance_frac": zero_variance_groups(rewards, G) / len(problems)}
            else:
                spare += [group for group in sampled if not group.is_flat]
            flat = sum(group.is_flat for group in groups)
            missing = torch.tensor(float(max(flat - len(spare), 0)), device=self.device)
            if float(self.trainer.strategy.reduce(missing, reduce_op="sum")) == 0:  # enough on every rank
                break
        groups = [spare.pop(0) if group.is_flat and spare else group for group in groups]  # flat ones replaced
        stats["informative_frac"] = torch.tensor(1 - sum(group.is_flat for group in groups) / per_rank)
        stats["sampling_rounds"] = torch.tensor(float(round_ + 1))

        problems = [group.problem for group in groups for _ in range(G)]
        prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])       # (B, P)
        rollout = join_rollouts([group.samples for group in groups], prompt_ids.shape[1])  # (B, N); 0 where masked
        tokens, mask = torch.where(rollout.mask, rollout.tokens, 0), rollout.mask          # (B, N) each
        rewards = torch.cat([group.rewards for group in groups])                           # (B,)
        advantages = group_advantages(rewards, G, normalize_std=cfg.scale_advantages)     # (B,)
        size = cfg.minibatch_size // world
        minibatches = [Minibatch(prompt_ids[i:i + size], prompt_mask[i:i + size], tokens[i:i + size],
                                 mask[i:i + size], advantages[i:i + size], rows_of(rollout, slice(i, i + size)))
                       for i in range(0, len(problems), size)]
        stats["response_len"] = mask.sum(dim=1).float().mean()
        return minibatches, stats

    @torch.no_grad()
    def sample_groups(self, problems: list[Problem], generator: torch.Generator) -> list[Group]:
        """G responses to each problem with the current policy, and their rewards: one `Group` per problem."""
        cfg, policy = self.config, self.policy
        repeated = [p for p in problems for _ in range(cfg.group_size)]
        prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in repeated])      # (B, P)
        rollout = self.engine.sample(prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                     temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                                     record=cfg.rollout_record)
        rewards = score(self.task, repeated, policy.decode_responses(rollout.tokens, rollout.mask))
        rewards = rewards.to(self.device).view(len(problems), cfg.group_size)             # (B/G, G)
        G = cfg.group_size
        return [Group(problem, rows_of(rollout, slice(i * G, (i + 1) * G)), rewards[i])
                for i, problem in enumerate(problems)]

    @torch.no_grad()
    def score_old(self, mb: Minibatch) -> OldPolicy:
        """π_old of a minibatch: the trainer's scoring before any update (R3: on the rollout's experts), or
        with --old-logprobs rollout what the sampler recorded, with no forward (verl's bypass mode)."""
        ref_logprobs = None
        if self.reference is not None:
            ref_logprobs = self.reference.score(mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask,
                                                temperature=self.config.temperature).logprobs
        if self.config.old_logprobs == "rollout":
            return OldPolicy(mb.rollout.logprobs, mb.rollout.topk_idx, mb.rollout.topk_logprobs, None, ref_logprobs, {})
        scores = self.policy.score(mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask,
                                   routing=mb.rollout.routing, temperature=self.config.temperature)
        return self.as_old_policy(scores, ref_logprobs, mb)

    @torch.no_grad()
    def as_old_policy(self, scores, ref_logprobs: Tensor | None, mb: Minibatch) -> OldPolicy:
        """What later updates compare with, from a scoring forward (detached), keeping router state only
        where it is used (`OldPolicy`), and how far the rollout's sampler μ was from it."""
        topk_idx = topk_logprobs = None
        if self.measures_router_shift:
            topk_idx = scores.topk_idx.clone(memory_format=torch.contiguous_format)  # (L, M, N, K): a view would keep S
            topk_logprobs = router_logprobs_at(scores.router_logits.detach(), topk_idx)     # (L, M, N, K)
        routing = scores.routing if self.config.routing_replay else None                   # (L, M, S, K)
        mismatch = {}
        if mb.rollout.logprobs is not None:  # routing against the trainer's own router, before any replay
            mismatch = rollout_mismatch_metrics(scores.logprobs, mb.rollout.logprobs, mb.mask,
                                                scores.router_logits, mb.rollout.topk_idx)
        return OldPolicy(scores.logprobs.detach(), topk_idx, topk_logprobs, routing, ref_logprobs, mismatch)

    def update(self, mb: Minibatch, old: OldPolicy | None) -> tuple[dict[str, Tensor], OldPolicy]:
        """One optimiser step on `mb`; returns its metrics and the old policy it trained against. `old` None:
        `mb` is on-policy and this forward is its old policy, returned for the step's later epochs."""
        cfg = self.config
        replay = old.routing if cfg.routing_replay else mb.rollout.routing  # R2, R3 (None unless recorded), or None
        scores = self.policy.score(mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask, routing=replay,
                                   freeze_router=cfg.freeze_router, temperature=cfg.temperature)
        if old is None:
            ref_logprobs = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logprobs = self.reference.score(mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask,
                                                        temperature=cfg.temperature).logprobs
            old = self.as_old_policy(scores, ref_logprobs, mb)
        gamma, router_metrics = self.router_shift(scores, old, mb)
        mask, weight, correction_metrics = self.rollout_correction(old, mb)
        out = policy_loss(cfg.loss, logprobs=scores.logprobs, old_logprobs=old.logprobs,
                          advantages=mb.advantages, mask=mask, gamma_min=float(self.gamma_floor),
                          router_shift=gamma if cfg.uses_router_shift else None, weight=weight, **self.clip)
        loss = out.loss + cfg.aux_loss_coef * scores.aux_loss if cfg.aux_loss_coef else out.loss  # no 0·aux backward
        metrics = {"loss": out.loss.detach(), "aux_loss": scores.aux_loss.detach()}
        if old.ref_logprobs is not None:
            kl = kl_to_reference(scores.logprobs, old.ref_logprobs, mb.mask)
            loss = loss + cfg.kl_coef * kl
            metrics["kl_to_ref"] = kl.detach()

        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        grad_norm = clip_grad_norm(self, cfg.max_grad_norm)  # a global norm under FSDP too
        optimizer.step()
        self.lr_schedulers().step()

        if cfg.gamma_min == "auto" and gamma is not None:
            self.adapt_gamma_floor(gamma, mb.mask)
        weight = mb.mask.float()
        # γ statistics come from router_metrics (computed once, here) for every loss, RS on or off, so runs
        # compare on one footing; the loss itself returns only its own metrics
        return metrics | out.metrics | {
            "clip_frac": out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"],
            "entropy": (scores.entropy * weight).sum() / weight.sum().clamp(min=1),
            "grad_norm": grad_norm.detach().float(),
            "lr": torch.tensor(optimizer.param_groups[0]["lr"])} | router_metrics | correction_metrics, old

    @torch.no_grad()
    def rollout_correction(self, old: OldPolicy, mb: Minibatch) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """The loss's mask and stop-gradient weight under --rollout-is / --rollout-mask (docs/rspo.md, "Rollout
        corrections"): GRPO takes token weights (B, T), the sequence-level losses one weight per sequence (B,);
        a token-level MIS mask leaves a sequence-level loss's tokens out of its mean instead (IcePop's mask)."""
        cfg, mask = self.config, mb.mask
        if cfg.rollout_is == "none" and cfg.rollout_mask == "none":
            return mask, None, {}
        per_token = cfg.loss == "grpo"
        weight = torch.ones_like(mb.tokens, dtype=torch.float32) if per_token else torch.ones(len(mask), device=mask.device)
        metrics, n_valid = {}, mask.sum().clamp(min=1)
        if cfg.rollout_is != "none":
            tis = truncated_is_weights(old.logprobs, mb.rollout.logprobs, mask, level=cfg.rollout_is,
                                       cap=cfg.rollout_is_cap)                                   # (M, N)
            weight = weight * (tis if per_token else tis.amax(dim=1))  # a sequence's weight sits on each of its tokens
            metrics["rollout_is_weight_mean"] = tis.sum() / n_valid
            metrics["rollout_is_capped_frac"] = ((tis >= cfg.rollout_is_cap) & mask).sum() / n_valid
        if cfg.rollout_mask != "none":
            low, high = cfg.rollout_mask_bounds
            keep = rollout_keep_mask(old.logprobs, mb.rollout.logprobs, mask, level=cfg.rollout_mask, low=low, high=high)
            metrics["rollout_masked_frac"] = (mask & ~keep).sum() / n_valid
            if per_token:
                weight = weight * keep.float()
            elif cfg.rollout_mask == "sequence":
                weight = weight * keep.any(dim=1).float()
            else:
                mask = keep
        return mask, weight, metrics

    @torch.no_grad()
    def router_shift(self, scores, old: OldPolicy, mb: Minibatch) -> tuple[Tensor | None, dict[str, Tensor]]:
        """γ (M, N) of this minibatch against the old routing (--gamma-reference rollout: the rollout's experts
        and μ's router log-probs), and the router metrics against the same reference; (None, {}) for a dense
        model or with diagnostics off. γ is measured for every loss by default, so that runs without RS still
        log how far their router moved."""
        if not self.measures_router_shift:
            return None, {}
        reference = mb.rollout if self.config.gamma_reference == "rollout" else old
        gamma = router_shift_ratio(scores.router_logits, reference.topk_idx, reference.topk_logprobs, mb.mask)  # (M, N)
        return gamma, router_shift_metrics(gamma, mb.mask, float(self.gamma_floor)) | {
            "gamma_floor": self.gamma_floor.clone(),
            "routing_consistency": routing_consistency(scores.router_logits, reference.topk_idx, mb.mask)}

    @torch.no_grad()
    def adapt_gamma_floor(self, gamma: Tensor, mask: Tensor) -> None:
        """--gamma-min auto (beyond the paper, its stated future work): move γ_min a step toward the γ
        quantile below which `gamma_floor_share` of this minibatch's tokens fall, so the share of floored
        tokens holds near that target as router shift grows or fades. A minibatch whose router did not move
        (the on-policy first one) carries no information and is skipped."""
        valid = gamma[mask].float()                                                   # (n_valid,)
        if valid.numel() == 0 or bool((valid == 1.0).all()):
            return
        target = torch.quantile(valid, self.config.gamma_floor_share)
        target = self.trainer.strategy.reduce(target, reduce_op="mean")  # one floor on every rank
        self.gamma_floor.lerp_(target.clamp(*AUTO_GAMMA_MIN_RANGE), AUTO_GAMMA_MIN_RATE)

    def evaluate(self) -> Tensor:
        return greedy_accuracy(self.policy, self.task, self.eval_problems, self.config.max_new_tokens)


@torch.no_grad()
def greedy_responses(policy: Policy, problems: list[Problem], max_new_tokens: int) -> list[str]:
    """The policy's greedy answer to each problem, decoded (eval mode while sampling, train mode after)."""
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])       # (B, P)
    policy.model.eval()
    rollout = policy.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=0.0)
    policy.model.train()
    return policy.decode_responses(rollout.tokens, rollout.mask)


def greedy_accuracy(policy: Policy, task: Task, problems: list[Problem], max_new_tokens: int) -> Tensor:
    """Held-out greedy accuracy: the share of `problems` whose greedy answer earns the full reward."""
    rewards = score(task, problems, greedy_responses(policy, problems, max_new_tokens))  # (B,)
    return (rewards == REWARD_CORRECT).float().mean()


def kl_to_reference(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) per token, averaged per sequence, then over sequences (like the losses)."""
    log_ratio = torch.where(mask, ref_logprobs - logprobs, 0.0)                      # (B, N)
    per_token = torch.expm1(log_ratio) - log_ratio                                   # (B, N)
    weight = mask.float()
    return ((per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)).mean()
