"""The one door between the RL loop and a model: generate rollouts, score tokens, replay or freeze routing.

Notation: B sequences, P prompt tokens (left-padded), N response tokens (right-padded), S = P + N,
V vocabulary, D model dim, L MoE layers, E experts, K experts per token, C tokens per log-prob chunk.

The loop (`minirspo.module`) never touches a model directly. A `Policy` turns prompt text into token
ids, samples responses (a `Rollout`: tokens, per-token log-probs and top-K routing, nothing of size E per
token), and scores given responses with the forward pass that trains (`Scores`: log-probs, entropy and
router logits at the response tokens, plus the top-K routing of every position for routing replay).

Alignment, shared by every implementation: the log-prob of response token n comes from the logits at
position P + n − 1 (the position that predicts it); its routing ("the experts activated for token n",
RSPO.md) is the router's choice at position P + n, where the token itself is processed.

Two implementations: `ToyPolicy` (toy_moe) and `HFPolicy`, a Hugging Face causal LM loaded from a local
directory, MoE or dense. On the MoE families (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral; transformers >= 5,
whose routers are `*TopKRouter` modules returning router logits, gates and experts), `RouterHooks` sits
on every gate: it records what the gate chose and, for routing replay or router freezing, recomputes the
gate as the family does (softmax over all E in float32, top-K, the K gates renormalised when the family
does: always for Mixtral, per `norm_topk_prob` for the others) from forced experts or a detached weight.
Log-probs are computed C tokens at a time (`ChunkedLogprobLM`), never as full float32 (B, S, V) logits.
"""
import contextlib
import functools
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minirspo.config import ROLLOUT_ENGINES
from minirspo.loss import router_logprobs_at
from toy_moe.generate import Rollout, generate, token_logprobs
from toy_moe.model import ToyMoE
from toy_moe.tokenizer import RANKS_PATH, SPECIAL_TOKENS, SPLIT_PATTERN, ToyTokenizer, parse_ranks

__all__ = ["HFPolicy", "Policy", "Rollout", "Scores", "ToyPolicy", "load_policy", "make_tiny_hf_checkpoint",
           "toy_hf_tokenizer"]

# A hub lookup for a missing local file hangs ~25 s before failing; every model here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")


class Scores(NamedTuple):
    logprobs: Tensor       # (B, N) float32 log-prob of each response token, 0 at padding
    entropy: Tensor        # (B, N) float32 entropy of the next-token distribution, detached
    router_logits: Tensor  # (L, B, N, E) float32 raw router logits at the response tokens
    topk_idx: Tensor       # (L, B, N, K) experts used at the response tokens
    routing: Tensor        # (L, B, S, K) experts used at every position: what routing replay feeds back
    aux_loss: Tensor       # scalar, the model's unweighted load-balance loss over real tokens


@torch.no_grad()
def next_token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats, detached, float32) of softmax(logits) over the last dim: (..., V) -> (...)."""
    log_p = logits.float().log_softmax(dim=-1)                                         # (..., V)
    return -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)                # (...)


class Policy(ABC):
    """What the RL loop needs from a model. `model` is the nn.Module the optimiser trains."""

    model: nn.Module

    @property
    @abstractmethod
    def is_moe(self) -> bool:
        """False for a dense model: RSPO then has no router to measure."""

    @property
    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """The repeated blocks of `model`: one FSDP unit and one activation-checkpointing unit each."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompt texts -> left-padded ids (B, P) int64 and mask (B, P) bool."""

    @abstractmethod
    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        """Response ids (B, N) -> texts, stopping at the end-of-sequence token."""

    @abstractmethod
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample responses without gradient (temperature 0 = greedy)."""

    @abstractmethod
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, mask: Tensor, *,
              routing: Tensor | None = None, freeze_router: bool = False,
              temperature: float = 1.0) -> Scores:
        """Score responses with the training forward; `routing` (L, B, S, K) replays given experts."""


class ToyPolicy(Policy):
    """`toy_moe.ToyMoE` behind the policy interface; special tokens other than EOS are never sampled."""

    def __init__(self, model: ToyMoE, tokenizer: ToyTokenizer):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.banned = tuple(i for i in tokenizer.special_ids if i != tokenizer.eos_id)

    @property
    def is_moe(self) -> bool:
        return self.model.n_moe_layers > 0

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        encoded = [self.tokenizer.encode_prompt(p) for p in prompts]
        return _left_pad(encoded, self.tokenizer.pad_id, next(self.model.parameters()).device)

    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode_response(row[valid]) for row, valid in zip(tokens.cpu(), mask.cpu())]

    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None) -> Rollout:
        return generate(self.model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_tokens=(self.tokenizer.eos_id,),
                        banned_tokens=self.banned, pad_id=self.tokenizer.pad_id, generator=generator)

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


def _left_pad(encoded: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id lists -> left-padded ids (B, P) int64 and mask (B, P) bool, on `device`."""
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)                  # (B, P)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)                         # (B, P)
    for row, prompt in enumerate(encoded):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------

