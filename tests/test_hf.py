"""HFPolicy on tiny random-init Qwen2-MoE, Qwen3-MoE, OLMoE and Mixtral checkpoints built here, offline.

Each family is saved with `make_tiny_hf_checkpoint` and loaded back through `load_policy("hf:PATH")`, so
the tests go through the same door as `--model hf:PATH`. References are the model's own forward on each
row without padding (positions 0.., nothing masked) and its gates' own outputs.
"""
import copy
import csv
import math

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from minirspo.config import RLConfig  # noqa: E402
from minirspo.module import RLModule  # noqa: E402
from minirspo.policy import HFPolicy, load_policy  # noqa: E402
from minirspo.tasks import make_task  # noqa: E402
from minirspo.rollout import check_rollout_engine  # noqa: E402
from minirspo.testing import make_tiny_hf_checkpoint  # noqa: E402
from minirspo.train import run  # noqa: E402
from toy_moe.generate import token_logprobs  # noqa: E402
from toy_moe.tokenizer import load_tokenizer  # noqa: E402
from tolerance import assert_close_in_ulps, largest  # noqa: E402  tests/tolerance.py: why these bounds hold on any CPU

hf_logging.disable_progress_bar()

# (family, config overrides): both settings of Qwen's norm_topk_prob; Mixtral always renormalises, OLMoE not.
FAMILIES = {"qwen2_moe": {"norm_topk_prob": True}, "qwen3_moe": {"norm_topk_prob": False}, "olmoe": {},
            "mixtral": {}}
# Every float comparison below is between two float32 computations of the same values in another order
# (a padded batch against one row, chunks against one pass, a KV cache against a full forward, experts
# summed in another order): assert_close_in_ulps allows MODEL_ULPS ulps of the largest reference value.


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {family: make_tiny_hf_checkpoint(root / family, family, **overrides)
             for family, overrides in FAMILIES.items()}
    paths["dense"] = make_tiny_hf_checkpoint(root / "dense", "qwen3")
    return paths


