"""HFPolicy's decode loop against HF `generate`: what sampling a rollout costs each way.

`HFPolicy.generate` samples with a loop of its own (`ChunkedLogprobLM.sample`): one prefill per distinct
prompt, then per step the decoder on one token per row, the head, and `pick_tokens`, the KV cache
appending in place (`GrowingCache`). This times one rollout of the trl_bench workload (16 arithmetic prompts ×
8 responses, temperature 1, a random-init Qwen3-MoE that never stops early, so every row runs every step) in
three ways, interleaved round by round, and reports medians and paired ratios:

    generate       HF `generate(do_sample=True, top_k=0, suppress_tokens=banned)`, as TRL calls it
    loop, dynamic  our loop with HF's `DynamicCache` (which concatenates the cache every step)
    loop           our loop as shipped (`GrowingCache`)

Examples:
    .venv/bin/python benchmarks/decode_bench.py                         # qwen3-14m, 16 and 64 new tokens
    .venv/bin/python benchmarks/decode_bench.py --new-tokens 256 --rounds 5
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import minirspo.policy.kv_cache
from minirspo.policy import load_policy
from minirspo.tasks import make_task
from minirspo.testing import make_tiny_hf_checkpoint

QWEN3_14M = dict(hidden_size=256, n_layers=4, n_heads=4, n_experts=8, top_k=2, expert_hidden=512)  # as trl_bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64], help="response lengths (default 16 64)")
    parser.add_argument("--rounds", type=int, default=15, help="rollouts timed each way per length (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or min(args.new_tokens) < 1 or args.threads < 1:
        sys.exit("error: need --rounds >= 2, --new-tokens >= 1 and --threads >= 1")
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as root:
        policy = load_policy(f"hf:{make_tiny_hf_checkpoint(Path(root) / 'qwen3-14m', 'qwen3_moe', **QWEN3_14M)}")
    problems = [p for p in make_task("arithmetic").sample(16, seed=1) for _ in range(8)]
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])      # (128, P)
    lm = policy.model.lm

    def hf_generate(new_tokens: int, seed: int) -> None:
        torch.manual_seed(seed)
        lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True, temperature=1.0,
                    top_k=0, max_new_tokens=new_tokens, suppress_tokens=list(policy.banned),
                    eos_token_id=list(policy.stop_ids), pad_token_id=policy.pad_id)

    def loop(cache_class):
        def sample(new_tokens: int, seed: int) -> None:
            minirspo.policy.kv_cache.GrowingCache = cache_class  # the loop imports it at each call
            policy.generate(prompt_ids, prompt_mask, max_new_tokens=new_tokens,
                            generator=torch.Generator().manual_seed(seed))
        return sample

    ways = {"generate": hf_generate, "loop, dynamic": loop(DynamicCache),
            "loop": loop(minirspo.policy.kv_cache.GrowingCache)}
    print(f"qwen3-14m, {len(problems)} rows, {args.threads} threads, {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.2f} before")
    print("| new tokens | way | ms / rollout | × generate's time (paired median) |\n|---:|---|---:|---:|")
    for new_tokens in args.new_tokens:
        seconds = {way: [] for way in ways}
        with torch.no_grad():
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for way, sample in (ways.items() if round_ % 2 else reversed(ways.items())):
                    started = time.perf_counter()
                    sample(new_tokens, round_)
                    if round_:
                        seconds[way].append(time.perf_counter() - started)
        for way, times in seconds.items():
            ratio = statistics.median(t / g for t, g in zip(times, seconds["generate"]))
            print(f"| {new_tokens} | {way} | {statistics.median(times) * 1e3:.0f} | {ratio:.2f}× |")
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