class RouterHooks:
    """Forward hooks on the MoE gates of an HF model, one gate per MoE layer, in layer order.

    A gate maps hidden states (N, D) to (router logits (N, E), gates (N, K), experts (N, K)) and its block
    dispatches with those gates and experts, so replacing the gate's output is all that routing replay and
    router freezing need. `configure` state stays until the next call because activation checkpointing
    re-runs every gate during backward and must get the same routing again; `recording` collects outputs
    only inside its `with` block, so those re-runs are not recorded twice.
    """

    def __init__(self, gates: list[nn.Module]):
        self.gates = gates
        self.replay: Tensor | None = None       # (L, N, K) experts to force, N = B·S
        self.freeze = False
        self.records: list[tuple[Tensor, Tensor]] | None = None
        for layer, gate in enumerate(gates):
            # a partial of a bound method, not a closure: deepcopy (the KL reference policy) re-binds it
            gate.register_forward_hook(functools.partial(self.on_gate, layer))

    def configure(self, replay: Tensor | None, freeze: bool) -> None:
        if replay is not None and (replay.ndim != 3 or replay.shape[0] != len(self.gates)):
            raise ValueError(f"routing must hold one (B·S, K) block per MoE layer ({len(self.gates)}), "
                             f"got shape {tuple(replay.shape)}")
        self.replay, self.freeze = replay, freeze

    @contextlib.contextmanager
    def recording(self):
        """Collect (router logits (N, E), experts used (N, K)) of every gate call inside the block."""
        self.records = []
        try:
            yield self.records
        finally:
            self.records = None

    def on_gate(self, layer: int, gate: nn.Module, args: tuple, output: tuple[Tensor, Tensor, Tensor]):
        router_logits, gates, experts = output
        if self.replay is not None or self.freeze:
            hidden = rearrange(args[0], "... d -> (...) d")                                # (N, D)
            weight = gate.weight.detach() if self.freeze else gate.weight
            router_logits = F.linear(hidden, weight)                                       # (N, E)
            probs = router_logits.float().softmax(dim=-1)                                  # (N, E)
            if self.replay is None:
                gates, experts = probs.topk(gate.top_k, dim=-1)                            # (N, K) each
            else:
                experts = self.replay[layer]                                               # (N, K)
                if experts.shape[0] != hidden.shape[0]:
                    raise ValueError(f"routing covers {experts.shape[0]} tokens, the batch has {hidden.shape[0]}")
                gates = probs.gather(-1, experts)                                          # (N, K)
            if getattr(gate, "norm_topk_prob", True):  # Mixtral's gate always renormalises and has no flag
                # tiny floor: forced experts can all have p == 0 in float32; their gates are then 0, not NaN.
                gates = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
            gates = gates.to(output[1].dtype)  # the dtype the family's own gate returns
        if self.records is not None:
            self.records.append((router_logits, experts))
        return router_logits, gates, experts


