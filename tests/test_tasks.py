"""minirspo.tasks: the safe parser, the verifiers, seeded disjoint splits, and loud scoring errors."""
import builtins
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minirspo.tasks import (
    EVAL_SHARE,
    REWARD_CORRECT,
    REWARD_MALFORMED,
    REWARD_WELL_FORMED,
    ArithmeticTask,
    CountdownTask,
    MalformedExpression,
    Problem,
    make_task,
    parse_expression,
    score,
    split_of,
)


def _random_expression_text() -> st.SearchStrategy[str]:
    """Texts of the grammar with random bracketing and spacing, so operator precedence is exercised."""
    numbers = st.integers(0, 30).map(str)

    def joined(children):
        def render(parts):
            left, symbol, space, right, bracketed = parts
            text = f"{left}{space}{symbol}{space}{right}"
            return f"({text})" if bracketed else text

        spaces = st.sampled_from(["", " "])
        return st.tuples(children, st.sampled_from("+-*/"), spaces, children, st.booleans()).map(render)

    return st.recursive(numbers, joined, max_leaves=6)


@settings(deadline=None, max_examples=200)
@given(_random_expression_text())
def test_parser_agrees_with_python_on_generated_arithmetic(text):
    # Python's own parser is the oracle here, on test-generated digits-and-operators text only.
    as_fractions = re.sub(r"[0-9]+", lambda match: f"Fraction({match.group()})", text)
    parsed = parse_expression(text)
    assert parsed.numbers == tuple(int(number) for number in re.findall(r"[0-9]+", text))
    try:
        expected = eval(as_fractions, {"Fraction": Fraction, "__builtins__": {}})
    except ZeroDivisionError:
        expected = None
    assert parsed.value == expected


@pytest.mark.parametrize(
    "text, value",
    [("3*7+12", 33), ("3+7*12", 87), ("(1+2)*3", 9), (" 4 / ( 2 - 1 ) ", 4), ("7-2-1", 4), ("8/4/2", 1),
     ("1/3+1/3", Fraction(2, 3)), ("5/(2-2)", None)],
)
def test_parser_accepts_the_grammar(text, value):
    assert parse_expression(text).value == value


@pytest.mark.parametrize(
    "text",
    ["", "   ", "3+", "(3", "3)", "()", "3**2", "3//2", "-3", "3 4", "3*7+12=33", "2^3", "1e3", "1.5", "\u0663",
     "__import__('os').system('true')", "(lambda: 1)()", "5/(2-2))"],
)
def test_parser_rejects_everything_else(text):
    with pytest.raises(MalformedExpression):
        parse_expression(text)


