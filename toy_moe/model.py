"""A small Mixture-of-Experts decoder written from scratch: the toy policy whose router RSPO watches.

Notation (shape comments use these letters):
    B batch, T tokens in this call, S key slots (T, or everything cached so far), V vocab, D model dim,
    H attention heads, Dh head dim (D / H), F hidden size of one SwiGLU expert, E experts per MoE layer,
    K experts per token (top-K), L MoE layers, N = B·T flattened tokens, M = N·K (token, expert) pairs.

Architecture: pre-norm decoder (RMSNorm -> causal attention with RoPE -> RMSNorm -> MoE or dense SwiGLU),
tied input/output embeddings. Each MoE layer has a linear router; p = softmax(z) over all E experts in
float32 (ST-MoE), the K largest p pick the experts and, renormalised (Mixtral / Qwen-MoE), weight them.
Dispatch is dropless: the N·K (token, expert) pairs are sorted by expert, each expert runs one matmul on
its contiguous block, and index_add_ sums the gated results back per token.

Padding: `attention_mask` is True on real tokens; prompts are left-padded and responses right-padded, so a
row may have pads at both ends. Position ids count real tokens (a left-padded row starts at 0), pad keys are
hidden from attention, and pads are left out of the router statistics. Pad positions still get finite
outputs (a pad query always sees at least itself), so callers may compute on them and mask afterwards.

Routing replay (`routing=`) forces the experts per MoE layer; the gates still come from the current
router's p at those experts. `freeze_router=True` detaches the router weight, so it gets no gradient while
the activations feeding it still do. `KVCache` makes one-token-per-step decoding exact and cheap.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import Tensor, nn


@dataclass
class ToyMoEConfig:
    """The dimensions of the project's CPU prototype, which trained at ~9k tokens/s on 2 cores (see
    benchmarks/README.md for today's figure); with a 512-token vocabulary and tied embeddings: 3.48M
    parameters, ~1.1M active per token."""

    vocab_size: int = 512  # V: token ids (the toy BPE has 512)
    d_model: int = 128  # D: width of the residual stream
    n_layers: int = 4  # decoder layers (each MoE unless moe_layers says otherwise)
    n_heads: int = 4  # H: attention heads; D / H must be even (RoPE rotates pairs)
    n_experts: int = 8  # E: 8 experts as in Mixtral 8x7B (Jiang et al. 2024)
    top_k: int = 2  # K: top-2 routing (GShard, Lepikhin et al. 2020; Mixtral)
    expert_hidden: int = 256  # F: SwiGLU hidden size of one expert (Shazeer 2020, "GLU Variants")
    # Which layers are MoE (None: all); the others get a dense SwiGLU of hidden size F·K, the same active
    # compute, so () is the dense model of that compute (the control with no router at all).
    moe_layers: tuple[int, ...] | None = None
    norm_topk_prob: bool = True  # renormalise the K gates to sum to 1 (Mixtral, Qwen-MoE)
    aux_loss_coef: float = 0.01  # α of the Switch Transformer load-balance loss (Fedus et al. 2021)
    z_loss_coef: float = 1e-3  # c_z of the router z-loss (ST-MoE, Zoph et al. 2022)
    router_fp32: bool = True  # router matmul and softmax in float32 (ST-MoE, "selective precision")
    dropout: float = 0.0  # dropout rate in [0, 1)
    max_seq_len: int = 256  # the longest prompt + response, in tokens
    rope_theta: float = 10000.0  # RoFormer (Su et al. 2021)

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "expert_hidden", "max_seq_len")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"ToyMoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"ToyMoEConfig.d_model={self.d_model} must split into n_heads={self.n_heads} "
                             "heads of even size (RoPE rotates pairs)")
        if self.top_k > self.n_experts:
            raise ValueError(f"ToyMoEConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ToyMoEConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.moe_layers is not None:
            self.moe_layers = tuple(self.moe_layers)
            in_range = all(0 <= i < self.n_layers for i in self.moe_layers)
            if len(set(self.moe_layers)) != len(self.moe_layers) or not in_range:
                raise ValueError(f"ToyMoEConfig.moe_layers={self.moe_layers} must be distinct layer indices "
                                 f"in [0, {self.n_layers})")

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers)) if self.moe_layers is None else tuple(sorted(self.moe_layers))


class ToyMoEOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    router_logits: Tensor  # (L, B, T, E) raw pre-softmax, float32
    topk_idx: Tensor  # (L, B, T, K) int64, the experts actually used (the forced ones under routing replay)
    aux_loss: Tensor  # scalar, unweighted Switch load-balance loss, mean over MoE layers, real tokens only
    z_loss: Tensor  # scalar, unweighted router z-loss, mean over MoE layers, real tokens only
    expert_counts: Tensor  # (L, E) float32, real tokens routed to each expert (a token counts once per expert)
    kv_cache: "KVCache | None"


class KVCache:
    """Preallocated keys and values of every layer, plus the key mask and real-token count per row.

    One cache serves one batch of B rows for up to `max_len` slots; each `ToyMoE.forward(kv_cache=cache)`
    appends its T tokens (real or pad) and attends over everything stored so far. Inference only.
    """

    def __init__(self, config: ToyMoEConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        head_dim = config.d_model // config.n_heads
        shape = (config.n_layers, batch_size, config.n_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (n_layers, B, H, S_max, Dh)
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # (n_layers, B, H, S_max, Dh)
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)  # (B, S_max)
        self.real_tokens = torch.zeros(batch_size, device=device, dtype=torch.long)  # (B,)
        self.length = 0  # slots filled so far
        self.max_seq_len = config.max_seq_len

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    def append(self, valid: Tensor) -> tuple[int, Tensor, Tensor]:
        """Reserve slots for T new tokens; return (first slot, their position ids (B, T), key mask (B, S))."""
        batch_size, n_new = valid.shape
        if batch_size != self.key_mask.shape[0]:
            raise ValueError(f"kv_cache holds {self.key_mask.shape[0]} rows but input_ids has {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"kv_cache is full: {self.length} + {n_new} tokens exceed max_len={self.max_len}")
        start = self.length
        positions = position_ids(valid, self.real_tokens[:, None], self.max_seq_len)  # (B, T), checked before any write
        self.key_mask[:, start : start + n_new] = valid
        self.real_tokens += valid.sum(1)
        self.length += n_new
        return start, positions, self.key_mask[:, : self.length]

    def store(self, layer: int, start: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys/values (B, H, T, Dh) at `start`; return all stored so far (B, H, S, Dh)."""
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def position_ids(valid: Tensor, real_before: Tensor | int, max_seq_len: int) -> Tensor:
    """Real tokens before each token in its row (B, T): a left-padded row starts at 0; a pad takes its
    neighbour's position, harmless since it is masked."""
    positions = (real_before + valid.cumsum(1) - 1).clamp_min(0)  # (B, T)
    if int(positions.max()) >= max_seq_len:
        raise ValueError(f"a row has more than max_seq_len={max_seq_len} real tokens")
    return positions