class ChunkedLogprobLM(nn.Module):
    """An HF causal LM whose forward returns log-probs of given response tokens instead of logits.

    The LM head runs on C response tokens at a time under activation checkpointing, so neither forward
    nor backward ever holds float32 logits of more than C tokens (those of a 32k vocabulary × 64 sequences
    × 1k response tokens would be 8 GB). This module is what FSDP wraps as its root, and
    `forward` (scoring) and `sample` (generation) are its entry points, so the root's own parameters
    (embeddings, final norm, head) are gathered around both.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"logprob_chunk_tokens must be >= 1, got {chunk_tokens}")
        self.lm, self.chunk_tokens = lm, chunk_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, *, temperature: float,
                banned_tokens: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """input_ids (B, S) ending in targets (B, N), attention_mask (B, S) bool -> log-probs (B, N) float32
        of each target under the logits just before it, and the entropies there (B, N), detached."""
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)               # (B, S) as HF generate
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask.long(),
                                       position_ids=positions, use_cache=False).last_hidden_state  # (B, S, D)
        predicting = rearrange(hidden[:, -targets.shape[1] - 1:-1], "b n d -> (b n) d")   # (B·N, D)
        flat_targets = rearrange(targets, "b n -> (b n)")                                  # (B·N,)
        head = functools.partial(self._head, temperature=temperature, banned_tokens=banned_tokens)
        chunks = [checkpoint(head, h, t, use_reentrant=False) if torch.is_grad_enabled() else head(h, t)
                  for h, t in zip(predicting.split(self.chunk_tokens), flat_targets.split(self.chunk_tokens))]
        logprobs, entropy = (torch.cat(parts) for parts in zip(*chunks))                  # (B·N,) each
        return (rearrange(logprobs, "(b n) -> b n", b=len(targets)),                       # (B, N)
                rearrange(entropy, "(b n) -> b n", b=len(targets)))                        # (B, N)

    def _head(self, hidden: Tensor, targets: Tensor, temperature: float, banned_tokens: tuple[int, ...]):
        logits = self.lm.get_output_embeddings()(hidden)                                   # (C, V)
        logprobs = token_logprobs(logits, targets, temperature=temperature, banned_tokens=banned_tokens)  # (C,)
        return logprobs, next_token_entropy(logits)

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, generation_config, logits_processor) -> Tensor:
        """HF `generate` (KV cache) after left-padded prompts (B, P), then one more cached step that feeds
        the last sampled token, so its routing is recorded like every earlier token's. -> tokens (B, N).
        `generation_config` must set use_cache and return_dict_in_generate (that step needs the cache)."""
        out = self.lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(),
                               generation_config=generation_config, logits_processor=logits_processor)
        tokens = out.sequences[:, prompt_ids.shape[1]:]                                    # (B, N)
        mask = torch.cat([prompt_mask.long(), torch.ones_like(tokens)], dim=1)            # (B, S)
        # `past_key_values`: the name every transformers 5 release accepts (a later 5.x renamed it `cache`, keeping
        # this one, with a warning, until 5.40); the GPU image here has 5.17, this checkout 5.24.
        self.lm(input_ids=tokens[:, -1:], attention_mask=mask, position_ids=mask.cumsum(dim=1)[:, -1:] - 1,
                past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        return tokens


class SampledTokenLogprobs:
    """A logits processor for HF `generate` (duck-typed): bans tokens for the sampler and keeps the log-prob
    of each sampled token under the distribution the RL loss recomputes (`token_logprobs`: temperature-
    scaled, banned tokens masked, before top-p).

    HF runs custom processors before its temperature and top-p warpers, so `scores` here are the raw logits.
    A step learns which token its logits produced only at the next step (the last column of `input_ids`),
    so one step of logits (B, V) is kept; `logprobs` scores the final token."""

    def __init__(self, temperature: float, banned_tokens: tuple[int, ...]):
        self.temperature, self.banned_tokens = temperature, banned_tokens
        self.previous: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.steps.append(token_logprobs(self.previous, input_ids[:, -1], temperature=self.temperature,
                                             banned_tokens=self.banned_tokens))            # (B,)
        self.previous = scores                                                             # (B, V)
        if not self.banned_tokens:
            return scores
        return scores.index_fill(-1, torch.tensor(self.banned_tokens, device=scores.device), float("-inf"))

    def logprobs(self, tokens: Tensor) -> Tensor:
        """Log-probs (B, N) of the sampled `tokens` (B, N), once generation is over."""
        last = token_logprobs(self.previous, tokens[:, -1], temperature=self.temperature,
                              banned_tokens=self.banned_tokens)                            # (B,)
        return rearrange([*self.steps, last], "n b -> b n")                                # (B, N)


@contextlib.contextmanager
def _rng_from(generator: torch.Generator | None, device: torch.device):
    """HF `generate` samples from the global RNG: seed it from `generator` for this block, then restore it."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def _router_gates(lm: nn.Module) -> list[nn.Module]:
    """The MoE gates of an HF model in layer order; [] for a dense model; an error for a family we cannot hook."""
    import transformers
    family = lm.config.model_type
    gates = [module for module in lm.modules() if type(module).__name__.endswith("TopKRouter")]
    if family in HF_MOE_FAMILIES:
        if not gates:
            raise ValueError(f"{family}: no `*TopKRouter` gate modules found; minirspo needs transformers >= 5, "
                             f"whose MoE routers are modules of their own (installed: {transformers.__version__})")
        return gates
    if gates or any(getattr(lm.config, name, 0) for name in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"model_type {family!r} is a Mixture-of-Experts family minirspo cannot hook; "
                         f"supported: {', '.join(HF_MOE_FAMILIES)}")
    return []