def batch(policy: HFPolicy, seed: int = 0):
    """Three prompts of different lengths (left-padded) and random responses of lengths 5, 2, 7 (right-padded)."""
    prompt_ids, prompt_mask = policy.encode_prompts(["1+2=", "Use 3, 5 and 7 to make 22.", "40+41="])
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (3, 7), generator=generator)                      # ordinary tokens only
    mask = torch.arange(7)[None, :] < torch.tensor([5, 2, 7])[:, None]                 # (B, N)
    return prompt_ids, prompt_mask, tokens, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_models_own_forward_and_routing(checkpoints, family):
    policy = load_policy(f"hf:{checkpoints[family]}")
    lm = policy.model.lm
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    with torch.no_grad():
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask)
    assert policy.is_moe and scores.router_logits.shape[:3] == (2, 3, 7)
    own_experts = []
    hooks = [gate.register_forward_hook(lambda module, args, out: own_experts.append(out[2]))
             for gate in policy.router.gates]
    for row in range(3):
        prompt = prompt_ids[row, prompt_mask[row]]
        response = tokens[row, mask[row]]
        own_experts.clear()
        with torch.no_grad():
            out = lm(torch.cat([prompt, response])[None], output_router_logits=True)
        start = len(prompt)
        # the policy never samples its banned tokens, so it scores under their removal too
        logprobs = token_logprobs(out.logits[0, start - 1:-1], response, banned_tokens=policy.banned)
        assert_close_in_ulps(scores.logprobs[row, mask[row]], logprobs)
        for layer in range(2):
            assert_close_in_ulps(scores.router_logits[layer, row, mask[row]], out.router_logits[layer][start:].float())
            # the same expert sets at every real position, prompt included (order within a set is free)
            row_routing = scores.routing[layer, row, torch.cat([prompt_mask[row], mask[row]])]
            assert torch.equal(row_routing.sort(-1).values, own_experts[layer].sort(-1).values)
    for hook in hooks:
        hook.remove()
    padding = ~mask
    assert (scores.router_logits[:, padding] == 0).all() and (scores.logprobs[padding] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_replay_reproduces_the_unforced_forward_and_forces_experts(checkpoints, family):
    policy = load_policy(f"hf:{checkpoints[family]}")
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    with torch.no_grad():
        free = policy.score(prompt_ids, prompt_mask, tokens, mask)
        replayed = policy.score(prompt_ids, prompt_mask, tokens, mask, routing=free.routing)
        reordered = policy.score(prompt_ids, prompt_mask, tokens, mask, routing=free.routing.flip(-1))
        forced_routing = (free.routing + 1) % policy.router.gates[0].weight.shape[0]
        forced = policy.score(prompt_ids, prompt_mask, tokens, mask, routing=forced_routing)
    assert_close_in_ulps(replayed.logprobs, free.logprobs)
    assert_close_in_ulps(replayed.router_logits, free.router_logits)
    # a gate follows its expert, not its slot: the same set in another order is the same forward
    assert_close_in_ulps(reordered.logprobs, free.logprobs)
    assert torch.equal(forced.topk_idx, forced_routing[:, :, prompt_ids.shape[1]:])
    # another expert set moves log-probs by O(0.1); 1e-4 is still ~100x the float32 noise of the lines above
    assert (forced.logprobs - free.logprobs)[mask].abs().max() > 1e-4
    # layer 0's router sees nothing forced yet; later layers see the forced experts' outputs
    assert_close_in_ulps(forced.router_logits[0], free.router_logits[0])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_frozen_router_gets_no_gradient_and_the_same_values(checkpoints, family):
    policy = load_policy(f"hf:{checkpoints[family]}")
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    grads = {}
    for freeze in (False, True):
        policy.model.zero_grad(set_to_none=True)
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask, freeze_router=freeze)
        (scores.logprobs.sum() + scores.router_logits.sum() + scores.aux_loss).backward()
        grads[freeze] = scores, [gate.weight.grad for gate in policy.router.gates]
        experts = policy.model.lm.get_decoder().layers[0].mlp.experts.down_proj
        assert experts.grad is not None and experts.grad.abs().max() > 0
    (free, free_grads), (frozen, frozen_grads) = grads[False], grads[True]
    assert_close_in_ulps(frozen.logprobs, free.logprobs)
    assert torch.equal(frozen.topk_idx, free.topk_idx)
    assert all(g is not None and g.abs().max() > 0 for g in free_grads)
    assert all(g is None for g in frozen_grads)
    # --router-lr-scale's parameter group: the weights that freezing stops, one (E, D) matrix per MoE layer
    names = {id(p): name for name, p in policy.model.named_parameters()}
    assert [names[id(w)] for w in policy.router_weights] == [names[id(g.weight)] for g in policy.router.gates]
    assert len(policy.router_weights) == len(policy.decoder_layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_prompt_pass_equals_one_pass_per_row_in_value_and_gradient(checkpoints, family, monkeypatch):
    import minirspo.policy.hf as hf
    policy = load_policy(f"hf:{checkpoints[family]}")
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    # rows 0, 2, 3 share a prompt and rows 1, 4 another (interleaved, so the gather order matters), each with
    # its own response; the prompts differ in length, so one of them is left-padded
    rows = torch.tensor([0, 1, 0, 0, 1])
    prompt_ids, prompt_mask = prompt_ids[rows], prompt_mask[rows]
    tokens = torch.randint(0, 500, tokens[rows].shape, generator=torch.Generator().manual_seed(1))   # (5, N)
    mask = torch.arange(tokens.shape[1])[None, :] < torch.tensor([7, 3, 5, 1, 6])[:, None]          # (5, N)
    assert hf.prompt_groups(prompt_ids, prompt_mask)[1].unique().numel() == 2
    results = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(hf, "prompt_groups", lambda ids, mask: None)
        policy.model.zero_grad(set_to_none=True)
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask)
        (scores.logprobs.sum() + scores.router_logits.sum() + scores.aux_loss).backward()
        results.append((scores, {name: p.grad for name, p in policy.model.named_parameters()}))
    (shared, shared_grads), (whole, whole_grads) = results
    # the same function of the same inputs, its sums taken in another order (a prompt attended from a cache)
    for name in ("logprobs", "router_logits", "aux_loss", "entropy"):
        assert_close_in_ulps(getattr(shared, name), getattr(whole, name), msg=name)
    valid = torch.cat([prompt_mask, mask], dim=1)                                       # (B, S)
    assert torch.equal(shared.routing[:, valid], whole.routing[:, valid])
    gradient_scale = largest(*whole_grads.values())  # in ulps of the model's largest gradient, as above
    for name, grad in whole_grads.items():
        assert_close_in_ulps(shared_grads[name], grad, scale=gradient_scale, msg=name)


