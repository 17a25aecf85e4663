"""One GRPO workload in TRL's GRPOTrainer and in minirspo, interleaved: seconds per RL step, phases, tokens/s.

    .venv/bin/pip install -e ".[bench]"                  # TRL (an optional extra, never a runtime dependency)
    .venv/bin/python benchmarks/trl_bench.py             # 2 threads each, 3 rounds, about 10 minutes on 2 idle cores
    .venv/bin/python benchmarks/trl_bench.py --rounds 1 --steps 3 --workloads qwen3-14m/16
    python3 benchmarks/trl_bench.py --device cuda --workloads qwen3-0.7b/256 --rounds 1   # a GPU (gpu_bench.sh)

The workload (issue 15): a random-init Qwen3-MoE saved locally (`minirspo.testing.make_tiny_hf_checkpoint`, the
toy BPE tokenizer as an HF tokenizer), G=8 responses to each of 16 arithmetic prompts per RL step, temperature 1,
no top-p/top-k, the rollout split into 2 optimiser steps of 64 sequences, GRPO's clipped token ratios averaged
per sequence (TRL `loss_type="grpo"`, minirspo `--loss grpo`), no KL term, float32, no activation
checkpointing, `torch.set_num_threads(threads)` in each process. The old policy's log-probs come from a no-grad
forward on both sides (TRL computes them because a generation feeds 2 optimiser steps).

Workloads: `qwen3-14m` (hidden 256, 4 layers, 8 experts top-2, expert width 512: 13.9M parameters) and `toy`
(the toy MoE's size: hidden 128, 4 layers, 8 experts top-2, expert width 256), with 16 or 64 new tokens; for a
GPU `qwen3-0.7b` (hidden 1024, 12 layers, 64 experts top-8, expert width 256, 32k vocabulary: 0.72B parameters,
0.16B active). `update TFLOP/s` is 6 × active parameters (the input embedding excluded, experts counted
top_k/E) × prompt-and-response tokens per row, over the update seconds; both tools get the same count for the
same rollout, so a tool that does less work for it (prompts shared per group) shows a higher figure.
`--device cuda` runs both tools in bf16 autocast over float32 weights (minirspo `--precision bf16-mixed`, TRL
`bf16=True`), synchronises the GPU at every phase boundary, and adds the update phase's model FLOP
utilisation against the GPU's dense bf16 peak (`--peak-tflops`, 989 for an H100/H200 SXM).

Each run is a fresh subprocess (one tool, one workload), and runs alternate between the tools in rounds so that
load from other processes hits both. The same prompts reach both: TRL is given the problems minirspo samples at
each step, in order and unshuffled, and the prompt token ids each side generates from are checked equal.

Timing: wall time between the ends of consecutive RL steps (TRL: every 2nd optimiser step; minirspo: every
Lightning training step), so each side's own loop overhead counts; the first step (warm-up) and minirspo's last
(it holds the end-of-run evaluation) are not timed. Phases: `generate` is sampling and decoding (TRL's
`_generate`, minirspo's `collect_rollouts`), `old log-probs` the no-grad scoring, `updates` the rest (forward,
backward, optimiser, rewards, bookkeeping). Completion tokens/s counts response tokens through the first stop
token. minirspo runs with `--no-router-diagnostics` (TRL computes no router statistics) and, as a third row of the
first workload, with them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"qwen3-14m": dict(hidden_size=256, n_layers=4, n_heads=4, n_experts=8, top_k=2, expert_hidden=512),
         "toy": dict(hidden_size=128, n_layers=4, n_heads=4, n_experts=8, top_k=2, expert_hidden=256),
         "qwen3-0.7b": dict(hidden_size=1024, n_layers=12, n_heads=16, n_experts=64, top_k=8, expert_hidden=256,
                            vocab_size=32768)}
N_PROMPTS, GROUP, MINIBATCH, SEED = 16, 8, 64, 0
TOOLS = ("trl", "minirspo", "minirspo+diag")


# --- one run (a subprocess) ----------------------------------------------------------------------------
def problems_of_step(task, step: int):
    from minirspo.module import step_seed
    return task.sample(N_PROMPTS, seed=step_seed(SEED, step), split="train")


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a phase's time is its own (no-op on CPU)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_minirspo(model: Path, new_tokens: int, steps: int, out: Path, diagnostics: bool, device: str) -> dict:
    import minirspo.train
    from minirspo.config import RLConfig
    from minirspo.module import RLModule
    record = {"ends": [], "generate": [], "old": [], "tokens": [], "prompt_ids": []}

    class TimedModule(RLModule):
        def training_step(self, batch, batch_idx):
            record["generate"].append(0.0)
            record["old"].append(0.0)
            super().training_step(batch, batch_idx)
            synchronize()
            record["ends"].append(time.perf_counter())

        def collect_rollouts(self, step):
            started = time.perf_counter()
            minibatches, stats = super().collect_rollouts(step)
            synchronize()
            record["generate"][-1] += time.perf_counter() - started
            record["tokens"].append(int(sum(int(mb.mask.sum()) for mb in minibatches)))
            record["prompt_ids"].append([ids[mask].tolist() for mb in minibatches
                                         for ids, mask in zip(mb.prompt_ids, mb.prompt_mask)])
            return minibatches, stats

        def score_old(self, mb):
            synchronize()
            started = time.perf_counter()
            old = super().score_old(mb)
            synchronize()
            record["old"][-1] += time.perf_counter() - started
            return old

    config = RLConfig(model=f"hf:{model}", out=str(out), loss="grpo", n_prompts=N_PROMPTS, group_size=GROUP,
                      minibatch_size=MINIBATCH, max_new_tokens=new_tokens, max_steps=steps + 1, eval_every=0,
                      eval_size=8, checkpoint_every=10_000, seed=SEED, accelerator="gpu" if device == "cuda" else "cpu",
                      precision="bf16-mixed" if device == "cuda" else "32-true",
                      resample_rounds=0, scale_advantages=True,  # one sampling round, GRPO's Â, as TRL
                      router_diagnostics=diagnostics)
    minirspo.train.RLModule = TimedModule
    minirspo.train.run(config)
    return record


def run_trl(model: Path, new_tokens: int, steps: int, out: Path, device: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minirspo.tasks import make_task, score
    task = make_task("arithmetic")
    problems = [p for step in range(steps) for p in problems_of_step(task, step)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "index": i}
                                 for i, p in enumerate(problems)])

    def reward(completions, index, **kwargs):
        return score(task, [problems[i] for i in index], [c[0]["content"] for c in completions]).tolist()

    record = {"ends": [], "generate": [], "old": [], "tokens": [], "prompt_ids": []}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 2 == 0:  # an RL step is 2 optimiser steps
                synchronize()
                record["ends"].append(time.perf_counter())

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=MINIBATCH, num_generations=GROUP,
                      steps_per_generation=N_PROMPTS * GROUP // MINIBATCH, gradient_accumulation_steps=1,
                      num_iterations=1, max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                      beta=0.0, loss_type="grpo", learning_rate=2e-4, max_grad_norm=1.0,
                      max_steps=steps * N_PROMPTS * GROUP // MINIBATCH, shuffle_dataset=False, seed=SEED,
                      bf16=device == "cuda", fp16=False, use_cpu=device == "cpu", gradient_checkpointing=False, report_to="none",
                      save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = GRPOTrainer(model=lm, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[StepEnds()])
    generate, logprobs, tokenize = trainer._generate, trainer._get_per_token_logps_and_entropies, trainer._tokenize_prompts

    def timed_generate(prompts):
        record["generate"].append(0.0)
        record["old"].append(0.0)
        synchronize()
        started = time.perf_counter()
        out = generate(prompts)
        synchronize()
        record["generate"][-1] += time.perf_counter() - started
        record["tokens"].append(sum(len(ids) for ids in out[1]))
        return out

    def timed_logprobs(*args, **kwargs):
        if torch.is_grad_enabled():
            return logprobs(*args, **kwargs)
        synchronize()
        started = time.perf_counter()
        out = logprobs(*args, **kwargs)
        synchronize()
        record["old"][-1] += time.perf_counter() - started
        return out

    def recorded_tokenize(prompts):
        out = tokenize(prompts)
        record["prompt_ids"].append([list(ids) for ids in out[0]])
        return out

    trainer._generate, trainer._get_per_token_logps_and_entropies = timed_generate, timed_logprobs
    trainer._tokenize_prompts = recorded_tokenize
    trainer.train()
    return record


def worker(argv: list[str]) -> None:
    tool, model, new_tokens, steps, threads, device, result = argv
    import torch
    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as out:
        if tool == "trl":
            record = run_trl(Path(model), int(new_tokens), int(steps), Path(out), device)
        else:
            record = run_minirspo(Path(model), int(new_tokens), int(steps), Path(out), tool.endswith("diag"), device)
    Path(result).write_text(json.dumps(record))


# --- the comparison ------------------------------------------------------------------------------------
def timed_steps(record: dict, steps: int) -> list[dict]:
    """Steps 1 .. steps-2 of a run (0 is warm-up; minirspo's last holds its end-of-run evaluation)."""
    ends = record["ends"]
    return [{"seconds": ends[k] - ends[k - 1], "generate": record["generate"][k], "old": record["old"][k],
             "tokens": record["tokens"][k], "prompt_tokens": sum(map(len, record["prompt_ids"][k]))}
            for k in range(1, steps - 1)]


def active_parameters(model: Path) -> float:
    """Parameters one token passes through: all but the input embedding, the experts' scaled by top_k / E."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    embedding = lm.get_input_embeddings().weight
    share = config.num_experts_per_tok / config.num_experts
    return sum(p.numel() * (share if ".experts." in name else 1) for name, p in lm.named_parameters()
               if p is not embedding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="RL steps per run (the first and last are not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=["qwen3-14m/16", "toy/16", "qwen3-14m/64"],
                        help="SIZE/NEW_TOKENS, SIZE one of " + ", ".join(SIZES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: float32; cuda: bf16 autocast, phases synchronised, update-phase MFU reported")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (default 989: H100/H200 SXM)")
    args = parser.parse_args()
    for workload in args.workloads:
        size, _, new_tokens = workload.partition("/")
        if size not in SIZES or not new_tokens.isdigit() or int(new_tokens) < 1:
            sys.exit(f"error: workload {workload!r} must be SIZE/NEW_TOKENS, SIZE one of {', '.join(SIZES)}")
    if args.rounds < 1 or args.steps < 3:
        sys.exit("error: need --rounds >= 1 and --steps >= 3 (the first and last steps are not timed)")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no GPU")
    from minirspo.testing import make_tiny_hf_checkpoint

    root = Path(tempfile.mkdtemp(prefix="trl_bench_"))
    sizes = {workload.partition("/")[0] for workload in args.workloads}
    models = {size: make_tiny_hf_checkpoint(root / size, "qwen3_moe", **SIZES[size], norm_topk_prob=True)
              for size in sizes}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()
    results: dict[tuple[str, str], list[dict]] = {}
    for workload in args.workloads:
        size, new_tokens = workload.split("/")
        tools = TOOLS if workload == args.workloads[0] else TOOLS[:2]
        prompts = {}
        for round_ in range(args.rounds):
            for tool in tools if round_ % 2 == 0 else tools[::-1]:
                result = root / f"{tool}.json"
                done = subprocess.run([sys.executable, __file__, "--worker", tool, str(models[size]), new_tokens,
                                       str(args.steps + (tool != "trl")), str(args.threads), args.device,
                                       str(result)],
                                      env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{tool} on {workload} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                record = json.loads(result.read_text())
                prompts[tool] = record["prompt_ids"][:args.steps]
                results.setdefault((workload, tool), []).extend(timed_steps(record, args.steps + (tool != "trl")))
                print(f"{workload} round {round_ + 1} {tool}: "
                      f"{statistics.median(s['seconds'] for s in results[(workload, tool)][-args.steps + 2:]):.2f} s/step",
                      flush=True)
        first = prompts["trl"]
        assert all(ids == first for ids in prompts.values()), f"{workload}: the tools saw different prompt token ids"
    load_after = os.getloadavg()

    print(f"\n{args.rounds} rounds × {args.steps - 2} timed RL steps per tool and workload, {args.threads} threads, "
          f"medians; 1/5/15-min load average {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
          f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after; prompt token ids checked equal\n")
    gpu = args.device == "cuda"
    active = {size: active_parameters(model) for size, model in models.items()}
    print("| workload | tool | s / RL step | generate | old log-probs | updates | completion tokens/s "
          "| sampled tokens/s | × TRL throughput | update TFLOP/s |" + (" update MFU |" if gpu else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    for workload in args.workloads:
        size = workload.partition("/")[0]
        trl_seconds = statistics.median(s["seconds"] for s in results[(workload, "trl")])
        for tool in TOOLS:
            if (workload, tool) not in results:
                continue
            steps = results[(workload, tool)]
            seconds = statistics.median(s["seconds"] for s in steps)
            generate = statistics.median(s["generate"] for s in steps)
            old = statistics.median(s["old"] for s in steps)
            tokens = statistics.median(s["tokens"] / s["seconds"] for s in steps)
            sampling = statistics.median(s["tokens"] / s["generate"] for s in steps)
            row = (f"| {workload.replace('/', ', ')} new tokens | {tool} | {seconds:.3f} | {generate:.3f} | {old:.3f} | "
                   f"{seconds - generate - old:.3f} | {tokens:,.0f} | {sampling:,.0f} | {trl_seconds / seconds:.2f}× |")
            # 6 · active parameters · (prompt + response tokens): forward and backward, per second of updates
            tflops = statistics.median(6 * active[size] * (s["prompt_tokens"] + s["tokens"])
                                       / (s["seconds"] - s["generate"] - s["old"]) for s in steps) / 1e12
            row += f" {tflops:.3g} |" + (f" {tflops / args.peak_tflops:.0%} |" if gpu else "")
            print(row)
    print("\nactive parameters (input embedding excluded, experts × top_k / E): "
          + ", ".join(f"{size} {count / 1e6:,.1f}M" for size, count in active.items())
          + (f"; MFU against {args.peak_tflops:.0f} TFLOP/s" if gpu else ""))

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