class HFPolicy(Policy):
    """A Hugging Face causal LM behind the policy interface: an MoE of HF_MOE_FAMILIES, or a dense model
    (then `is_moe` is False and RSPO refuses it). Special tokens other than the stop tokens, and ids beyond
    the tokenizer, are never sampled (the CPU prototype's pitfall: a sampled PAD/BOS breaks scoring).

    The checkpoint's generation defaults (top_k, repetition_penalty, ...) are dropped: RL must sample from
    the distribution it scores, the model's own at --temperature / --top-p. The HF router aux loss is not
    added by the model (no `labels`, `output_router_logits` off); `Scores.aux_loss` carries it unweighted
    for the loop's --aux-loss-coef."""

    def __init__(self, lm: nn.Module, tokenizer, *, logprob_chunk_tokens: int = 4096):
        from transformers import GenerationConfig
        if getattr(lm.config, "router_jitter_noise", 0.0):
            raise ValueError(f"router_jitter_noise={lm.config.router_jitter_noise}: a noisy router makes the "
                             "training forward random, so old and new log-probs would disagree on-policy")
        vocab_size = lm.get_output_embeddings().out_features
        if vocab_size < len(tokenizer):
            raise ValueError(f"model vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        eos = lm.generation_config.eos_token_id
        self.stop_ids = tuple(sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}))
        if not self.stop_ids:
            raise ValueError("neither the model's generation config nor its tokenizer names an end-of-sequence token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        special = {*tokenizer.all_special_ids, *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)}
        self.banned = tuple(sorted((special - set(self.stop_ids)) | set(range(len(tokenizer), vocab_size))))
        lm.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=list(self.stop_ids),
                                                bos_token_id=tokenizer.bos_token_id)
        lm.config.output_router_logits = False
        self.router = RouterHooks(_router_gates(lm))
        self.balance_loss = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        self.model, self.tokenizer = ChunkedLogprobLM(lm, logprob_chunk_tokens), tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, *, logprob_chunk_tokens: int = 4096) -> "HFPolicy":
        """Model (float32: the optimiser's master weights; --precision bf16-mixed computes in bf16) and
        tokenizer from a local directory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls(lm.eval(), AutoTokenizer.from_pretrained(path), logprob_chunk_tokens=logprob_chunk_tokens)

    @property
    def is_moe(self) -> bool:
        return bool(self.router.gates)

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.lm.get_decoder().layers)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """With a chat template, each prompt is one user turn plus the generation prompt; else plain text."""
        if self.tokenizer.chat_template:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True) for prompt in prompts]
            encoded = self.tokenizer(texts, add_special_tokens=False).input_ids
        else:
            encoded = self.tokenizer(prompts).input_ids
        return _left_pad(encoded, self.pad_id, next(self.model.parameters()).device)

    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode(row[valid].tolist(), skip_special_tokens=True)
                for row, valid in zip(tokens.cpu(), mask.cpu())]

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None) -> Rollout:
        """The model's own `generate` with a KV cache; temperature 0 = greedy (log-probs then at temperature 1).
        Routing is recorded by the gate hooks as each sampled token is fed back."""
        from transformers import GenerationConfig
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        greedy = temperature == 0
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                                  temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                                  top_k=None if greedy else 0, pad_token_id=self.pad_id, eos_token_id=list(self.stop_ids),
                                  use_cache=True, return_dict_in_generate=True)
        sampled = SampledTokenLogprobs(1.0 if greedy else temperature, self.banned)
        self.router.configure(replay=None, freeze=False)
        with self.router.recording() as records, _rng_from(generator, prompt_ids.device):
            tokens = self.model.sample(prompt_ids, prompt_mask, config, [sampled])         # (B, N)
        is_stop = torch.isin(tokens, torch.tensor(self.stop_ids, device=tokens.device))   # (B, N)
        mask = (is_stop.cumsum(dim=1) - is_stop.long()) == 0                               # (B, N) through 1st stop
        logprobs = torch.where(mask, sampled.logprobs(tokens), 0.0)                        # (B, N)
        if not self.is_moe:  # no routing: (0, B, N, 0), like its scores
            no_routing = tokens.new_zeros((0, *tokens.shape, 0))
            return Rollout(tokens, logprobs, mask, no_routing, no_routing.float())
        n_layers, n_steps = len(self.router.gates), tokens.shape[1]
        # Passes: the prompt, tokens 1..N-1 fed back, then our extra step feeding token N. Under FSDP on several
        # processes, transformers' synced_gpus makes a rank that has finished run dummy passes until every
        # rank has, between its last real pass and our extra step: whole passes, dropped here.
        extra = len(records) - n_layers * (n_steps + 1)
        if extra < 0 or extra % n_layers:
            raise RuntimeError(f"expected {n_steps + 1} forward passes of {n_layers} gates while generating "
                               f"{n_steps} tokens, recorded {len(records)} gate calls")
        token_records = records[n_layers:n_layers * n_steps] + records[len(records) - n_layers:]
        topk_idx = rearrange(torch.stack([experts for _, experts in token_records]),
                             "(n l) b k -> l b n k", l=n_layers)                            # (L, B, N, K)
        router_logits = rearrange(torch.stack([logits for logits, _ in token_records]),
                                  "(n l) b e -> l b n e", l=n_layers)                       # (L, B, N, E)
        topk_logprobs = torch.where(rearrange(mask, "b n -> 1 b n 1"),
                                    router_logprobs_at(router_logits, topk_idx), 0.0)       # (L, B, N, K)
        return Rollout(tokens, logprobs, mask, topk_idx, topk_logprobs)

    def score(self, prompt_ids, prompt_mask, tokens, mask, *, routing=None, freeze_router=False,
              temperature=1.0) -> Scores:
        """Router logits are 0 at padding; padded positions keep the model's routing (mask them)."""
        batch, prompt_len = prompt_ids.shape
        ids = torch.cat([prompt_ids, tokens], dim=1)                                       # (B, S)
        valid = torch.cat([prompt_mask, mask], dim=1).bool()                               # (B, S)
        if routing is not None:
            if routing.shape[:3] != (len(self.router.gates), *ids.shape):
                raise ValueError(f"routing must be (L, B, S, K) with (L, B, S) = "
                                 f"{(len(self.router.gates), *ids.shape)}, got {tuple(routing.shape)}")
            routing = rearrange(routing, "l b s k -> l (b s) k")                           # (L, B·S, K)
        self.router.configure(replay=routing, freeze=freeze_router)
        with self.router.recording() as records:
            logprobs, entropy = self.model(ids, valid, tokens, temperature=temperature, banned_tokens=self.banned)
        if len(records) != len(self.router.gates):
            raise RuntimeError(f"recorded {len(records)} gate calls in one forward of {len(self.router.gates)} MoE layers")
        if not self.is_moe:
            return Scores(torch.where(mask, logprobs, 0.0), entropy, logprobs.new_zeros((0, *tokens.shape, 0)),
                          tokens.new_zeros((0, *tokens.shape, 0)), ids.new_zeros((0, *ids.shape, 0)),
                          logprobs.new_zeros(()))
        response_valid = rearrange(mask.bool(), "b n -> b n 1")
        router_logits = torch.stack([
            torch.where(response_valid, rearrange(logits.float(), "(b s) e -> b s e", b=batch)[:, prompt_len:], 0.0)
            for logits, _ in records])                                                     # (L, B, N, E)
        used = torch.stack([rearrange(experts, "(b s) k -> b s k", b=batch) for _, experts in records])  # (L, B, S, K)
        gate = self.router.gates[0]
        aux_loss = self.balance_loss(tuple(logits for logits, _ in records), gate.weight.shape[0], gate.top_k, valid)
        return Scores(logprobs=torch.where(mask, logprobs, 0.0), entropy=entropy, router_logits=router_logits,
                      topk_idx=used[:, :, prompt_len:], routing=used, aux_loss=aux_loss)


