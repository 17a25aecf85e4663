"""The behaviour policy: who samples the rollouts, at which precision, and what it records.

    engine.py     `RolloutEngine`, the interface the RL loop talks to; `BuiltinEngine`, the policy's own
                  KV-cache decode on the trainer's model or on a low-precision copy; `join_rollouts`
    precision.py  `LowPrecisionCopy`: the engine's copy of the weights in bf16, fp16 or fp8 (e4m3, emulated)
    vllm_engine.py `VLLMEngine`: vLLM in this process, weights synced in place each step (make setup VLLM=1)
    export.py     the toy as the Hugging Face Mixtral it is, and any HF model's weights under checkpoint names

`make_engine(policy, engine, precision)` builds the one `--rollout-engine` and `--rollout-precision` ask for;
`check_rollout_engine` refuses what cannot run, before any work.
"""
import importlib.util
from typing import Literal, get_args

from minirspo.policy import Policy
from minirspo.rollout.engine import BuiltinEngine, RolloutEngine, join_rollouts, rows_of
from minirspo.rollout.precision import ROLLOUT_PRECISIONS, LowPrecisionCopy, RolloutPrecision

__all__ = ["BuiltinEngine", "LowPrecisionCopy", "ROLLOUT_ENGINES", "ROLLOUT_PRECISIONS", "RolloutEngine", "VLLM_PRECISIONS",
           "RolloutEngineName", "RolloutPrecision", "check_rollout_engine", "join_rollouts", "make_engine", "rows_of"]

RolloutEngineName = Literal["hf", "vllm"]  # hf: the built-in decode (toy or HF model); vllm: vLLM in this process
ROLLOUT_ENGINES = get_args(RolloutEngineName)
VLLM_PRECISIONS = ("32", "bf16", "fp16")


def check_rollout_engine(rollout_engine: str) -> None:
    """--rollout-engine: `hf`, the built-in decode, always runs; `vllm` needs the vllm package (make setup VLLM=1)."""
    if rollout_engine not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout_engine {rollout_engine!r}; choose one of {list(ROLLOUT_ENGINES)}")
    if rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("vllm needs the vllm package, which this environment lacks: `make setup VLLM=1` installs "
                         "vLLM's CPU build into .venv (a GPU machine: pip install vllm); --rollout-engine hf samples "
                         "with the built-in decode")


def make_engine(policy: Policy, engine: str = "hf", precision: str = "32", *, seed: int = 0) -> RolloutEngine:
    """The behaviour policy of a run: the built-in decode at `precision` ("32": the trainer's model), or vLLM."""
    check_rollout_engine(engine)
    if engine == "vllm":
        from minirspo.rollout.vllm_engine import VLLMEngine  # imports vllm only when asked for
        return VLLMEngine(policy, precision, seed=seed)
    return BuiltinEngine(policy, precision)
