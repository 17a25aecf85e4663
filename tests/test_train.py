"""The RL loop end to end on a tiny toy MoE: every loss runs, resume is exact, minibatches go off-policy,
RSPO learns, and bad input fails clearly."""
import dataclasses
import math

import pytest
import torch

from minirspo.config import RLConfig
from minirspo.module import RLModule
from minirspo.policy import ToyPolicy, load_policy
from minirspo.report import read_metrics, read_rows
from minirspo.tasks import score
from minirspo.train import main
from minirspo.warmstart import warm_start
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.checkpoint import load_toy_checkpoint, save_toy_checkpoint
from toy_moe.pretrain import PretrainConfig
from tolerance import assert_close_in_ulps  # tests/tolerance.py: why these bounds hold on any CPU

TINY = ToyMoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=32, max_seq_len=64)
REQUIRED_COLUMNS = {"step", "reward_mean", "accuracy", "response_len", "entropy", "clip_frac", "approx_kl",
                    "gamma_mean", "gamma_floored_frac", "routing_consistency", "grad_norm", "seconds"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_toy_checkpoint(ToyMoE(TINY), None, tmp_path_factory.mktemp("tiny") / "model.pt")


def tiny_args(checkpoint, out, *extra) -> list[str]:
    return ["--model", f"toy:{checkpoint}", "--out", str(out), "--max-steps", "2", "--n-prompts", "4",
            "--group-size", "4", "--minibatch-size", "8", "--eval-size", "8", "--eval-every", "1",
            "--max-new-tokens", "6", "--lr", "3e-3", "--warmup-steps", "1", *extra]


def test_a_run_loads_its_model_and_builds_its_task_once(tiny_checkpoint, tmp_path, monkeypatch):
    # validate() checks --model by loading it and --task-options by building the task; the run must use what it
    # derived (config.CheckedRun), not load or build them again
    import minirspo.config
    import toy_moe.checkpoint
    loads, builds = [], []
    real_load, real_make = toy_moe.checkpoint.load_toy_checkpoint, minirspo.config.make_task
    monkeypatch.setattr(toy_moe.checkpoint, "load_toy_checkpoint", lambda path: loads.append(path) or real_load(path))
    monkeypatch.setattr(minirspo.config, "make_task", lambda *a, **k: builds.append(a) or real_make(*a, **k))
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "1", "--task-options", "max_operand=50"))
    assert len(loads) == 1 and builds == [("arithmetic",)]


@pytest.mark.parametrize("extra", [["--loss", "grpo"], ["--loss", "gspo"], ["--loss", "gmpo"], ["--loss", "rspo"],
                                   ["--loss", "grpo", "--router-shift"], ["--loss", "gmpo", "--routing-replay"],
                                   ["--loss", "gmpo", "--freeze-router"], ["--loss", "rspo", "--kl-coef", "0.1"],
                                   ["--loss", "rspo", "--gamma-min", "auto"],
                                   # Lightning's *-true precisions change the default dtype inside the step
                                   ["--loss", "rspo", "--precision", "64-true"],
                                   ["--loss", "rspo", "--precision", "bf16-true"]],
                         ids=lambda extra: " ".join(extra))
