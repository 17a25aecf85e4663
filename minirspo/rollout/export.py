"""The toy MoE as a Hugging Face Mixtral, so that an inference engine (vLLM) can serve it.

Notation: V vocabulary, D model dim, H heads, Dh = D / H, L layers, E experts, K top-k, F one expert's hidden size.

toy_moe's architecture is Mixtral's: pre-norm RMSNorm (eps 1e-6), causal attention with RoPE rotating the pairs
(i, i + Dh/2) (GPT-NeoX / Llama's rotate_half), SwiGLU experts, a linear router whose softmax over all E picks
the top-K and renormalises their gates, and input and output embeddings tied. So the export is a renaming and
reshaping of the same numbers, and `tests/test_rollout.py` checks that the Mixtral computes the toy's logits and
routing. What has no Mixtral counterpart is refused: a dense layer (`moe_layers`) and gates that are not
renormalised (`norm_topk_prob=False`).

`hf_checkpoint_weights` gives any HF model's weights under the names its checkpoint files use (transformers'
own reverse conversion, what `save_pretrained` writes: e.g. Mixtral's fused `mlp.experts.gate_up_proj` (E, 2F,
D) becomes `block_sparse_moe.experts.{e}.w1/w3.weight`), the names an engine's in-place weight reload expects.
"""

import torch
from einops import rearrange
from torch import Tensor, nn

from toy_moe.model import ToyMoE, ToyMoEConfig


def check_exportable(model: ToyMoE | ToyMoEConfig) -> None:
    """ValueError naming what a Mixtral cannot express (of a model or of its config)."""
    config = model if isinstance(model, ToyMoEConfig) else model.config
    if config.moe_layers is not None and tuple(config.moe_layers) != tuple(range(config.n_layers)):
        raise ValueError(f"the toy has dense layers (moe_layers={config.moe_layers}); a Mixtral is MoE in every "
                         "layer, so an engine cannot serve it")
    if not config.norm_topk_prob:
        raise ValueError("the toy does not renormalise its top-K gates (norm_topk_prob=False); Mixtral always does")


def mixtral_config(model: ToyMoE, tokenizer):
    from transformers import MixtralConfig
    config = model.config
    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.expert_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        head_dim=config.d_model // config.n_heads, num_local_experts=config.n_experts,
        num_experts_per_tok=config.top_k, max_position_embeddings=config.max_seq_len, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, tie_word_embeddings=True,
        sliding_window=None, router_jitter_noise=0.0, output_router_logits=False, attention_dropout=0.0,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def mixtral_weights(model: ToyMoE) -> dict[str, Tensor]:
    """The toy's parameters under an in-memory transformers-5 Mixtral's names and layouts (views, no copies
    except the transposes)."""
    weights = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight,
               "lm_head.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        q, k, v = rearrange(block.attn.qkv.weight, "(three o) d -> three o d", three=3)  # (D, D) each
        weights |= {f"{prefix}.self_attn.q_proj.weight": q, f"{prefix}.self_attn.k_proj.weight": k,
                    f"{prefix}.self_attn.v_proj.weight": v, f"{prefix}.self_attn.o_proj.weight": block.attn.out.weight,
                    f"{prefix}.input_layernorm.weight": block.attn_norm.weight,
                    f"{prefix}.post_attention_layernorm.weight": block.mlp_norm.weight,
                    f"{prefix}.mlp.gate.weight": block.mlp.router.weight,                       # (E, D)
                    # toy: x @ W with W (E, D, 2F) and (E, F, D); Mixtral: F.linear(x, W[e]) with (E, 2F, D), (E, D, F)
                    f"{prefix}.mlp.experts.gate_up_proj": rearrange(block.mlp.gate_up, "e d f -> e f d"),
                    f"{prefix}.mlp.experts.down_proj": rearrange(block.mlp.down, "e f d -> e d f")}
    return weights


def toy_as_mixtral(model: ToyMoE, tokenizer) -> nn.Module:
    """A transformers MixtralForCausalLM (float32, eval) computing what `model` computes."""
    from transformers import MixtralForCausalLM
    check_exportable(model)
    lm = MixtralForCausalLM(mixtral_config(model, tokenizer))
    with torch.no_grad():
        lm.load_state_dict({name: weight.detach() for name, weight in mixtral_weights(model).items()}, strict=True)
    return lm.eval()


def hf_checkpoint_weights(lm: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`state_dict` (default: lm's own) under the names and layouts of lm's checkpoint files."""
    from transformers.core_model_loading import revert_weight_conversion
    state_dict = {name: value.detach() for name, value in (lm.state_dict() if state_dict is None else state_dict).items()}
    return dict(revert_weight_conversion(lm, state_dict))
