"""Distributed equivalence on CPU with gloo: a step with `ddp` or `fsdp2` on 2 processes equals the step of
one process on the same global batch (loss, gradient norm and every parameter).

Every run goes through `minirspo.train.run`. The one-process reference runs in the test process; each
2-process run is a clean subprocess of this file (`python tests/test_distributed.py ...`), so Lightning's
own launcher starts the second rank (an in-process `strategy="ddp"` under pytest would re-launch pytest
itself). The module under test is `RLModule` with two changes that
make runs of different world sizes comparable, and nothing else:
- `collect_rollouts` returns a fixed global batch (random ordinary tokens, response lengths and rewards,
  seeded) instead of sampling, whose rank gets its whole groups exactly as in production: sampling is
  seeded per rank, so 1 and 2 processes would otherwise train on different sequences;
- SGD instead of AdamW: Adam's first steps are lr·g/(|g| + eps), which turns float-rounding differences of
  near-zero gradient entries into updates of up to lr, while SGD keeps parameter differences at lr times
  the gradient difference.
Two optimiser steps (ppo_epochs=2) are taken, so the second is off-policy (ratio ≠ 1, γ < 1) and the
gradient clip (max_grad_norm well below the gradient norm) scales both.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LR = 1.0
MAX_GRAD_NORM = 0.05  # each step moves the parameters by at most LR · MAX_GRAD_NORM in L2 norm


def fixed_batch_module():
    from minirspo.config import RLConfig  # noqa: F401  (imports kept inside: this file is also the worker)
    from minirspo.loss import group_advantages, zero_variance_groups
    from minirspo.module import Minibatch, RLModule
    from minirspo.policy import Samples

    class FixedBatchModule(RLModule):
        def collect_rollouts(self, step):
            cfg, world, rank = self.config, self.trainer.world_size, self.global_rank
            generator = torch.Generator().manual_seed(step)  # the same global batch on every rank
            problems = self.task.sample(cfg.n_prompts, seed=step, split="train")
            repeated = [p for p in problems for _ in range(cfg.group_size)]
            batch = len(repeated)
            tokens = torch.randint(0, 500, (batch, cfg.max_new_tokens), generator=generator)        # (B, N)
            lengths = torch.randint(1, cfg.max_new_tokens + 1, (batch,), generator=generator)       # (B,)
            mask = torch.arange(cfg.max_new_tokens)[None, :] < lengths[:, None]                     # (B, N)
            rewards = torch.rand(batch, generator=generator)                                         # (B,)
            advantages = group_advantages(rewards, cfg.group_size)                                  # (B,)
            per_rank = batch // world  # whole groups, as RLModule.collect_rollouts splits prompts
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            prompt_ids, prompt_mask = self.policy.encode_prompts([p.prompt for p in repeated[mine]])
            device = prompt_ids.device
            mine_tokens, mine_mask = tokens[mine].to(device), mask[mine].to(device)
            minibatch = Minibatch(prompt_ids, prompt_mask, mine_tokens, mine_mask, advantages[mine].to(device),
                                  Samples(mine_tokens, mine_mask))
            stats = {"reward_mean": rewards.mean(), "response_len": lengths.float().mean(),
                     "zero_variance_frac": zero_variance_groups(rewards, cfg.group_size) / cfg.n_prompts}
            return [minibatch], stats

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
            return [optimizer], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0),
                                  "interval": "step"}]

        def on_train_end(self):
            from torch.distributed.tensor import DTensor
            params = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                      for name, p in self.model.named_parameters()}  # full_tensor: a collective, all ranks
            if self.global_rank == 0:
                torch.save(params, Path(self.config.out) / "params.pt")

    return FixedBatchModule


def train_one_step(checkpoint: Path, out: Path, strategy: str, devices: int) -> None:
    """One RL step of FixedBatchModule through `minirspo.train.run`; writes OUT/metrics.csv and OUT/params.pt."""
    import minirspo.train
    from minirspo.config import RLConfig
    config = RLConfig(model=f"hf:{checkpoint}", out=str(out), strategy=strategy, devices=devices,
                      accelerator="cpu", max_steps=1, n_prompts=4, group_size=2, minibatch_size=8, ppo_epochs=2,
                      max_new_tokens=6, max_grad_norm=MAX_GRAD_NORM, eval_size=2, logprob_chunk_tokens=7)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(minirspo.train, "RLModule", fixed_batch_module())
        minirspo.train.run(config)


def read_results(out: Path) -> tuple[dict, dict]:
    with open(out / "metrics.csv") as file:
        (metrics, final) = list(csv.DictReader(file))  # the step, then the final policy's evaluation
    assert (metrics["step"], final["step"]) == ("0", "1") and final["accuracy"]
    return {name: float(value) for name, value in metrics.items() if value}, torch.load(out / "params.pt")


def run_in_subprocess(checkpoint: Path, out: Path, strategy: str, devices: int) -> tuple[dict, dict]:
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, __file__, str(checkpoint), str(out), strategy, str(devices)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{strategy} × {devices} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return read_results(out)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    pytest.importorskip("transformers")
    from minirspo.testing import make_tiny_hf_checkpoint
    root = tmp_path_factory.mktemp("dist")
    checkpoint = make_tiny_hf_checkpoint(root / "qwen3_moe", "qwen3_moe", norm_topk_prob=True)
    train_one_step(checkpoint, root / "single", "auto", 1)
    return checkpoint, read_results(root / "single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_take_the_single_process_step(single_process, tmp_path, strategy):
    checkpoint, (metrics_1, params_1) = single_process
    metrics_2, params_2 = run_in_subprocess(checkpoint, tmp_path / strategy, strategy, 2)
    # the run is not trivial: a gradient flowed, the clip was active, and the second step was off-policy
    assert metrics_1["grad_norm"] > 2 * MAX_GRAD_NORM and metrics_1["gamma_mean"] < 1
    # Only these two: the loss is a mean over sequences, equal on every rank, and the clipped norm is global;
    # token-weighted metrics such as γ's mean are averaged over ranks as means of rank means, which weighs
    # tokens differently than one process does. Half the batch per rank changes matmul blocking and the
    # order of float32 sums: token log-probs (|log p| <= ~10) move by a few ulps (tests/tolerance.py), i.e.
    # <= ~1e-5 with margin, so each term A_i·exp(mean ℓ̂) by <= 1e-5 of |A_i|·e^0.4 (RSPO's clip), and
    # mean |A_i| <= 1 for std-normalised groups: |Δloss| <= 1.5e-5 whatever the loss's own size (terms
    # of both signs may cancel it to ~0, so no relative bound). The norm (> 2·MAX_GRAD_NORM, asserted
    # above) is a root of a sum of squares of those gradients: relative 1e-5, ~100 ulps.
    assert metrics_2["loss"] == pytest.approx(metrics_1["loss"], rel=0, abs=1.5e-5)
    assert metrics_2["grad_norm"] == pytest.approx(metrics_1["grad_norm"], rel=1e-5, abs=0)
    # Per parameter tensor: the two runs differ by under 1% of how far the step moved it, or by float32
    # rounding of the weights themselves (2 ulps of the largest). A gradient not averaged over ranks, a
    # norm clipped per shard or a group split across ranks changes the motion by tens of %.
    initial = initial_parameters(checkpoint)
    assert params_2.keys() == params_1.keys() == initial.keys()
    for name, after in params_1.items():
        motion = (after - initial[name]).abs().max()
        rounding = 2 * torch.finfo(torch.float32).eps * after.abs().max()
        assert (params_2[name] - after).abs().max() <= 0.01 * motion + rounding, name


def initial_parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    from minirspo.policy import load_policy
    return {name: p.detach() for name, p in load_policy(f"hf:{checkpoint}").model.named_parameters()}


def test_the_single_process_step_moves_every_router(single_process):
    """Guards the comparison above against parameters the step hardly moved."""
    checkpoint, (_, params) = single_process
    initial = initial_parameters(checkpoint)
    routers = [name for name in params if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for name in routers:
        # > 1e-6: far above float32 rounding of weights of size ~0.02 (1e-9), so it did move
        assert (params[name] - initial[name]).abs().max() > 1e-6, name


if __name__ == "__main__":  # one 2-process run: python tests/test_distributed.py CHECKPOINT OUT STRATEGY DEVICES
    checkpoint, out, strategy, devices = sys.argv[1:]
    train_one_step(Path(checkpoint), Path(out), strategy, int(devices))


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2():
    from minirspo.config import RLConfig
    with pytest.raises(ValueError, match="--strategy fsdp2"):  # by the config itself, before any process starts
        RLConfig(strategy="fsdp", devices=2)
