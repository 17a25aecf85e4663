"""What the RL loop saves by sampling the toy MoE without recording log-probs and routing.

`toy_moe.generate(..., record=False)` (what `ToyPolicy.generate` uses, since the loop re-scores every
rollout) skips the sampled tokens' log-probs, every layer's top-K routing and the forward that would route
the last token. This times one default rollout (32 prompts × 8 responses, up to 8 new tokens, T 0.7) both
ways from the same generator state, alternating, and reports the medians and the paired ratio.

Examples:
    python benchmarks/rollout_record_bench.py --model runs/warmstart/arithmetic-HASH/model.pt
    OMP_NUM_THREADS=1 python benchmarks/rollout_record_bench.py --model PATH --rounds 80
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from minirspo.policy.toy import ToyPolicy
from minirspo.tasks import make_task
from toy_moe.generate import generate
from toy_moe.checkpoint import load_toy_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a toy MoE checkpoint (model.pt) trained on a+b=")
    parser.add_argument("--rounds", type=int, default=40, help="rollouts timed each way (default 40)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        sys.exit(f"error: checkpoint not found: {args.model}")
    if args.rounds < 2:
        sys.exit("error: --rounds must be >= 2")
    model, tokenizer = load_toy_checkpoint(args.model)
    policy = ToyPolicy(model, tokenizer)
    problems = [p for p in make_task("arithmetic").sample(32, seed=1) for _ in range(8)]
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])  # (256, P)
    options = dict(max_new_tokens=8, temperature=0.7, stop_tokens=(tokenizer.eos_id,), banned_tokens=policy.banned,
                   pad_id=tokenizer.pad_id)
    seconds = {True: [], False: []}
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for round_ in range(args.rounds):
            for record in (True, False):
                started = time.perf_counter()
                generate(model, prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(round_), record=record,
                         **options)
                seconds[record].append(time.perf_counter() - started)
    ratios = [bare / recorded for bare, recorded in zip(seconds[False], seconds[True])]
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"record=True {statistics.median(seconds[True]) * 1e3:.1f} ms, record=False "
          f"{statistics.median(seconds[False]) * 1e3:.1f} ms per rollout; paired ratio median "
          f"{statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}); "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