# ---------------------------------------------------------------------------------------------------
# Loading, and tiny offline HF checkpoints for tests and benchmarks
# ---------------------------------------------------------------------------------------------------

def check_rollout_engine(rollout_engine: str, kind: str) -> None:
    """--rollout-engine: `hf` samples with the model's own generate; `vllm` is the slot for a GPU engine."""
    if rollout_engine not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout_engine {rollout_engine!r}; choose one of {list(ROLLOUT_ENGINES)}")
    if rollout_engine == "hf":
        return
    if kind == "toy":
        raise ValueError("--rollout-engine vllm: the toy model samples with its own generate; use --rollout-engine hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("--rollout-engine vllm needs the vllm package (GPU only: pip install vllm); "
                         "--rollout-engine hf samples with the model's own generate") from None
    raise ValueError("--rollout-engine vllm: minirspo samples with HF generate only; a vLLM engine would need the "
                     "trainer's weights pushed to it every RL step, which is not implemented")


def load_policy(spec: str, *, rollout_engine: str = "hf", logprob_chunk_tokens: int = 4096) -> Policy:
    """`toy:PATH` (a toy_moe checkpoint, see toy_moe.pretrain) or `hf:PATH` (a local Hugging Face model
    directory: config, weights, tokenizer) -> a Policy. Clear errors for a bad spec or a missing path."""
    kind, _, path = spec.partition(":")
    if kind not in ("toy", "hf") or not path:
        raise ValueError(f"model spec must be 'toy:PATH' or 'hf:PATH', got {spec!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    check_rollout_engine(rollout_engine, kind)
    if kind == "hf":
        return HFPolicy.from_pretrained(path, logprob_chunk_tokens=logprob_chunk_tokens)
    from toy_moe.pretrain import load_toy_checkpoint
    model, tokenizer = load_toy_checkpoint(path)
    return ToyPolicy(model, tokenizer)


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
