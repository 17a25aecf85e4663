"""The RL tasks: seeded problems, a safe verifier and the format + correctness reward.

Notation: B batch of (problem, response) pairs.

- `ArithmeticTask`, a smoke test: prompt `12+34=`, reference answer `46`.
- `CountdownTask`, the task of the paper's small-scale study: prompt `3 7 12>33:` (the numbers, then the
  target), answer an expression that hits the target using each given number at most once, e.g. `3*7+12`.
Prompts are plain text (the tokenizer adds the chat markers). The same problems feed the supervised warm
start as (prompt, answer) pairs and the RL loop as prompts to score.

Verification never calls `eval`: `parse_expression` is a recursive-descent parser over exact
`fractions.Fraction` values for the grammar

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "/") factor)*
    factor     := number | "(" expression ")"        number := ASCII digits; spaces are skipped

and anything else (letters, `**`, unary minus, a trailing `=33`) is malformed.

Splits: a problem belongs to "eval" when the hash of its canonical key falls in the first `EVAL_SHARE` of
the hash range, else to "train", so the splits are disjoint for every seed and every sample size.
"""
from __future__ import annotations

import hashlib
import math
import operator
import random
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch

# Format + correctness reward, the split of TinyZero's Countdown reward (score=1.0, format_score=0.1).
REWARD_CORRECT = 1.0  # well-formed and right
REWARD_WELL_FORMED = 0.1  # parses (an integer / an expression) but is wrong: reused number, miss, x/0
REWARD_MALFORMED = 0.0  # does not parse

SPLITS = ("train", "eval")
EVAL_SHARE = 0.1  # share of the problem space held out for evaluation
EVAL_SEED = 20251027  # `eval_set` draws with this seed, so every run evaluates on the same problems
MAX_DRAWS_PER_PROBLEM = 1000  # rejection-sampling budget before knobs are declared impossible

_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM_PRECEDENCE = 3
_LEXEME = re.compile(r"([0-9]+)|([-+*/()])|(\s+)|(.)", flags=re.DOTALL)


@dataclass(frozen=True)
class Problem:
    prompt: str  # plain text: "12+34=" or "3 7 12>33:"
    answer: str  # a reference solution: "46" or "3*7+12"
    numbers: tuple[int, ...]  # the operands (arithmetic) or the numbers to use (Countdown)
    target: int  # the value a correct answer equals


class MalformedExpression(ValueError):
    """The text is not an expression of the grammar in the module docstring."""


@dataclass(frozen=True)
class ParsedExpression:
    value: Fraction | None  # None when the expression divides by zero
    numbers: tuple[int, ...]  # the number literals, in reading order


def parse_expression(text: str) -> ParsedExpression:
    """Parse and evaluate `text` exactly; raise `MalformedExpression` if it is not in the grammar."""
    tokens: list[int | str] = []
    for match in _LEXEME.finditer(text):
        number, symbol, _, other = match.groups()
        if other is not None:
            raise MalformedExpression(f"unexpected character {other!r} in {text!r}")
        if number is not None:
            tokens.append(int(number))
        elif symbol is not None:
            tokens.append(symbol)
    parser = _Parser(tokens)
    value = parser.expression()
    if parser.position != len(tokens):
        raise MalformedExpression(f"unexpected {tokens[parser.position]!r} in {text!r}")
    return ParsedExpression(value, tuple(parser.numbers))


class _Parser:
    """One method per grammar rule; a division by zero makes the value None but parsing goes on, so that
    the rest of the text is still checked for form."""

    def __init__(self, tokens: list[int | str]):
        self.tokens, self.position, self.numbers = tokens, 0, []

    def peek(self) -> int | str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> int | str | None:
        token = self.peek()
        self.position += 1
        return token

    def expression(self) -> Fraction | None:
        value = self.term()
        while self.peek() in ("+", "-"):
            symbol = self.take()
            value = _apply(symbol, value, self.term())
        return value

    def term(self) -> Fraction | None:
        value = self.factor()
        while self.peek() in ("*", "/"):
            symbol = self.take()
            value = _apply(symbol, value, self.factor())
        return value

    def factor(self) -> Fraction | None:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            value = self.expression()
            if self.take() != ")":
                raise MalformedExpression("missing ')'")
            return value
        found = "end of text" if token is None else repr(token)
        raise MalformedExpression(f"expected a number or '(', got {found}")


