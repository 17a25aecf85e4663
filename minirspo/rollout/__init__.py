"""The behaviour policy: who samples the rollouts, at which precision, and what it records.

    engine.py     `RolloutEngine`, the interface the RL loop talks to; `BuiltinEngine`, the policy's own
                  KV-cache decode on the trainer's model or on a low-precision copy; `join_rollouts`
    precision.py  `LowPrecisionCopy`: the engine's copy of the weights in bf16, fp16 or fp8 (e4m3, emulated)

`make_engine(policy, engine, precision)` builds the one `--rollout-engine` and `--rollout-precision` ask for;
`check_rollout_engine` refuses what cannot run, before any work.
"""
from typing import Literal, get_args

from minirspo.policy import Policy
from minirspo.rollout.engine import BuiltinEngine, RolloutEngine, join_rollouts, rows_of
from minirspo.rollout.precision import ROLLOUT_PRECISIONS, LowPrecisionCopy, RolloutPrecision

__all__ = ["BuiltinEngine", "LowPrecisionCopy", "ROLLOUT_ENGINES", "ROLLOUT_PRECISIONS", "RolloutEngine",
           "RolloutEngineName", "RolloutPrecision", "check_rollout_engine", "join_rollouts", "make_engine", "rows_of"]

RolloutEngineName = Literal["hf", "vllm"]  # hf: the built-in decode (toy or HF model); vllm: reserved
ROLLOUT_ENGINES = get_args(RolloutEngineName)


def check_rollout_engine(rollout_engine: str, kind: str) -> None:
    """--rollout-engine: `hf` samples with the built-in decode in this process; `vllm` is the slot for vLLM."""
    if rollout_engine not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout_engine {rollout_engine!r}; choose one of {list(ROLLOUT_ENGINES)}")
    if rollout_engine == "hf":
        return
    if kind == "toy":
        raise ValueError("--rollout-engine vllm: the toy model samples with its own decode; use --rollout-engine hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("--rollout-engine vllm needs the vllm package; --rollout-engine hf samples with the "
                         "built-in decode (--rollout-precision picks its precision)") from None
    raise ValueError("--rollout-engine vllm: not implemented yet (the built-in decode takes --rollout-precision "
                     "bf16/fp16/fp8 to sample from an engine-like low-precision copy)")


def make_engine(policy: Policy, engine: str = "hf", precision: str = "32") -> RolloutEngine:
    """The behaviour policy of a run: today the built-in decode at `precision` ("32": the trainer's model)."""
    check_rollout_engine(engine, "hf")
    return BuiltinEngine(policy, precision)
