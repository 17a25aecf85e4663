"""What a low-precision rollout copy costs in an RL step: the default run's step with rollouts sampled by the
trainer's own float32 model (--rollout-precision 32) against a bf16, fp16 or fp8 copy, and the copy's refresh.

    .venv/bin/python benchmarks/rollout_precision_bench.py                 # default toy, 2 threads, 3 rounds
    .venv/bin/python benchmarks/rollout_precision_bench.py --threads 1 --steps 8 --precisions 32 fp8

Each run is `python -m minirspo.train` on the default warm start (built first if missing, as `make train` would)
in a fresh process with the default settings but --max-steps (the first step is warm-up and not timed), no
held-out evaluation and no checkpoint; runs alternate between precisions in rounds; the table gives medians over
all timed steps. `seconds` is the RL step, `rollout_seconds` the sampling and rewarding inside it (at a precision
other than 32 also recording log μ and routing, which the mismatch metrics need), `rollout_sync_seconds` the
copy's in-place refresh from the trainer's weights. On a CPU a bf16/fp8 copy computes in bf16, which x86 CPUs
without AMX run no faster than float32, and fp8 is emulated (its values held in bf16): no speed to gain here.
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16", "fp8"], choices=["32", "bf16", "fp16", "fp8"])
    parser.add_argument("--steps", type=int, default=6, help="RL steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="", help="toy:FILE; empty: the default warm start")
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1 or args.threads < 1:
        parser.error("need --steps >= 2 (the first is not timed), --rounds >= 1 and --threads >= 1")
    from minirspo.config import RLConfig
    from minirspo.report import read_metrics
    from minirspo.warmstart import warm_start
    model = args.model or f"toy:{warm_start(RLConfig())}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    columns = ("seconds", "rollout_seconds", "rollout_sync_seconds")
    timings = {precision: {name: [] for name in columns} for precision in args.precisions}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds):
            for precision in args.precisions if round_ % 2 == 0 else args.precisions[::-1]:
                out = Path(root) / f"{precision}-{round_}"
                done = subprocess.run([sys.executable, "-m", "minirspo.train", "--model", model, "--out", str(out),
                                       "--max-steps", str(args.steps), "--eval-every", "0", "--eval-size", "8",
                                       "--checkpoint-every", "100000", "--rollout-precision", precision],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"--rollout-precision {precision} failed:\n{done.stderr[-3000:]}")
                metrics = read_metrics(out / "metrics.csv")
                for name in columns:  # step 0 is warm-up; the last row holds only the final evaluation
                    timings[precision][name] += [v for v in metrics[name][1:args.steps] if not math.isnan(v)]
                print(f"round {round_ + 1} {precision}: {statistics.median(timings[precision]['seconds']):.3f} s/step",
                      flush=True)
    load_after = os.getloadavg()
    print(f"\n{model}; default RL settings, {args.threads} threads, {args.rounds} rounds × {args.steps - 1} timed steps; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    base = statistics.median(timings[args.precisions[0]]["seconds"])
    print(f"| rollout precision | s / RL step | × {args.precisions[0]} | rollout s | copy refresh s |")
    print("|---|---:|---:|---:|---:|")
    for precision, values in timings.items():
        step = statistics.median(values["seconds"])
        print(f"| {precision} | {step:.3f} | {step / base:.2f} | {statistics.median(values['rollout_seconds']):.3f} | "
              f"{statistics.median(values['rollout_sync_seconds']):.4f} |")


if __name__ == "__main__":
    main()
