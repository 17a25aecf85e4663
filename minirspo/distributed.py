"""Scaling the same loss out: the Lightning strategy behind --strategy, FSDP2 sharding, gradient clipping.

Notation: W processes in all (--num-nodes × --devices), B sequences on one rank, L decoder layers.

    --strategy auto   one device; ddp when --devices or --num-nodes > 1
    --strategy ddp    every rank holds the whole model and optimiser; gradients are all-reduced (averaged)
    --strategy fsdp   refused before any work (config.check_scale): Lightning's `FSDPStrategy` (FSDP1)
                      wraps the whole LightningModule as its root, so the several backward passes that one
                      RL step runs inside `training_step` break its state machine ("Expects BACKWARD_PRE or
                      BACKWARD_POST state but got HandleTrainingState.FORWARD", seen on an H100; Lightning
                      issue #19626, FSDPStrategy with manual optimisation). fsdp2 shards the same way.
    --strategy fsdp2  Lightning `ModelParallelStrategy`: `fully_shard` per decoder layer, then the root, in
                      `RLModule.configure_model`; runs on GPUs with NCCL and on CPUs with gloo

What keeps a W-process step equal to the one-process step on the same global batch (tested in
tests/test_distributed.py): prompts are split across ranks by whole groups (RLModule.collect_rollouts), so
group advantages never need another rank; every rank holds the same number of sequences and its loss is
their mean, and DDP and FSDP average gradients over ranks, which is the mean over the global batch; the
gradient norm that --max-grad-norm clips is the norm of the whole (sharded) gradient (`clip_grad_norm`).

Activation checkpointing (--activation-checkpointing) wraps each decoder layer with torch's
`checkpoint_wrapper`, before sharding.
Multi-node runs use Lightning's launcher: torchrun or SLURM starts one process per device
(docs/scaling.md).
"""
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from minirspo.config import RLConfig
from minirspo.policy import Policy

__all__ = ["build_strategy", "clip_grad_norm", "parallelize"]


def build_strategy(config: RLConfig, policy: Policy) -> str | Strategy:
    """The Lightning strategy for `config.strategy` (config.STRATEGIES); "auto" on one device is Lightning's."""
    if config.strategy == "auto" and config.num_nodes * config.devices == 1:
        return "auto"
    if config.strategy in ("auto", "ddp"):
        # A frozen router gets no gradient, and DDP must be told that some parameters may go unused.
        return DDPStrategy(find_unused_parameters=config.freeze_router)
    return ModelParallelStrategy(data_parallel_size=config.num_nodes * config.devices, tensor_parallel_size=1)


def parallelize(module) -> None:
    """`RLModule.configure_model`: activation checkpointing (any strategy) and, under fsdp2, `fully_shard` on every decoder layer and then on the policy model as the root."""
    policy: Policy = module.policy
    strategy = module.trainer.strategy
    if any(isinstance(m, FSDPModule) for m in policy.model.modules()):
        return  # configure_model runs once per fit; a second fit finds the model already sharded
    if module.config.activation_checkpointing:
        layer_types = tuple({type(layer) for layer in policy.decoder_layers})
        apply_activation_checkpointing(policy.model, check_fn=lambda m: isinstance(m, layer_types))
    if not isinstance(strategy, ModelParallelStrategy):
        return
    mesh = strategy.device_mesh["data_parallel"]
    # bf16 compute and all-gathers, float32 gradient reduction (as torchtitan); else full float32
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if module.trainer.precision == "bf16-mixed" else MixedPrecisionPolicy()
    for layer in policy.decoder_layers:  # after activation checkpointing: the checkpoint wrappers
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(policy.model, mesh=mesh, mp_policy=mixed)
    if hasattr(policy.model, "sample"):
        # HF generation enters through `sample`, not `forward`: gather the root's parameters around it too
        register_fsdp_forward_method(policy.model, "sample")


def clip_grad_norm(module, max_norm: float) -> Tensor:
    """Clip the policy's gradients to a global L2 norm of `max_norm`; return the norm before clipping.

    `torch.nn.utils.clip_grad_norm_` alone is right on one device and under DDP (full gradients on every
    rank). Under fsdp2 the gradients are DTensor shards: their norm is reduced over ranks (`full_tensor`)
    before clipping, as torchtitan does."""
    params = [p for p in module.policy.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
