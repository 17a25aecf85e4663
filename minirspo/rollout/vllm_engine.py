"""vLLM as the rollout engine: the behaviour policy μ an RL stack at scale samples with, colocated in this process.

Notation: B rows (prompts × G), P prompt tokens, N response tokens.

The engine is started once (the first `sync`), from the trainer's weights saved in checkpoint format to a
scratch folder: an HF policy's own model, or the toy exported as the Mixtral it is (`export.toy_as_mixtral`).
It runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), in the rollout precision's dtype, and is never
checkpointed. After every RL step's updates the weights go to it in place, without a disk round trip: vLLM's
`reload_weights` on its worker, fed the trainer's tensors under the checkpoint's names (transformers' own reverse
conversion, `export.hf_checkpoint_weights`).

μ is the distribution the trainer scores: the engine returns *processed* log-probs (`logprobs_mode`: after the
temperature and the allowed-token mask), the banned tokens are left out of `allowed_token_ids`, and the policy's
stop tokens are its `stop_token_ids`; top-p is refused (it would truncate μ below what the trainer scores).
Each row is its own request with a seed drawn from the step's generator, so a resumed run asks for the same
samples (vLLM's CPU kernels gave identical tokens in tests/test_vllm.py; that is an observation, not a promise
of bit-exactness across builds). What vLLM returns of the routing is the experts' ids, on GPU builds only
(`enable_return_routed_experts`), never router probabilities: here nothing of it, so R3, RS against the rollout
and the routing mismatch columns are unavailable with this engine (refused, or left empty).
"""
import os
import tempfile

import torch
from torch import Tensor

from minirspo.policy import HFPolicy, Policy, Samples, ToyPolicy
from minirspo.rollout.engine import RolloutEngine
from minirspo.rollout.export import hf_checkpoint_weights, mixtral_weights, toy_as_mixtral

DTYPES = {"32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMEngine(RolloutEngine):
    """A vLLM `LLM` serving a copy of the trainer's weights at `precision` ("32", "bf16" or "fp16")."""

    def __init__(self, policy: Policy, precision: str = "32", *, seed: int = 0):
        if precision not in DTYPES:
            raise ValueError(f"vLLM rollouts take precision {', '.join(DTYPES)}; got {precision!r}")
        if isinstance(policy, ToyPolicy):
            self.template = toy_as_mixtral(policy.model, policy.tokenizer)  # the names and config vLLM serves
        elif isinstance(policy, HFPolicy):
            self.template = policy.model.lm
        else:
            raise ValueError(f"vLLM cannot serve a {type(policy).__name__}")
        self.trainer, self.precision, self.seed = policy, precision, seed
        # the KV cache is sized for this many positions per sequence (more than a rollout uses, at most 4096)
        self.max_model_len = min(self.template.config.max_position_embeddings, 4096)
        vocabulary = self.template.config.vocab_size
        self.allowed = sorted(set(range(vocabulary)) - set(policy.banned))
        self.llm = None
        self.folder: tempfile.TemporaryDirectory | None = None

    def checkpoint_weights(self) -> dict[str, Tensor]:
        """The trainer's current weights under the checkpoint names vLLM loads."""
        if isinstance(self.trainer, ToyPolicy):
            return hf_checkpoint_weights(self.template, mixtral_weights(self.trainer.model))
        return hf_checkpoint_weights(self.template)

    def sync(self) -> None:
        if self.llm is None:
            self.start()
            return
        weights = ((name, tensor.detach().to("cpu")) for name, tensor in self.checkpoint_weights().items())
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        repack_cpu_weights(worker.model_runner.model)

    def start(self) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")         # GiB of KV cache: tiny models, small batches
        from vllm import LLM
        self.folder = tempfile.TemporaryDirectory(prefix="minirspo-vllm-")
        if isinstance(self.trainer, ToyPolicy):  # the export's weights, refreshed from the toy's current ones
            self.template.load_state_dict({name: weight.detach() for name, weight in mixtral_weights(self.trainer.model).items()})
        self.template.save_pretrained(self.folder.name)  # config and safetensors, what vLLM loads at start-up
        self.llm = LLM(model=self.folder.name, skip_tokenizer_init=True, dtype=DTYPES[self.precision],
                       enforce_eager=True, max_model_len=self.max_model_len, seed=self.seed,
                       logprobs_mode="processed_logprobs")

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_p, generator, record) -> Samples:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if self.llm is None:
            raise RuntimeError("call sync() before sample(): the engine has not started")
        if record == "routing":
            raise ValueError("vLLM's CPU build returns no routing: rollout routing replay (R3) needs a GPU build")
        prompts = [TokensPrompt(prompt_token_ids=row[valid].tolist()) for row, valid in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=generator.device).tolist()
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                                 logprobs=0 if record != "none" else None, stop_token_ids=list(self.trainer.stop_ids),
                                 allowed_token_ids=self.allowed, detokenize=False, skip_special_tokens=False)
                  for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses = [output.outputs[0] for output in outputs]
        width = max(len(response.token_ids) for response in responses)
        tokens = torch.full((len(responses), width), self.trainer.pad_id, dtype=torch.long)      # (B, N)
        mask = torch.zeros(len(responses), width, dtype=torch.bool)                               # (B, N)
        logprobs = torch.zeros(len(responses), width)                                             # (B, N)
        for row, response in enumerate(responses):
            ids = list(response.token_ids)
            tokens[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = True
            if record != "none":
                logprobs[row, :len(ids)] = torch.tensor([step[token].logprob for step, token in zip(response.logprobs, ids)])
        device = prompt_ids.device
        return Samples(tokens.to(device), mask.to(device), logprobs.to(device) if record != "none" else None)

    def close(self) -> None:
        """Shut the engine down and free its memory (one engine alive at a time)."""
        if self.llm is not None:
            del self.llm
            self.llm = None
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def repack_cpu_weights(model: torch.nn.Module) -> None:
    """Work around two places where vLLM 0.32's CPU build keeps computing with the old weights after an in-place
    reload (tests/test_vllm.py catches both):
    - MoE experts: on a weight update, UnquantizedFusedMoEMethod._setup_kernel copies the new weights in their
      plain layout and skips the experts kernel's `process_weights_after_loading`, which on a CPU packs them for
      its grouped GEMM (on GPUs it does nothing); running it again packs them.
    - A tied LM head: its packed GEMM handle is made from the embedding once, and the reload, which loads no
      weight into the head itself, never remakes it; its quant method's processing does."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is not None and hasattr(module, "w13_weight"):
            kernel.fused_experts.process_weights_after_loading(module)
        elif type(module).__name__ == "ParallelLMHead" and method is not None:
            method.process_weights_after_loading(module)
