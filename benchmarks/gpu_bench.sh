#!/usr/bin/env bash
# The GPU half of the throughput benchmarks in one run (sized for ~8 minutes on one H100/H200, ~13 with vllm):
#   1. trl_bench at qwen3-0.7b (hidden 1024, 12 layers, 64 experts top-8, 32k vocabulary; 0.16B active),
#      256 new tokens, bf16 autocast: TRL's GRPOTrainer against minirspo, s / RL step by phase, sampled
#      tokens/s, and the update phase's TFLOP/s and MFU;
#   2. rs_cost_bench at a fine-grained shape (24 layers, hidden 1024, 64 experts top-8, 64 sequences × up to
#      512 response tokens): GMPO without router diagnostics against RSPO, step time and peak GPU memory;
#   3. vllm_bench at 0.7B (hidden 1024, 12 layers, 64 experts top-8, 32k vocabulary), 256 responses × 256 new
#      tokens: rollout seconds with vLLM against the built-in decode, when the image can import vllm (it says
#      so plainly and skips this part when it cannot).
# Each table goes to the terminal and to $OUT (default runs/gpu_bench).
#
#   bash benchmarks/gpu_bench.sh          # on the GPU machine
#   bash benchmarks/gpu_bench.sh --cpu    # dry run of the same code paths at toy sizes on CPU (~3 minutes)
#
# Python: $PYTHON, else .venv/bin/python, else python3. An image without TRL or tyro gets them from wheels in
# .whl/ (`make gpu-wheels` downloads them, for Python 3.12; copy the folder along), installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import trl, tyro" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
    TRL_ARGS=(--device cpu --workloads toy/16 --rounds 1 --steps 3)
    RS_ARGS=(--device cpu --layers 2 --experts 8 --top-k 2 --sequences 8 --response 16 --rounds 1 --steps 3)
    VLLM_ARGS=(--device cpu --hidden 128 --layers 2 --experts 8 --top-k 2 --expert-hidden 64 --heads 2
               --prompts 4 --group 4 --new-tokens 16 --rounds 2)
else
    MODE=gpu
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    TRL_ARGS=(--device cuda --workloads qwen3-0.7b/256 --rounds 1 --steps 4)
    RS_ARGS=(--device cuda --layers 24 --hidden 1024 --experts 64 --top-k 8 --expert-hidden 256 --sequences 64
             --response 512 --rounds 1 --steps 3)
    VLLM_ARGS=(--device cuda --hidden 1024 --layers 12 --experts 64 --top-k 8 --expert-hidden 256 --heads 8
               --vocab 32000 --prompts 32 --group 8 --new-tokens 256 --rounds 3)
fi
"$PYTHON" -c "import torch, transformers, trl; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| trl', trl.__version__, '| cuda', torch.cuda.is_available())"

timeout 330 "$PYTHON" benchmarks/trl_bench.py "${TRL_ARGS[@]}" 2>&1 | tee "$OUT/trl_bench-$MODE.md" || echo "trl_bench failed"
timeout 200 "$PYTHON" benchmarks/rs_cost_bench.py "${RS_ARGS[@]}" 2>&1 | tee "$OUT/rs_cost_bench-$MODE.md" || echo "rs_cost_bench failed"
if "$PYTHON" -c "import vllm" 2> /dev/null; then
    timeout 300 "$PYTHON" benchmarks/vllm_bench.py "${VLLM_ARGS[@]}" 2>&1 | tee "$OUT/vllm_bench-$MODE.md" || echo "vllm_bench failed"
else
    echo "vllm_bench skipped: this image cannot import vllm (pip install vllm on a GPU image; make setup VLLM=1 on CPU)" \
        | tee "$OUT/vllm_bench-$MODE.md"
fi
