"""The simplest loop that should learn: on-policy REINFORCE with a group baseline, as a sanity reference.

Notation: B = n_prompts × G sequences, P prompt tokens, N response tokens.

One step: sample G responses to each of n_prompts prompts with the current policy, reward them, take
group advantages Â (minirspo.loss.group_advantages), then ONE optimiser step on

    loss = −mean_i Â_i · (1/|y_i|) Σ_t log π_θ(y_it)

on the very tokens that were sampled. No old policy, no ratio, no clipping, no minibatches, no Lightning:
nothing that `python -m minirspo.train` adds is here. With one minibatch per rollout the project's GRPO
loss has exactly this gradient (its ratio is 1 and no clip is active), so the two must learn alike;
when the project's loop learns worse than this one, the difference is in what it adds.

It goes through the same doors as the RL loop (the Policy interface, the task's verifier, the same
held-out greedy accuracy), so it measures the loop, not a different model or metric.

Examples:
    python benchmarks/reinforce_reference.py --model toy:runs/warmstart/arithmetic-HASH/model.pt
    python benchmarks/reinforce_reference.py --model toy:PATH --lr 3e-4 --steps 300 --seed 1 --csv runs/ref.csv
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from minirspo.loss import group_advantages
from minirspo.module import greedy_accuracy, step_seed
from minirspo.policy import load_policy
from minirspo.tasks import make_task, score


def reinforce_step(policy, task, *, n_prompts: int, group_size: int, max_new_tokens: int, temperature: float,
                   seed: int, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> dict[str, float]:
    problems = [p for p in task.sample(n_prompts, seed=seed, split="train") for _ in range(group_size)]
    prompt_ids, prompt_mask = policy.encode_prompts([p.prompt for p in problems])          # (B, P)
    policy.model.eval()
    rollout = policy.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=torch.Generator().manual_seed(seed))
    policy.model.train()
    rewards = score(task, problems, policy.decode_responses(rollout.tokens, rollout.mask))  # (B,)
    advantages = group_advantages(rewards, group_size)                                      # (B,)
    logprobs = policy.score(prompt_ids, prompt_mask, rollout.tokens, rollout.mask,
                            temperature=temperature).logprobs                                # (B, N)
    weight = rollout.mask.float()                                                           # (B, N)
    per_sequence = (logprobs * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)          # (B,)
    loss = -(advantages * per_sequence).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), max_grad_norm)
    optimizer.step()
    return {"reward_mean": float(rewards.mean()), "loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/reinforce_reference.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="toy:PATH of a warm-start model.pt (or hf:PATH)")
    parser.add_argument("--task", default="arithmetic", help="arithmetic or countdown (default: arithmetic)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument("--steps", type=int, default=200, help="RL steps, one optimiser step each (default: 200)")
    parser.add_argument("--n-prompts", type=int, default=32, help="prompts per step (default: 32)")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt, G (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="response length cap (default: 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--eval-every", type=int, default=20, help="held-out greedy accuracy every k steps (20)")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out problems (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds prompts and samples (default: 0)")
    parser.add_argument("--csv", type=Path, help="write one row per step here")
    args = parser.parse_args(argv)
    for name in ("lr", "steps", "n_prompts", "eval_every", "eval_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.group_size < 2:
        parser.error(f"--group-size must be >= 2 (a group baseline needs two responses), got {args.group_size}")
    try:
        policy = load_policy(args.model)
        task = make_task(args.task)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    torch.manual_seed(args.seed)
    eval_problems = task.eval_set(args.eval_size)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=args.lr, weight_decay=0.0)
    rows, started = [], time.perf_counter()
    for step in range(args.steps + 1):
        row = {"step": step}
        if step % args.eval_every == 0 or step == args.steps:
            row["accuracy"] = float(greedy_accuracy(policy, task, eval_problems, args.max_new_tokens))
            print(f"step {step:4d}  held-out greedy accuracy {row['accuracy']:.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        if step < args.steps:
            row |= reinforce_step(policy, task, n_prompts=args.n_prompts, group_size=args.group_size,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=step_seed(args.seed, step), optimizer=optimizer, max_grad_norm=1.0)
        rows.append(row)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["step", "accuracy", "reward_mean", "loss"])
            writer.writeheader()
            writer.writerows(rows)
    accuracies = [row["accuracy"] for row in rows if "accuracy" in row]
    print(f"held-out greedy accuracy {accuracies[0]:.3f} -> {accuracies[-1]:.3f} (best {max(accuracies):.3f}) "
          f"in {args.steps} steps, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