def test_every_loss_runs_and_logs_finite_metrics(tiny_checkpoint, tmp_path, extra):
    main(tiny_args(tiny_checkpoint, tmp_path, *extra))
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert REQUIRED_COLUMNS <= set(metrics)
    assert metrics["step"] == [0.0, 1.0, 2.0]  # two RL steps, then the final policy's evaluation
    for name in REQUIRED_COLUMNS:
        assert all(math.isfinite(v) for v in metrics[name][:2]), name
    assert math.isfinite(metrics["accuracy"][2]) and math.isnan(metrics["loss"][2])
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_frozen_router_does_not_move_while_the_rest_does(tiny_checkpoint, tmp_path):
    # A random-init model earns no reward (all advantages 0), so the load-balance loss supplies the gradient:
    # it reaches the router directly, and everything upstream of it through the router's input.
    main(tiny_args(tiny_checkpoint, tmp_path / "frozen", "--loss", "gmpo", "--freeze-router", "--aux-loss-coef", "1"))
    frozen = torch.load(tmp_path / "frozen" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    initial = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    routers = [name for name in initial if "router" in name]
    assert routers, "the toy model names its router weights 'router'"
    for name in routers:
        assert torch.equal(frozen[f"model.{name}"], initial[name]), f"{name} moved with --freeze-router"
    assert not torch.equal(frozen["model.embed.weight"], initial["embed.weight"])


def test_the_last_row_evaluates_the_final_policy(tiny_checkpoint, tmp_path, monkeypatch):
    # A random-init model answers nothing right, so its accuracy cannot tell two policies apart; a fingerprint
    # of the weights stands in for the evaluation. The last row must carry the weights the run ends with
    # (last.ckpt, after the last step's updates); the row of the last step, those from before its updates.
    fingerprint = lambda model: sum(p.detach().double().square().sum() for p in model.parameters())  # noqa: E731
    monkeypatch.setattr(RLModule, "evaluate", lambda self: fingerprint(self.model))
    main(tiny_args(tiny_checkpoint, tmp_path, "--aux-loss-coef", "1"))  # the load-balance loss moves the weights
    accuracy = read_metrics(tmp_path / "metrics.csv")["accuracy"]                    # steps 0, 1 and the final 2
    final, _ = load_toy_checkpoint(tiny_checkpoint)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    final.load_state_dict({key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")})
    # both sides are the same float64 sum rounded to float32 (the logged metrics are float32), so equal exactly
    assert accuracy[2] == float(torch.as_tensor(fingerprint(final)).float())
    assert accuracy[1] != accuracy[2]


def test_digit_accuracy_reads_an_rl_checkpoint_into_the_warm_start_it_began_from(tiny_checkpoint, tmp_path,
                                                                                 digit_accuracy, capsys):
    # --aux-loss-coef 1: a random-init model earns no reward, so the load-balance loss moves the weights
    main(tiny_args(tiny_checkpoint, tmp_path, "--loss", "grpo", "--aux-loss-coef", "1"))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    trained = torch.load(checkpoint, weights_only=False)["state_dict"]
    policy = digit_accuracy.load_checkpoint(checkpoint, tiny_checkpoint)
    for name, value in policy.model.state_dict().items():
        assert torch.equal(value, trained[f"model.{name}"]), name
    assert not torch.equal(policy.model.embed.weight, load_policy(f"toy:{tiny_checkpoint}").model.embed.weight)
    with pytest.raises(SystemExit) as error:  # without its warm start, an RL checkpoint has no architecture
        digit_accuracy.main([str(checkpoint)])
    assert "needs --base" in str(error.value)


def test_router_lr_scale_scales_the_router_step_and_nothing_else(tiny_checkpoint):
    # One AdamW step from the same weights and gradients, with and without --router-lr-scale 4. Adam's step is
    # lr · m̂ / (√v̂ + ε), linear in lr, so the routers must move exactly 4× as far (to the ulps of the weights,
    # rounding of w − step) and every other weight exactly as far as before.
    steps = {}
    for scale in (1.0, 4.0):
        model, tokenizer = load_toy_checkpoint(tiny_checkpoint)
        module = RLModule(ToyPolicy(model, tokenizer), RLConfig(lr=1e-2, router_lr_scale=scale))
        [optimizer], [schedule] = module.configure_optimizers()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.grad = torch.linspace(-1.0, 1.0, p.numel()).view_as(p)
        optimizer.step()
        steps[scale] = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    routers = {name for name in steps[1.0] if name.endswith("router.weight")}
    assert len(routers) == TINY.n_layers
    for name, step in steps[1.0].items():
        if name in routers:
            assert_close_in_ulps(steps[4.0][name], 4 * step, ulps=8, scale=largest_weight(tiny_checkpoint), msg=name)
            assert step.abs().max() > 0, name
        else:
            assert torch.equal(steps[4.0][name], step), name


def largest_weight(checkpoint) -> float:
    return max(w.abs().max().item() for w in torch.load(checkpoint, weights_only=True)["state_dict"].values())


def dense_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_toy_checkpoint(ToyMoE(dataclasses.replace(TINY, moe_layers=())), None, tmp_path / "dense.pt")


@pytest.mark.parametrize("flags", [["--loss", "rspo"], ["--loss", "grpo", "--routing-replay"],
                                   ["--loss", "grpo", "--router-lr-scale", "2"]], ids=" ".join)
def test_the_dense_toy_trains_with_router_free_losses_and_refuses_router_flags(tmp_path, capsys, flags):
    dense = dense_checkpoint(tmp_path)
    main(tiny_args(dense, tmp_path / "grpo", "--loss", "grpo"))
    metrics = read_metrics(tmp_path / "grpo" / "metrics.csv")
    assert metrics["step"] == [0.0, 1.0, 2.0] and all(math.isfinite(v) for v in metrics["loss"][:2])
    assert "gamma_mean" not in metrics and "routing_consistency" not in metrics
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(dense, tmp_path / "refused", *flags))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "need an MoE router" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused" / "metrics.csv").exists()


@pytest.mark.parametrize("rollout", [[], ["--rollout-precision", "bf16"]], ids=["float32 rollouts", "a bf16 copy"])
def test_resume_is_bit_exact(tiny_checkpoint, tmp_path, rollout):
    # The load-balance loss keeps the weights, Adam's state and the adaptive γ floor moving even where a
    # random-init model earns no reward, so an inexact resume would show. A rollout copy is never checkpointed:
    # the resumed run rebuilds it from the restored weights.
    common = ["--checkpoint-every", "2", "--seed", "3", "--aux-loss-coef", "1", "--gamma-min", "auto",
              "--lr", "2e-2", *rollout]
    main(tiny_args(tiny_checkpoint, tmp_path / "straight", *common, "--max-steps", "4"))
    main(tiny_args(tiny_checkpoint, tmp_path / "resumed", *common, "--max-steps", "2"))
    main(tiny_args(tiny_checkpoint, tmp_path / "resumed", *common, "--max-steps", "4", "--resume"))
    straight = read_metrics(tmp_path / "straight" / "metrics.csv")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert straight["step"] == resumed["step"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    for name in {name for name in straight if not name.endswith("seconds")}:  # wall-clock times are not state
        assert straight[name] == pytest.approx(resumed[name], abs=0, rel=0, nan_ok=True), name
    final = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
             for run in ("straight", "resumed")]
    for name, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][name]), name
        assert value.dtype != torch.bfloat16, f"{name}: the rollout copy was checkpointed"
    assert final[0]["state_dict"]["gamma_floor"] != 0.8, "the adaptive floor never moved: a weak test"
    # resuming a run that has nothing left to train keeps its metrics
    main(tiny_args(tiny_checkpoint, tmp_path / "resumed", *common, "--max-steps", "4", "--resume"))
    assert read_metrics(tmp_path / "resumed" / "metrics.csv") == resumed
    initial = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert not torch.equal(final[0]["state_dict"]["model.embed.weight"], initial["embed.weight"])


