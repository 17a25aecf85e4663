"""`HFPolicy`: a Hugging Face causal LM, loaded from a local directory, behind the policy interface.

Notation: B sequences, P prompt tokens (left-padded), N response tokens (right-padded), S = P + N,
V vocabulary, D model dim, L MoE layers, E experts, K experts per token, C tokens per log-prob chunk,
U distinct prompts, H key/value heads, d head dim.

MoE or dense. On the MoE families (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral; transformers >= 5,
whose routers are `*TopKRouter` modules returning router logits, gates and experts), `RouterHooks` sits
on every gate: it records what the gate chose and, for routing replay or router freezing, recomputes the
gate as the family does (softmax over all E in float32, top-K, the K gates renormalised when the family
does: always for Mixtral, per `norm_topk_prob` for the others) from forced experts or a detached weight.
Log-probs are computed C tokens at a time (`ChunkedLogprobLM`), never as full float32 (B, S, V) logits.
Scoring runs each distinct prompt once and the G responses to it from its KV cache (`prompt_groups`): the same
function with U·P + B·N tokens instead of B·S (a third fewer at 16-token responses to 9-token prompts).
Sampling is a decode loop of our own over the model's decoder and head (`ChunkedLogprobLM.sample`), not HF
`generate`: greedy, it picks the same tokens (tests/test_hf.py); it samples from the `generator` it is given
rather than the global RNG; it takes 0.82-0.84x the time (benchmarks/README.md, decode_bench).
transformers is imported only where a model is built, so the toy path runs without it.
"""
import contextlib
import functools
import inspect
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import checkpoint

from minirspo.loss import router_logprobs_at
from minirspo.policy.base import Policy, Samples, Scores, left_pad, next_token_entropy
from toy_moe.generate import pick_tokens, token_logprobs

# A hub lookup for a missing local file hangs ~25 s before failing; every model here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral")
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # config keys that only an MoE sets


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
                banned_tokens: tuple[int, ...], prompt_groups: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """input_ids (B, S) ending in targets (B, N), attention_mask (B, S) bool -> log-probs (B, N) float32
        of each target under the logits just before it, and the entropies there (B, N), detached.

        `prompt_groups` = (one row of each distinct prompt (U,), each row's prompt among them (B,)): the G
        responses to a prompt share it, so the prompt runs once per group (U rows) and its keys and values,
        gathered to the B rows, are the cache the responses attend to; gradients flow back through the gather.
        The same function as one pass over (B, S), with U·P + B·N tokens instead of B·S."""
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)               # (B, S) as HF generate
        decoder, n_targets = self.lm.get_decoder(), targets.shape[1]
        if prompt_groups is None:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.long(),
                             position_ids=positions, use_cache=False).last_hidden_state     # (B, S, D)
            predicting = rearrange(hidden[:, -n_targets - 1:-1], "b n d -> (b n) d")      # (B·N, D)
        else:
            from transformers import DynamicCache
            first, group = prompt_groups
            prompt_len = input_ids.shape[1] - n_targets
            cache = DynamicCache()
            prompt_hidden = decoder(input_ids=input_ids[first, :prompt_len],
                                    attention_mask=attention_mask[first, :prompt_len].long(),
                                    position_ids=positions[first, :prompt_len], use_cache=True,
                                    **{_cache_argument(decoder): cache}).last_hidden_state  # (U, P, D)
            cache.batch_select_indices(group)                                              # (B, H, P, d) per layer
            response_hidden = decoder(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask.long(),
                                      position_ids=positions[:, prompt_len:], use_cache=True,
                                      **{_cache_argument(decoder): cache}).last_hidden_state  # (B, N, D)
            predicting = rearrange(torch.cat([prompt_hidden[group, -1:], response_hidden[:, :-1]], dim=1),
                                   "b n d -> (b n) d")                                     # (B·N, D)
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
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, temperature: float,
               top_p: float, stop_ids: tuple[int, ...], banned_tokens: tuple[int, ...], pad_id: int,
               generator: torch.Generator | None, record: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """A KV-cache decode after left-padded prompts (B, P) -> the sampled tokens (B, N), N <= max_new_tokens,
        `pad_id` after each row's first stop token, and their mask (B, N), True through that stop token; it ends
        when every row has stopped.

        The loop HF `generate` runs for plain sampling, without its per-step machinery: each step is the
        decoder on one token per row, the head on its last hidden state, and the toy sampler's `pick_tokens`
        (the same temperature, top-p and banned tokens as `token_logprobs` scores). The prompt of rows that share
        it is prefilled once (`prompt_groups`) and its cache gathered to the B rows; the cache appends in place
        (`GrowingCache`). benchmarks/README.md (decode_bench) measures it against `generate`.

        `record`: also the log-prob of each sampled token (B, N) under `token_logprobs` (the footing `forward`
        scores on), and one more decoder step after the last token, so that every response token passes the
        router gates (which the caller records) once; None in third place otherwise."""
        from minirspo.policy.kv_cache import GrowingCache
        if not bool(prompt_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: every row's last prompt position a real token")
        decoder, head = self.lm.get_decoder(), self.lm.get_output_embeddings()
        batch, prompt_len = prompt_ids.shape
        attention = F.pad(prompt_mask.long(), (0, max_new_tokens), value=1)               # (B, P + max_new_tokens)
        positions = (attention.cumsum(dim=1) - 1).clamp_min(0)                             # (B, P + max_new_tokens)
        cache = GrowingCache()
        uses_cache = {"use_cache": True, _cache_argument(decoder): cache}
        groups = prompt_groups(prompt_ids, prompt_mask)
        first = groups[0] if groups is not None else slice(None)
        hidden = decoder(input_ids=prompt_ids[first], attention_mask=attention[first, :prompt_len],
                         position_ids=positions[first, :prompt_len], **uses_cache).last_hidden_state[:, -1]  # (U, D)
        if groups is not None:
            cache.batch_select_indices(groups[1])                                          # (B, H, P, d) per layer
            hidden = hidden[groups[1]]                                                     # (B, D)
        stop = torch.tensor(stop_ids, device=prompt_ids.device)
        alive = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)             # (B,)
        score_temperature = temperature if temperature > 0 else 1.0  # greedy picks are scored at temperature 1
        tokens, masks, logprobs = [], [], []
        for step in range(max_new_tokens):
            logits = head(hidden)                                                          # (B, V)
            token = torch.where(alive, pick_tokens(logits, temperature, top_p, banned_tokens, generator), pad_id)  # (B,)
            tokens.append(token)
            masks.append(alive)
            if record:
                logprob = token_logprobs(logits, token, temperature=score_temperature, banned_tokens=banned_tokens)
                logprobs.append(torch.where(alive, logprob, 0.0))                          # (B,)
            alive = alive & ~torch.isin(token, stop)
            finished = step == max_new_tokens - 1 or not bool(alive.any())
            if finished and not record:
                break
            end = prompt_len + step + 1  # the prompt and the tokens so far, the one just sampled included
            hidden = decoder(input_ids=token[:, None], attention_mask=attention[:, :end],
                             position_ids=positions[:, end - 1:end], **uses_cache).last_hidden_state[:, -1]  # (B, D)
            if finished:
                break
        recorded = rearrange(logprobs, "n b -> b n") if record else None                   # (B, N)
        return rearrange(tokens, "n b -> b n"), rearrange(masks, "n b -> b n"), recorded   # (B, N) each


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """Rows with the same prompt: (the first row of each distinct prompt (U,), each row's prompt (B,)), or None
    when every prompt differs."""
    key = torch.where(prompt_mask.bool(), prompt_ids, -1)                                 # (B, P)
    distinct, group = torch.unique(key, dim=0, return_inverse=True)                        # (U, P), (B,)
    if len(distinct) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)                                       # (B,)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce(0, group, rows, "amin")  # (U,)
    return first, group


