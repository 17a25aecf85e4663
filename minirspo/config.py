"""Configuration of an RL run: one typed dataclass, every field a command-line flag of minirspo.train.

Defaults are sized for the 2-core CPU prototype in shared/notes/cpu-prototype.md (a 3.4M-parameter toy
MoE: ~1 s per RL step of 32 prompts × 8 responses) and cite where each value comes from.
"""
import argparse
from dataclasses import dataclass, field

from minirspo.tasks import Task, make_task
from toy_moe.cli import add_config_flags, config_from_flags
from toy_moe.pretrain import PretrainConfig

LOSS_NAMES = ("grpo", "gspo", "gmpo", "rspo")
STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")  # minirspo.distributed
ROLLOUT_ENGINES = ("hf", "vllm")                # minirspo.policy.check_rollout_engine


@dataclass
class RLConfig:
    # --- what to train ---
    task: str = "arithmetic"          # "arithmetic" (a+b=, learns in minutes on a CPU) or "countdown" (the paper's)
    task_options: str = ""            # the task's knobs, e.g. "max_operand=9" or "n_numbers=4,ops=+-*/"
    model: str = ""                   # "" = toy MoE warm-started here; "toy:PATH" = a toy_moe checkpoint;
                                      # "hf:PATH" = a local Hugging Face MoE (Qwen2/3-MoE, OLMoE, Mixtral)
    loss: str = "rspo"                # grpo | gspo | gmpo | rspo (= gmpo + router-shift weighting)
    router_shift: bool = False        # RS weighting as a plug-in on grpo/gspo/gmpo (always on for rspo)
    gamma_min: float | str = 0.8      # γ floor; 0.8 as in public RSPO implementations (RSPO.md); or "auto":
    gamma_floor_share: float = 0.05   # ... then γ_min tracks this quantile of γ (share of tokens floored)
    clip_low: float | None = None     # ε_low; None = the loss's own default (RSPO.md: 0.2 / 3e-4 / 0.4)
    clip_high: float | None = None    # ε_high; None = the loss's own default (0.2 / 4e-4 / 0.4)
    routing_replay: bool = False      # train forward reuses the rollout's experts (paper's replay baseline)
    freeze_router: bool = False       # router weights get no gradient (paper's other stabiliser)
    # The Switch load-balance loss fights the RL signal for the router and, being unrelated to reward,
    # moves routing on its own: off during RL unless asked for (the paper's setting does not use it).
    aux_loss_coef: float = 0.0
    kl_coef: float = 0.0              # KL-to-reference (k3) coefficient; RSPO.md's objectives have none

    # --- rollouts: 32 prompts × G=8 (prototype); DeepSeekMath GRPO uses G=64 at scale ---
    n_prompts: int = 32
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0

    # --- updates: 4 minibatches per rollout, so minibatches 2..4 are off-policy (where router shift lives) ---
    minibatch_size: int = 64          # sequences per optimiser step; must divide n_prompts × group_size
    ppo_epochs: int = 1
    lr: float = 2e-4                  # prototype: steady at 1e-4, unstable at 3e-4, collapse at 1e-3
    warmup_steps: int = 8             # optimiser steps of linear warm-up (a fresh Adam jumps otherwise)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    # --- run ---
    max_steps: int = 150              # RL steps (one rollout + its minibatch updates each)
    eval_every: int = 10              # held-out greedy accuracy every this many steps (and at the end)
    eval_size: int = 200
    checkpoint_every: int = 25
    seed: int = 0
    out: str = "runs/rspo"
    resume: bool = False              # continue from OUT/checkpoints/last.ckpt
    accelerator: str = "auto"
    devices: int = 1                  # processes per node (one per GPU)
    precision: str = "32-true"        # "bf16-mixed" on GPUs: bf16 compute, float32 master weights

    # --- scale (minirspo.distributed; README "Scaling out") ---
    strategy: str = "auto"            # auto | ddp | fsdp2 (fully_shard; GPUs, CPU/gloo); fsdp refuses (distributed)
    num_nodes: int = 1
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: memory for ~1/3 more compute
    rollout_engine: str = "hf"        # hf = the model's own generate with a KV cache; vllm is reserved
    # LM-head tokens per log-prob chunk: float32 logits peak at chunk × V × 4 bytes (4096 × 32k vocab: 0.5 GB)
    logprob_chunk_tokens: int = 4096

    # --- warm start: supervised pretraining of the toy MoE on task text, cached in warmstart_dir ---
    warmstart_dir: str = "runs/warmstart"
    # 250 supervised steps, not pretrain's own 600: a start that is right on part of the problems (the
    # prototype started RL from 13.5%) leaves the RL run something to learn and a reward curve to show.
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(max_steps=250))

    def build_task(self) -> Task:
        """The task with its --task-options knobs (fields of the task's dataclass; whole numbers read as int)."""
        knobs = dict(option.split("=", 1) for option in self.task_options.split(",") if option.strip())
        return make_task(self.task, **{key.strip(): int(value) if value.strip().lstrip("-").isdigit() else value.strip()
                                       for key, value in knobs.items()})

    @property
    def uses_router_shift(self) -> bool:
        return self.loss == "rspo" or self.router_shift

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * (self.n_prompts * self.group_size // self.minibatch_size)

    def __post_init__(self):
        if any("=" not in option for option in self.task_options.split(",") if option.strip()):
            raise ValueError(f"task_options must look like 'key=value,key=value', got {self.task_options!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSS_NAMES)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group baseline), got {self.group_size}")
        batch = self.n_prompts * self.group_size
        if self.minibatch_size < 1 or batch % self.minibatch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} must divide n_prompts × group_size = {batch}")
        if self.gamma_min != "auto" and not (isinstance(self.gamma_min, (int, float)) and 0.0 < self.gamma_min <= 1.0):
            raise ValueError(f"gamma_min must be a number in (0, 1] or 'auto', got {self.gamma_min!r}")
        if not 0.0 < self.gamma_floor_share < 1.0:
            raise ValueError(f"gamma_floor_share must be in (0, 1), got {self.gamma_floor_share}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"unknown rollout_engine {self.rollout_engine!r}; choose one of {list(ROLLOUT_ENGINES)}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "ppo_epochs", "max_new_tokens", "eval_size",
                     "num_nodes", "devices", "logprob_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")



def parse_config(argv: list[str] | None, prog: str = "python -m minirspo.train", description: str = "") -> RLConfig:
    """RLConfig from command-line flags; an invalid value exits with argparse's usage error."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, RLConfig)
    try:
        return config_from_flags(RLConfig, vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))