# --- the run folder is a record: nothing mixes two runs into it, nothing loses one ---------------------------
def folder_contents(folder) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(argv, capsys) -> str:
    """main(argv)'s one-line refusal (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    errors = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def test_a_resume_with_other_settings_is_refused_touching_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    main(tiny_args(tiny_checkpoint, out))
    before = folder_contents(out)
    error = refused(tiny_args(tiny_checkpoint, out, "--resume", "--loss", "grpo", "--n-prompts", "8"), capsys)
    assert "--loss rspo -> grpo" in error and "--n-prompts 4 -> 8" in error
    # another model's checkpoint would die in a state_dict size mismatch; the settings tell first
    torch.manual_seed(0)
    wider = save_toy_checkpoint(ToyMoE(dataclasses.replace(TINY, d_model=48)), None, tmp_path / "wider.pt")
    assert "--model" in refused(tiny_args(wider, out, "--resume"), capsys)
    assert folder_contents(out) == before


def test_a_resume_may_change_only_length_cadence_and_verbosity(tiny_checkpoint, tmp_path):
    main(tiny_args(tiny_checkpoint, tmp_path, "--checkpoint-every", "2"))
    # a config.yaml written before some settings existed: the missing keys compare as their defaults
    import yaml
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for newer in ("logprob_chunk_tokens", "router_diagnostics", "overwrite"):
        del recorded[newer]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    main(tiny_args(tiny_checkpoint, tmp_path, "--resume", "--max-steps", "3", "--eval-every", "2",
                   "--checkpoint-every", "1", "--verbose"))
    assert read_metrics(tmp_path / "metrics.csv")["step"] == [0.0, 1.0, 2.0, 3.0]


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_leaves_nothing_of_the_old_run(
        tiny_checkpoint, tmp_path, capsys):
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "2"))
    before = folder_contents(tmp_path)
    assert "--overwrite" in refused(tiny_args(tiny_checkpoint, tmp_path, "--seed", "1"), capsys)
    assert folder_contents(tmp_path) == before
    main(tiny_args(tiny_checkpoint, tmp_path, "--seed", "1", "--max-steps", "3", "--overwrite"))
    # Lightning would have saved beside the old last.ckpt as last-v1.ckpt, and --resume read the old one
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3 * 2
    assert read_metrics(tmp_path / "metrics.csv")["step"] == [0.0, 1.0, 2.0, 3.0]
    from minirspo.config import parse_config
    recorded = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert (recorded.seed, recorded.pretrain.seed, recorded.overwrite, recorded.resume) == (1, 1, False, False)
    # a folder a run was killed in before its first checkpoint is used too
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "config.yaml").write_text("loss: rspo\n")
    assert "already holds a run (config.yaml)" in refused(tiny_args(tiny_checkpoint, tmp_path / "killed"), capsys)


def test_first_minibatch_is_on_policy_and_later_ones_are_not(tiny_checkpoint, tmp_path, monkeypatch):
    seen = []
    real_update = RLModule.update

    def recording_update(self, mb, old):
        metrics, derived = real_update(self, mb, old)
        seen.append(metrics)
        return metrics, derived

    monkeypatch.setattr(RLModule, "update", recording_update)
    # 16 sequences in 4 minibatches at a large learning rate, so the policy visibly moves between them; a
    # random-init model earns no reward, so the load-balance loss is what moves it (router included).
    main(tiny_args(tiny_checkpoint, tmp_path, "--loss", "rspo", "--max-steps", "1", "--minibatch-size", "4",
                   "--lr", "2e-2", "--aux-loss-coef", "1"))
    first, later = seen[0], seen[1:]
    assert first["ratio_mean"] == 1.0 and first["approx_kl"] == 0.0
    assert first["gamma_lowest"] == 1.0 and first["gamma_mean"] == 1.0
    assert first["routing_consistency"] == 1.0
    assert all(m["approx_kl"] > 0 for m in later)
    assert all(m["gamma_mean"] < 1.0 for m in later)


def assert_same_old_policy(reused, scored):
    """The first minibatch's old policy taken from its training forward against a separate no-grad scoring.
    Both run the same forward on the same parameters (with and without autograd recording), so they can
    differ only by the order of float32 reductions: MODEL_ULPS ulps of the largest value compared (see
    tests/tolerance.py). Experts are compared exactly: swapping two would need router logits within a
    rounding error of each other."""
    assert_close_in_ulps(reused.logprobs, scored.logprobs)
    assert_close_in_ulps(reused.topk_logprobs, scored.topk_logprobs)
    assert_close_in_ulps(reused.ref_logprobs, scored.ref_logprobs)
    for name in ("topk_idx", "routing"):
        want = getattr(scored, name)
        assert (getattr(reused, name) is None) if want is None else torch.equal(getattr(reused, name), want), name
    assert not reused.logprobs.requires_grad and reused.logprobs.abs().sum() > 0  # detached, and not all padding


def record_updates(monkeypatch) -> list:
    """Patch RLModule.update to record (the old policy it was given, a separate no-grad scoring of an on-policy
    minibatch taken before its update, the old policy the update derived) per call."""
    calls = []
    real_update = RLModule.update

    def checking_update(self, mb, old):
        scored = self.score_old(mb) if old is None else None  # before this update moves the parameters
        metrics, derived = real_update(self, mb, old)
        calls.append((old, scored, derived))
        return metrics, derived

    monkeypatch.setattr(RLModule, "update", checking_update)
    return calls


def test_the_first_minibatch_is_its_own_old_policy(tiny_checkpoint, tmp_path, monkeypatch):
    calls = record_updates(monkeypatch)
    # 2 minibatches × 2 epochs; a KL reference, so its log-probs are part of the reused old policy too
    main(tiny_args(tiny_checkpoint, tmp_path, "--loss", "rspo", "--max-steps", "1", "--ppo-epochs", "2",
                   "--kl-coef", "0.1", "--aux-loss-coef", "1", "--lr", "2e-2"))
    (first_old, scored, reused), (second_old, _, _), (again, _, _), (second_again, _, _) = calls
    assert first_old is None and second_old is not None  # only the on-policy minibatch skips the scoring
    assert_same_old_policy(reused, scored)
    # router state: the experts and their router log-probs at response tokens only, 12 bytes per (L, M, N, K)
    assert reused.routing is None  # kept only for routing replay
    assert reused.topk_idx.untyped_storage().nbytes() + reused.topk_logprobs.untyped_storage().nbytes() == \
        reused.topk_idx.numel() * 12
    assert again is reused and second_again is second_old  # the second epoch reuses the stored old values


def test_eval_every_0_evaluates_at_the_end_only_and_times_evaluation_apart(tiny_checkpoint, tmp_path):
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "3", "--eval-every", "0"))
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert [math.isnan(v) for v in metrics["accuracy"]] == [True, True, True, False]  # the final number is kept
    assert [math.isnan(v) for v in metrics["eval_seconds"]] == [True, True, True, False]
    assert metrics["eval_seconds"][-1] > 0 and all(v > 0 for v in metrics["seconds"][:3])
    # the rollout is part of the step: sampling and rewards, then scoring and updates
    assert all(0 < rollout < step for rollout, step in zip(metrics["rollout_seconds"][:3], metrics["seconds"][:3]))


@pytest.mark.parametrize("loss,diagnostics", [("grpo", False), ("rspo", True)])
def test_router_diagnostics_off_skips_gamma_unless_the_loss_uses_it(tiny_checkpoint, tmp_path, loss, diagnostics):
    main(tiny_args(tiny_checkpoint, tmp_path, "--loss", loss, "--no-router-diagnostics"))
    columns = set(read_metrics(tmp_path / "metrics.csv"))
    for name in ("gamma_mean", "gamma_lowest", "gamma_floored_frac", "routing_consistency"):
        assert (name in columns) == diagnostics, name
    assert {"loss", "ratio_mean", "clip_frac", "seconds"} <= columns


def test_unknown_loss_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tiny_checkpoint, tmp_path, "--loss", "ppo"))
    assert exit_info.value.code != 0
    assert "invalid choice 'ppo' for argument '--loss'" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path / "nowhere.pt", tmp_path / "out"))
    assert exit_info.value.code != 0
    assert "nowhere.pt" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tiny_checkpoint, tmp_path, "--resume"))
    assert exit_info.value.code != 0
    assert "no checkpoint" in capsys.readouterr().err


def sampled_reward(model, tokenizer, task_options: str, n_samples: int, seed: int) -> float:
    """Mean reward of `n_samples` temperature-1 responses to the task's train prompts."""
    task = RLConfig(task_options=task_options).build_task()
    policy = ToyPolicy(model, tokenizer)
    problems = task.sample(n_samples, seed=seed)
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])
    rollout = policy.generate(prompt_ids, prompt_mask, max_new_tokens=4, generator=torch.Generator().manual_seed(seed))
    return float(score(task, problems, policy.decode_responses(rollout.tokens, rollout.mask)).mean())