def _cache_argument(decoder: nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` from the transformers release that renamed it,
    `past_key_values` before (the old name is deprecated and goes away in 5.40)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


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
    if gates or any(getattr(lm.config, name, 0) for name in MOE_CONFIG_KEYS):
        raise ValueError(f"model_type {family!r} is a Mixture-of-Experts family minirspo cannot hook; "
                         f"supported: {', '.join(HF_MOE_FAMILIES)}")
    return []


class HFPolicy(Policy):
    """A Hugging Face causal LM behind the policy interface: an MoE of HF_MOE_FAMILIES, or a dense model
    (then `is_moe` is False and RSPO refuses it). Special tokens other than the stop tokens, and ids beyond
    the tokenizer, are never sampled (the CPU prototype's pitfall: a sampled PAD/BOS breaks scoring).

    The checkpoint's generation defaults (top_k, repetition_penalty, ...) are not used (the decode loop is our
    own): RL must sample from the distribution it scores, the model's own at --temperature / --top-p. The HF
    router aux loss is not added by the model (no `labels`, `output_router_logits` off); `Scores.aux_loss`
    carries it unweighted for the loop's --aux-loss-coef."""

    def __init__(self, lm: nn.Module, tokenizer, *, logprob_chunk_tokens: int = 4096):
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
    def router_weights(self) -> list[nn.Parameter]:
        return [gate.weight for gate in self.router.gates]

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
        return left_pad(encoded, self.pad_id, next(self.model.parameters()).device)

    def decode_responses(self, tokens: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode(row[valid].tolist(), skip_special_tokens=True)
                for row, valid in zip(tokens.cpu(), mask.cpu())]

    @property
    def matmul_weights(self) -> list[tuple[str, int]]:
        # every nn.Linear of the decoder layers, (out, in), and the fused expert stacks of transformers 5, (E, out, in)
        # (`F.linear(x, gate_up_proj[e])`); the gates are `*TopKRouter` modules, not nn.Linear, so they stay out
        layers = self.model.lm.get_decoder().layers
        prefix = next(name for name, module in self.model.named_modules() if module is layers)
        return [(f"{prefix}.{name}", -1) for name, param in layers.named_parameters()
                if isinstance(layers.get_submodule(name.rpartition(".")[0]), nn.Linear) and name.endswith(".weight")
                or name.endswith(("experts.gate_up_proj", "experts.down_proj"))]

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None, record="none") -> Samples:
        """A KV-cache decode (`ChunkedLogprobLM.sample`); temperature 0 = greedy. With `record`, the gates'
        choices during the decode are kept: the prefill's for the prompt, then one decoder step per response
        token (the one that feeds it in), which is where `score` reads a token's routing too."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        self.router.configure(replay=None, freeze=False)  # a replay left by the last `score` must not apply here
        with self.router.recording() as records:
            tokens, mask, logprobs = self.model.sample(  # (B, N) each
                prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                stop_ids=self.stop_ids, banned_tokens=self.banned, pad_id=self.pad_id, generator=generator,
                record=record != "none")
        if record == "none":
            return Samples(tokens, mask)
        if not self.is_moe:
            empty = tokens.new_zeros((0, *tokens.shape, 0))
            return Samples(tokens, mask, logprobs, empty, empty.float(),
                           prompt_ids.new_zeros((0, len(tokens), prompt_ids.shape[1] + tokens.shape[1], 0))
                           if record == "routing" else None)
        n_layers = len(self.router.gates)
        prefill, steps = records[:n_layers], records[n_layers:]  # then one record per layer per decode step
        step_logits = rearrange(torch.stack([logits for logits, _ in steps]), "(n l) b e -> l b n e", l=n_layers)  # (L, B, N, E)
        topk_idx = rearrange(torch.stack([experts for _, experts in steps]), "(n l) b k -> l b n k", l=n_layers)  # (L, B, N, K)
        topk_logprobs = router_logprobs_at(step_logits, topk_idx)                          # (L, B, N, K)
        routing = None
        if record == "routing":
            prompt_experts = torch.stack([experts for _, experts in prefill])              # (L, U·P, K)
            prompt_experts = rearrange(prompt_experts, "l (u p) k -> l u p k", p=prompt_ids.shape[1])  # (L, U, P, K)
            groups = prompt_groups(prompt_ids, prompt_mask)
            if groups is not None:
                prompt_experts = prompt_experts[:, groups[1]]                              # (L, B, P, K)
            routing = torch.cat([prompt_experts, topk_idx], dim=2)                         # (L, B, S, K)
        valid = rearrange(mask, "b n -> 1 b n 1")
        return Samples(tokens, mask, logprobs, topk_idx, torch.where(valid, topk_logprobs, 0.0), routing)

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
        # A prompt's G responses share one prompt pass, except where the routing is forced (it is given per row)
        # or decoder layers recompute in backward (a recomputed layer would append to the KV cache again).
        groups = None
        if routing is None and not isinstance(self.decoder_layers[0], CheckpointWrapper):
            groups = prompt_groups(prompt_ids, prompt_mask)
        self.router.configure(replay=routing, freeze=freeze_router)
        with self.router.recording() as records:
            logprobs, entropy = self.model(ids, valid, tokens, temperature=temperature, banned_tokens=self.banned,
                                           prompt_groups=groups)
        n_layers, passes = len(self.router.gates), 1 if groups is None else 2
        if len(records) != n_layers * passes:
            raise RuntimeError(f"recorded {len(records)} gate calls in {passes} forward passes of {n_layers} MoE layers")
        if not self.is_moe:
            return Scores(torch.where(mask, logprobs, 0.0), entropy, logprobs.new_zeros((0, *tokens.shape, 0)),
                          tokens.new_zeros((0, *tokens.shape, 0)), ids.new_zeros((0, *ids.shape, 0)),
                          logprobs.new_zeros(()))
        if groups is None:  # per layer: router logits (B, S, E) and experts (B, S, K)
            layers = [(rearrange(logits, "(b s) e -> b s e", b=batch), rearrange(experts, "(b s) k -> b s k", b=batch))
                      for logits, experts in records]
        else:  # the prompt pass's (U·P) rows gathered to the B rows, then the response pass's (B·N)
            first, group = groups
            layers = [tuple(torch.cat([rearrange(in_prompt, "(u p) x -> u p x", u=len(first))[group],
                                       rearrange(in_response, "(b n) x -> b n x", b=batch)], dim=1)   # (B, S, ·)
                            for in_prompt, in_response in zip(prompt_record, response_record))
                      for prompt_record, response_record in zip(records[:n_layers], records[n_layers:])]
        response_valid = rearrange(mask.bool(), "b n -> b n 1")
        router_logits = torch.stack([torch.where(response_valid, logits.float()[:, prompt_len:], 0.0)
                                     for logits, _ in layers])                             # (L, B, N, E)
        used = torch.stack([experts for _, experts in layers])                             # (L, B, S, K)
        gate = self.router.gates[0]
        aux_loss = self.balance_loss(tuple(rearrange(logits, "b s e -> (b s) e") for logits, _ in layers),
                                     gate.weight.shape[0], gate.top_k, valid)
        return Scores(logprobs=torch.where(mask, logprobs, 0.0), entropy=entropy, router_logits=router_logits,
                      topk_idx=used[:, :, prompt_len:], routing=used, aux_loss=aux_loss)
