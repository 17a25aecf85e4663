"""toy_moe.model and toy_moe.generate: dispatch against a naive loop, dense equivalence, exact KV-cache decoding,
routing replay, router freezing, padding-invariant router statistics, sampling rules.

Float32 tolerances: two computations of the same float32 quantity that differ only in summation order (a
batched matmul against a per-token loop, SDPA over a cache against SDPA over the full sequence) agree to a
few ulps of the largest value compared, whatever the CPU: `assert_close_in_ulps` (tests/tolerance.py says
why) allows MODEL_ULPS = 64 of them, while a wrong mask, position or expert moves values by 1e-2 of their
scale or more.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toy_moe.generate import generate, pick_tokens, token_logprobs
from toy_moe.model import DenseMLP, KVCache, MoELayer, ToyMoE, ToyMoEConfig
from tolerance import assert_close_in_ulps, largest  # tests/tolerance.py


def tiny_config(**overrides) -> ToyMoEConfig:
    fields = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=24,
                  max_seq_len=64)
    return ToyMoEConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> ToyMoE:
    torch.manual_seed(seed)
    return ToyMoE(tiny_config(**overrides)).eval()


def pad_mask(length: int, left_pads: list[int], right_pads: list[int]) -> torch.Tensor:
    """(B, T) True between row b's left_pads[b] leading and right_pads[b] trailing pads."""
    positions = torch.arange(length)
    left, right = torch.tensor(left_pads)[:, None], torch.tensor(right_pads)[:, None]
    return (positions >= left) & (positions < length - right)  # (B, T)


def reference_moe(layer: MoELayer, x: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    """Per token, per chosen expert: softmax over all experts, K largest (or forced), renormalised gates,
    silu(g)·u·W_down. Written from the definition, not from MoELayer's dispatch."""
    hidden = layer.down.shape[1]
    outputs = []
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n].float() @ layer.router.weight.float().T, dim=0)
        by_prob = sorted(range(layer.n_experts), key=lambda e: -probs[e].item())
        chosen = forced[n].tolist() if forced is not None else by_prob[: layer.top_k]
        total = sum(probs[e] for e in chosen)
        y = torch.zeros_like(x[n])
        for e in chosen:
            h = x[n] @ layer.gate_up[e]
            gate, up = h[:hidden], h[hidden:]
            y = y + (probs[e] / total) * ((gate * torch.sigmoid(gate) * up) @ layer.down[e])
        outputs.append(y)
    return torch.stack(outputs)


@settings(deadline=None, max_examples=25)
@given(
    n_tokens=st.integers(1, 12),
    n_experts=st.integers(1, 5),
    top_k_share=st.floats(0.0, 1.0),
    force=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batched_dispatch_matches_per_token_loop_outputs_and_gradients(n_tokens, n_experts, top_k_share, force, seed):
    top_k = 1 + round(top_k_share * (n_experts - 1))
    torch.manual_seed(seed)
    layer = ToyMoE(tiny_config(n_experts=n_experts, top_k=top_k)).blocks[0].mlp
    x = torch.randn(n_tokens, 16, requires_grad=True)
    forced = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)]) if force else None
    weights = torch.randn(n_tokens, 16)

    y, _, topk_idx = layer(x[None], None if forced is None else forced[None], False)
    (y[0] * weights).sum().backward()
    params = [x, layer.router.weight, layer.gate_up, layer.down]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    y_ref = reference_moe(layer, x, forced)
    (y_ref * weights).sum().backward()

    assert_close_in_ulps(y[0], y_ref)
    # gradients in ulps of the largest one: the router's may cancel to ~0 (top-1 gates are exactly 1)
    gradient_scale = largest(*(p.grad for p in params))
    for p, grad in zip(params, grads):
        assert_close_in_ulps(grad, p.grad, scale=gradient_scale)
    if forced is not None:
        assert torch.equal(topk_idx[0], forced)


def test_one_expert_top1_is_exactly_a_dense_swiglu():
    torch.manual_seed(0)
    layer = MoELayer(tiny_config(n_experts=1, top_k=1))
    torch.nn.init.normal_(layer.router.weight)
    torch.nn.init.normal_(layer.gate_up, std=0.3)
    torch.nn.init.normal_(layer.down, std=0.3)
    dense = DenseMLP(16, 24)
    with torch.no_grad():
        dense.gate_up.copy_(layer.gate_up[0])
        dense.down.copy_(layer.down[0])
    x = torch.randn(3, 7, 16)
    y, _, topk_idx = layer(x, None, False)
    assert torch.equal(y, dense(x))
    assert torch.equal(topk_idx, torch.zeros(3, 7, 1, dtype=torch.long))


