"""What an `a+b=` checkpoint knows, digit by digit: exact match, the leading digits, the units digit.

Greedy answers to the arithmetic task's held-out problems (the RL loop's evaluation set), split into the
leading digits (all but the last: the magnitude, carries included) and the units digit, (a + b) mod 10,
which the model must look up from both operands' last digits. A model that gets every leading digit right
and guesses the units digit scores ~10% exact match: the chance level that a 10% stopping threshold can be
crossed at without the units digit learnt (docs/default_run.md, "Why seed 2 does not learn").

An RL run's checkpoint (OUT/checkpoints/last.ckpt) is read into the architecture and tokenizer of the warm
start it began from (`--base`), so a run's start and end can be compared on more problems than it evaluated.

Examples:
    python benchmarks/digit_accuracy.py runs/warmstart/arithmetic-HASH/model.pt
    python benchmarks/digit_accuracy.py A/model.pt B/model.pt --problems 2000
    python benchmarks/digit_accuracy.py WARM/model.pt runs/rspo/checkpoints/last.ckpt --base WARM/model.pt
"""
import argparse
import sys
from pathlib import Path

import torch

from minirspo.module import greedy_responses
from minirspo.policy import Policy, load_policy
from minirspo.tasks import make_task


def digit_shares(answers: list[str], targets: list[str]) -> dict[str, float]:
    """Shares of answers right in full, in their leading digits (all but the last), in their last digit."""
    pairs = [(answer.strip(), target) for answer, target in zip(answers, targets, strict=True)]
    share = lambda hits: sum(hits) / len(pairs)  # noqa: E731
    return {
        "exact": share(answer == target for answer, target in pairs),
        "leading digits": share(answer[:-1] == target[:-1] for answer, target in pairs),
        "units digit": share(answer[-1:] == target[-1] for answer, target in pairs),
    }


def load_checkpoint(checkpoint: Path, base: Path | None = None) -> Policy:
    """A toy policy from a warm start (model.pt), or from an RL run's Lightning checkpoint (*.ckpt) read into
    the warm start `base`: the RL module holds the policy's model as `model`, so its weights are `model.*`."""
    policy = load_policy(f"toy:{base if checkpoint.suffix == '.ckpt' else checkpoint}")
    if checkpoint.suffix == ".ckpt":
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        policy.model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()
                                      if key.startswith("model.")})
    return policy


def digit_accuracy(policy: Policy, n_problems: int, max_new_tokens: int = 8) -> dict[str, float]:
    """Shares of held-out problems whose greedy answer is right in full, in its leading digits, in its last."""
    problems = make_task("arithmetic").eval_set(n_problems)
    with torch.no_grad():
        answers = greedy_responses(policy, problems, max_new_tokens)
    return digit_shares(answers, [str(p.target) for p in problems])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help="toy MoE checkpoints trained on a+b=: warm starts (model.pt) or RL checkpoints (*.ckpt)")
    parser.add_argument("--base", type=Path, help="the warm start (model.pt) that the *.ckpt RL checkpoints began from")
    parser.add_argument("--problems", type=int, default=1000, help="held-out problems to answer (default 1000)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in [*args.checkpoints, *([args.base] if args.base else [])] if not path.is_file()]
    if missing:
        sys.exit(f"error: checkpoint not found: {missing[0]}")
    if args.problems < 1:
        sys.exit("error: --problems must be >= 1")
    if args.base is None and any(path.suffix == ".ckpt" for path in args.checkpoints):
        sys.exit("error: an RL checkpoint (*.ckpt) needs --base, the warm start (model.pt) its run began from")
    print("| checkpoint | exact match | leading digits right | units digit right |\n|---|---|---|---|")
    for checkpoint in args.checkpoints:
        shares = digit_accuracy(load_checkpoint(checkpoint, args.base), args.problems)
        print(f"| {checkpoint} | " + " | ".join(f"{value:.3f}" for value in shares.values()) + " |")


if __name__ == "__main__":
    main()
