"""Rollout seconds with vLLM against the built-in decode: the same prompts, sizes and sampling settings.

    .venv/bin/python benchmarks/vllm_bench.py                                   # CPU: qwen3-moe at hidden 256
    .venv/bin/python benchmarks/vllm_bench.py --hidden 1024 --layers 12 --experts 64 --top-k 8 \\
        --expert-hidden 256 --new-tokens 512 --prompts 64 --device cuda        # what gpu_bench.sh runs

One rollout: --prompts arithmetic prompts × --group responses, temperature 1, up to --new-tokens tokens, on a
random-init Qwen3-MoE (it rarely stops early, so nearly every row runs every step). `builtin` is the RL loop's own
KV-cache decode on the trainer's float32 (GPU: bf16) model with log μ recorded, as `--rollout-precision` runs it;
`vllm` is `VLLMEngine` at the same precision (engine start and its warm-up calls are reported apart, not timed
with the rollouts). Rounds alternate between the two; the table gives medians and the paired ratio. Needs vllm
(`make setup VLLM=1` on CPU; a GPU image with vllm for --device cuda).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minirspo.policy import load_policy  # noqa: E402
from minirspo.rollout import BuiltinEngine  # noqa: E402
from minirspo.tasks import make_task  # noqa: E402
from minirspo.testing import make_tiny_hf_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary (0: the toy tokenizer's 512)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if min(args.hidden, args.layers, args.experts, args.top_k, args.prompts, args.group, args.new_tokens, args.rounds) < 1:
        parser.error("every size must be a whole number >= 1")
    if args.hidden // args.heads < 32:
        parser.error(f"--hidden / --heads = {args.hidden // args.heads}: vLLM's CPU attention needs head dims of 32 and up")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    try:
        from minirspo.rollout.vllm_engine import VLLMEngine
    except ImportError as error:
        sys.exit(f"error: vllm cannot be imported ({error}); make setup VLLM=1 installs vLLM's CPU build")
    folder = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    model = make_tiny_hf_checkpoint(folder / "model", "qwen3_moe", hidden_size=args.hidden, n_layers=args.layers,
                                    n_heads=args.heads, n_experts=args.experts, top_k=args.top_k,
                                    expert_hidden=args.expert_hidden, vocab_size=args.vocab or None)
    policy = load_policy(f"hf:{model}")
    precision = "32"
    if args.device == "cuda":
        policy.model.to("cuda", torch.bfloat16)
        precision = "bf16"
    problems = make_task("arithmetic").sample(args.prompts, seed=0, split="train")
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems for _ in range(args.group)])
    sampling = dict(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, record="tokens")
    builtin, vllm = BuiltinEngine(policy, "32"), VLLMEngine(policy, precision)
    started = time.perf_counter()
    vllm.sync()
    start_seconds = time.perf_counter() - started
    warmups = []
    for _ in range(2):  # the first calls compile and allocate; they are not a rollout's cost
        started = time.perf_counter()
        vllm.sample(prompt_ids, prompt_mask, generator=torch.Generator(device=prompt_ids.device), **sampling)
        warmups.append(time.perf_counter() - started)
    builtin.sample(prompt_ids, prompt_mask, generator=torch.Generator(device=prompt_ids.device), **sampling)
    times = {"builtin": [], "vllm": []}
    tokens = {"builtin": [], "vllm": []}
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for name, engine in ((("builtin", builtin), ("vllm", vllm)) if round_ % 2 == 0 else (("vllm", vllm), ("builtin", builtin))):
            generator = torch.Generator(device=prompt_ids.device).manual_seed(round_)
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            samples = engine.sample(prompt_ids, prompt_mask, generator=generator, **sampling)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
            tokens[name].append(int(samples.mask.sum()))
    load_after = os.getloadavg()
    vllm.close()
    print(f"Qwen3-MoE random init: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k} "
          f"(width {args.expert_hidden}); {args.prompts} prompts × {args.group} responses, <= {args.new_tokens} new tokens, "
          f"temperature 1; {args.device}, precision {precision}, torch threads {torch.get_num_threads()}; "
          f"{args.rounds} rounds; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"vLLM engine start {start_seconds:.1f} s; warm-up calls {', '.join(f'{s:.1f}' for s in warmups)} s\n")
    print("| engine | rollout s (median) | sampled tokens / s | × builtin (paired, median) |")
    print("|---|---:|---:|---:|")
    for name in times:
        seconds = statistics.median(times[name])
        rate = statistics.median(t / s for t, s in zip(tokens[name], times[name]))
        ratio = statistics.median(v / b for v, b in zip(times[name], times["builtin"]))
        print(f"| {name} | {seconds:.3f} | {rate:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
