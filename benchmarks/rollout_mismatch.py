"""How far a low-precision rollout copy is from the trainer: routing flips, log-prob gaps and KL, per MoE layer and
overall, for toy MoEs of growing depth (L) and granularity (E experts, top-K) at the same active compute.

    .venv/bin/python benchmarks/rollout_mismatch.py                                # all 9 shapes, ~30 min on 1 thread
    .venv/bin/python benchmarks/rollout_mismatch.py --shapes 4x8x2 8x32x4 --no-warm-start

Each shape LxExK gets expert width 512/K (K experts of 512/K: the same active MLP compute as the default toy's
top-2 of 256) and the default toy's other sizes (D 128, 8 heads). Its trainer is the toy warm-started on `a+b=`
exactly as `python -m minirspo.train` would (until 10% held-out accuracy, at most --warm-start-steps steps, cached
under --warmstart-dir); a shape whose warm start does not reach 10% is measured at its random initialisation
instead, and the table says so. For each rollout precision the engine (minirspo.rollout, the RL loop's own) samples
--prompts held-out prompts once each at temperature 0.7 from its copy and records what it saw; the trainer (float32)
then scores the same tokens, as the RL loop's π_old does (loss.rollout_mismatch_metrics):
    sets differ   share of (response token, MoE layer) top-K expert sets the trainer's router picks differently
    tokens flip   share of response tokens with at least one such layer
    |Δ log p|     mean |log π_old − log μ| of the sampled tokens (max in brackets)
    KL            k3 estimate of KL(μ ‖ π_old) per token
    per layer     "sets differ" of each MoE layer, first to last
Rollout fp8+router also quantizes the routers' weights, which the RL loop's fp8 copy (like vLLM) keeps in bf16.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirspo.config import RLConfig  # noqa: E402
from minirspo.loss import rollout_mismatch_metrics, routing_flips  # noqa: E402
from minirspo.policy import ToyPolicy  # noqa: E402
from minirspo.rollout import BuiltinEngine, LowPrecisionCopy  # noqa: E402
from minirspo.warmstart import warm_start, warm_start_dir  # noqa: E402
from toy_moe.checkpoint import load_toy_checkpoint  # noqa: E402
from toy_moe.model import ToyMoE, ToyMoEConfig  # noqa: E402
from toy_moe.pretrain import PretrainConfig  # noqa: E402
from toy_moe.tokenizer import load_tokenizer  # noqa: E402

SHAPES = ("4x8x2", "4x32x4", "4x64x8", "8x8x2", "8x32x4", "8x64x8", "16x8x2", "16x32x4", "16x64x8")


def shape_config(shape: str) -> ToyMoEConfig:
    n_layers, n_experts, top_k = (int(part) for part in shape.split("x"))
    return ToyMoEConfig(n_layers=n_layers, n_experts=n_experts, top_k=top_k, expert_hidden=512 // top_k, n_heads=8)


def warm_started_accuracy(run_config: RLConfig) -> float | None:
    """The last held-out accuracy the cached warm start logged (None if it logged none)."""
    logs = sorted(warm_start_dir(run_config).glob("logs/**/metrics.csv"))
    rows = [row for path in logs for row in csv.DictReader(path.open()) if row.get("val/accuracy")]
    return float(rows[-1]["val/accuracy"]) if rows else None


def trainer_policy(shape: str, args) -> tuple[ToyPolicy, str]:
    """The shape's warm start if it reaches 10%, else its random initialisation; and which one, in words."""
    model_config = shape_config(shape)
    if args.warm_start:
        pretrain = PretrainConfig(eval_every=10, stop_at_accuracy=0.10, max_steps=args.warm_start_steps,
                                  model=model_config, progress_bar=False)
        run_config = RLConfig(warmstart_dir=args.warmstart_dir, seed=args.seed, pretrain=pretrain)
        path = warm_start(run_config)
        accuracy = warm_started_accuracy(run_config)
        if accuracy is not None and accuracy > 0.10:
            model, tokenizer = load_toy_checkpoint(path)
            return ToyPolicy(model.eval(), tokenizer), f"warm start ({accuracy:.0%})"
        reason = f"random init (warm start {accuracy:.0%} after {args.warm_start_steps} steps)"
    else:
        reason = "random init"
    torch.manual_seed(args.seed)
    return ToyPolicy(ToyMoE(model_config).eval(), load_tokenizer()), reason