def test_rspo_raises_the_reward(tmp_path):
    # Single-digit sums (a, b in 0..4): a tiny model learns the format in a few dozen supervised steps and
    # then earns a mix of 0.1 and 1.0 rewards, the signal RL needs.
    options = "max_operand=4"
    pretrain = PretrainConfig(model=TINY, max_steps=40, batch_size=64, lr=1e-2, warmup_steps=10, eval_every=40,
                              eval_examples=4, progress_bar=False)
    start = warm_start(RLConfig(task_options=options, warmstart_dir=str(tmp_path / "warm"), pretrain=pretrain))
    main(["--model", f"toy:{start}", "--task-options", options, "--out", str(tmp_path / "rl"), "--loss", "rspo",
          "--max-steps", "40", "--ppo-epochs", "2", "--n-prompts", "16", "--group-size", "8",
          "--minibatch-size", "32", "--eval-size", "16", "--eval-every", "20", "--max-new-tokens", "4",
          "--lr", "1e-2", "--warmup-steps", "2", "--checkpoint-every", "40"])
    model, tokenizer = load_toy_checkpoint(start)
    before = sampled_reward(model, tokenizer, options, 4096, seed=1)
    state = torch.load(tmp_path / "rl" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict({name.removeprefix("model."): value for name, value in state.items()
                           if name.startswith("model.")})
    after = sampled_reward(model, tokenizer, options, 4096, seed=1)
    # Rewards are 0, 0.1 or 1 with a mean near 0.2 (about 12% of samples score 1), so one sample's std is
    # about 0.3 and the difference of two 4096-sample means has a standard error near 0.0066: a rise of
    # 0.025 is almost 4 standard errors, not sampling luck. (This run measured 0.208 -> 0.249.)
    assert after > before + 0.025, (before, after)


def test_a_resume_keeps_the_rows_before_its_checkpoint_and_logs_each_redone_step_once(tiny_checkpoint, tmp_path):
    import csv
    main(tiny_args(tiny_checkpoint, tmp_path, "--checkpoint-every", "1", "--max-steps", "2"))  # last.ckpt: step 2
    metrics = tmp_path / "metrics.csv"
    before = read_rows(metrics)
    # what a run killed after logging steps 2 and 3 past that checkpoint leaves: rows the resume redoes
    with open(metrics, "a", newline="") as handle:
        stale = csv.DictWriter(handle, fieldnames=list(before[0]))
        stale.writerows([{"step": step, "loss": "-999"} for step in (2, 3)])
    main(tiny_args(tiny_checkpoint, tmp_path, "--checkpoint-every", "1", "--max-steps", "4", "--resume"))
    after = read_rows(metrics)
    assert [row["step"] for row in after] == ["0", "1", "2", "3", "4"]
    assert after[:2] == before[:2]  # the earlier rows, cell for cell
    assert all(row["loss"] != "-999" for row in after) and after[2]["accuracy"] != ""
    # a resume with nothing left to train leaves the file as it was, the final row included
    written = metrics.read_bytes()
    main(tiny_args(tiny_checkpoint, tmp_path, "--checkpoint-every", "1", "--max-steps", "4", "--resume"))
    assert metrics.read_bytes() == written


def test_ctrl_c_finishes_the_step_saves_and_resumes(tiny_checkpoint, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    args = tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "200", "--checkpoint-every", "1000")
    # TTY_COMPATIBLE: rich draws the live bar as on a terminal, so the output shows where the notice landed
    process = subprocess.Popen([sys.executable, "-m", "minirspo.train", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=os.environ | {"TTY_COMPATIBLE": "1"})
    checkpoint, metrics = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # header + 2 steps
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert checkpoint.is_file()
    # the notice printed while the bar is live has a line of its own above the bar, not the end of the bar's line
    lines = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output))  # without colours and cursor moves
    assert any(line.startswith("Ctrl-C: finishing this RL step") for line in lines), output
    stopped_at = torch.load(checkpoint, weights_only=False)["global_step"]
    # a whole number of RL steps: the interrupted step finished before the checkpoint (16 sequences / 8 = 2
    # optimiser steps per RL step), and the run stopped long before its 200 steps
    assert stopped_at % 2 == 0 and 2 <= stopped_at < 2 * 200
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", str(stopped_at // 2 + 1), "--resume"))
    # the interrupted run has no final row (it stopped early); the resumed one ends with its own
    assert read_metrics(metrics)["step"] == [float(s) for s in range(stopped_at // 2 + 2)]


def test_the_command_line_defaults_are_the_config_defaults():
    from minirspo.config import parse_config
    assert parse_config([]) == RLConfig()
    assert parse_config(["--pretrain.max-steps", "7"]).pretrain.max_steps == 7


# --- the command line: config files, bad input, the console ----------------------------------------------
def test_the_run_writes_its_config_and_config_reruns_it_with_overrides(tiny_checkpoint, tmp_path):
    import dataclasses

    import yaml

    from minirspo.config import parse_config
    first = tmp_path / "first"
    main(tiny_args(tiny_checkpoint, first, "--loss", "gmpo", "--router-shift", "--gamma-min", "auto",
                   "--clip-low", "0.3", "--max-steps", "1"))
    written = parse_config(["--config", str(first / "config.yaml")])
    assert written == parse_config(tiny_args(tiny_checkpoint, first, "--loss", "gmpo", "--router-shift",
                                             "--gamma-min", "auto", "--clip-low", "0.3", "--max-steps", "1"))
    # run it again from the file, with two flags after --config overriding it
    second = tmp_path / "second"
    main(["--config", str(first / "config.yaml"), "--out", str(second), "--no-router-shift"])
    expected = dataclasses.replace(written, out=str(second), router_shift=False)
    assert parse_config(["--config", str(second / "config.yaml")]) == expected
    assert yaml.safe_load((second / "config.yaml").read_text())["router_shift"] is False
    assert read_metrics(second / "metrics.csv")["step"] == [0.0, 1.0]


def test_a_config_with_every_kind_of_value_round_trips(tmp_path):
    from minirspo.config import parse_config
    from toy_moe.cli import write_config
    config = RLConfig(task="countdown", task_options="n_numbers=3,ops=+-", loss="grpo", router_shift=True,
                      gamma_min="auto", clip_low=0.25, clip_high=None, n_prompts=4, minibatch_size=16,
                      temperature=0.7, resume=True, precision="bf16-mixed", strategy="ddp",
                      pretrain=PretrainConfig(model=ToyMoEConfig(moe_layers=(0, 2), norm_topk_prob=False),
                                              tokenizer=None, max_steps=7, lr=1e-3))
    path = write_config(config, tmp_path / "config.yaml", rerun="python -m minirspo.train")
    assert parse_config(["--config", str(path)]) == config
    assert parse_config(["--max-steps", "3", "--config", str(path)]).max_steps == config.max_steps  # file wins
    assert parse_config(["--config", str(path), "--pretrain.model.moe-layers", "None"]).pretrain.model.moe_layers is None


def test_task_choices_are_the_registered_tasks():
    from typing import get_args

    from minirspo.config import TaskName
    from minirspo.tasks import TASKS
    assert set(get_args(TaskName)) == set(TASKS)


def not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are notes, not weights\n")
    return path


def empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    return path


def bare_folder(tmp_path):
    (tmp_path / "hf").mkdir()
    return tmp_path / "hf"


def hf_config_only(tmp_path, name: str, **settings):
    """A Hugging Face model folder with a config.json and no weights at all: a check that passes or refuses
    it has read nothing but the config."""
    import json
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(settings))
    return tmp_path / name


def config_file_with_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("loss: grpo\nn_promts: 8\n")
    return path


# (flags, the flag the one-line error must name); `{tmp}` is the test's folder
BAD_INPUT = [
    (["--task", "nosuch"], "--task"),
    (["--task", "countdown", "--task-options", "foo=1"], "--task-options"),
    (["--task-options", "max_operand"], "--task-options"),
    (["--task-options", "max_operand=-3"], "--task-options"),
    (["--loss", "ppo"], "--loss"),
    (["--model", "toy:{not_a_checkpoint}"], "--model"),
    (["--model", "toy:{empty_file}"], "--model"),
    (["--model", "toy:{tmp}"], "--model"),
    (["--model", "hf:{bare_folder}"], "--model"),
    (["--model", "hf:{not_a_checkpoint}"], "--model"),
    (["--model", "gguf:x"], "--model"),
    (["--resume", "--out", "{tmp}/never_ran"], "--resume"),
    (["--out", "{not_a_checkpoint}"], "--out"),
    (["--n-prompts", "0"], "--n-prompts"),
    (["--group-size", "1"], "--group-size"),
    (["--minibatch-size", "0"], "--minibatch-size"),
    (["--minibatch-size", "48"], "--minibatch-size"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--eval-size", "0"], "--eval-size"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--max-steps", "0"], "--max-steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--gamma-min", "1.5"], "--gamma-min"),
    (["--precision", "8-bit"], "--precision"),
    (["--strategy", "deepspeed"], "--strategy"),
    (["--rollout-engine", "vllm"], "--rollout-engine"),
    (["--pretrain.max-steps", "0"], "--pretrain.max-steps"),
    (["--pretrain.lr", "-1"], "--pretrain.lr"),
    (["--pretrain.model.n-experts", "0"], "--pretrain.model.n-experts"),
    (["--pretrain.max-step", "3"], "--pretrain.max-step"),
    (["--config", "{tmp}"], "--config"),
    (["--config", "{empty_file}"], "--config"),
    (["--config", "{typo_config}"], "--config {typo_config}: Unrecognized options: --n-promts"),
    # values that only mean something together, or not at all
    (["--pretrain.seed", "5"], "--pretrain.seed"),                       # --seed seeds the warm start
    (["--gamma-floor-share", "0.1"], "--gamma-floor-share"),             # only --gamma-min auto reads it
    (["--model", "toy:{tiny}", "--pretrain.max-steps", "3"], "--pretrain.max-steps"),  # no warm start with --model
    (["--task", "countdown", "--task-options", "n_numbers=abc"], "knob n_numbers takes a whole number, not 'abc'"),
    (["--task-options", "max_operand=3,max_operand=4"], "max_operand is given twice"),
    (["--resume", "--overwrite"], "--overwrite"),
    # what used to be refused only once work had begun
    (["--strategy", "fsdp"], "--strategy fsdp2"),
    (["--devices", "3", "--accelerator", "cpu"], "--devices"),
    (["--max-new-tokens", "1000"], "at most 247"),                       # 256 positions, 9 for a+b= prompts
    (["--model", "toy:{tiny}", "--max-new-tokens", "56"], "at most 55"),  # TINY's 64 positions
    (["--model", "toy:{dense}"], "--loss rspo"),
    (["--model", "toy:{dense}", "--loss", "grpo", "--freeze-router"], "--freeze-router"),
    (["--model", "hf:{hf_dense}"], "--loss rspo"),
    (["--model", "hf:{hf_unknown_moe}", "--loss", "grpo"], "cannot hook"),
]


