"""`ToyPolicy`: the from-scratch `toy_moe.ToyMoE` behind the policy interface (see `minirspo.policy.base`).

Notation: B sequences, P prompt tokens, N response tokens, S = P + N, V vocabulary, L MoE layers, E experts,
K experts per token.
"""
import torch
from torch import Tensor, nn

from minirspo.policy.base import Policy, Samples, Scores, left_pad, next_token_entropy
from toy_moe.generate import generate, token_logprobs
from toy_moe.model import ToyMoE
from toy_moe.tokenizer import ToyTokenizer


class ToyPolicy(Policy):
    """`toy_moe.ToyMoE` behind the policy interface; special tokens other than EOS are never sampled."""

    def __init__(self, model: ToyMoE, tokenizer: ToyTokenizer):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.banned = tuple(i for i in tokenizer.special_ids if i != tokenizer.eos_id)
        self.stop_ids, self.pad_id = (tokenizer.eos_id,), tokenizer.pad_id

    @property
    def is_moe(self) -> bool:
        return self.model.n_moe_layers > 0

    @property
    def router_weights(self) -> list[nn.Parameter]:
        return [module.router.weight for module in self.model.modules() if hasattr(module, "router")]

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        encoded = [self.tokenizer.encode_prompt(p) for p in prompts]
        return left_pad(encoded, self.tokenizer.pad_id, next(self.model.parameters()).device)

    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode_response(row[valid]) for row, valid in zip(tokens.cpu(), mask.cpu())]

    @property
    def matmul_weights(self) -> list[tuple[str, int]]:
        # nn.Linear weights are (out, in); toy_moe's SwiGLU weights are (..., in, out), multiplied as x @ W
        return [(name, -1 if name.endswith(".weight") else -2) for name, _ in self.model.named_parameters()
                if name.endswith(("attn.qkv.weight", "attn.out.weight", "mlp.gate_up", "mlp.down"))]

    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None, record="none") -> Samples:
        """toy_moe's cached sampler; it records log-probs and routing only when asked (the loop re-scores)."""
        rollout = generate(self.model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, stop_tokens=(self.tokenizer.eos_id,),
                           banned_tokens=self.banned, pad_id=self.tokenizer.pad_id, generator=generator,
                           record=record != "none")
        if record == "none":
            return Samples(rollout.tokens, rollout.mask)
        routing = torch.cat([rollout.prompt_topk_idx, rollout.topk_idx], dim=2) if record == "routing" else None  # (L, B, S, K)
        return Samples(rollout.tokens, rollout.mask, rollout.logprobs, rollout.topk_idx, rollout.topk_logprobs, routing)

    def score(self, prompt_ids, prompt_mask, tokens, mask, *, routing=None, freeze_router=False,
              temperature=1.0) -> Scores:
        prompt_len = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids, tokens], dim=1)                                  # (B, S)
        out = self.model(ids, torch.cat([prompt_mask, mask], dim=1), routing=routing,
                         freeze_router=freeze_router)
        next_logits = out.logits[:, prompt_len - 1:-1]                                 # (B, N, V)
        logprobs = token_logprobs(next_logits, tokens, temperature=temperature, banned_tokens=self.banned)
        return Scores(logprobs=torch.where(mask, logprobs, 0.0), entropy=next_token_entropy(next_logits),
                      router_logits=out.router_logits[:, :, prompt_len:],              # (L, B, N, E)
                      topk_idx=out.topk_idx[:, :, prompt_len:],                        # (L, B, N, K)
                      routing=out.topk_idx, aux_loss=out.aux_loss)