@torch.no_grad()
def measure(policy: ToyPolicy, precision: str, args) -> dict[str, object]:
    task = RLConfig().build_task()
    problems = task.eval_set(args.prompts)
    prompt_ids, prompt_mask = policy.encode_prompts([problem.prompt for problem in problems])    # (B, P)
    engine = BuiltinEngine(policy, precision.removesuffix("+router"))
    if precision == "fp8+router":  # the routers quantized too, which engines do not do (a stronger lever)
        engine.copy = LowPrecisionCopy(policy, "fp8", fp8_routers=True)
    engine.sync()
    samples = engine.sample(prompt_ids, prompt_mask, max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=1.0,
                            generator=torch.Generator().manual_seed(args.seed), record="tokens")
    scores = policy.score(prompt_ids, prompt_mask, samples.tokens, samples.mask, temperature=0.7)
    metrics = rollout_mismatch_metrics(scores.logprobs, samples.logprobs, samples.mask, scores.router_logits,
                                       samples.topk_idx)
    flips = routing_flips(scores.router_logits, samples.topk_idx, samples.mask)                  # (L, B, N)
    per_layer = flips.float().sum(dim=(1, 2)) / samples.mask.sum().clamp(min=1)                 # (L,)
    return {name: float(value) for name, value in metrics.items()} | {"per_layer": per_layer.tolist(),
                                                                       "tokens": int(samples.mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="LxExK shapes (default: all nine)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16", "fp8", "fp8+router"],
                        choices=["bf16", "fp16", "fp8", "fp8+router"],
                        help="fp8+router: the routers' weights quantized to e4m3 too, which engines do not do")
    parser.add_argument("--prompts", type=int, default=256, help="held-out a+b= prompts, one response each")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="response length limit (the RL default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the warm start, the random init and sampling")
    parser.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                        help="warm-start each shape as the RL loop does (default), or measure random inits")
    parser.add_argument("--warm-start-steps", type=int, default=600, help="the warm start's step limit")
    parser.add_argument("--warmstart-dir", default="runs/warmstart", help="the warm-start cache")
    args = parser.parse_args()
    for shape in args.shapes:
        parts = shape.split("x")
        if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts) or 512 % int(parts[2]):
            parser.error(f"--shapes: got {shape!r}; expected LxExK with K dividing 512, e.g. 8x32x4")
    if args.prompts < 1 or args.max_new_tokens < 1:
        parser.error("--prompts and --max-new-tokens: expected whole numbers >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.prompts} prompts x 1 response, "
          f"<= {args.max_new_tokens} tokens, temperature 0.7, seed {args.seed}\n")
    print("| L×E×K | trainer | rollout | sets differ | tokens flip | |Δ log p| mean (max) | KL(μ‖π_old) | per layer (sets differ, %) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        started = time.perf_counter()
        policy, origin = trainer_policy(shape, args)
        for precision in args.precisions:
            m = measure(policy, precision, args)
            layers = " ".join(f"{100 * share:.1f}" for share in m["per_layer"])
            print(f"| {shape.replace('x', '×')} | {origin} | {precision} | {m['rollout_routing_mismatch']:.2%} | "
                  f"{m['rollout_tokens_flipped']:.1%} | {m['rollout_logprob_diff_mean']:.4f} "
                  f"({m['rollout_logprob_diff_max']:.3f}) | {m['rollout_kl']:.1e} | {layers} |", flush=True)
        print(f"<!-- {shape}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