def test_verifiers_never_evaluate_code(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the verifier called eval/exec/compile")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, forbidden)
    problem = Problem(prompt="3 7 12>33:", answer="3*7+12", numbers=(3, 7, 12), target=33)
    responses = ["__import__('os').system('touch pwned')", "open('x', 'w')", "3*7+12", "33"]
    assert [CountdownTask().reward(problem, r) for r in responses] == [
        REWARD_MALFORMED, REWARD_MALFORMED, REWARD_CORRECT, REWARD_WELL_FORMED
    ]


@pytest.mark.parametrize(
    "numbers, target, response, reward",
    [
        ((11, 2, 5), 33, "11*(5-2)", REWARD_CORRECT),
        ((11, 2, 5), 33, "11+11+11", REWARD_WELL_FORMED),  # hits the target by reusing 11
        ((11, 11, 11), 33, "11+11+11", REWARD_CORRECT),  # three 11s given, three used
        ((3, 11, 5), 33, "3*11", REWARD_CORRECT),  # a subset of the numbers is allowed
        ((3, 11, 5), 33, "33", REWARD_WELL_FORMED),  # 33 is not a given number
        ((3, 11, 5), 33, "3*11+5", REWARD_WELL_FORMED),  # misses the target
        ((3, 11, 5), 33, "3/(5-5)", REWARD_WELL_FORMED),  # division by zero is a wrong answer
        ((3, 11, 5), 33, "3*11=33", REWARD_MALFORMED),
        ((3, 11, 5), 33, "", REWARD_MALFORMED),
    ],
)
def test_countdown_reward(numbers, target, response, reward):
    problem = Problem(prompt="p", answer="a", numbers=numbers, target=target)
    assert CountdownTask().reward(problem, response) == reward


@pytest.mark.parametrize(
    "response, reward",
    [("46", REWARD_CORRECT), (" 46 ", REWARD_CORRECT), ("45", REWARD_WELL_FORMED), ("-46", REWARD_WELL_FORMED),
     ("12+34", REWARD_MALFORMED), ("4 6", REWARD_MALFORMED), ("", REWARD_MALFORMED)],
)
def test_arithmetic_reward(response, reward):
    problem = Problem(prompt="12+34=", answer="46", numbers=(12, 34), target=46)
    assert ArithmeticTask().reward(problem, response) == reward


TASK_SETTINGS = [
    ArithmeticTask(),
    ArithmeticTask(max_operand=9, ops="+-*"),
    CountdownTask(),
    CountdownTask(n_numbers=4, max_number=100, ops="+-*/", max_target=100),
    CountdownTask(n_numbers=2, min_number=0, max_number=5, ops="/-", min_target=-10),
]


@pytest.mark.parametrize("task", TASK_SETTINGS, ids=repr)
def test_every_reference_answer_scores_full_marks(task):
    problems = task.sample(300, seed=1) + task.eval_set(100)
    assert score(task, problems, [problem.answer for problem in problems]).eq(REWARD_CORRECT).all()


@pytest.mark.parametrize("task", TASK_SETTINGS, ids=repr)
def test_problems_respect_the_knobs(task):
    for problem in task.sample(300, seed=2):
        if isinstance(task, CountdownTask):
            assert len(problem.numbers) == task.n_numbers
            assert all(task.min_number <= number <= task.max_number for number in problem.numbers)
            assert task.min_target <= problem.target <= task.max_target
            assert problem.prompt == f"{' '.join(map(str, problem.numbers))}>{problem.target}:"
        else:
            assert all(0 <= number <= task.max_operand for number in problem.numbers)
            assert re.fullmatch(rf"[0-9]+[{re.escape(task.ops)}][0-9]+=", problem.prompt)


@pytest.mark.parametrize("task", TASK_SETTINGS, ids=repr)
def test_no_prompt_takes_more_toy_tokens_than_the_longest_prompt_has_bytes(task):
    # what `minirspo.config.check_fits_model` relies on to refuse a too long --max-new-tokens before any work
    from toy_moe.tokenizer import load_tokenizer
    tokenizer, bound = load_tokenizer(), len(task.longest_prompt().encode())
    for problem in task.sample(1000, seed=3) + task.eval_set(200):
        assert len(tokenizer.encode(problem.prompt)) <= len(problem.prompt.encode()) <= bound, problem.prompt


@pytest.mark.parametrize("task", [ArithmeticTask(), CountdownTask()], ids=repr)
def test_splits_are_disjoint_and_seeds_reproducible(task):
    train, held_out = task.sample(3000, seed=0), task.eval_set(300)
    assert {task.key(p) for p in train}.isdisjoint({task.key(p) for p in held_out})
    assert task.sample(50, seed=7) == task.sample(50, seed=7)
    assert task.sample(50, seed=7) != task.sample(50, seed=8)
    assert task.eval_set(20) == held_out[:20]


def test_eval_share_of_the_problem_space():
    prompts = [f"{a}+{b}=" for a in range(100) for b in range(100)]
    share = sum(split_of(prompt) == "eval" for prompt in prompts) / len(prompts)
    # a hash split is Binomial(10000, 0.1): standard deviation 0.003, so +-0.02 is more than 6 sigma
    assert abs(share - EVAL_SHARE) < 0.02


def test_countdown_key_ignores_the_order_of_the_numbers():
    task = CountdownTask()
    first = Problem(prompt="3 7 12>33:", answer="3*7+12", numbers=(3, 7, 12), target=33)
    second = Problem(prompt="12 3 7>33:", answer="3*7+12", numbers=(12, 3, 7), target=33)
    assert task.key(first) == task.key(second)


def test_score_returns_float32_rewards():
    task = ArithmeticTask()
    problems = task.sample(3, seed=0)
    rewards = score(task, problems, [problems[0].answer, "-1", "nope"])
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == pytest.approx([REWARD_CORRECT, REWARD_WELL_FORMED, REWARD_MALFORMED])
    with pytest.raises(ValueError, match="3 problems but 2 responses"):
        score(task, problems, ["1", "2"])


def test_a_throwing_verifier_names_the_prompt(monkeypatch):
    task = CountdownTask()
    problems = task.sample(2, seed=0)

    def broken_reward(self, problem, response):
        raise KeyError("boom")

    monkeypatch.setattr(CountdownTask, "reward", broken_reward)
    with pytest.raises(RuntimeError, match=re.escape(repr(problems[0].prompt))):
        score(task, problems, ["1", "2"])


@pytest.mark.parametrize("bad_reward", [math.nan, math.inf])
def test_a_non_finite_reward_names_the_prompt(monkeypatch, bad_reward):
    task = ArithmeticTask()
    problems = task.sample(2, seed=0)
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, problem, response: bad_reward)
    with pytest.raises(RuntimeError, match=re.escape(repr(problems[0].prompt))):
        score(task, problems, ["1", "2"])


def test_make_task_and_bad_knobs():
    assert make_task("countdown", n_numbers=4) == CountdownTask(n_numbers=4)
    assert make_task("arithmetic", ops=("+", "-")) == ArithmeticTask(ops="+-")
    with pytest.raises(ValueError, match="arithmetic.*countdown"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="ops"):
        make_task("arithmetic", ops="+/")
    with pytest.raises(ValueError, match="n_numbers"):
        CountdownTask(n_numbers=1)
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().sample(1, seed=0, split="test")


def test_impossible_knobs_are_an_error_not_a_hang():
    with pytest.raises(ValueError, match="widen the knobs"):
        CountdownTask(max_number=3, min_target=1000, max_target=2000).sample(1, seed=0)


def test_digit_accuracy_splits_an_answer_into_its_leading_digits_and_its_units_digit(digit_accuracy):
    # right / magnitude only / units only / a digit short / single-digit sum, with the whitespace decode leaves
    answers = ["113", "110 ", "123", "11", "7"]
    targets = ["113", "113", "113", "113", "7"]
    shares = digit_accuracy.digit_shares(answers, targets)
    assert shares == {"exact": 2 / 5, "leading digits": 3 / 5, "units digit": 3 / 5}
    with pytest.raises(ValueError):  # answers and targets of different lengths are a caller's bug
        digit_accuracy.digit_shares(["1"], ["1", "2"])
