"""Configuration of an RL run: one typed dataclass, every field a flag of `python -m minirspo.train`.

`RLConfig` is flat (`config.lr`, `config.n_prompts`) but assembled from sections — task, loss, rollouts,
updates, run, scale, warm start — which `--help` shows as groups; each field's comment is its help.
Defaults are sized for a 2-core CPU (a 3.4M-parameter toy MoE: about 1 s per RL step of 32 prompts × 8
responses) and cite where each value comes from; the equations, symbols and the defaults' sources are in
docs/rspo.md.

`validate(config)` is the one place that refuses bad input, before any warm start or training begins: the
values (in `RLConfig.__post_init__`, so a config built in Python is checked too) and then what lies outside
the config: model files, the checkpoint --resume needs, accelerators. Each refusal is a UsageError whose one
line names the flag, what was given and what is accepted.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence, get_args

import torch
import tyro

from minirspo.rollout import (ROLLOUT_ENGINES, ROLLOUT_PRECISIONS, VLLM_PRECISIONS, RolloutEngineName,
                              RolloutPrecision, check_rollout_engine)
from minirspo.tasks import TASKS, Task, make_task
from toy_moe.cli import UsageError, as_plain_data, differences, parse_flags
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.tokenizer import ToyTokenizer, load_tokenizer
from toy_moe.pretrain import Accelerator, PretrainConfig, Precision, check_accelerator, name_flags

TaskName = Literal["arithmetic", "countdown"]          # minirspo.tasks.TASKS
LossName = Literal["grpo", "gspo", "gmpo", "rspo"]     # minirspo.loss
Strategy = Literal["auto", "ddp", "fsdp", "fsdp2"]     # minirspo.distributed
GammaReference = Literal["old", "rollout"]             # minirspo.module RLModule.router_shift
OldLogprobs = Literal["trainer", "rollout"]            # minirspo.module RLModule.old_policies
CorrectionLevel = Literal["none", "token", "sequence"]  # minirspo.loss truncated_is_weights, rollout_keep_mask
LOSS_NAMES, STRATEGIES, CORRECTION_LEVELS = get_args(LossName), get_args(Strategy), get_args(CorrectionLevel)


@dataclass
class TaskSection:
    """What to train: the task and the model."""

    task: TaskName = "arithmetic"
    """arithmetic: a+b= (learns in minutes on a CPU); countdown: reach a target with + - * / (the paper's)"""
    task_options: str = ""
    """the task's knobs, key=value,key=value: e.g. max_operand=9 (arithmetic) or n_numbers=4,ops=+-*/ (countdown)"""
    model: str = ""
    """empty: warm-start the toy MoE here; toy:FILE: a toy_moe model.pt; hf:DIR: a local Hugging Face MoE folder"""


@dataclass
class LossSection:
    """The policy-gradient objective (docs/rspo.md)."""

    loss: LossName = "rspo"
    """grpo: token ratios; gspo: one sequence ratio; gmpo: their geometric mean; rspo: gmpo + router-shift weight"""
    router_shift: bool = False
    """router-shift weighting as a plug-in on grpo/gspo/gmpo (always on for rspo)"""
    router_diagnostics: bool = True
    """log γ and routing consistency for every loss (one footing for comparisons); --no-router-diagnostics skips
    them where the loss does not use γ (rspo, --router-shift and --gamma-min auto always compute it)"""
    gamma_min: float | Literal["auto"] = 0.8
    """γ floor in (0, 1]; 0.8 as in public RSPO implementations; auto: track --gamma-floor-share"""
    gamma_floor_share: float = 0.05
    """with --gamma-min auto, γ_min tracks this quantile of γ (the share of tokens floored), in (0, 1)"""
    clip_low: float | None = None
    """ε_low; None: the loss's own default (grpo 0.2, gspo 3e-4, gmpo and rspo 0.4)"""
    clip_high: float | None = None
    """ε_high; None: the loss's own default (grpo 0.2, gspo 4e-4, gmpo and rspo 0.4)"""
    # Off by default: with the 0.1 format reward, std scaling blows a group's 0.1-vs-0 format difference up to
    # full-size advantages that push wrong answers up (docs/default_run.md).
    scale_advantages: bool = False
    """divide each group's advantages by its reward std (GRPO); off: Â = r − mean (Dr. GRPO, Liu et al. 2025)"""
    routing_replay: bool = False
    """R2, the paper's routing-replay baseline: every update routes each token to π_old's experts (the
    trainer's own scoring of the rollout before the updates), not to the experts the rollout's sampler chose"""
    rollout_routing_replay: bool = False
    """R3 (arXiv 2510.11370, slime's name): π_old's scoring and every update route each token to the experts
    the rollout's sampler (μ) chose; the gates still come from the trainer's router, so it still learns"""
    gamma_reference: GammaReference = "old"
    """RS's γ measured on π_old's top-K experts against π_old's router (the paper), or on the rollout's top-K
    against μ's router log-probs (rollout)"""
    old_logprobs: OldLogprobs = "trainer"
    """trainer: π_old is the trainer's scoring of the rollout before the updates; rollout: μ's recorded
    log-probs and routing stand in for π_old and that forward is skipped (verl's bypass mode)"""
    rollout_is: CorrectionLevel = "none"
    """truncated importance sampling against the rollout (TIS, verl rollout_is): a stop-gradient weight
    min(π_old/μ, C) per token, or min(Π_t π_old/μ, C) per sequence; token level is GRPO's only"""
    rollout_is_cap: float = 2.0
    """C, the TIS cap (verl's default rollout_is_threshold)"""
    rollout_mask: CorrectionLevel = "none"
    """masked importance sampling (MIS / IcePop): tokens, or whole sequences by their geometric-mean ratio,
    whose π_old/μ lies outside --rollout-mask-bounds get no gradient"""
    rollout_mask_bounds: tuple[float, float] = (0.5, 2.0)
    """LOW HIGH of --rollout-mask: a token is kept when LOW <= π_old/μ <= HIGH (0.5 2: off by 2x either way)"""
    freeze_router: bool = False
    """router weights get no gradient (the paper's other stabiliser)"""
    aux_loss_coef: float = 0.0
    """Switch load-balance loss during RL; off as in the paper (it fights the reward for the router)"""
    kl_coef: float = 0.0
    """KL-to-reference (k3) coefficient; the paper's objectives have none"""


@dataclass
class RolloutSection:
    """Rollouts: 32 prompts × G=8 responses per RL step (CPU prototype; DeepSeekMath's GRPO uses G=64 at scale)."""

    n_prompts: int = 32
    """prompts per RL step (across all processes)"""
    group_size: int = 8
    """G, responses per prompt; >= 2, since the group mean is the baseline"""
    max_new_tokens: int = 8
    """response length limit, in tokens (a+b= answers are 1-3 digits and EOS; Countdown needs ~16)"""
    temperature: float = 0.7
    """sampling temperature, >= 0 (0: greedy); 0.7 learned faster than 1.0 from a 10% start (docs/default_run.md)"""
    top_p: float = 1.0
    """nucleus sampling mass, in (0, 1]"""
    rollout_precision: RolloutPrecision = "32"
    """the sampler's copy of the weights (minirspo.rollout): 32 samples with the trainer's own model (no copy);
    bf16 / fp16 a copy of every weight in that dtype; fp8 the matrices as float8 e4m3 with per-channel scales,
    computed in bf16 (emulated on a CPU); refreshed after every RL step's updates, never checkpointed"""
    # From a 10% start most groups are flat, and RL makes more of them so (docs/default_run.md).
    resample_rounds: int = 3
    """DAPO's dynamic sampling: up to this many more rounds of fresh prompts replace groups with equal rewards"""


@dataclass
class UpdateSection:
    """Updates: 4 minibatches per rollout, so minibatches 2..4 are off-policy (where router shift lives)."""

    minibatch_size: int = 64
    """sequences per optimiser step; must divide n_prompts × group_size"""
    ppo_epochs: int = 1
    """passes over each rollout"""
    lr: float = 1e-4
    """AdamW learning rate; swept in docs/default_run.md: 1e-4 learns, 2e-4 swings, 1e-3 collapses"""
    warmup_steps: int = 8
    """optimiser steps of linear warm-up (a fresh Adam jumps otherwise)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    # Not in the paper: a lever to make the router move faster than the rest (docs/results/moe_stress.md).
    router_lr_scale: float = 1.0
    """the router weights' learning rate is lr × this (> 0); 1: one learning rate for every weight"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""


@dataclass
class RunSection:
    """The run: length, evaluation, checkpoints, outputs, hardware."""

    max_steps: int = 300
    """RL steps (one rollout and its minibatch updates each); 300 fit the default run in 10 minutes on 2 CPU cores"""
    eval_every: int = 25
    """held-out greedy accuracy before every this many RL steps and of the final policy (0: the final only; timed apart)"""
    eval_size: int = 1000
    """held-out problems per evaluation; 1000 because at a 10% start the standard error is 0.009 (0.021, a fifth
    of the start, on 200), small enough to read a 3× gain off (docs/default_run.md, "How many held-out problems")"""
    checkpoint_every: int = 50
    """RL steps between checkpoints (OUT/checkpoints/last.ckpt; also written on Ctrl-C)"""
    seed: int = 0
    """seeds prompts, sampling and the warm start (its examples and initialisation: --pretrain.seed is refused)"""
    out: str = "runs/rspo"
    """output folder: config.yaml, metrics.csv, curves.png, checkpoints/"""
    resume: bool = False
    """continue the run in OUT from its checkpoints/last.ckpt, with its settings: only --max-steps,
    --checkpoint-every, --eval-every and --verbose may change (raise --max-steps to train further)"""
    overwrite: bool = False
    """start over in an OUT that holds an earlier run: its config.yaml, metrics, curves and checkpoints go first"""
    accelerator: Accelerator = "auto"
    """Lightning accelerator"""
    devices: int = 1
    """processes per node (one per GPU)"""
    precision: Precision = "32-true"
    """Lightning precision; bf16-mixed on GPUs: bf16 compute, float32 master weights"""
    verbose: bool = False
    """also show Lightning's own messages and library warnings"""


@dataclass
class ScaleSection:
    """Scaling out (minirspo.distributed; docs/scaling.md)."""

    strategy: Strategy = "auto"
    """ddp; fsdp2: fully_shard (GPUs, or CPU over gloo); fsdp is refused (FSDP1 breaks on several backwards)"""
    num_nodes: int = 1
    """machines"""
    activation_checkpointing: bool = False
    """recompute each decoder layer in backward: memory for about 1/3 more compute"""
    rollout_engine: RolloutEngineName = "hf"
    """hf: a KV-cache decode loop over the model itself (HFPolicy.generate); vllm is reserved"""
    logprob_chunk_tokens: int = 4096
    """LM-head tokens per log-prob chunk: float32 logits peak at chunk × V × 4 bytes (4096 × 32k: 0.5 GB)"""


@dataclass
class WarmStartSection:
    """Warm start: supervised pretraining of the toy MoE (--pretrain.*), cached; skipped when --model is given."""

    warmstart_dir: str = "runs/warmstart"
    """cache of warm starts: one folder per task and pretrain config (config.yaml, model.pt)"""


SECTIONS = {"task": TaskSection, "loss": LossSection, "rollouts": RolloutSection, "updates": UpdateSection,
            "run": RunSection, "scale": ScaleSection, "warm_start": WarmStartSection}


@dataclass
class RLConfig(WarmStartSection, ScaleSection, RunSection, UpdateSection, RolloutSection, LossSection,
               TaskSection):  # fields in reverse order of the bases: task first
    # Pretraining stops at the first evaluation (every 10 steps) above 10% held-out greedy accuracy: a start
    # right on a few problems leaves RL something to learn. A fixed step count lands anywhere on a+b='s sharp
    # transition (250 steps gave 6.6% on one CPU and 11-13% on another; 140-410 steps reach 10% by seed).
    # Eight attention heads, not toy_moe's four: with four, 2 of 6 seeds (seed 2 among them) learn the sum's
    # magnitude first and reach 10% by guessing its units digit, a start RL cannot leave; with eight, 1 of 6
    # (docs/default_run.md, "The initialisation decides").
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        eval_every=10, stop_at_accuracy=0.10, model=ToyMoEConfig(n_heads=8)))

    def build_task(self) -> Task:
        """The task with its --task-options knobs (fields of the task's dataclass)."""
        return make_task(self.task, **task_knobs(self.task, self.task_options))

    @property
    def uses_router_shift(self) -> bool:
        return self.loss == "rspo" or self.router_shift

    @property
    def rollout_record(self) -> str:
        """What the rollout's sampler must record (`Policy.generate`): every position's experts for R3; log μ and
        the response tokens' routing for a low-precision copy or vLLM (the mismatch metrics) or anything that reads
        μ; nothing with the built-in decode at precision 32 otherwise (μ is then π_old up to float noise, and
        recording costs ~13% of sampling)."""
        if self.rollout_routing_replay:
            return "routing"
        reads_rollout = (self.rollout_is != "none" or self.rollout_mask != "none" or self.old_logprobs == "rollout"
                         or self.gamma_reference == "rollout")
        engine_differs = self.rollout_precision != "32" or self.rollout_engine != "hf"
        return "tokens" if reads_rollout or engine_differs else "none"

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.n_prompts * self.group_size // self.minibatch_size)

    def __post_init__(self):
        # --seed seeds the warm start too (minirspo.warmstart): the record shows the seed it used
        self.pretrain = dataclasses.replace(self.pretrain, seed=self.seed)
        check_values(self)