def test_chunked_logprobs_equal_unchunked_in_value_and_gradient(checkpoints):
    path = checkpoints["qwen3_moe"]
    chunked, whole = (load_policy(f"hf:{path}", logprob_chunk_tokens=size) for size in (3, 10_000))
    head_rows = []
    chunked.model.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[0]))
    prompt_ids, prompt_mask, tokens, mask = batch(chunked)
    weights = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for policy in (chunked, whole):
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask)
        (scores.logprobs * weights).sum().backward()
        results.append((scores, {n: p.grad for n, p in policy.model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert_close_in_ulps(a.logprobs, b.logprobs)
    assert_close_in_ulps(a.entropy, b.entropy)
    # gradients in ulps of the model's largest (embed_tokens: 2.7e-6 = 5 ulps of 4.75 on one AMD EPYC)
    gradient_scale = largest(*grads_b.values())
    for name, grad in grads_a.items():
        assert_close_in_ulps(grad, grads_b[name], scale=gradient_scale, msg=name)
    # 21 response positions in chunks of 3, run once forward and once more in backward (checkpointing)
    assert max(head_rows) == 3 and len(head_rows) == 2 * math.ceil(tokens.numel() / 3)


def test_activation_checkpointing_recomputes_the_replayed_routing(checkpoints):
    """Checkpointed layers re-run their gates in backward: the hooks must force the same experts again."""
    path = checkpoints["olmoe"]
    plain, checkpointed = load_policy(f"hf:{path}"), load_policy(f"hf:{path}")
    layer_type = type(checkpointed.decoder_layers[0])
    apply_activation_checkpointing(checkpointed.model, check_fn=lambda module: isinstance(module, layer_type))
    assert all(type(layer) is not layer_type for layer in checkpointed.decoder_layers)
    prompt_ids, prompt_mask, tokens, mask = batch(plain)
    with torch.no_grad():
        routing = (plain.score(prompt_ids, prompt_mask, tokens, mask).routing + 1) % 4  # not the router's own
    grads = []
    for policy in (plain, checkpointed):
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask, routing=routing, freeze_router=True)
        scores.logprobs.sum().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in policy.model.named_parameters()})
    gradient_scale = largest(*grads[0].values())  # in ulps of the model's largest gradient, as above
    for name, grad in grads[0].items():
        assert_close_in_ulps(grads[1][name], grad, scale=gradient_scale, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_samples_what_the_training_forward_scores(checkpoints, family):
    policy = load_policy(f"hf:{checkpoints[family]}")
    prompt_ids, prompt_mask, _, _ = batch(policy)
    sampled = [policy.generate(prompt_ids, prompt_mask, max_new_tokens=6, temperature=1.0,
                               generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens) and not torch.equal(sampled[0].tokens, sampled[2].tokens)
    assert not torch.isin(sampled[0].tokens[sampled[0].mask], torch.tensor(policy.banned)).any()
    # A greedy KV-cache decode picks, at every response position, the token the training forward ranks first
    # among the allowed ones (its log-prob is the largest), wherever the top two are not within float noise.
    # Rows repeat prompts, so the decode starts from a prefill shared by each prompt's rows.
    rows = torch.tensor([0, 1, 2, 0, 2])
    prompt_ids, prompt_mask = prompt_ids[rows], prompt_mask[rows]
    greedy = policy.generate(prompt_ids, prompt_mask, max_new_tokens=6, temperature=0.0)
    ids = torch.cat([prompt_ids, greedy.tokens], dim=1)                                # (B, S)
    valid = torch.cat([prompt_mask, greedy.mask], dim=1)                               # (B, S)
    with torch.no_grad():
        logits = policy.model.lm(input_ids=ids, attention_mask=valid.long(),
                                 position_ids=(valid.long().cumsum(1) - 1).clamp_min(0)).logits  # (B, S, V)
    allowed = logits.float().index_fill(-1, torch.tensor(policy.banned), float("-inf"))[:, prompt_ids.shape[1] - 1:-1]
    top = allowed.log_softmax(-1).topk(2, dim=-1).values                               # (B, N, 2)
    # (1e-4 in log-prob is ~1000 ulps of log-probs of order 1: the two paths cannot swap such a pair)
    clear = (top[..., 0] - top[..., 1] > 1e-4) & greedy.mask
    assert clear[greedy.mask].float().mean() > 0.9
    assert torch.equal(allowed.argmax(-1)[clear], greedy.tokens[clear])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decode_loop_picks_what_hf_generate_picks(checkpoints, family):
    # Our decode loop against the library's: HF `generate` (greedy, banned tokens suppressed, its own cache and
    # per-row prefill) must choose the same tokens wherever its top two are not within float noise.
    policy = load_policy(f"hf:{checkpoints[family]}")
    rows = torch.tensor([0, 1, 2, 0, 2, 1])
    prompt_ids, prompt_mask = (t[rows] for t in batch(policy)[:2])
    ours = policy.generate(prompt_ids, prompt_mask, max_new_tokens=8, temperature=0.0)
    theirs = policy.model.lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=False,
                                      max_new_tokens=8, suppress_tokens=list(policy.banned),
                                      eos_token_id=policy.stop_ids, pad_token_id=policy.pad_id, output_scores=True,
                                      return_dict_in_generate=True)
    steps = min(ours.tokens.shape[1], len(theirs.scores))                             # both end when all rows stop
    scores = torch.stack(theirs.scores[:steps], dim=1).float()                        # (B, N, V) banned at -inf
    top = scores.log_softmax(-1).topk(2, dim=-1).values                                # (B, N, 2)
    # A position counts once it and every earlier one were clear (after a near-tie the two prefixes may differ).
    # (1e-4 in log-prob is ~1000 ulps of log-probs of order 1, as in the test above)
    clear = (top[..., 0] - top[..., 1] > 1e-4).cumprod(dim=1).bool() & ours.mask[:, :steps]
    assert clear.sum() >= 0.9 * ours.mask.sum()
    assert torch.equal(ours.tokens[:, :steps][clear], theirs.sequences[:, prompt_ids.shape[1]:][:, :steps][clear])


def test_the_growing_cache_holds_what_a_dynamic_cache_holds_without_copying_it():
    from transformers import DynamicCache

    from minirspo.policy.kv_cache import GrowingCache
    generator = torch.Generator().manual_seed(0)
    growing, dynamic = GrowingCache(), DynamicCache()
    storages = set()
    # a prefill of 5 positions, a gather to other rows (as after a shared prefill), then single-position steps
    for step, length in enumerate([5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]):
        if step == 1:
            for cache in (growing, dynamic):
                cache.batch_select_indices(torch.tensor([0, 0, 1, 2, 1]))
        rows = 3 if step == 0 else 5
        for layer in range(2):
            keys, values = torch.randn(2, rows, 2, length, 4, generator=generator)
            got, want = growing.update(keys, values, layer), dynamic.update(keys, values, layer)
            assert all(torch.equal(g, w) for g, w in zip(got, want))               # the same values, exactly
        storages.add(growing.layers[0].keys.untyped_storage().data_ptr())
    assert growing.get_seq_length() == dynamic.get_seq_length() == 16
    # the prefill's buffer, the gathered rows' buffer, and a doubling at 11 and at 22: 3, not one per step
    assert len(storages) == 3


def test_generation_stops_at_a_stop_token_and_masks_after_it(checkpoints):
    def length_through_first_stop(tokens, stop_ids):
        hits = torch.isin(tokens, torch.tensor(stop_ids)).nonzero()
        return int(hits[0]) + 1 if len(hits) else len(tokens)

    policy = load_policy(f"hf:{checkpoints['olmoe']}")
    prompt_ids, prompt_mask, _, _ = batch(policy)
    greedy = policy.generate(prompt_ids, prompt_mask, max_new_tokens=8, temperature=0.0)
    eos_ids = policy.stop_ids
    row = int(greedy.mask[:, 2].nonzero()[0])
    policy.stop_ids = (*eos_ids, int(greedy.tokens[row, 2]))  # a row's third greedy token now stops it
    stopped = policy.generate(prompt_ids, prompt_mask, max_new_tokens=8, temperature=0.0)
    assert stopped.mask[row].sum() <= 3
    for row in range(3):
        assert greedy.mask[row].sum() == length_through_first_stop(greedy.tokens[row], eos_ids)
        length = length_through_first_stop(greedy.tokens[row], policy.stop_ids)
        assert stopped.mask[row].sum() == length and stopped.mask[row, :length].all()
        assert torch.equal(stopped.tokens[row, :length], greedy.tokens[row, :length])


def test_prompts_encode_like_the_toy_tokenizer(checkpoints):
    policy = load_policy(f"hf:{checkpoints['mixtral']}")
    toy = load_tokenizer()
    problems = make_task("countdown").sample(8, seed=0, split="train") + make_task("arithmetic").sample(8, seed=0)
    ids, mask = policy.encode_prompts([p.prompt for p in problems])
    for row, problem in zip(range(len(problems)), problems):
        assert ids[row, mask[row]].tolist() == toy.encode_prompt(problem.prompt)
    answers = [toy.encode_example(p.prompt, p.answer)[1] for p in problems[:3]]
    width = max(map(len, answers))
    tokens = torch.tensor([a + [toy.pad_id] * (width - len(a)) for a in answers])
    assert policy.decode_responses(tokens, tokens != toy.pad_id) == [p.answer for p in problems[:3]]


def test_a_deep_copy_hooks_its_own_gates(checkpoints):
    """The KL reference is `copy.deepcopy(policy)`: its gate hooks must record into the copy."""
    policy = load_policy(f"hf:{checkpoints['qwen2_moe']}")
    reference = copy.deepcopy(policy)
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    with torch.no_grad():
        reference.router.gates[1].weight.mul_(3.0)
        ours, theirs = (p.score(prompt_ids, prompt_mask, tokens, mask) for p in (policy, reference))
    assert_close_in_ulps(ours.router_logits[0], theirs.router_logits[0])
    assert (ours.router_logits[1] - theirs.router_logits[1])[mask].abs().max() > 1e-3  # ×3 moves logits by O(1)


def test_dense_model_is_refused_by_rspo(checkpoints):
    policy = load_policy(f"hf:{checkpoints['dense']}")
    assert not policy.is_moe
    prompt_ids, prompt_mask, tokens, mask = batch(policy)
    with torch.no_grad():
        scores = policy.score(prompt_ids, prompt_mask, tokens, mask)
    assert scores.router_logits.shape == (0, 3, 7, 0) and scores.logprobs[mask].lt(0).all()
    with pytest.raises(ValueError, match="rspo.*router logits|router logits.*rspo"):
        RLModule(policy, RLConfig(loss="rspo", model=f"hf:{checkpoints['dense']}"))


def test_load_policy_errors(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="'toy:PATH' or 'hf:PATH'"):
        load_policy("llama:/models/x")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_policy(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="rollout_engine"):
        check_rollout_engine("sglang")
    jittery = make_tiny_hf_checkpoint(tmp_path / "jitter", "mixtral", router_jitter_noise=0.1)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        load_policy(f"hf:{jittery}")


@pytest.mark.parametrize("family,flags", [("qwen3_moe", dict(loss="rspo", kl_coef=0.01)),
                                          ("mixtral", dict(loss="gmpo", routing_replay=True, freeze_router=True,
                                                           activation_checkpointing=True))])
def test_rl_steps_run_end_to_end(checkpoints, tmp_path, capsys, family, flags):
    config = RLConfig(model=f"hf:{checkpoints[family]}", out=str(tmp_path / "run"), max_steps=2, n_prompts=2,
                      group_size=2, minibatch_size=2, max_new_tokens=4, eval_size=2, eval_every=1,
                      logprob_chunk_tokens=5, **flags)
    with open(run(config)) as file:
        rows = list(csv.DictReader(file))
    assert "router load-balance loss is off during RL" in capsys.readouterr().out
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # two RL steps, then the final policy's evaluation
    for row in rows[:2]:
        assert math.isfinite(float(row["loss"])) and 0 < float(row["gamma_mean"]) <= 1
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["aux_loss"]) > 0
    assert 0 <= float(rows[2]["accuracy"]) <= 1


