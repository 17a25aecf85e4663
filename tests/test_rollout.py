"""The behaviour policy (minirspo.rollout): the engine's low-precision copy, what it records while sampling, the
mismatch it shows against the trainer, R3's replay of its experts, and the RL loop's flags around it.

Notation: B sequences, P prompt tokens, N response tokens, S = P + N, L MoE layers, E experts, K top-k.
"""
import math

import pytest
import torch

from minirspo.loss import rollout_mismatch_metrics
from minirspo.policy import Samples, ToyPolicy, load_policy
from minirspo.report import read_metrics
from minirspo.rollout import BuiltinEngine, LowPrecisionCopy, join_rollouts
from minirspo.rollout.precision import E4M3_MAX, fp8_scales
from minirspo.testing import make_tiny_hf_checkpoint
from minirspo.train import main
from toy_moe.checkpoint import save_toy_checkpoint
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.tokenizer import load_tokenizer
from test_train import TINY, tiny_args, tiny_checkpoint  # noqa: F401  (the RL loop's tiny runs, one definition)
from tolerance import MODEL_ULPS, assert_close_in_ulps  # tests/tolerance.py: why these bounds hold on any CPU

# Deeper and finer, so that a bf16 copy flips some routing on a few hundred tokens (engine-mismatch probe:
# 0.6% of (layer, token) sets at L4 E8 K2, more with depth and experts)
FINE = ToyMoEConfig(d_model=64, n_layers=4, n_heads=4, n_experts=16, top_k=4, expert_hidden=32, max_seq_len=64)


def toy_policy(config: ToyMoEConfig, seed: int = 0) -> ToyPolicy:
    torch.manual_seed(seed)
    return ToyPolicy(ToyMoE(config).eval(), load_tokenizer())


@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
    return load_policy(f"hf:{make_tiny_hf_checkpoint(tmp_path_factory.mktemp('hf') / 'qwen3', 'qwen3_moe')}")