# --- validation ----------------------------------------------------------------------------------------
def refuse(flag: str, given, accepted: str):
    raise UsageError(f"--{flag.replace('_', '-')}: got {given!r}; {accepted}")


def check_values(config: RLConfig) -> None:
    """The config's values on their own: choices, ranges, and how the sizes fit together."""
    for name, choices in (("task", TASKS), ("loss", LOSS_NAMES), ("strategy", STRATEGIES),
                          ("rollout_engine", ROLLOUT_ENGINES)):
        if getattr(config, name) not in choices:
            refuse(name, getattr(config, name), f"choose one of {', '.join(choices)}")
    for name in ("n_prompts", "max_new_tokens", "minibatch_size", "ppo_epochs", "max_steps",
                 "eval_size", "checkpoint_every", "devices", "num_nodes", "logprob_chunk_tokens"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            refuse(name, getattr(config, name), "expected a whole number >= 1")
    for name in ("warmup_steps", "seed", "eval_every", "resample_rounds"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            refuse(name, getattr(config, name), "expected a whole number >= 0")
    if not isinstance(config.group_size, int) or config.group_size < 2:
        refuse("group_size", config.group_size, "expected a whole number >= 2 (GRPO's baseline is the group mean)")
    batch = config.n_prompts * config.group_size
    if batch % config.minibatch_size:
        refuse("minibatch_size", config.minibatch_size,
               f"it must divide n_prompts × group_size = {config.n_prompts} × {config.group_size} = {batch}")
    for name in ("lr", "router_lr_scale"):
        if not getattr(config, name) > 0:
            refuse(name, getattr(config, name), "expected a number > 0")
    if not config.temperature >= 0:
        refuse("temperature", config.temperature, "expected a number >= 0 (0: greedy)")
    if not 0 < config.top_p <= 1:
        refuse("top_p", config.top_p, "expected a number in (0, 1]")
    for name in ("weight_decay", "aux_loss_coef", "kl_coef"):
        if not getattr(config, name) >= 0:
            refuse(name, getattr(config, name), "expected a number >= 0")
    if not config.max_grad_norm > 0:
        refuse("max_grad_norm", config.max_grad_norm, "expected a number > 0")
    for name in ("clip_low", "clip_high"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            refuse(name, getattr(config, name), "expected a number > 0, or None for the loss's default")
    if config.gamma_min != "auto" and not (isinstance(config.gamma_min, (int, float)) and 0 < config.gamma_min <= 1):
        refuse("gamma_min", config.gamma_min, "expected a number in (0, 1] or auto")
    if not 0 < config.gamma_floor_share < 1:
        refuse("gamma_floor_share", config.gamma_floor_share, "expected a number in (0, 1)")
    check_rollout_options(config)
    task_knobs(config.task, config.task_options)  # their types here; their values when `validate` builds the task
    check_scale(config)
    check_nothing_ignored(config)


def task_knobs(task: str, options: str) -> dict[str, int | str]:
    """--task-options `key=value,key=value` as the task's keyword arguments, each value read as its knob's
    type (the type of the field's default: whole numbers, or text); a bad one is refused naming the knob."""
    fields = {knob.name: knob for knob in dataclasses.fields(TASKS[task])}
    knobs: dict[str, int | str] = {}
    for option in (option for option in options.split(",") if option.strip()):
        if "=" not in option:
            refuse("task_options", options, "expected key=value,key=value")
        key, text = (part.strip() for part in option.split("=", 1))
        if key not in fields:
            refuse("task_options", options, f"the {task} task has no knob {key}; its knobs are {', '.join(fields)}")
        if key in knobs:
            refuse("task_options", options, f"{key} is given twice")
        kind = type(fields[key].default)
        try:
            knobs[key] = kind(text)
        except ValueError:
            accepted = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            refuse("task_options", options, f"the {task} task's knob {key} takes {accepted}, not {text!r}")
    return knobs


def check_scale(config: RLConfig) -> None:
    """Strategy and process count, refused here rather than once Lightning has spawned the processes (each of
    which would print the error again)."""
    if config.strategy == "fsdp":
        refuse("strategy", "fsdp", "FSDP1 (Lightning's FSDPStrategy) wraps the LightningModule as one root, and "
                                   "the RL step's several backward passes inside training_step break its state "
                                   "machine (Lightning issue #19626); use --strategy fsdp2, the same per-layer "
                                   "sharding with FSDP2, on GPUs and on CPUs")
    world = config.num_nodes * config.devices
    if config.n_prompts % world or config.minibatch_size % world:
        refuse("devices", config.devices, f"--n-prompts {config.n_prompts} and --minibatch-size "
                                          f"{config.minibatch_size} must split evenly over --num-nodes × --devices "
                                          f"= {world} processes (whole prompt groups per process)")


def check_nothing_ignored(config: RLConfig) -> None:
    """A flag that would be ignored is refused instead: a user who sets it expects it to matter."""
    default = RLConfig.__dataclass_fields__
    if config.gamma_min != "auto" and config.gamma_floor_share != default["gamma_floor_share"].default:
        refuse("gamma_floor_share", config.gamma_floor_share, "it sets where --gamma-min auto puts the floor; "
                                                              f"with --gamma-min {config.gamma_min} it does nothing")
    if config.model:
        default_pretrain = dataclasses.replace(default["pretrain"].default_factory(), seed=config.seed)
        changed = differences(as_plain_data(default_pretrain), as_plain_data(config.pretrain))
        if changed:
            flags = ", ".join(f"--pretrain.{name.replace('_', '-')}" for name in changed)
            raise UsageError(f"{flags}: the warm start is skipped with --model {config.model}, so these would "
                             "be ignored; drop them, or drop --model")


def check_rollout_options(config: RLConfig) -> None:
    """The behaviour policy's precision and the corrections against it (docs/rspo.md, "Rollout corrections"):
    each combination that means nothing is refused here, before any work."""
    for name, choices in (("rollout_precision", ROLLOUT_PRECISIONS), ("rollout_is", CORRECTION_LEVELS),
                          ("rollout_mask", CORRECTION_LEVELS), ("gamma_reference", get_args(GammaReference)),
                          ("old_logprobs", get_args(OldLogprobs))):
        if getattr(config, name) not in choices:
            refuse(name, getattr(config, name), f"choose one of {', '.join(choices)}")
    if not config.rollout_is_cap > 0:
        refuse("rollout_is_cap", config.rollout_is_cap, "expected a number > 0")
    bounds = config.rollout_mask_bounds
    if len(bounds) != 2 or not 0 < bounds[0] <= 1 <= bounds[1]:
        refuse("rollout_mask_bounds", bounds, "expected LOW HIGH with 0 < LOW <= 1 <= HIGH (a ratio of 1 is kept)")
    if config.rollout_is == "token" and config.loss != "grpo":
        refuse("rollout_is", "token", f"{config.loss} is a sequence-level objective with no per-token term for a "
                                      "token weight to multiply; use --rollout-is sequence (or --loss grpo)")
    if config.routing_replay and config.rollout_routing_replay:
        refuse("rollout_routing_replay", True, "it replays the rollout's experts, --routing-replay π_old's: "
                                               "choose one")
    if config.old_logprobs == "rollout":
        for name in ("rollout_is", "rollout_mask"):
            if getattr(config, name) != "none":
                refuse(name, getattr(config, name), "with --old-logprobs rollout π_old is μ, so π_old/μ = 1 and "
                                                    "there is nothing to correct; use none")
        if config.routing_replay:
            refuse("routing_replay", True, "with --old-logprobs rollout there is no π_old scoring to replay; "
                                           "use --rollout-routing-replay")
    uses_rollout_logprobs = config.rollout_is != "none" or config.rollout_mask != "none" or config.old_logprobs == "rollout"
    if uses_rollout_logprobs and config.top_p < 1:
        refuse("top_p", config.top_p, "the rollout's log μ is recorded before top-p truncation, as π_old is scored, "
                                      "so π_old/μ would not correct for the truncated sampler; use 1 with "
                                      "--rollout-is, --rollout-mask or --old-logprobs rollout")
    if uses_rollout_logprobs and config.temperature == 0:
        refuse("temperature", 0, "greedy rollouts have no sampling distribution to correct for; use a number > 0")
    if config.rollout_precision != "32" and config.strategy in ("fsdp", "fsdp2"):
        refuse("rollout_precision", config.rollout_precision, "a low-precision rollout copy of a sharded model is not "
                                                              "supported yet; use 32, or --strategy ddp")
    if config.rollout_engine == "vllm":
        check_vllm_options(config)


def check_vllm_options(config: RLConfig) -> None:
    """What --rollout-engine vllm cannot do (minirspo/rollout/vllm_engine.py), refused before any work."""
    if config.rollout_precision not in VLLM_PRECISIONS:
        refuse("rollout_precision", config.rollout_precision, f"with --rollout-engine vllm choose one of "
                                                              f"{', '.join(VLLM_PRECISIONS)} (fp8 is the built-in copy's)")
    if config.top_p < 1:
        refuse("top_p", config.top_p, "vLLM's log-probs would be of the truncated distribution, not the one the "
                                      "trainer scores; use 1 with --rollout-engine vllm")
    if config.temperature == 0:
        refuse("temperature", 0, "--rollout-engine vllm samples; use a number > 0")
    if config.rollout_routing_replay:
        refuse("rollout_routing_replay", True, "R3 needs the experts the engine routed to, which vLLM returns only "
                                               "on GPU builds (enable_return_routed_experts), not this one; use "
                                               "--rollout-engine hf")
    if config.gamma_reference == "rollout":
        refuse("gamma_reference", "rollout", "no engine returns router probabilities; use old with --rollout-engine vllm")
    if config.strategy != "auto" or config.devices != 1 or config.num_nodes != 1:
        refuse("rollout_engine", "vllm", "the engine runs colocated in one training process; use --strategy auto "
                                         "--devices 1 --num-nodes 1")


@dataclass(frozen=True)
class CheckedModel:
    """--model once its checks passed: its configuration, and what the run opens (nothing is read twice)."""

    shape: ToyMoEConfig | dict                          # the toy's config, or the HF model's config.json
    toy: tuple[ToyMoE, ToyTokenizer] | None = None      # toy:FILE, loaded once, while checking it
    hf_dir: Path | None = None                          # hf:DIR, whose weights load only after every check


@dataclass(frozen=True)
class CheckedRun:
    """What `validate` derived while checking a configuration, handed to the run so it derives nothing again."""

    task: Task                                          # the task with its --task-options knobs
    model: CheckedModel | None                          # --model; None: the warm-started toy


def validate(config: RLConfig) -> CheckedRun:
    """Everything `python -m minirspo.train` can check before it starts, beyond the values `RLConfig` checked
    when it was built: the task's knobs, the model file or folder, the output folders, the accelerator and
    the rollout engine. Raises UsageError; returns what the checks derived (the task, the loaded --model)."""
    for name in ("out", "warmstart_dir"):
        if Path(getattr(config, name)).exists() and not Path(getattr(config, name)).is_dir():
            refuse(name, getattr(config, name), "expected a folder, but it is a file")
    check_accelerator(config.accelerator, "accelerator")
    if not config.model:
        check_accelerator(config.pretrain.accelerator, "pretrain.accelerator")
    try:
        task = config.build_task()
    except (TypeError, ValueError) as error:  # a knob of the right type but out of the task's range
        refuse("task_options", config.task_options, str(error))
    model = check_model(config.model) if config.model else None
    check_fits_model(config, task, model.shape if model else config.pretrain.model)
    try:
        check_rollout_engine(config.rollout_engine)
    except (ValueError, ModuleNotFoundError) as error:
        refuse("rollout_engine", config.rollout_engine, str(error))
    return CheckedRun(task, model)


def check_fits_model(config: RLConfig, task: Task, shape: ToyMoEConfig | dict) -> None:
    """What the model's configuration alone can refuse, before any weight is loaded for training: router
    flags on a dense model, and responses longer than the toy's positions (the toy's sampler would refuse
    them only at the first batch whose prompt is long enough, possibly hundreds of steps in)."""
    name = config.model or "the warm-started toy MoE"
    if isinstance(shape, dict):  # hf: config.json
        check_router_flags(config, hf_config_is_moe(shape, config.model), name)
        return
    check_router_flags(config, bool(shape.moe_layer_ids), name)
    if config.rollout_engine == "vllm":  # vLLM serves the toy as a Mixtral (minirspo/rollout/export.py)
        from minirspo.rollout.export import check_exportable
        try:
            check_exportable(shape)
        except ValueError as error:
            refuse("rollout_engine", "vllm", str(error))
        head_dim = shape.d_model // shape.n_heads
        if head_dim < 32 and not torch.cuda.is_available():
            refuse("rollout_engine", "vllm", f"vLLM's CPU attention takes head dims of 32 and up, and {name} has "
                                             f"{head_dim} (d_model {shape.d_model} / {shape.n_heads} heads): give "
                                             f"--pretrain.model.n-heads {shape.d_model // 32} or fewer")
    # the chat framing (bos, user, assistant) plus at most one token per byte of the longest prompt
    prompt_tokens = len(load_tokenizer().encode_prompt("")) + len(task.longest_prompt().encode())
    if prompt_tokens + config.max_new_tokens > shape.max_seq_len:
        refuse("max_new_tokens", config.max_new_tokens,
               f"{name} has {shape.max_seq_len} positions and the {config.task} task's prompts take up to "
               f"{prompt_tokens} of them, so at most {shape.max_seq_len - prompt_tokens}")


def check_router_flags(config: RLConfig, is_moe: bool, model: str) -> None:
    """Router-shift weighting, routing replay, router freezing and a router learning rate need a router."""
    if is_moe:
        return
    flags = [flag for flag, used in (("--loss rspo", config.loss == "rspo"), ("--router-shift", config.router_shift),
                                     ("--routing-replay", config.routing_replay),
                                     ("--freeze-router", config.freeze_router),
                                     ("--rollout-routing-replay", config.rollout_routing_replay),
                                     ("--gamma-reference rollout", config.gamma_reference == "rollout"),
                                     ("--rollout-engine vllm", config.rollout_engine == "vllm"),
                                     (f"--router-lr-scale {config.router_lr_scale}", config.router_lr_scale != 1.0))
             if used]
    if flags:
        raise UsageError(f"{', '.join(flags)}: these need an MoE router, and {model} is dense (no MoE layers, so no "
                         "router logits); use --loss grpo, gspo or gmpo without router flags")


def hf_config_is_moe(hf_config: dict, spec: str) -> bool:
    """Whether a Hugging Face config.json describes an MoE that minirspo can hook (HF_MOE_FAMILIES); an MoE of
    another family is refused here, before its weights load."""
    from minirspo.policy.hf import HF_MOE_FAMILIES, MOE_CONFIG_KEYS
    family = hf_config.get("model_type")
    if family in HF_MOE_FAMILIES:
        return True
    if any(hf_config.get(key) for key in MOE_CONFIG_KEYS):
        refuse("model", spec, f"model_type {family!r} is a Mixture-of-Experts family minirspo cannot hook; "
                              f"supported: {', '.join(HF_MOE_FAMILIES)}")
    return False


def check_model(spec: str) -> CheckedModel:
    """--model toy:FILE must load as a toy_moe checkpoint (loaded here, once); hf:DIR must be a folder with a
    config.json (read here; its weights load after every check)."""
    kind, _, path = spec.partition(":")
    if kind not in ("toy", "hf") or not path:
        refuse("model", spec, "expected toy:FILE (a toy_moe checkpoint), hf:DIR (a Hugging Face model folder) "
                              "or nothing (warm-start the toy MoE here)")
    path = Path(path)
    if not path.exists():
        refuse("model", spec, f"{path} does not exist")
    if kind == "hf":
        if not path.is_dir():
            refuse("model", spec, f"{path} is not a folder; hf: takes a Hugging Face model folder")
        if not (path / "config.json").is_file():
            refuse("model", spec, f"{path} has no config.json; hf: takes a Hugging Face model folder")
        try:
            hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            refuse("model", spec, f"{path / 'config.json'} is not valid JSON ({type(error).__name__})")
        if not isinstance(hf_config, dict):
            refuse("model", spec, f"{path / 'config.json'} is not a mapping of settings")
        return CheckedModel(hf_config, hf_dir=path)
    if not path.is_file():
        refuse("model", spec, f"{path} is a folder; toy: takes a model.pt file from toy_moe.pretrain")
    if path.stat().st_size == 0:
        refuse("model", spec, f"{path} is empty; toy: takes a model.pt file from toy_moe.pretrain")
    from toy_moe.checkpoint import load_toy_checkpoint
    try:
        model, tokenizer = load_toy_checkpoint(path)
    except Exception as error:  # any failure to unpickle or to fit the model means "not a toy checkpoint"
        refuse("model", spec, f"{path} is not a toy_moe checkpoint ({type(error).__name__}); toy: takes a "
                              "model.pt file from toy_moe.pretrain")
    return CheckedModel(model.config, toy=(model, tokenizer))


# --- the command line ----------------------------------------------------------------------------------
OmitPrefix = tyro.conf.OmitArgPrefixes


@dataclass
class Flags:
    """RLConfig as `--help` shows it: one group per section, flags without a section prefix."""

    task: Annotated[TaskSection, OmitPrefix]
    loss: Annotated[LossSection, OmitPrefix]
    rollouts: Annotated[RolloutSection, OmitPrefix]
    updates: Annotated[UpdateSection, OmitPrefix]
    run: Annotated[RunSection, OmitPrefix]
    scale: Annotated[ScaleSection, OmitPrefix]
    warm_start: Annotated[WarmStartSection, OmitPrefix]
    pretrain: PretrainConfig
    config: Path | None = None
    """a config.yaml written by an earlier run: its values, with the flags after --config overriding them"""

    @classmethod
    def of(cls, config: RLConfig) -> Flags:
        sections = {name: section(**{f.name: getattr(config, f.name) for f in dataclasses.fields(section)})
                    for name, section in SECTIONS.items()}
        return cls(**sections, pretrain=config.pretrain)

    def to_config(self) -> RLConfig:
        values = {f.name: getattr(getattr(self, name), f.name)
                  for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
        return RLConfig(**values, pretrain=self.pretrain)


def parse_config(argv: Sequence[str] | None, prog: str = "python -m minirspo.train", description: str = "") -> RLConfig:
    """RLConfig from command-line flags (and `--config FILE`); bad values raise UsageError naming the flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token.split("=")[0] == "--pretrain.seed" for token in argv):  # a config.yaml may hold it: resolved
        raise UsageError("--pretrain.seed: --seed seeds the warm start too and would override it; give --seed")
    try:
        return parse_flags(Flags, argv, prog=prog, description=description, default=Flags.of(RLConfig())).to_config()
    except UsageError as error:
        raise UsageError(name_flags(str(error), prefix="pretrain.")) from None