def swiglu(x: Tensor, gate_up_weight: Tensor, down_weight: Tensor) -> Tensor:
    """SwiGLU MLP: (silu(x W_gate) * x W_up) W_down, with W_gate and W_up stored side by side (D, 2F)."""
    gate, up = (x @ gate_up_weight).chunk(2, dim=-1)  # (..., F) each
    return (F.silu(gate) * up) @ down_weight  # (..., D)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (..., B, H, T, Dh), rotating the pairs (i, i + Dh/2) as GPT-NeoX / Llama do."""
    first, second = x.chunk(2, dim=-1)  # (..., B, H, T, Dh/2) each
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)  # (..., B, H, T, Dh)


def causal_mask(key_mask: Tensor, start: int, n_queries: int) -> Tensor:
    """Boolean SDPA mask (B, 1, T, S): query slot start+i sees real keys up to itself, and always itself so
    that a pad query (e.g. the first slot of a left-padded row) has a finite softmax."""
    query_slot = torch.arange(start, start + n_queries, device=key_mask.device)[:, None]  # (T, 1)
    key_slot = torch.arange(key_mask.shape[1], device=key_mask.device)[None, :]  # (1, S)
    visible = rearrange(key_mask, "b s -> b 1 1 s") & (key_slot <= query_slot)  # (B, 1, T, S)
    return visible | (key_slot == query_slot)  # (B, 1, T, S)