def prompts(policy, n: int = 16, seed: int = 0):
    """n distinct a+b= prompts (left-padded ids and mask) with G = 1."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 1000, (n, 2), generator=generator).tolist()
    return policy.encode_prompts([f"{a}+{b}=" for a, b in pairs])


def sample(engine, policy, record="tokens", n=16, max_new_tokens=12):
    engine.sync()
    ids, mask = prompts(policy, n)
    samples = engine.sample(ids, mask, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                            generator=torch.Generator().manual_seed(0), record=record)
    return ids, mask, samples


# --- the copy ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["toy", "hf"])
def test_the_fp8_copy_holds_exactly_what_e4m3_with_its_scales_can_represent(kind, hf_policy):
    policy = toy_policy(TINY) if kind == "toy" else hf_policy
    copy = LowPrecisionCopy(policy, "fp8")
    trainer, copied = dict(policy.model.named_parameters()), dict(copy.model.named_parameters())
    matrices = dict(policy.matmul_weights)
    assert matrices and not any("router" in name or "gate.weight" in name or "embed" in name for name in matrices)
    changed = 0
    for name, weight in copied.items():
        assert weight.dtype == torch.bfloat16 and not weight.requires_grad, name
        if name not in matrices:  # everything else, router included: the bf16 cast
            assert torch.equal(weight, trainer[name].detach().to(torch.bfloat16)), name
            continue
        scale = fp8_scales(trainer[name], matrices[name])
        assert bool((torch.log2(scale) == torch.log2(scale).round()).all()), f"{name}: scales are powers of two"
        q = weight.float() / scale                                               # exact: s = 2^k
        assert q.abs().max() <= E4M3_MAX, name
        assert torch.equal(q.to(torch.float8_e4m3fn).float(), q), f"{name} holds values e4m3 cannot represent"
        # and it is the nearest such value: quantizing the trainer's weight gives exactly the copy
        assert torch.equal((trainer[name].detach() / scale).to(torch.float8_e4m3fn).float(), q), name
        changed += int(not torch.equal(weight, trainer[name].detach().to(torch.bfloat16)))
    assert changed == len(matrices), "fp8 must round more coarsely than bf16 somewhere in every matrix"


def test_refresh_copies_the_trainer_s_new_weights_in_place():
    policy = toy_policy(TINY)
    copy = LowPrecisionCopy(policy, "bf16")
    storage = {name: param.data_ptr() for name, param in copy.model.named_parameters()}
    with torch.no_grad():
        for param in policy.model.parameters():
            param.add_(0.5)
    copy.refresh()
    for name, param in copy.model.named_parameters():
        assert param.data_ptr() == storage[name], f"{name} was reallocated"
        assert torch.equal(param, dict(policy.model.named_parameters())[name].detach().to(torch.bfloat16)), name


# --- what the engine records, against the trainer ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["toy", "hf"])
def test_at_precision_32_the_rollout_is_the_old_policy_up_to_float_noise(kind, hf_policy):
    policy = toy_policy(TINY) if kind == "toy" else hf_policy
    ids, mask, samples = sample(BuiltinEngine(policy, "32"), policy)
    with torch.no_grad():
        scores = policy.score(ids, mask, samples.tokens, samples.mask, temperature=1.0)
    # a KV-cache decode against a full forward: the same sums in another order (tests/tolerance.py)
    assert_close_in_ulps(samples.logprobs, scores.logprobs, ulps=MODEL_ULPS)
    metrics = rollout_mismatch_metrics(scores.logprobs, samples.logprobs, samples.mask, scores.router_logits,
                                       samples.topk_idx)
    bound = MODEL_ULPS * torch.finfo(torch.float32).eps * float(scores.logprobs.abs().max())
    assert metrics["rollout_logprob_diff_max"] <= bound and metrics["rollout_kl"].abs() <= bound
    # the same experts, except where the router's K-th and (K+1)-th logits lie within float noise of each other
    top = scores.router_logits.topk(samples.topk_idx.shape[-1] + 1, dim=-1).values          # (L, B, N, K+1)
    near_tie = (top[..., -2] - top[..., -1]) <= MODEL_ULPS * torch.finfo(torch.float32).eps * top.abs().amax(-1)
    same = (scores.topk_idx.sort(-1).values == samples.topk_idx.sort(-1).values).all(-1)    # (L, B, N)
    assert bool((same | near_tie | ~samples.mask).all())
    want = scores.router_logits.log_softmax(-1).gather(-1, samples.topk_idx)                 # (L, B, N, K)
    assert_close_in_ulps(samples.topk_logprobs, torch.where(samples.mask[None, :, :, None], want, 0.0), ulps=MODEL_ULPS)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8"])
def test_a_low_precision_copy_samples_from_another_distribution_and_flips_routing(precision):
    policy = toy_policy(FINE)
    ids, mask, samples = sample(BuiltinEngine(policy, precision), policy, n=48)
    engine_storage = BuiltinEngine(policy, precision)
    engine_storage.sync()
    assert next(engine_storage.copy.model.parameters()).dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
    with torch.no_grad():
        scores = policy.score(ids, mask, samples.tokens, samples.mask, temperature=1.0)
    metrics = rollout_mismatch_metrics(scores.logprobs, samples.logprobs, samples.mask, scores.router_logits,
                                       samples.topk_idx)
    noise = MODEL_ULPS * torch.finfo(torch.float32).eps * float(scores.logprobs.abs().max())
    assert metrics["rollout_logprob_diff_max"] > 10 * noise, metrics  # far beyond float32 reordering
    assert metrics["rollout_tokens_flipped"] > 0 and metrics["rollout_routing_mismatch"] > 0, metrics


@pytest.mark.parametrize("kind", ["toy", "hf"])
def test_rollout_routing_replay_reproduces_the_rollout_s_experts_exactly(kind, hf_policy):
    policy = toy_policy(FINE) if kind == "toy" else hf_policy
    engine = BuiltinEngine(policy, "fp8")
    engine.sync()
    ids, mask, samples = sample(engine, policy, record="routing", n=24)
    assert samples.routing.shape[2] == ids.shape[1] + samples.tokens.shape[1]
    own = policy.score(ids, mask, samples.tokens, samples.mask, temperature=1.0)
    replayed = policy.score(ids, mask, samples.tokens, samples.mask, routing=samples.routing, temperature=1.0)
    assert torch.equal(replayed.routing, samples.routing)
    assert torch.equal(replayed.topk_idx, samples.routing[:, :, ids.shape[1]:])
    if kind == "toy":  # the fp8 toy flips some routing, which the replay removes
        assert not torch.equal(own.routing.sort(-1).values, samples.routing.sort(-1).values)


def test_join_rollouts_repads_rounds_of_different_widths():
    L, K = 2, 2

    def part(rows, prompt_width, lengths, width, fill):
        tokens = torch.full((rows, width), fill)
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]                   # (b, N)
        experts = torch.full((L, rows, prompt_width + width, K), fill)
        return Samples(tokens, mask, torch.full((rows, width), -float(fill)), experts[:, :, prompt_width:],
                       torch.full((L, rows, width, K), -float(fill)), experts)

    first, second = part(2, 5, [1, 3], 4, 7), part(1, 3, [2], 2, 9)
    joined = join_rollouts([first, second], prompt_width=4)
    assert joined.tokens.tolist() == [[7, 7, 7], [7, 7, 7], [9, 9, 0]]  # N = the longest response (3), not 4
    assert joined.mask.tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert joined.logprobs[2].tolist() == [-9, -9, 0]
    pads = torch.arange(K).tolist()
    assert joined.routing.shape == (L, 3, 4 + 3, K)
    assert joined.routing[0, 0, :, 0].tolist() == [7] * 7  # a wider prompt is cut from the left
    assert joined.routing[0, 2].tolist() == [pads] + [[9, 9]] * 5 + [pads]  # 3 → 4 positions, 2 → 3 tokens
    assert joined.topk_idx[0, 2].tolist() == [[9, 9], [9, 9], pads]


# --- the RL loop with a rollout copy -------------------------------------------------------------------------
MISMATCH = ("rollout_logprob_diff_mean", "rollout_logprob_diff_max", "rollout_kl", "rollout_routing_mismatch",
            "rollout_tokens_flipped")


@pytest.mark.parametrize("extra", [
    ["--rollout-precision", "bf16"],
    ["--rollout-precision", "fp8", "--loss", "grpo", "--rollout-is", "token", "--rollout-mask", "token"],
    ["--rollout-precision", "fp16", "--loss", "gspo", "--rollout-is", "sequence", "--rollout-mask", "sequence"],
    ["--rollout-precision", "fp8", "--rollout-routing-replay", "--gamma-reference", "rollout"],
    ["--rollout-precision", "fp8", "--loss", "gmpo", "--old-logprobs", "rollout"],
], ids=lambda extra: " ".join(extra))
def test_a_run_with_a_rollout_copy_logs_the_mismatch(tiny_checkpoint, tmp_path, extra):
    main(tiny_args(tiny_checkpoint, tmp_path, *extra))
    metrics = read_metrics(tmp_path / "metrics.csv")
    logged = set(MISMATCH) <= set(metrics)
    assert logged == ("--old-logprobs" not in extra), "bypass has no π_old forward to compare μ with"
    if logged:
        assert all(0 < value < 1 for value in metrics["rollout_logprob_diff_mean"][:2])
        assert all(math.isfinite(metrics[name][0]) for name in MISMATCH)
    if "--rollout-is" in extra:
        assert all(0 < value <= 2 for value in metrics["rollout_is_weight_mean"][:2])
    assert all(value >= 0 for value in metrics["rollout_sync_seconds"][:2])


BAD_ROLLOUT_FLAGS = [
    (["--rollout-precision", "fp4"], "--rollout-precision"),
    (["--rollout-is", "token", "--loss", "gmpo"], "--rollout-is"),
    (["--rollout-is", "token", "--rollout-is-cap", "0"], "--rollout-is-cap"),
    (["--rollout-mask", "token", "--rollout-mask-bounds", "1.5", "2"], "--rollout-mask-bounds"),
    (["--routing-replay", "--rollout-routing-replay"], "--rollout-routing-replay"),
    (["--old-logprobs", "rollout", "--rollout-is", "sequence"], "--rollout-is"),
    (["--old-logprobs", "rollout", "--routing-replay"], "--routing-replay"),
    (["--rollout-mask", "token", "--top-p", "0.9"], "--top-p"),
    (["--rollout-precision", "bf16", "--strategy", "fsdp2"], "--rollout-precision"),
    (["--gamma-reference", "engine"], "--gamma-reference"),
    (["--rollout-engine", "vllm", "--rollout-precision", "fp8"], "--rollout-precision"),
    (["--rollout-engine", "vllm", "--top-p", "0.9"], "--top-p"),
    (["--rollout-engine", "vllm", "--rollout-routing-replay"], "--rollout-routing-replay"),
    (["--rollout-engine", "vllm", "--gamma-reference", "rollout"], "--gamma-reference"),
    (["--rollout-engine", "vllm", "--strategy", "ddp"], "--rollout-engine"),
    (["--rollout-engine", "vllm"], "--rollout-engine"),  # the default toy's 8 heads of 16 on vLLM's CPU build
]


@pytest.mark.parametrize("flags, flag", BAD_ROLLOUT_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_ROLLOUT_FLAGS])
def test_meaningless_rollout_combinations_are_refused_in_one_line_before_any_work(tmp_path, capsys, flags, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["--warmstart-dir", str(tmp_path / "warm"), "--out", str(tmp_path / "run"), *flags])
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and flag in errors[0], errors
    assert not (tmp_path / "warm").exists() and not (tmp_path / "run").exists()


def test_r3_and_gamma_against_the_rollout_need_a_router(tmp_path, capsys):
    dense = save_toy_checkpoint(ToyMoE(ToyMoEConfig(**{**TINY.__dict__, "moe_layers": ()})), None, tmp_path / "dense.pt")
    for flags in (["--rollout-routing-replay"], ["--gamma-reference", "rollout"]):
        with pytest.raises(SystemExit):
            main(tiny_args(dense, tmp_path / flags[0], "--loss", "grpo", *flags))
        assert "MoE router" in capsys.readouterr().err


def test_vllm_missing_is_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "vllm" else find_spec(name, *args))
    wide = save_toy_checkpoint(ToyMoE(ToyMoEConfig(**{**TINY.__dict__, "d_model": 64})), None, tmp_path / "wide.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(wide, tmp_path / "run", "--rollout-engine", "vllm"))
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and "make setup VLLM=1" in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_the_toy_exported_as_mixtral_computes_the_toy_s_logits_and_routing():
    from minirspo.rollout.export import hf_checkpoint_weights, toy_as_mixtral
    policy = toy_policy(FINE)
    lm = toy_as_mixtral(policy.model, policy.tokenizer)
    ids, mask = prompts(policy, n=6)                                                       # left-padded (B, P)
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        toy = policy.model(ids, mask)
        mixtral = lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions, output_router_logits=True)
    valid = mask[..., None]
    # the same float32 numbers through other kernels: only the order of the sums differs (tests/tolerance.py)
    assert_close_in_ulps(torch.where(valid, mixtral.logits, 0.0), torch.where(valid, toy.logits, 0.0))
    router = torch.stack([layer.reshape(*ids.shape, -1) for layer in mixtral.router_logits])  # (L, B, P, E)
    assert_close_in_ulps(torch.where(valid, router, 0.0), torch.where(valid, toy.router_logits, 0.0))
    top = router.topk(FINE.top_k, dim=-1).indices.sort(-1).values
    assert torch.equal(top[:, mask], toy.topk_idx.sort(-1).values[:, mask])
    names = hf_checkpoint_weights(lm)  # what vLLM's in-place reload is fed: per-expert checkpoint names
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names and len(names) > len(lm.state_dict())
    dense = ToyMoE(ToyMoEConfig(**{**TINY.__dict__, "moe_layers": ()}))
    with pytest.raises(ValueError, match="dense layers"):
        toy_as_mixtral(dense, policy.tokenizer)


@pytest.mark.parametrize("flags, replays", [(["--rollout-routing-replay"], True), ([], False)],
                         ids=["R3", "no replay"])
def test_r3_routes_the_old_scoring_and_every_update_to_the_rollout_s_experts(tiny_checkpoint, tmp_path, monkeypatch,
                                                                           flags, replays):
    seen = []
    score = ToyPolicy.score

    def spy(self, prompt_ids, prompt_mask, tokens, mask, *, routing=None, **kwargs):
        out = score(self, prompt_ids, prompt_mask, tokens, mask, routing=routing, **kwargs)
        seen.append((routing, out.routing))
        return out

    monkeypatch.setattr(ToyPolicy, "score", spy)
    main(tiny_args(tiny_checkpoint, tmp_path, "--rollout-precision", "fp8", "--eval-every", "0", *flags))
    assert len(seen) >= 2 * 2  # two steps, each an old-policy scoring and two updates
    for given, used in seen:
        assert (given is not None) == replays
        if replays:  # the forward computed with exactly the experts it was given, at every position
            assert torch.equal(used, given)


@pytest.mark.parametrize("loss, is_level, mask_level", [("grpo", "token", "token"), ("grpo", "sequence", "sequence"),
                                                       ("gmpo", "sequence", "token"), ("rspo", "none", "sequence")])
def test_the_loop_hands_each_loss_the_correction_docs_rspo_describes(loss, is_level, mask_level):
    # δ = log π_old − log μ by hand: row 0 e^{0.1}, e^{1.5}; row 1 e^{-1}, e^{0.2}, padding. Cap 2, bounds 0.5 2.
    from minirspo.config import RLConfig
    from minirspo.module import Minibatch, OldPolicy, RLModule
    policy = toy_policy(TINY)
    config = RLConfig(loss=loss, rollout_is=is_level, rollout_mask=mask_level)
    module = RLModule(policy, config)
    mask = torch.tensor([[True, True], [True, False]])
    old = torch.zeros(2, 2)
    rollout = Samples(torch.zeros(2, 2, dtype=torch.long), mask, -torch.tensor([[0.1, 1.5], [-1.0, 0.0]]))
    mb = Minibatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), rollout.tokens, mask,
                   torch.ones(2), rollout)
    mask_out, weight, metrics = module.rollout_correction(OldPolicy(old, None, None, None, None, {}), mb)
    e = math.exp
    tis = {"token": [[e(0.1), 2.0], [e(-1.0), 0.0]], "sequence": [[2.0, 2.0], [e(-1.0), 0.0]], "none": [[1, 1], [1, 0]]}
    # MIS keeps e^{0.1} only; by sequence, row 0's geometric mean e^{0.8} = 2.2 and row 1's e^{-1} both fall outside
    keep = {"token": [[1, 0], [0, 0]], "sequence": [[0, 0], [0, 0]]}
    if loss == "grpo":  # token weights: TIS times MIS on each token, the mask untouched
        want = [[t * k for t, k in zip(*rows)] for rows in zip(tis[is_level], keep[mask_level])]
        assert weight.flatten().tolist() == pytest.approx([w for row in want for w in row]) and torch.equal(mask_out, mask)
    else:  # one weight per sequence; a token-level MIS mask leaves tokens out of the sequence's mean instead
        sequence_tis = [max(row) for row in tis[is_level]] if is_level != "none" else [1.0, 1.0]
        sequence_keep = [1.0, 1.0] if mask_level == "token" else [float(any(row)) for row in keep["sequence"]]
        assert weight.tolist() == pytest.approx([t * k for t, k in zip(sequence_tis, sequence_keep)])
        want_mask = [[bool(k) for k in row] for row in keep["token"]] if mask_level == "token" else mask.tolist()
        assert mask_out.tolist() == want_mask
    assert float(metrics["rollout_masked_frac"]) == pytest.approx(2 / 3 if mask_level == "token" else 1.0)