@pytest.mark.parametrize("family,flags", [("qwen3_moe", dict(loss="rspo", kl_coef=0.1)),
                                          ("mixtral", dict(loss="gmpo", freeze_router=True, activation_checkpointing=True,
                                                           logprob_chunk_tokens=5))])
def test_the_first_minibatch_is_its_own_old_policy(checkpoints, tmp_path, monkeypatch, family, flags):
    from test_train import assert_same_old_policy, record_updates  # the comparison and its tolerance are explained there
    calls = record_updates(monkeypatch)
    run(RLConfig(model=f"hf:{checkpoints[family]}", out=str(tmp_path / "run"), max_steps=1, n_prompts=2,
                 group_size=2, minibatch_size=2, max_new_tokens=4, eval_size=2, aux_loss_coef=1.0, lr=1e-2, **flags))
    (first_old, scored, reused), (second_old, _, _) = calls
    assert first_old is None and second_old is not None
    assert_same_old_policy(reused, scored)


def test_a_dense_model_trains_with_a_loss_that_needs_no_router(checkpoints, tmp_path):
    config = RLConfig(model=f"hf:{checkpoints['dense']}", out=str(tmp_path / "run"), loss="grpo", max_steps=1,
                      n_prompts=2, group_size=2, minibatch_size=2, max_new_tokens=4, eval_size=2, eval_every=1)
    with open(run(config)) as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and math.isfinite(float(rows[0]["loss"]))  # the step, then the final evaluation
    assert "gamma_mean" not in rows[0] and "routing_consistency" not in rows[0]