@pytest.mark.parametrize("flags, flag", BAD_INPUT, ids=[" ".join(flags) for flags, _ in BAD_INPUT])
def test_bad_input_is_one_line_naming_the_flag_before_any_work(tiny_checkpoint, tmp_path, capsys, flags, flag):
    paths = {"tmp": tmp_path, "not_a_checkpoint": not_a_checkpoint(tmp_path), "empty_file": empty_file(tmp_path),
             "bare_folder": bare_folder(tmp_path), "typo_config": config_file_with_unknown_key(tmp_path),
             "tiny": tiny_checkpoint, "dense": dense_checkpoint(tmp_path),
             "hf_dense": hf_config_only(tmp_path, "qwen3", model_type="qwen3"),
             "hf_unknown_moe": hf_config_only(tmp_path, "moe", model_type="deepseek_v3", n_routed_experts=8)}
    warm = tmp_path / "warm"
    defaults = ["--warmstart-dir", str(warm), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main([*defaults, *(token.format(**paths) for token in flags)])
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert exit_info.value.code != 0
    assert len(errors) == 1 and errors[0].startswith("error: ") and flag.format(**paths) in errors[0], errors
    assert captured.out == ""
    assert not warm.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--task", "nosuch"], ["--model", "toy:{not_a_checkpoint}"]],
                         ids=lambda flags: " ".join(flags))
