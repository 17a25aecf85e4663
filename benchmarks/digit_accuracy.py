"""What an `a+b=` checkpoint knows, digit by digit: exact match, the leading digits, the units digit.

Greedy answers to the arithmetic task's held-out problems (the RL loop's evaluation set), split into the
leading digits (all but the last: the magnitude, carries included) and the units digit, (a + b) mod 10,
which the model must look up from both operands' last digits. A model that gets every leading digit right
and guesses the units digit scores ~10% exact match: the chance level that a 10% stopping threshold can be
crossed at without the units digit learnt (docs/default_run.md, "Why seed 2 does not learn").

Examples:
    python benchmarks/digit_accuracy.py runs/warmstart/arithmetic-HASH/model.pt
    python benchmarks/digit_accuracy.py A/model.pt B/model.pt --problems 2000
"""
import argparse
import sys
from pathlib import Path

import torch

from minirspo.module import greedy_responses
from minirspo.policy import load_policy
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


def digit_accuracy(checkpoint: Path, n_problems: int, max_new_tokens: int = 8) -> dict[str, float]:
    """Shares of held-out problems whose greedy answer is right in full, in its leading digits, in its last."""
    problems = make_task("arithmetic").eval_set(n_problems)
    with torch.no_grad():
        answers = greedy_responses(load_policy(f"toy:{checkpoint}"), problems, max_new_tokens)
    return digit_shares(answers, [str(p.target) for p in problems])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="toy MoE checkpoints (model.pt) trained on a+b=")
    parser.add_argument("--problems", type=int, default=1000, help="held-out problems to answer (default 1000)")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.checkpoints if not path.is_file()]
    if missing or args.problems < 1:
        sys.exit(f"error: checkpoint not found: {missing[0]}" if missing else "error: --problems must be >= 1")
    print("| checkpoint | exact match | leading digits right | units digit right |\n|---|---|---|---|")
    for checkpoint in args.checkpoints:
        shares = digit_accuracy(checkpoint, args.problems)
        print(f"| {checkpoint} | " + " | ".join(f"{value:.3f}" for value in shares.values()) + " |")


if __name__ == "__main__":
    main()