class Attention(nn.Module):
    def __init__(self, config: ToyMoEConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.dropout = layer, config.n_heads, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None,
                start: int) -> Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h dh) -> three b h t dh", three=3, h=self.n_heads)  # (3, B, H, T, Dh)
        (q, k), v = rotate(qkv[:2], cos, sin), qkv[2]  # (B, H, T, Dh) each
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer, start, k, v)  # (B, H, S, Dh) each
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.out(rearrange(y, "b h t dh -> b t (h dh)"))  # (B, T, D)


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(d_model, 2 * hidden))
        self.down = nn.Parameter(torch.empty(hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_up, self.down)  # (B, T, D)


class MoELayer(nn.Module):
    """Linear router + E SwiGLU experts (weights stacked along a leading E axis), dropless dispatch."""

    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.norm_topk_prob, self.router_fp32 = config.norm_topk_prob, config.router_fp32
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(config.n_experts, config.d_model, 2 * config.expert_hidden))
        self.down = nn.Parameter(torch.empty(config.n_experts, config.expert_hidden, config.d_model))

    def route(self, x: Tensor, forced_idx: Tensor | None, freeze_router: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Return router logits (B, T, E) float32, the experts used (B, T, K) and their gates (B, T, K)."""
        weight = self.router.weight.detach() if freeze_router else self.router.weight
        if self.router_fp32:  # autocast off: under bf16-mixed it would cast this matmul back to bf16
            with torch.autocast(x.device.type, enabled=False):
                router_logits = F.linear(x.float(), weight.float())  # (B, T, E)
        else:
            router_logits = F.linear(x, weight).float()  # (B, T, E)
        probs = router_logits.softmax(dim=-1)  # (B, T, E)
        if forced_idx is None:
            gates, topk_idx = probs.topk(self.top_k, dim=-1)  # (B, T, K) each
        else:
            topk_idx, gates = forced_idx, probs.gather(-1, forced_idx)  # (B, T, K) each
        if self.norm_topk_prob:
            # tiny floor: forced experts can all have p == 0 in float32; their gates are then 0, not NaN.
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        return router_logits, topk_idx, gates

    def experts(self, x: Tensor, topk_idx: Tensor, gates: Tensor) -> Tensor:
        """Sum over k of gates[n, k] * expert_{topk_idx[n, k]}(x[n]); x (N, D), topk_idx and gates (N, K)."""
        expert_of_pair = rearrange(topk_idx, "n k -> (n k)")  # (M,)
        pair_order = torch.argsort(expert_of_pair, stable=True)  # (M,) pairs grouped by expert
        token_of_pair = pair_order // self.top_k  # (M,) token index of each sorted pair
        pairs_per_expert = torch.bincount(expert_of_pair, minlength=self.n_experts).tolist()
        x_sorted = x.index_select(0, token_of_pair)  # (M, D)
        # unbind once: indexing the stacked weights per expert would make backward build E full-size zero grads
        experts = zip(x_sorted.split(pairs_per_expert), self.gate_up.unbind(0), self.down.unbind(0))
        y_sorted = torch.cat([
            swiglu(x_block, gate_up, down) for x_block, gate_up, down in experts if len(x_block)
        ])  # (M, D)
        gate_sorted = rearrange(gates, "n k -> (n k)")[pair_order].to(y_sorted.dtype)  # (M,)
        weighted = (y_sorted * gate_sorted[:, None]).to(x.dtype)  # under bf16 autocast the experts run in bf16
        return torch.zeros_like(x).index_add_(0, token_of_pair, weighted)  # (N, D)

    def forward(self, x: Tensor, forced_idx: Tensor | None, freeze_router: bool) -> tuple[Tensor, Tensor, Tensor]:
        router_logits, topk_idx, gates = self.route(x, forced_idx, freeze_router)
        y = self.experts(
            rearrange(x, "b t d -> (b t) d"),
            rearrange(topk_idx, "b t k -> (b t) k"),
            rearrange(gates, "b t k -> (b t) k"),
        )  # (N, D)
        return rearrange(y, "(b t) d -> b t d", b=x.shape[0]), router_logits, topk_idx


class Block(nn.Module):
    def __init__(self, config: ToyMoEConfig, layer: int):
        super().__init__()
        self.is_moe = layer in config.moe_layer_ids
        self.attn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attn = Attention(config, layer)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.mlp = MoELayer(config) if self.is_moe else DenseMLP(config.d_model, config.expert_hidden * config.top_k)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None, start: int,
                forced_idx: Tensor | None, freeze_router: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> (x (B, T, D), and for a MoE layer its router logits (B, T, E) and experts (B, T, K))."""
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, start))  # (B, T, D)
        if not self.is_moe:
            return x + self.drop(self.mlp(self.mlp_norm(x))), None, None
        y, router_logits, topk_idx = self.mlp(self.mlp_norm(x), forced_idx, freeze_router)
        return x + self.drop(y), router_logits, topk_idx


