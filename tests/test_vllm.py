"""vLLM as the rollout engine (minirspo/rollout/vllm_engine.py), on vLLM's CPU build: `make test VLLM=1`.

Skipped, with the reason, where vllm is not installed or cannot run a tiny model on this machine (vLLM alone,
checked once in a subprocess, so that a CPU the build does not support cannot take pytest down with it). At most one
engine is alive at a time: every test of this file runs on one pytest worker (xdist_group), the engine of the
first tests is closed before the runs start theirs, and a run closes its own when it ends.

Notation: B rows, P prompt tokens, N response tokens.
"""
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from minirspo.policy import ToyPolicy
from minirspo.report import read_metrics
from minirspo.testing import make_tiny_hf_checkpoint
from minirspo.train import main
from toy_moe.checkpoint import save_toy_checkpoint
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.tokenizer import load_tokenizer
from tolerance import MODEL_ULPS, assert_close_in_ulps  # tests/tolerance.py: why these bounds hold on any CPU

pytestmark = pytest.mark.xdist_group("vllm")

# vLLM's CPU attention takes head dims of 32 and up (16 is refused), so two heads of 64
TOY = ToyMoEConfig(d_model=128, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=64, max_seq_len=64)

PROBE = """
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"], os.environ["VLLM_CPU_KVCACHE_SPACE"] = "0", "1"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={folder!r}, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=64)
llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
"""


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory):
    """Skip unless vLLM itself (not minirspo's engine, whose failures the tests must show) starts a tiny model
    and samples from it here, in a subprocess."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (make setup VLLM=1 installs vLLM's CPU build)")
    folder = make_tiny_hf_checkpoint(tmp_path_factory.mktemp("probe") / "qwen3", "qwen3_moe", hidden_size=64,
                                     n_heads=2)
    probe = subprocess.run([sys.executable, "-c", PROBE.format(folder=str(folder))], capture_output=True, text=True,
                           timeout=900)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vLLM cannot run a tiny model on this machine: {last}")


def toy_policy(seed: int) -> ToyPolicy:
    torch.manual_seed(seed)
    return ToyPolicy(ToyMoE(TOY).eval(), load_tokenizer())


def prompts(policy, n: int = 16):
    pairs = torch.randint(0, 1000, (n, 2), generator=torch.Generator().manual_seed(0)).tolist()
    return policy.encode_prompts([f"{a}+{b}=" for a, b in pairs])


class TestOneEngine:
    """One toy engine, started once, for the tests that talk to it directly (closed when the class ends)."""

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, vllm_runs):
        from minirspo.rollout.vllm_engine import VLLMEngine
        policy = toy_policy(0)
        engine = VLLMEngine(policy, "32", seed=0)
        engine.sync()
        yield engine
        engine.close()

    def test_float32_engine_log_probs_are_the_trainer_s(self, engine):
        policy = engine.trainer
        ids, mask = prompts(policy)
        samples = engine.sample(ids, mask, max_new_tokens=8, temperature=0.7, top_p=1.0,
                                generator=torch.Generator().manual_seed(0), record="tokens")
        with torch.no_grad():
            scores = policy.score(ids, mask, torch.where(samples.mask, samples.tokens, 0), samples.mask, temperature=0.7)
        # another implementation of the same float32 forward: only the order of the sums differs (tests/tolerance.py)
        assert_close_in_ulps(samples.logprobs, scores.logprobs, ulps=MODEL_ULPS)
        assert samples.mask.any() and not (samples.tokens[samples.mask] == policy.pad_id).any()
        banned = torch.tensor(policy.banned)
        assert not torch.isin(samples.tokens[samples.mask], banned).any(), "a banned token was sampled"

    def test_after_a_sync_the_engine_samples_from_the_new_weights(self, engine):
        policy = engine.trainer
        ids, mask = prompts(policy)
        with torch.no_grad():  # other weights altogether: another seed's model
            for param, other in zip(policy.model.parameters(), toy_policy(1).model.parameters()):
                param.copy_(other)
        greedy = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, generator=torch.Generator(), record="none")
        policy.model.eval()
        want = policy.generate(ids, mask, **greedy)
        stale = engine.sample(ids, mask, **greedy)
        engine.sync()
        fresh = engine.sample(ids, mask, **greedy)
        same = lambda a, b: a.tokens.shape == b.tokens.shape and torch.equal(a.tokens[a.mask], b.tokens[b.mask])  # noqa: E731
        assert not same(stale, want), "the old engine already answered like the new weights: a weak test"
        assert same(fresh, want)


def run_args(model: str, out, *extra) -> list[str]:
    return ["--model", model, "--out", str(out), "--max-steps", "3", "--n-prompts", "4", "--group-size", "4",
            "--minibatch-size", "8", "--eval-size", "8", "--eval-every", "0", "--max-new-tokens", "6",
            "--lr", "3e-3", "--warmup-steps", "1", "--rollout-engine", "vllm", *extra]


def assert_mismatch_logged(metrics: dict, steps: int) -> None:
    for step in range(steps):
        assert 0 < metrics["rollout_logprob_diff_mean"][step] <= metrics["rollout_logprob_diff_max"][step] < 1
        assert math.isfinite(metrics["rollout_kl"][step])
    # the engine returns no routing: those columns stay empty, not 0
    assert "rollout_routing_mismatch" not in metrics and "rollout_tokens_flipped" not in metrics


def test_a_qwen3_moe_run_with_vllm_writes_the_mismatch_metrics(vllm_runs, tmp_path):
    model = make_tiny_hf_checkpoint(tmp_path / "qwen3", "qwen3_moe", hidden_size=128, n_heads=2, expert_hidden=64)
    main(run_args(f"hf:{model}", tmp_path / "run", "--rollout-precision", "bf16"))
    metrics = read_metrics(tmp_path / "run" / "metrics.csv")
    assert metrics["step"][:3] == [0.0, 1.0, 2.0]
    assert_mismatch_logged(metrics, 3)


def test_a_toy_run_with_vllm_resumes_into_the_same_run(vllm_runs, tmp_path):
    # The resumed run starts a fresh engine from the restored weights and asks it for the same per-request seeds;
    # on this build that reproduces the run exactly (an observation about vLLM's CPU kernels, which the test pins).
    torch.manual_seed(0)
    model = f"toy:{save_toy_checkpoint(ToyMoE(TOY), None, tmp_path / 'model.pt')}"
    common = ["--rollout-precision", "bf16", "--checkpoint-every", "2", "--aux-loss-coef", "1", "--lr", "2e-2"]
    main(run_args(model, tmp_path / "straight", *common))
    main(run_args(model, tmp_path / "resumed", *common, "--max-steps", "2"))
    main(run_args(model, tmp_path / "resumed", *common, "--resume"))
    straight = read_metrics(tmp_path / "straight" / "metrics.csv")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert_mismatch_logged(straight, 3)
    for name in {name for name in straight if not name.endswith("seconds")}:
        assert straight[name] == pytest.approx(resumed[name], abs=0, rel=0, nan_ok=True), name