@settings(deadline=None, max_examples=10)
@given(
    left_pads=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    right_pads=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    prefill=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_kv_cache_one_token_per_step_matches_full_forward(left_pads, right_pads, prefill, seed):
    model = tiny_model(seed)
    generator = torch.Generator().manual_seed(seed)
    length = 12
    ids = torch.randint(0, 32, (3, length), generator=generator)
    mask = pad_mask(length, left_pads, right_pads)
    with torch.no_grad():
        full = model(ids, mask)
        cache = KVCache(model.config, 3, length)
        chunks = [model(ids[:, :prefill], mask[:, :prefill], kv_cache=cache)]
        chunks += [model(ids[:, t : t + 1], mask[:, t : t + 1], kv_cache=cache) for t in range(prefill, length)]
    # Every position is compared, pads included: a pad query sees the same keys in both paths.
    assert_close_in_ulps(torch.cat([c.logits for c in chunks], dim=1), full.logits)
    router_logits = torch.cat([c.router_logits for c in chunks], dim=2)
    assert_close_in_ulps(router_logits, full.router_logits)
    assert torch.equal(torch.cat([c.topk_idx for c in chunks], dim=2), full.topk_idx)


def rollout_against_full_forward(model, prompt_ids, prompt_mask, rollout, temperature, banned):
    """Score the rollout with one full forward, as the RL loop does, and compare every recorded field."""
    prompt_len = prompt_ids.shape[1]
    with torch.no_grad():
        full = model(torch.cat([prompt_ids, rollout.tokens], dim=1), torch.cat([prompt_mask, rollout.mask], dim=1))
    n = rollout.tokens.shape[1]
    predicting = full.logits[:, prompt_len - 1 : -1]  # the logits just before each generated token
    scored = token_logprobs(predicting, rollout.tokens, temperature=temperature, banned_tokens=banned)
    assert_close_in_ulps(rollout.logprobs, torch.where(rollout.mask, scored, 0.0))
    valid = rollout.mask[None, :, :, None]
    full_experts = full.topk_idx[:, :, prompt_len:]
    assert full_experts.shape[2] == n
    assert torch.equal(torch.where(valid, rollout.topk_idx, 0), torch.where(valid, full_experts, 0))
    router_logprobs = full.router_logits[:, :, prompt_len:].log_softmax(-1).gather(-1, rollout.topk_idx)
    assert_close_in_ulps(rollout.topk_logprobs, torch.where(valid, router_logprobs, 0.0))
    return full


@settings(deadline=None, max_examples=8)
@given(
    left_pads=st.lists(st.integers(0, 5), min_size=4, max_size=4),
    top_p=st.sampled_from([1.0, 0.8]),
    temperature=st.sampled_from([1.0, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_generate_with_cache_matches_full_forward_on_left_padded_prompts(left_pads, top_p, temperature, seed):
    model = tiny_model(seed)
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 32, (4, 6), generator=generator)
    prompt_mask = pad_mask(6, left_pads, [0] * 4)
    prompt_ids = torch.where(prompt_mask, prompt_ids, 0)
    banned, stops = (0, 1), (2, 3, 4)
    rollout = generate(
        model, prompt_ids, prompt_mask, max_new_tokens=10, temperature=temperature, top_p=top_p,
        stop_tokens=stops, banned_tokens=banned, pad_id=0, generator=generator,
    )
    rollout_against_full_forward(model, prompt_ids, prompt_mask, rollout, temperature, banned)
    assert not torch.isin(rollout.tokens[rollout.mask], torch.tensor(banned)).any()


def test_greedy_generation_takes_the_argmax_and_scores_at_temperature_one():
    model = tiny_model(1)
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    prompt_mask = prompt_ids != 0
    rollout = generate(model, prompt_ids, prompt_mask, max_new_tokens=8, temperature=0.0, banned_tokens=(0,))
    full = rollout_against_full_forward(model, prompt_ids, prompt_mask, rollout, 1.0, (0,))
    masked_logits = full.logits[:, 3:-1].index_fill(-1, torch.tensor([0]), float("-inf"))
    assert torch.equal(rollout.tokens, masked_logits.argmax(-1))


def test_cache_and_no_cache_generation_agree_and_seeded_sampling_repeats():
    model = tiny_model(2)
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    prompt_mask = prompt_ids != 0
    runs = [
        generate(model, prompt_ids, prompt_mask, max_new_tokens=12, banned_tokens=(0,),
                 generator=torch.Generator().manual_seed(7), use_cache=use_cache)
        for use_cache in (True, True, False)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].tokens, runs[2].tokens)
    assert_close_in_ulps(runs[0].logprobs, runs[2].logprobs)
    assert_close_in_ulps(runs[0].topk_logprobs, runs[2].topk_logprobs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_without_recording_draws_the_same_tokens_with_one_forward_fewer(use_cache):
    model = tiny_model(2)
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    prompt_mask = prompt_ids != 0
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    rollouts = {}
    for record in (True, False):
        forwards.clear()
        rollouts[record] = generate(model, prompt_ids, prompt_mask, max_new_tokens=6, stop_tokens=(2,),
                                    banned_tokens=(0,), generator=torch.Generator().manual_seed(7),
                                    use_cache=use_cache, record=record)
        rollouts[record, "forwards"] = len(forwards)
    hook.remove()
    recorded, bare = rollouts[True], rollouts[False]
    assert torch.equal(recorded.tokens, bare.tokens) and torch.equal(recorded.mask, bare.mask)
    assert bare.logprobs is None and bare.topk_idx is None and bare.topk_logprobs is None
    steps = recorded.tokens.shape[1]
    # the prompt's forward, then one per sampled token; unrecorded, the last token is never fed back
    assert (rollouts[True, "forwards"], rollouts[False, "forwards"]) == (1 + steps, steps)


def test_rows_stop_at_their_stop_token_and_generation_ends_when_all_stopped():
    model = tiny_model(3)
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    stops = tuple(range(2, 30))  # nearly every token stops, so rows end within a few steps
    rollout = generate(model, prompt_ids, prompt_ids != 0, max_new_tokens=40, stop_tokens=stops, banned_tokens=(0,),
                       pad_id=0, generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape[1] < 40
    for row in range(2):
        is_stop = torch.isin(rollout.tokens[row], torch.tensor(stops)) & rollout.mask[row]
        first_stop = int(is_stop.nonzero()[0])
        assert rollout.mask[row, : first_stop + 1].all() and not rollout.mask[row, first_stop + 1 :].any()
        assert (rollout.tokens[row, first_stop + 1 :] == 0).all()
        assert (rollout.logprobs[row, first_stop + 1 :] == 0).all()
    assert rollout.mask[:, -1].any(), "the last step is the one where the last row stopped"


def test_banned_tokens_are_never_sampled_and_tiny_top_p_is_greedy():
    model = tiny_model(4)
    prompt_ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    allowed = (29, 30, 31)
    banned = tuple(t for t in range(32) if t not in allowed)
    sampled = generate(model, prompt_ids, prompt_ids != 0, max_new_tokens=20, banned_tokens=banned, temperature=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isin(sampled.tokens, torch.tensor(allowed)).all()
    assert torch.isfinite(sampled.logprobs).all()
    nucleus = generate(model, prompt_ids, prompt_ids != 0, max_new_tokens=20, top_p=1e-6,
                       generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt_ids, prompt_ids != 0, max_new_tokens=20, temperature=0.0)
    assert torch.equal(nucleus.tokens, greedy.tokens)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (2.0, 0.5)])
def test_sampled_tokens_follow_the_temperature_scaled_banned_masked_nucleus(temperature, top_p):
    # pick_tokens is the sampler of both decode loops (toy and HF). Reference, in float64 and one token at a
    # time: softmax(logits / T) with banned tokens at 0, the most probable tokens kept until their mass reaches
    # top_p, renormalised.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.5])
    banned = (4,)
    weights = [0.0 if token in banned else math.exp(value / temperature) for token, value in enumerate(logits.tolist())]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    want = torch.tensor([p / mass if t in kept else 0.0 for t, p in enumerate(probs)], dtype=torch.float64)
    draws = 40_000
    tokens = pick_tokens(logits.expand(draws, -1), temperature, top_p, banned, torch.Generator().manual_seed(0))
    got = torch.bincount(tokens, minlength=len(probs)).double() / draws
    # each frequency is a binomial mean: within 5 standard deviations of its probability (a chance of ~6e-7
    # per token), and exactly 0 where the probability is 0
    assert torch.all((got - want).abs() <= 5 * (want * (1 - want) / draws).sqrt()), (got, want)


def test_token_logprobs_is_the_temperature_scaled_banned_masked_log_softmax():
    logits = torch.randn(2, 5, 9)
    tokens = torch.randint(0, 9, (2, 5))
    log_probs = torch.log_softmax(logits.index_fill(-1, torch.tensor([3]), float("-inf")) / 0.5, -1)
    expected = log_probs.gather(-1, tokens[..., None])[..., 0]
    # the same log-softmax of the same scaled logits, maybe fused differently: a few ulps of |log p| <= ~10
    assert_close_in_ulps(token_logprobs(logits, tokens, temperature=0.5, banned_tokens=(3,)), expected)
    assert token_logprobs(logits, torch.full((2, 5), 3), banned_tokens=(3,)).eq(float("-inf")).all()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=0.0)


def test_routing_replay_of_own_choices_is_exact_and_other_choices_change_the_output():
    model = tiny_model(5)
    ids = torch.randint(0, 32, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, -3:] = False
    free = model(ids, mask)
    replayed = model(ids, mask, routing=free.topk_idx)
    assert torch.equal(replayed.logits, free.logits)
    assert torch.equal(replayed.router_logits, free.router_logits)
    other = (free.topk_idx + 1) % model.config.n_experts
    shifted = model(ids, mask, routing=other)
    assert torch.equal(shifted.topk_idx, other)
    assert (shifted.logits - free.logits).abs().max() > 1e-3  # other experts: O(0.1), far above float32 noise


def test_frozen_router_gets_no_gradient_but_everything_upstream_does():
    model = tiny_model(6)
    ids = torch.randint(0, 32, (2, 8))
    out = model(ids, freeze_router=True)
    (out.logits.square().mean() + model.router_loss(out)).backward()
    routers = [block.mlp.router.weight for block in model.blocks]
    assert all(w.grad is None or not w.grad.any() for w in routers)
    others = [p for name, p in model.named_parameters() if "router" not in name]
    assert all(p.grad is not None and p.grad.any() for p in others)

    model.zero_grad(set_to_none=True)
    model(ids, freeze_router=True).aux_loss.backward()  # reaches the embeddings only through the router's input
    assert model.embed.weight.grad is not None and model.embed.weight.grad.any()
    model.zero_grad(set_to_none=True)
    model(ids).aux_loss.backward()
    assert all(w.grad is not None and w.grad.any() for w in routers)


def naive_router_statistics(router_logits, topk_idx, mask, n_experts, top_k):
    """Loops over layers and real tokens: counts, Switch aux E·Σ f_e·P_e (f over N·K pairs), z = mean lse²."""
    aux, z, counts = [], [], torch.zeros(router_logits.shape[0], n_experts)
    real = mask.nonzero().tolist()
    for layer in range(router_logits.shape[0]):
        probs_sum = torch.zeros(n_experts)
        lse_sq = 0.0
        for b, t in real:
            probs_sum += torch.softmax(router_logits[layer, b, t], 0)
            lse_sq += torch.logsumexp(router_logits[layer, b, t], 0) ** 2
            for e in topk_idx[layer, b, t].tolist():
                counts[layer, e] += 1
        aux.append(n_experts * (counts[layer] / (len(real) * top_k) * probs_sum / len(real)).sum())
        z.append(lse_sq / len(real))
    return torch.stack(aux).mean(), torch.stack(z).mean(), counts


@settings(deadline=None, max_examples=15)
@given(
    batch=st.integers(1, 3), length=st.integers(1, 6), extra_left=st.integers(0, 3), extra_right=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_padding_changes_neither_router_statistics_nor_real_outputs(batch, length, extra_left, extra_right, seed):
    model = tiny_model(seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (batch, length), generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    mask[:, 0] = True  # inner pads are allowed too; keep one real token so the statistics are defined
    base = model(ids, mask)
    aux, z, counts = naive_router_statistics(base.router_logits, base.topk_idx, mask, 4, 2)
    # the naive loops sum the same <= 18 tokens' terms in another order: a few ulps of the result
    assert_close_in_ulps(base.aux_loss, aux)
    assert_close_in_ulps(base.z_loss, z)
    assert torch.equal(base.expert_counts, counts)

    noise = torch.randint(0, 32, (batch, extra_left + length + extra_right), generator=generator)
    padded_ids = noise.clone()
    padded_ids[:, extra_left : extra_left + length] = ids
    padded_mask = torch.zeros_like(padded_ids, dtype=torch.bool)
    padded_mask[:, extra_left : extra_left + length] = mask
    padded = model(padded_ids, padded_mask)
    assert torch.equal(padded.expert_counts, base.expert_counts)
    # more (zero) terms in the sums, so another summation order: a few ulps of the result
    assert_close_in_ulps(padded.aux_loss, base.aux_loss)
    assert_close_in_ulps(padded.z_loss, base.z_loss)
    inner = padded.logits[:, extra_left : extra_left + length]
    assert_close_in_ulps(inner[mask], base.logits[mask])
    assert torch.isfinite(padded.logits).all()


def test_left_padded_row_starts_at_position_zero():
    model = tiny_model(7)
    ids = torch.randint(0, 32, (1, 6))
    alone = model(ids)
    padded = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.tensor([[False] * 3 + [True] * 6]))
    assert_close_in_ulps(padded.logits[:, 3:], alone.logits)
    assert torch.equal(model(ids, torch.ones(1, 6)).logits, alone.logits)  # all-real mask == no mask, same kernel


def test_bad_routing_and_bad_inputs_raise_clear_errors():
    model = tiny_model(8)
    ids = torch.randint(0, 32, (2, 5))
    good = model(ids).topk_idx
    bad_routings = {
        "shape": good[:, :, :4],
        "int64": good.int(),
        "outside": torch.full_like(good, 4),
        "twice": good[..., :1].expand_as(good).contiguous(),
    }
    for message, routing in bad_routings.items():
        with pytest.raises(ValueError, match=message):
            model(ids, routing=routing)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, torch.tensor([[True] * 4 + [False]] * 2), max_new_tokens=3)
    with pytest.raises(ValueError, match="overlap"):
        generate(model, ids, torch.ones(2, 5), max_new_tokens=3, stop_tokens=(1,), banned_tokens=(1,))
    with pytest.raises(ValueError, match="top_k"):
        tiny_config(top_k=5)
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_config(moe_layers=(2,))


def test_dense_layers_follow_moe_layers_and_report_only_moe_routing():
    model = tiny_model(9, n_layers=3, moe_layers=(1,))
    out = model(torch.randint(0, 32, (2, 5)))
    assert out.router_logits.shape == (1, 2, 5, 4) and out.topk_idx.shape == (1, 2, 5, 2)
    assert [block.is_moe for block in model.blocks] == [False, True, False]
    assert out.expert_counts.sum() == 2 * 5 * 2


def test_no_moe_layer_is_the_dense_model_of_the_same_active_compute():
    # moe_layers=() (the dense control): every layer a SwiGLU of hidden F·K; it must compute exactly what a
    # one-expert top-1 MoE of hidden F·K computes with the same weights (whose gate is exactly 1), and report
    # no routing and zero router losses.
    dense = tiny_model(3, moe_layers=())
    one_expert = tiny_model(4, n_experts=1, top_k=1, expert_hidden=2 * 24)
    with torch.no_grad():
        for name, param in one_expert.named_parameters():
            if "router" not in name:
                param.copy_(dense.get_parameter(name).reshape(param.shape))
    ids, mask = torch.randint(0, 32, (3, 6)), torch.tensor([[0] * 2 + [1] * 4] + [[1] * 6] * 2).bool()
    out = dense(ids, mask)
    assert torch.equal(out.logits, one_expert(ids, mask).logits)
    assert out.router_logits.shape == (0, 3, 6, 4) and out.topk_idx.shape == (0, 3, 6, 2)
    assert out.aux_loss == 0 and out.z_loss == 0 and out.expert_counts.shape == (0, 4)
    assert dense.n_moe_layers == 0 and not any("router" in name for name, _ in dense.named_parameters())
    rollout = generate(dense, ids, mask, max_new_tokens=3, temperature=1.0, stop_tokens=(1,), pad_id=0,
                       generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape == (3, 3) and rollout.topk_idx.shape == (0, 3, 3, 2)


def test_bf16_autocast_runs_with_a_float32_router():
    torch.manual_seed(0)
    model = ToyMoE(ToyMoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 500, (2, 7)))
    out.logits.float().sum().backward()
    assert out.router_logits.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_rejected_cache_step_leaves_the_cache_as_it_was():
    model = tiny_model(10, max_seq_len=8)
    cache = KVCache(model.config, 1, 12)
    with torch.no_grad():
        model(torch.randint(0, 32, (1, 8)), kv_cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.randint(0, 32, (1, 1)), kv_cache=cache)
        with pytest.raises(ValueError, match="rows"):
            model(torch.randint(0, 32, (2, 1)), kv_cache=cache)
        assert cache.length == 8 and int(cache.real_tokens) == 8
        model(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), kv_cache=cache)  # a pad still fits
    assert cache.length == 9 and int(cache.real_tokens) == 8
    with pytest.raises(ValueError, match="no_grad"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