def router_statistics(router_logits: Tensor, topk_idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Switch load-balance loss, ST-MoE z-loss (both averaged over layers) and expert counts, real tokens only.

    Switch (Fedus et al. 2021, eq. 4): aux = E · Σ_e f_e · P_e, with P_e the mean router probability of expert
    e and f_e the share of the N·K (token, expert) pairs sent to e. Dividing f by K (our choice for top-K) keeps
    the balanced optimum at 1 for every K. ST-MoE z-loss: mean of logsumexp(z)^2. A batch with no real token
    gives 0 for both.
    """
    n_layers, _, _, n_experts = router_logits.shape
    if n_layers == 0:  # a dense model has no router to balance
        zero = router_logits.new_zeros(())
        return zero, zero, router_logits.new_zeros(0, n_experts)
    top_k = topk_idx.shape[-1]
    weight = valid.to(router_logits.dtype)  # (B, T)
    n_real = weight.sum().clamp_min(1.0)
    pair_weight = repeat(weight, "b t -> l (b t k)", l=n_layers, k=top_k)  # (L, M)
    # new_zeros, not torch.zeros: under Lightning's *-true precisions the default dtype is not float32
    expert_counts = pair_weight.new_zeros(n_layers, n_experts).scatter_add_(
        1, rearrange(topk_idx, "l b t k -> l (b t k)"), pair_weight
    )  # (L, E)
    mean_prob = einsum(router_logits.softmax(dim=-1), weight, "l b t e, b t -> l e") / n_real  # (L, E)
    pair_share = expert_counts / (n_real * top_k)  # (L, E)
    aux_loss = (n_experts * (pair_share * mean_prob).sum(-1)).mean()
    z_loss = (einsum(torch.logsumexp(router_logits, dim=-1).square(), weight, "l b t, b t -> l") / n_real).mean()
    return aux_loss, z_loss, expert_counts


class ToyMoE(nn.Module):
    def __init__(self, config: ToyMoEConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)  # tied: also the output projection
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        head_dim = config.d_model // config.n_heads
        inv_freq = config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
        angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, Dh/2)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) everywhere (GPT-2); projections into the residual stream get 0.02 / sqrt(2·n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                is_residual_out = name.endswith(("attn.out.weight", "mlp.down"))
                nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_out else 0.02)

    @property
    def n_moe_layers(self) -> int:
        return len(self.config.moe_layer_ids)

    def router_loss(self, output: ToyMoEOutput) -> Tensor:
        """The router terms to add to a training loss: aux_loss_coef · aux_loss + z_loss_coef · z_loss."""
        return self.config.aux_loss_coef * output.aux_loss + self.config.z_loss_coef * output.z_loss

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        routing: Tensor | None = None,
        freeze_router: bool = False,
        kv_cache: KVCache | None = None,
    ) -> ToyMoEOutput:
        """input_ids (B, T) int64; attention_mask (B, T) bool or 0/1, True on real tokens (None = all real);
        routing (L, B, T, K) int64 forces the experts of each MoE layer; kv_cache appends to and attends over
        a KVCache (inference only)."""
        valid = self._check_inputs(input_ids, attention_mask)  # (B, T)
        if routing is not None:
            self._check_routing(routing, valid)
        if kv_cache is not None and torch.is_grad_enabled():
            raise ValueError("kv_cache is for inference: call forward under torch.no_grad()")
        n_tokens = input_ids.shape[1]
        if kv_cache is not None:
            start, positions, key_mask = kv_cache.append(valid)  # (B, T), (B, S)
            mask = causal_mask(key_mask, start, n_tokens)  # (B, 1, T, S)
        else:
            start, positions = 0, position_ids(valid, 0, self.config.max_seq_len)  # (B, T)
            # Without pads, SDPA's built-in causal mask is the same mask and faster.
            mask = None if attention_mask is None or bool(valid.all()) else causal_mask(valid, 0, n_tokens)
        cos = rearrange(self.rope_cos[positions], "b t f -> b 1 t f")  # (B, 1, T, Dh/2)
        sin = rearrange(self.rope_sin[positions], "b t f -> b 1 t f")  # (B, 1, T, Dh/2)

        x = self.drop(self.embed(input_ids))  # (B, T, D)
        router_logits, topk_idx = [], []
        for block in self.blocks:
            forced_idx = routing[len(topk_idx)] if routing is not None and block.is_moe else None
            x, layer_logits, layer_idx = block(x, cos, sin, mask, kv_cache, start, forced_idx, freeze_router)
            if block.is_moe:
                router_logits.append(layer_logits)
                topk_idx.append(layer_idx)
        logits = F.linear(self.final_norm(x), self.embed.weight)  # (B, T, V)
        if router_logits:
            router_logits, topk_idx = torch.stack(router_logits), torch.stack(topk_idx)  # (L, B, T, E), (L, B, T, K)
        else:  # a dense model: no MoE layer, L = 0
            router_logits = x.new_zeros(0, *input_ids.shape, self.config.n_experts, dtype=torch.float32)  # (0, B, T, E)
            topk_idx = torch.zeros(0, *input_ids.shape, self.config.top_k, dtype=torch.long, device=x.device)  # (0, B, T, K)
        aux_loss, z_loss, expert_counts = router_statistics(router_logits, topk_idx, valid)
        return ToyMoEOutput(logits, router_logits, topk_idx, aux_loss, z_loss, expert_counts, kv_cache)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a non-empty (B, T) int64 tensor, "
                             f"got {tuple(input_ids.shape)} {input_ids.dtype}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size})")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} "
                             f"!= input_ids shape {tuple(input_ids.shape)}")
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must be bool or hold only 0 and 1")
        return attention_mask.bool()

    def _check_routing(self, routing: Tensor, valid: Tensor) -> None:
        expected = (self.n_moe_layers, *valid.shape, self.config.top_k)
        if tuple(routing.shape) != expected:
            raise ValueError(f"routing must have shape (L, B, T, K) = {expected}, got {tuple(routing.shape)}")
        if routing.dtype != torch.long:
            raise ValueError(f"routing must be int64, got {routing.dtype}")
        if int(routing.min()) < 0 or int(routing.max()) >= self.config.n_experts:
            raise ValueError(f"routing holds expert ids outside [0, n_experts={self.config.n_experts})")
        repeated = (routing.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)  # (L, B, T)
        if bool((repeated & valid).any()):
            raise ValueError("routing names the same expert twice for a real token")