def _apply(symbol: str, left: Fraction | None, right: Fraction | None) -> Fraction | None:
    if left is None or right is None or (symbol == "/" and right == 0):
        return None
    return _OPERATIONS[symbol](left, right)


def _canonical_ops(ops: str | Sequence[str], allowed: str, name: str) -> str:
    joined = "".join(ops)
    if not joined or not set(joined) <= set(allowed) or len(set(joined)) != len(joined):
        raise ValueError(f"{name}.ops must be distinct symbols from {allowed!r}, got {ops!r}")
    return joined


def split_of(key: str) -> str:
    """"eval" for the first EVAL_SHARE of the sha256 range, else "train"."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "eval" if digest < EVAL_SHARE * 2**64 else "train"


class Task(ABC):
    """Seeded sampling shared by every task; a task says how to draw, key and reward one problem."""

    @abstractmethod
    def draw(self, rng: random.Random) -> Problem | None:
        """One random problem, or None when this draw is rejected (the sampler draws again)."""

    @abstractmethod
    def key(self, problem: Problem) -> str:
        """A canonical key: problems that differ only cosmetically share it (and so share a split)."""

    @abstractmethod
    def reward(self, problem: Problem, response: str) -> float:
        """REWARD_CORRECT, REWARD_WELL_FORMED or REWARD_MALFORMED for one decoded response."""

    @abstractmethod
    def longest_prompt(self) -> str:
        """A prompt at least as long, in characters, as any this task draws: a run checks before it starts
        that every prompt and its response fit the model's positions (a byte-level BPE token is >= 1 byte)."""

    def sample(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        """`n` independent problems of `split` (they may repeat), the same list for the same seed."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng, problems = random.Random(seed), []
        for _ in range(MAX_DRAWS_PER_PROBLEM * n):
            if len(problems) == n:
                break
            problem = self.draw(rng)
            if problem is not None and split_of(self.key(problem)) == split:
                problems.append(problem)
        if len(problems) < n:
            raise ValueError(
                f"{self}: found {len(problems)} of {n} {split!r} problems in {MAX_DRAWS_PER_PROBLEM * n} draws;"
                " widen the knobs (number/operand and target ranges)"
            )
        return problems

    def eval_set(self, n: int) -> list[Problem]:
        """The fixed held-out problems: `eval_set(m)` is a prefix of `eval_set(n)` for m <= n."""
        return self.sample(n, seed=EVAL_SEED, split="eval")


@dataclass(frozen=True)
class ArithmeticTask(Task):
    """`a+b=` with a, b in 0..max_operand; the answer is the integer result. Defaults: the CPU prototype's
    smoke test (operands 0..99, addition), which a 3.4M-parameter toy MoE learns in about a minute."""

    max_operand: int = 99
    ops: str = "+"  # any of "+-*"; "-" makes negative answers like "-7"

    def __post_init__(self):
        if self.max_operand < 0:
            raise ValueError(f"ArithmeticTask.max_operand must be >= 0, got {self.max_operand}")
        object.__setattr__(self, "ops", _canonical_ops(self.ops, "+-*", "ArithmeticTask"))

    def draw(self, rng: random.Random) -> Problem:
        left, right = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        symbol = rng.choice(self.ops)
        result = _OPERATIONS[symbol](left, right)
        prompt = f"{left}{symbol}{right}="
        return Problem(prompt=prompt, answer=str(result), numbers=(left, right), target=result)

    def key(self, problem: Problem) -> str:
        return problem.prompt

    def longest_prompt(self) -> str:
        return f"{self.max_operand}+{self.max_operand}="

    def reward(self, problem: Problem, response: str) -> float:
        text = response.strip()
        if re.fullmatch(r"-?[0-9]+", text) is None:
            return REWARD_MALFORMED
        return REWARD_CORRECT if int(text) == problem.target else REWARD_WELL_FORMED


@dataclass(frozen=True)
class CountdownTask(Task):
    """n_numbers numbers in [min_number, max_number] and a target in [min_target, max_target] that a random
    expression over all the numbers reaches, so every problem has a solution (the reference answer). A
    response may use any of + - * / and any subset of the numbers, each at most once; `ops` only shapes the
    generated targets ("/" only where it divides exactly). Defaults: the CPU prototype's Countdown-lite
    (3 numbers in 1..20, + - *, targets 1..200); the harder TinyZero-style setting is e.g. n_numbers=4,
    max_number=100, ops="+-*/"."""

    n_numbers: int = 3
    min_number: int = 1
    max_number: int = 20
    ops: str = "+-*"  # any of "+-*/"
    min_target: int = 1
    max_target: int = 200

    def __post_init__(self):
        if self.n_numbers < 2:
            raise ValueError(f"CountdownTask.n_numbers must be >= 2, got {self.n_numbers}")
        if not 0 <= self.min_number <= self.max_number:
            numbers = f"{self.min_number}..{self.max_number}"
            raise ValueError(f"CountdownTask needs 0 <= min_number <= max_number, got {numbers}")
        if self.min_target > self.max_target:
            targets = f"{self.min_target}..{self.max_target}"
            raise ValueError(f"CountdownTask needs min_target <= max_target, got {targets}")
        object.__setattr__(self, "ops", _canonical_ops(self.ops, "+-*/", "CountdownTask"))

    def draw(self, rng: random.Random) -> Problem | None:
        numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.n_numbers)]
        # (value, text, precedence of its outermost operator); join two random parts until one is left
        parts = [(Fraction(number), str(number), _ATOM_PRECEDENCE) for number in numbers]
        while len(parts) > 1:
            left = parts.pop(rng.randrange(len(parts)))
            right = parts.pop(rng.randrange(len(parts)))
            joined = _join(rng.choice(self.ops), left, right)
            if joined is None:
                return None
            parts.append(joined)
        value, expression, _ = parts[0]
        if not self.min_target <= value <= self.max_target:
            return None
        target = int(value)
        prompt = f"{' '.join(map(str, numbers))}>{target}:"
        return Problem(prompt=prompt, answer=expression, numbers=tuple(numbers), target=target)

    def key(self, problem: Problem) -> str:
        return f"{' '.join(map(str, sorted(problem.numbers)))}>{problem.target}"

    def longest_prompt(self) -> str:
        target = max(str(self.min_target), str(self.max_target), key=len)
        return f"{' '.join([str(self.max_number)] * self.n_numbers)}>{target}:"

    def reward(self, problem: Problem, response: str) -> float:
        try:
            parsed = parse_expression(response)
        except MalformedExpression:
            return REWARD_MALFORMED
        uses_given_numbers = not Counter(parsed.numbers) - Counter(problem.numbers)
        return REWARD_CORRECT if uses_given_numbers and parsed.value == problem.target else REWARD_WELL_FORMED


def _join(symbol: str, left: tuple, right: tuple) -> tuple | None:
    """Combine two (value, text, precedence) parts with the fewest brackets; None for an inexact division,
    which keeps every intermediate value an integer."""
    (left_value, left_text, left_precedence), (right_value, right_text, right_precedence) = left, right
    if symbol == "/" and (right_value == 0 or left_value % right_value != 0):
        return None
    precedence = _PRECEDENCE[symbol]
    if left_precedence < precedence:
        left_text = f"({left_text})"
    # a-(b+c) and a/(b*c) need their brackets; a+(b-c) and a*(b/c) do not, in exact arithmetic
    if right_precedence < precedence or (right_precedence == precedence and symbol in "-/"):
        right_text = f"({right_text})"
    return _OPERATIONS[symbol](left_value, right_value), f"{left_text}{symbol}{right_text}", precedence


def score(task: Task, problems: Sequence[Problem], responses: Sequence[str]) -> torch.Tensor:
    """Rewards (B,) float32. A verifier that raises or returns NaN/inf is an error naming the prompt, never
    a silent 0 that would quietly bias the advantages."""
    if len(problems) != len(responses):
        raise ValueError(f"got {len(problems)} problems but {len(responses)} responses")
    rewards = []
    for problem, response in zip(problems, responses):
        where = f"{type(task).__name__}.reward on prompt {problem.prompt!r}, response {response!r}"
        try:
            reward = float(task.reward(problem, response))
        except Exception as error:
            raise RuntimeError(f"{where} raised {error!r}") from error
        if not math.isfinite(reward):
            raise RuntimeError(f"{where} returned {reward}")
        rewards.append(reward)
    return torch.tensor(rewards, dtype=torch.float32)  # (B,)


TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, **knobs) -> Task:
    """`make_task("countdown", n_numbers=4, ops="+-*/")`; the knobs are the task dataclass's fields."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**knobs)
