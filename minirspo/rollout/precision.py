"""The engine's copy of the weights at a rollout precision: bf16, fp16, or fp8 emulated in bf16.

Notation: W a weight matrix, c its output channels, s_c one scale per output channel, q the float8 e4m3 values.

An inference engine holds its own copy of the trainer's weights in a lower precision; the copy's rounding is
what makes it route and sample differently (R3, arXiv 2510.11370). `LowPrecisionCopy` is that copy: the
policy deep-copied once, every parameter (router included) cast to the rollout dtype, and refreshed in place
from the trainer's parameters (`refresh`) after each RL step's updates, never checkpointed.

FP8, and where we depart from an FP8 engine:
- The matrices an engine quantizes (`Policy.matmul_weights`: attention and MLP/expert weights, not the
  embeddings, LM head or routers, which vLLM keeps in the model dtype: most of its MoE models build the gate
  without a quantization config, "gate always runs at half / full precision") become float8 e4m3 values q with one scale per output channel, W ≈ q · s_c, as FP8
  checkpoints with channel-wise weight scales store them (llm-compressor's FP8_DYNAMIC, vLLM's per-channel
  FP8 GEMM). Per-channel, not per-128×128-block (DeepSeek-V3's layout): the toy's matrices are 128 wide, so a
  block would be nearly a whole matrix, and per-channel is the finer of the two here.
- Scales are powers of two (s_c = 2^⌈log2(amax_c / 448)⌉, as MXFP8's E8M0 scales and DeepGEMM's UE8M0 are),
  not amax_c / 448: then q · s_c is exactly representable in bf16, so the bf16 copy holds exactly the values
  float8 e4m3 with those scales can represent, and tests can check that bit for bit. A power-of-two scale
  only moves the range (amax / s_c lies in (224, 448]); e4m3's relative precision is the same at any scale.
- Weights only: activations stay bf16 (W8A16); a real FP8 GEMM also quantizes activations per token. On a
  CPU the products run in bf16 either way, so FP8 buys no speed here (benchmarks/README.md).
"""
import copy
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from minirspo.policy import Policy

RolloutPrecision = Literal["32", "bf16", "fp16", "fp8"]
ROLLOUT_PRECISIONS = get_args(RolloutPrecision)
STORAGE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}  # fp8: e4m3 values in bf16
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def fp8_scales(weight: Tensor, reduce_dim: int) -> Tensor:
    """Power-of-two scales, one per output channel (the amax over `reduce_dim`, the axis the matmul sums over),
    such that weight / scale lies within ±448; 1 for an all-zero channel. Shape: weight's, 1 at reduce_dim."""
    amax = weight.detach().abs().amax(dim=reduce_dim, keepdim=True).float()           # (..., 1, ...)
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX))
    return torch.where(amax > 0, torch.exp2(exponent), 1.0)


def fp8_round_trip(weight: Tensor, reduce_dim: int) -> Tensor:
    """float8 e4m3 quantization with per-output-channel power-of-two scales, dequantized: q · s in float32."""
    scale = fp8_scales(weight, reduce_dim)
    return (weight.detach().float() / scale).to(torch.float8_e4m3fn).float() * scale  # W / s is exact: s = 2^k


class LowPrecisionCopy:
    """A copy of `policy` whose parameters are the trainer's at `precision`, refreshed in place by `refresh`."""

    def __init__(self, policy: Policy, precision: str, *, fp8_routers: bool = False):
        """`fp8_routers`: quantize the routers' weights too (what an engine does not do; for measurements)."""
        if precision not in STORAGE_DTYPE:
            raise ValueError(f"rollout precision {precision!r} has no copy; choose one of {', '.join(STORAGE_DTYPE)}")
        self.trainer, self.precision = policy, precision
        self.policy = copy.deepcopy(policy)  # hooks and tokenizer too; its weights are overwritten by refresh
        self.policy.model.requires_grad_(False).eval().to(STORAGE_DTYPE[precision])
        self.quantized = dict(policy.matmul_weights) if precision == "fp8" else {}
        if precision == "fp8" and fp8_routers:  # routers are (E, D) and multiply as x @ W.T, like nn.Linear
            router_ids = {id(weight) for weight in policy.router_weights}
            self.quantized |= {name: -1 for name, param in policy.model.named_parameters() if id(param) in router_ids}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Overwrite the copy with the trainer's current weights, cast or quantized; no new tensors."""
        copies = dict(self.policy.model.named_parameters())
        for name, param in self.trainer.model.named_parameters():
            value = param.detach()
            if name in self.quantized:
                value = fp8_round_trip(value, self.quantized[name])
            copies[name].copy_(value)  # copy_ casts to the copy's dtype (exact for fp8: q · 2^k fits bf16)
        # buffers (RoPE tables) never change: the deep copy cast them once, as an engine builds its own tables

    @property
    def model(self) -> nn.Module:
        return self.policy.model
