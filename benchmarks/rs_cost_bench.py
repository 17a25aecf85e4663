"""What router-shift weighting costs in an RL step: GMPO without router diagnostics against RSPO, at a fine-grained
MoE shape (many layers, 64 experts, top-8, responses of a few hundred tokens), scaled to fit a CPU.

    .venv/bin/python benchmarks/rs_cost_bench.py                      # 2 threads, 3 rounds, a few minutes
    .venv/bin/python benchmarks/rs_cost_bench.py --layers 24 --response 512 --threads 1 --rounds 2
    python3 benchmarks/rs_cost_bench.py --device cuda --layers 24 --hidden 1024 --expert-hidden 256 --sequences 64

RSPO is GMPO plus γ: per minibatch, the old policy's top-K experts and router log-probs at the response tokens
are kept ((L, B, N, K): int64 + float32, 12 bytes each), and every update computes γ from the training forward's
router logits (no gradient) and floors and multiplies it into the token weights. `--no-router-diagnostics`
makes GMPO do none of that, so the difference between the two rows is RS's own cost; a third row, GMPO with the
default diagnostics (γ and routing consistency measured but not used), shows what the diagnostics cost.

The workload is the RL loop's update phase through `minirspo.train.run`: a fixed rollout (random ordinary
tokens, response lengths drawn between N/2 and N, random rewards; sampling is the same for every loss, so it is
left out, which makes RS's share of the step larger than in a full step), scored as the old policy and trained
in 2 minibatches, so the second is off-policy. Each run is a fresh process (its peak resident memory is its
own); runs alternate between the variants in rounds, and step times are medians over rounds (the first step of
each run is warm-up). `seconds` is the RL step as metrics.csv logs it. `--device cuda` trains in bf16 autocast
(`--precision bf16-mixed`) and reports the peak GPU memory allocated instead of the peak resident memory.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"gmpo": dict(loss="gmpo", router_diagnostics=False), "rspo": dict(loss="rspo"),
            "gmpo+diag": dict(loss="gmpo", router_diagnostics=True)}


def worker(variant: str, model: str, sequences: int, response: int, steps: int, threads: int, device: str,
           result: str) -> None:
    import torch
    torch.set_num_threads(threads)
    import minirspo.train
    from minirspo.config import RLConfig
    from minirspo.loss import group_advantages, zero_variance_groups
    from minirspo.module import Minibatch, RLModule
    from minirspo.policy import Samples
    from minirspo.report import read_metrics
    router_state = []

    class FixedRollout(RLModule):
        def collect_rollouts(self, step):
            cfg = self.config
            generator = torch.Generator().manual_seed(step)
            problems = self.task.sample(cfg.n_prompts, seed=step, split="train")
            repeated = [p for p in problems for _ in range(cfg.group_size)]
            tokens = torch.randint(0, 500, (len(repeated), response), generator=generator)            # (B, N)
            lengths = torch.randint(response // 2, response + 1, (len(repeated),), generator=generator)  # (B,)
            mask = torch.arange(response)[None, :] < lengths[:, None]                                  # (B, N)
            rewards = torch.rand(len(repeated), generator=generator)                                   # (B,)
            advantages = group_advantages(rewards, cfg.group_size)                                     # (B,)
            tokens, mask, advantages = (t.to(self.device) for t in (tokens, mask, advantages))
            prompt_ids, prompt_mask = self.policy.encode_prompts([p.prompt for p in repeated])
            size = cfg.minibatch_size
            minibatches = [Minibatch(prompt_ids[i:i + size], prompt_mask[i:i + size], tokens[i:i + size],
                                     mask[i:i + size], advantages[i:i + size], Samples(tokens[i:i + size], mask[i:i + size]))
                           for i in range(0, len(repeated), size)]
            return minibatches, {"reward_mean": rewards.mean(), "response_len": lengths.float().mean(),
                                 "zero_variance_frac": zero_variance_groups(rewards, cfg.group_size) / cfg.n_prompts}

        def score_old(self, mb):
            old = super().score_old(mb)
            router_state.append(sum(t.untyped_storage().nbytes() for t in (old.topk_idx, old.topk_logprobs, old.routing)
                                    if t is not None))
            return old

        def evaluate(self):  # held-out accuracy is timed apart and means nothing on random tokens
            return torch.tensor(0.0)

    with tempfile.TemporaryDirectory() as out:
        config = RLConfig(model=f"hf:{model}", out=out, n_prompts=sequences // 4, group_size=4,
                          minibatch_size=sequences // 2, max_new_tokens=response, max_steps=steps, eval_every=0,
                          checkpoint_every=10_000, accelerator="gpu" if device == "cuda" else "cpu",
                          precision="bf16-mixed" if device == "cuda" else "32-true", **VARIANTS[variant])
        minirspo.train.RLModule = FixedRollout
        minirspo.train.run(config)
        # step 0 is warm-up; the row after the last step holds only the final evaluation (no seconds)
        seconds = [s for s in read_metrics(Path(out) / "metrics.csv")["seconds"][1:] if not math.isnan(s)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()  # bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    Path(result).write_text(json.dumps({"seconds": seconds, "peak_rss": peak,
                                        "router_state": max(router_state)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--expert-hidden", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=16, help="B per RL step (groups of 4, 2 minibatches)")
    parser.add_argument("--response", type=int, default=256, help="N, response tokens")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: float32, peak resident memory; cuda: bf16 autocast, peak GPU memory allocated")
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        sys.exit("error: need --steps >= 2 (the first is not timed) and --rounds >= 1")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no GPU")
    from minirspo.testing import make_tiny_hf_checkpoint

    root = Path(tempfile.mkdtemp(prefix="rs_cost_bench_"))
    model = make_tiny_hf_checkpoint(root / "model", "qwen3_moe", hidden_size=args.hidden, n_layers=args.layers,
                                    n_heads=4, n_experts=args.experts, top_k=args.top_k,
                                    expert_hidden=args.expert_hidden, norm_topk_prob=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for variant in list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]:
            result = root / f"{variant}.json"
            done = subprocess.run([sys.executable, __file__, "--worker", variant, str(model), str(args.sequences),
                                   str(args.response), str(args.steps), str(args.threads), args.device, str(result)],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            runs.setdefault(variant, []).append(json.loads(result.read_text()))
            print(f"round {round_ + 1} {variant}: {statistics.median(runs[variant][-1]['seconds']):.2f} s/step", flush=True)
    load_after = os.getloadavg()

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    print(f"\nQwen3-MoE random init: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.top_k} "
          f"(expert width {args.expert_hidden}), vocab {config.vocab_size}; {args.sequences} sequences × up to "
          f"{args.response} response tokens per RL step in 2 minibatches; {args.device}, {args.threads} threads; {args.rounds} rounds × "
          f"{args.steps - 1} timed steps; 1/5/15-min load average {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f} before, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after\n")
    bound = args.layers * (args.sequences // 2) * args.response * args.top_k * 12
    base = statistics.median(s for run in runs["gmpo"] for s in run["seconds"])
    base_peak = statistics.median(run["peak_rss"] for run in runs["gmpo"])
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"| variant | s / RL step | × GMPO | {memory} | vs GMPO | router state per minibatch | bound L·B·N·K·12 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, variant_runs in runs.items():
        seconds = statistics.median(s for run in variant_runs for s in run["seconds"])
        peak = statistics.median(run["peak_rss"] for run in variant_runs)
        state = max(run["router_state"] for run in variant_runs)
        print(f"| {variant} | {seconds:.3f} | {seconds / base:.3f} | {peak / 2**20:,.0f} MiB | "
              f"{(peak - base_peak) / 2**20:+,.0f} MiB | {state / 2**20:.2f} MiB | {bound / 2**20:.2f} MiB |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        variant, model, sequences, response, steps, threads, device, result = sys.argv[2:]
        worker(variant, model, int(sequences), int(response), int(steps), int(threads), device, result)
    else:
        main()