def test_bad_input_from_the_shell_prints_one_line_and_nothing_else(tmp_path, flags):
    import subprocess
    import sys
    args = [token.format(not_a_checkpoint=not_a_checkpoint(tmp_path)) for token in flags]
    result = subprocess.run([sys.executable, "-m", "minirspo.train", "--warmstart-dir", str(tmp_path / "warm"),
                             *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and flags[0] in result.stderr, result.stderr
    assert not (tmp_path / "warm").exists()


def test_help_explains_every_flag(capsys):
    import re
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out)
    assert "Examples:" in text and "python -m minirspo.train --loss grpo --router-shift" in text
    # the rerun example gives the rerun a folder of its own (the first run's is a record, refused as --out)
    assert "--config runs/rspo/config.yaml --seed 1 --out runs/rspo-seed1" in text
    for group in ("task", "loss", "rollouts", "updates", "run", "scale", "warm-start", "pretrain"):
        assert f" {group} options " in text, group
    assert "{arithmetic,countdown}" in text and "{grpo,gspo,gmpo,rspo}" in text
    # every flag line is followed by its explanation, not only "(default: ...)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    flags = [i for i, line in enumerate(lines) if line.startswith("--")]
    assert len(flags) > 60
    for i in flags:
        assert not lines[i + 1].startswith("(default"), lines[i]
    for name in ("--max-steps", "--pretrain.max-steps", "--pretrain.model.n-experts", "--task-options",
                 "--router-shift", "--routing-replay", "--freeze-router", "--resume", "--activation-checkpointing"):
        assert any(line.split(",")[0].split()[0] == name for line in lines), name


@pytest.mark.parametrize("program", ["minirspo.train", "minirspo.compare"])
def test_help_into_a_reader_that_stops_early_ends_quietly(program):
    # `--help | head -3`: the reader is gone before the program writes (closed here before its imports end),
    # so every write fails with a broken pipe; no traceback, whatever the exit status (argparse's help ignores
    # the failed write and exits 0, tyro's raises and run_main exits 1)
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-m", program, "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert stderr == "", stderr


def test_the_progress_bar_counts_rl_steps_across_a_resume(tiny_checkpoint, tmp_path, monkeypatch):
    import minirspo.train
    seen = []
    make_bar = minirspo.train.rl_progress_bar

    def recording_bar(config, latest):
        bar = make_bar(config, latest)
        show = bar.show

        def record(trainer, pl_module):  # what the bar draws after each update: (k, N, its metrics)
            show(trainer, pl_module)
            task = bar.progress.tasks[0]
            seen.append((int(task.completed), int(task.total), task.fields["shown"]))
        bar.show = record
        return bar

    monkeypatch.setattr(minirspo.train, "rl_progress_bar", recording_bar)
    # 16 sequences per step in minibatches of 8: 2 optimiser steps per RL step
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "2"))
    assert [(k, n) for k, n, _ in seen] == [(0, 2), (1, 2), (2, 2)]
    assert seen[0][2] == "" and all(shown.startswith("reward: ") and " acc: " in shown for _, _, shown in seen[1:])
    seen.clear()
    main(tiny_args(tiny_checkpoint, tmp_path, "--max-steps", "4", "--resume"))
    assert [(k, n) for k, n, _ in seen] == [(2, 4), (3, 4), (4, 4)]  # starts at 2 of 4, not 0 of 2


def test_a_run_prints_what_happens_and_no_library_noise(tiny_checkpoint, tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "minirspo.train", *tiny_args(tiny_checkpoint, tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for noise in ("GPU available", "TPU available", "Tip:", "Trainer.fit", "LeafSpec", "Epoch", "v_num"):
        assert noise not in result.stdout, noise
    assert "RL: " in result.stdout and "2/2" in result.stdout and "held-out greedy accuracy" in result.stdout
