#!/usr/bin/env bash
# One short check for a lent GPU (under 5 minutes on one H100): RSPO steps of a small random-init HF MoE
# (Qwen3-MoE layout, ~0.3B parameters: hidden 768, 8 layers, 32 experts top-4, 32k vocabulary) with
# --strategy fsdp2 on one GPU, bf16-mixed, in its own process (and --strategy fsdp, to show it is refused with
# a clear error: see minirspo/distributed.py). Prints, per strategy, sampled tokens/s over whole RL steps (generate + score + 4 updates; steps with a greedy
# evaluation excluded), peak GPU memory, and the last step's loss, γ and gradient norm.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu        # dry run of the same code path: tiny model, fsdp2 on CPU/gloo
# Python: $PYTHON, else .venv/bin/python, else python3 (an image with torch, lightning, transformers >= 5,
# einops, tiktoken, rich, matplotlib); the repository need not be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu_check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu; STRATEGIES="fsdp2"
else
    MODE=gpu; STRATEGIES="fsdp fsdp2"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| lightning', lightning.__version__, '| cuda', torch.cuda.is_available())"

for STRATEGY in $STRATEGIES; do
    LOG="$OUT/$STRATEGY-$MODE.log"
    if timeout 200 "$PYTHON" - "$MODE" "$STRATEGY" "$OUT" > "$LOG" 2>&1 <<'EOF'
import csv, statistics, sys, time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from minirspo.config import RLConfig
from minirspo.testing import make_tiny_hf_checkpoint
from minirspo.train import run

hf_logging.disable_progress_bar()
mode, strategy, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
gpu = mode == "gpu"
model_size = (dict(hidden_size=768, n_layers=8, n_heads=12, n_experts=32, top_k=4, expert_hidden=384,
                   vocab_size=32768) if gpu else dict(vocab_size=2048))
checkpoint = out / f"model-{mode}"
if not (checkpoint / "config.json").is_file():
    make_tiny_hf_checkpoint(checkpoint, "qwen3_moe", norm_topk_prob=True, **model_size)
rl = (dict(n_prompts=32, group_size=8, minibatch_size=64, max_new_tokens=64, max_steps=5) if gpu else
      dict(n_prompts=4, group_size=2, minibatch_size=4, max_new_tokens=8, max_steps=3))
config = RLConfig(model=f"hf:{checkpoint}", out=str(out / f"{strategy}-{mode}"), strategy=strategy,
                  accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                  eval_size=16, eval_every=1000, checkpoint_every=1000, logprob_chunk_tokens=4096, **rl)
if gpu:
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
with open(run(config)) as file:
    rows = [row for row in csv.DictReader(file)]
wall = time.perf_counter() - started
timed = [row for row in rows if not row.get("accuracy")] or rows  # steps 0 and last also evaluate
tokens_per_s = statistics.median(config.n_prompts * config.group_size * float(row["response_len"])
                                 / float(row["seconds"]) for row in timed)
peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
last = rows[-1]
print(f"RESULT strategy={strategy} sampled_tokens_per_s={tokens_per_s:.0f} "
      f"step_s={statistics.median(float(row['seconds']) for row in timed):.2f} peak_gpu_mem_gib={peak:.2f} "
      f"loss={float(last['loss']):.4f} gamma_mean={float(last['gamma_mean']):.4f} "
      f"grad_norm={float(last['grad_norm']):.3f} wall_s={wall:.0f}", flush=True)
EOF
    then
        grep RESULT "$LOG"
    else
        echo "FAILED strategy=$STRATEGY (exit $?; 124 = over 200 s), last lines of $LOG:"
        tail -n 40 "$LOG"
    fi
done
