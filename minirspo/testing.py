"""Tiny offline Hugging Face checkpoints for tests, tutorials and benchmarks: no hub access, any size.

`make_tiny_hf_checkpoint` saves a random-init model of one of the supported families with
`toy_hf_tokenizer`, the toy BPE as an HF tokenizer, so `load_policy("hf:PATH")` runs anywhere offline.
"""
from pathlib import Path

import torch

from minirspo.policy.hf import HF_MOE_FAMILIES
from toy_moe.tokenizer import RANKS_PATH, SPECIAL_TOKENS, SPLIT_PATTERN, parse_ranks

__all__ = ["make_tiny_hf_checkpoint", "toy_hf_tokenizer"]


TOY_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|user|>{{ message['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def toy_hf_tokenizer():
    """The toy BPE (toy_moe/data/toy_moe.tiktoken) as an HF `PreTrainedTokenizerFast`, built offline, whose
    chat template gives the toy layout: it encodes every prompt exactly as `ToyTokenizer.encode_prompt`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    converter = TikTokenConverter(vocab_file=str(RANKS_PATH), pattern=SPLIT_PATTERN,
                                  extra_special_tokens=list(SPECIAL_TOKENS))
    # tiktoken's own loader caches local files by path, so after a ranks rebuild it could return stale ranks.
    converter.load_tiktoken_bpe = lambda path: parse_ranks(Path(path).read_text(encoding="utf-8"), source=path)
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|pad|>", chat_template=TOY_CHAT_TEMPLATE)


def make_tiny_hf_checkpoint(path: str | Path, family: str = "qwen3_moe", *, hidden_size: int = 32,
                            n_layers: int = 2, n_heads: int = 2, n_experts: int = 4, top_k: int = 2,
                            expert_hidden: int = 32, vocab_size: int | None = None, seed: int = 0,
                            **config_overrides) -> Path:
    """A random-init HF model of `family` (one of HF_MOE_FAMILIES, or a dense model_type such as "qwen3")
    with `toy_hf_tokenizer`, saved to `path` without any hub access. Dense layers get hidden size
    expert_hidden · top_k, the active compute of one MoE layer. `vocab_size` above the tokenizer's 512 adds
    ids that are never sampled (a realistic LM-head cost for benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = toy_hf_tokenizer()
    sizes = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, num_hidden_layers=n_layers,
                 num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=hidden_size // n_heads,
                 intermediate_size=expert_hidden * top_k, max_position_embeddings=1024,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if family in HF_MOE_FAMILIES:
        sizes |= dict(num_experts=n_experts, num_experts_per_tok=top_k)
        if family in ("qwen2_moe", "qwen3_moe"):
            sizes |= dict(moe_intermediate_size=expert_hidden)
        else:  # OLMoE and Mixtral size their experts with intermediate_size
            sizes |= dict(intermediate_size=expert_hidden)
        if family == "qwen2_moe":
            sizes |= dict(shared_expert_intermediate_size=expert_hidden)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **(sizes | config_overrides)))
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
