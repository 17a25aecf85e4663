"""Autograder of the minirspo course assignments: grade one file, a folder of hand-ins, or a Gradescope submission.

Every property of the assignment (minirspo/course/assignments.py) runs as a Hypothesis test and earns the
points that the points file (tutorials/assignments/points.json) gives it, all or nothing. A failure is
reported as the call that rebuilds its inputs, e.g. `example_inputs("rspo_loss", "mask", batch=1, tokens=2,
seed=0)`, next to the expected and received numbers. The grader never shows the reference's source: a
traceback keeps only the frames of the submitted file.

Each submission runs in its own process (sandbox.py, child.py), where the reference implementation does not
exist: it receives inputs and returns outputs as data, and this process, which holds the reference,
compares them. Each property has a time limit (--time-limit, 20 s): overrunning it scores the property 0,
"timed out after 20 s", and the next property starts a fresh process. A process that exits, crashes or
sends garbage scores 0 for every property not yet graded. Results (table, CSV, results.json) are written
here, after the submission's process is gone.

Examples:
    python -m minirspo.grade router_shift_ratio              # the student file in tutorials/assignments/
    python -m minirspo.grade rspo_loss --submission my_rspo.py
    python -m minirspo.grade rspo_loss --submission minirspo/loss.py     # the reference: full marks
    python -m minirspo.grade moe_dispatch --submission toy_moe/model.py
    python -m minirspo.grade rspo_loss --submissions hand-ins/ --csv grades.csv
    python -m minirspo.grade rspo_loss --submission /autograder/submission --gradescope /autograder/results/results.json
    python -m minirspo.grade rspo_loss --points my_points.json --max-examples 100 --time-limit 60
    sudo python -m minirspo.grade rspo_loss --submission x.py --sandbox-user student   # as run_autograder does
"""
import argparse
import csv
import json
import math
import os
import pwd
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, Phase, given, settings
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from minirspo.course.assignments import (ASSIGNMENTS, ASSIGNMENTS_DIR, REFERENCE_PACKAGES, Assignment, Mismatch,
                                         Property, short_repr)
from minirspo.course.sandbox import ChildGone, Sandbox, SubmissionError, SubmissionRaised

DEFAULT_POINTS = ASSIGNMENTS_DIR / "points.json"
MAX_EXAMPLES = 25  # per property; every example is a few tiny tensors, so a whole assignment takes seconds
TIME_LIMIT = 20.0  # seconds of the submission's own time per property (its import too): ~100x what it needs


# ---------------------------------------------------------------------------------------------------
# Loading a submission and the points
# ---------------------------------------------------------------------------------------------------

def find_in_folder(assignment: Assignment, folder: Path) -> Path:
    """The file to grade in a folder of one student's files (Gradescope's /autograder/submission): the
    student file's name (e.g. rspo_loss.py) anywhere under it, else its only *.py file."""
    name = Path(assignment.student_file).name
    for candidates in (sorted(folder.rglob(name)), sorted(folder.rglob("*.py"))):
        if len(candidates) == 1:
            return candidates[0]
    found = ", ".join(path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*.py"))) or "no *.py file"
    raise SubmissionError(f"submit one file named {name}; {folder} holds {found}")


def open_sandbox(assignment: Assignment, path: Path, time_limit: float = TIME_LIMIT,
                 user: str | None = None) -> Sandbox:
    """The submission imported in its own process, ready for `run`; SubmissionError or ChildGone if not."""
    sandbox = Sandbox(path, str(path), assignment.graded, assignment.given, REFERENCE_PACKAGES, time_limit, user)
    try:
        sandbox.load()
    except BaseException:
        sandbox.close()
        raise
    return sandbox


def load_points(path: Path | str | None = None) -> dict[str, dict[str, float]]:
    """{assignment: {property: points}} from a JSON points file; every property needs a value >= 0."""
    path = Path(path) if path is not None else DEFAULT_POINTS
    if not path.is_file():
        raise FileNotFoundError(f"points file not found: {path} (pass --points FILE)")
    try:
        points = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a JSON points file: {error}") from None
    if not isinstance(points, dict) or not all(isinstance(value, dict) for value in points.values()):
        raise ValueError(f"{path} must hold {{assignment: {{property: points}}}}, e.g. "
                         f'{{"rspo_loss": {{"value": 2, ...}}, ...}}')
    for assignment_name, by_property in points.items():
        if assignment_name not in ASSIGNMENTS:
            raise ValueError(f"{path}: unknown assignment {assignment_name!r}; choose from {sorted(ASSIGNMENTS)}")
        names = {prop.name for prop in ASSIGNMENTS[assignment_name].properties}
        if set(by_property) != names:
            raise ValueError(f"{path}: {assignment_name} must give points to exactly {sorted(names)}; "
                             f"missing {sorted(names - set(by_property))}, unknown {sorted(set(by_property) - names)}")
        for name, value in by_property.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{path}: {assignment_name}.{name} must be a number >= 0, got {value!r}")
    return points


def points_for(points: dict[str, dict[str, float]], assignment_name: str, where: str = "the points file") -> dict[str, float]:
    if assignment_name not in points:
        raise ValueError(f"{where} gives no points to {assignment_name}; it has {sorted(points)}")
    return points[assignment_name]


# ---------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------

class PropertyScore(NamedTuple):
    name: str
    checks: str
    points: float
    earned: float
    failure: str | None  # None when it passed; else what went wrong and how to reproduce it


class Report(NamedTuple):
    assignment: str
    submission: Path
    scores: list[PropertyScore]
    problem: str | None  # why nothing could be graded, if so

    @property
    def total(self) -> float:
        return sum(score.earned for score in self.scores)

    @property
    def max_total(self) -> float:
        return sum(score.points for score in self.scores)


def run_property(assignment: Assignment, prop: Property, sandbox: Sandbox,
                 max_examples: int) -> tuple[str | None, ChildGone | None]:
    """(None if every example passed, else the shrunk counterexample as text; why the sandbox is gone, if so)."""
    failures: list[tuple[dict, BaseException]] = []
    not_implemented: list[str] = []
    gone: list[ChildGone] = []

    # no explain phase: it re-runs the shrunk example many times only to annotate Hypothesis's own report
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))
    @given(example=prop.examples)
    def test(example):
        if gone:
            return  # the remaining examples pass unseen: the property is scored from `gone`
        try:
            prop.check(sandbox, prop.build(**example))
        except ChildGone as error:
            gone.append(error)
        except SubmissionRaised as error:
            if error.is_a("NotImplementedError"):  # nothing to shrink: Hypothesis would only spend seconds
                not_implemented.append(error.message)
                return
            failures.append((example, error))
            raise
        except Exception as error:
            failures.append((example, error))
            raise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few entries: starting intra-op threads costs more than it saves
    try:
        test()
    except Exception:
        if not gone:
            example, error = failures[-1]  # Hypothesis replays the shrunk example last
            return _describe_failure(assignment, prop, example, error), None
    finally:
        torch.set_num_threads(threads)
    if gone:
        return str(gone[0]), gone[0]
    if not_implemented:
        return f"not implemented yet: {not_implemented[0]}", None
    return None, None


def _describe_failure(assignment: Assignment, prop: Property, example: dict, error: BaseException) -> str:
    arguments = ", ".join(f"{key}={value!r}" for key, value in example.items())
    inputs = prop.build(**example)
    shown = "\n".join(f"    {name} = {short_repr(value) if isinstance(value, Tensor) else repr(value)}"
                      for name, value in inputs.items() if name != "self")
    if isinstance(error, Mismatch):
        what = str(error)
    elif isinstance(error, SubmissionRaised):
        what = f"your code raised:\n{error.traceback}"
    else:
        what = f"the grader could not compare your output: {type(error).__name__}: {error}"
    return (f"{what}\nreproduce:\n    from minirspo.course import example_inputs\n"
            f"    inputs = example_inputs({assignment.name!r}, {prop.name!r}, {arguments})\n"
            f"    {prop.function or assignment.graded[0]}(**inputs)\ninputs:\n{shown}")


def grade(assignment_name: str, submission: Path | str, points: dict[str, dict[str, float]] | None = None,
          max_examples: int = MAX_EXAMPLES, time_limit: float = TIME_LIMIT, user: str | None = None) -> Report:
    """Grade one file (or the one file of a student's folder) in its own process: every property of the
    assignment, all or nothing, each within `time_limit` seconds of the submission's time."""
    if assignment_name not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment_name!r}; choose one of {sorted(ASSIGNMENTS)}")
    assignment = ASSIGNMENTS[assignment_name]
    points = points_for(points if points is not None else load_points(), assignment_name)
    path = Path(submission).resolve()

    def score(prop: Property, failure: str | None) -> PropertyScore:
        return PropertyScore(prop.name, prop.checks, points[prop.name], points[prop.name] if failure is None else 0.0,
                             failure)

    scores: list[PropertyScore] = []
    sandbox, ended = None, None  # ended: why the properties not yet graded cannot be
    try:
        if path.is_dir():
            path = find_in_folder(assignment, path)
        if not path.is_file():
            raise SubmissionError(f"submission file not found: {path}")
        for prop in assignment.properties:
            if sandbox is None and ended is None:
                try:
                    sandbox = open_sandbox(assignment, path, time_limit, user)
                except (SubmissionError, ChildGone) as error:
                    if not scores:
                        raise SubmissionError(str(error)) from None
                    ended = str(error)
            if ended is not None:
                scores.append(score(prop, f"not graded: {ended}"))
                continue
            sandbox.budget = time_limit
            failure, gone = run_property(assignment, prop, sandbox, max_examples)
            if gone is not None:
                sandbox.close()
                sandbox = None
                ended = None if gone.timed_out else str(gone)  # a timeout costs its property, a crash the rest
            scores.append(score(prop, failure))
    except SubmissionError as error:
        return Report(assignment_name, path, [score(prop, None)._replace(earned=0.0) for prop in assignment.properties],
                      str(error))
    finally:
        if sandbox is not None:
            sandbox.close()
    return Report(assignment_name, path, scores, None)


def score_table(report: Report) -> Table:
    table = Table(title=f"{report.assignment}: {report.submission}")
    for column, justify in (("property", "left"), ("checks", "left"), ("result", "left"), ("points", "right")):
        table.add_column(column, justify=justify)
    for score in report.scores:
        result = "[green]pass" if score.earned == score.points and report.problem is None else "[red]fail"
        table.add_row(score.name, score.checks, result, f"{score.earned:g} / {score.points:g}")
    table.add_section()
    table.add_row("[bold]total", "", "", f"[bold]{report.total:g} / {report.max_total:g}")
    return table


def print_report(report: Report, console: Console) -> None:
    console.print(score_table(report))
    if report.problem is not None:
        console.print(Text(report.problem, style="red"))
    for score in report.scores:
        if score.failure is not None:
            console.rule(f"[red]{score.name}")
            console.print(Text(score.failure), soft_wrap=True)  # unwrapped: the reproduce line is copied


def grade_folder(assignment_name: str, folder: Path | str, csv_path: Path | str,
                 points: dict[str, dict[str, float]] | None = None, **options) -> list[Report]:
    """Grade every *.py under `folder` (student = path without .py), each in its own process, and write one
    CSV row per student; `options` go to `grade` (max_examples, time_limit, user)."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py submissions under {folder}")
    points = points if points is not None else load_points()
    reports = [grade(assignment_name, path, points, **options) for path in files]
    names = [prop.name for prop in ASSIGNMENTS[assignment_name].properties]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["submission", *names, "total", "max", "problem"])
        for path, report in zip(files, reports):
            writer.writerow([path.relative_to(folder).with_suffix("").as_posix(),
                             *(f"{score.earned:g}" for score in report.scores),
                             f"{report.total:g}", f"{report.max_total:g}", report.problem or ""])
    return reports


GRADESCOPE_VISIBILITY = ("visible", "hidden", "after_due_date", "after_published")


def gradescope_results(report: Report, seconds: float, visibility: str = "visible") -> dict:
    """The report in Gradescope's autograder results format (results.json): one test per property, with its
    points as max_score, and the total as the submission's score. Students see each test's `output` (what
    it checks, then the counterexample when it failed) under `visibility`; the grader's console output
    (Gradescope's stdout) stays with the instructors."""
    if visibility not in GRADESCOPE_VISIBILITY:
        raise ValueError(f"unknown visibility {visibility!r}; choose one of {list(GRADESCOPE_VISIBILITY)}")
    tests = []
    for score in report.scores:
        passed = report.problem is None and score.failure is None
        outcome = "passed" if passed else (report.problem or score.failure)
        tests.append({"name": score.name, "score": score.earned, "max_score": score.points,
                      "status": "passed" if passed else "failed", "output": f"checks: {score.checks}\n\n{outcome}",
                      "output_format": "text", "visibility": visibility})
    summary = f"{report.assignment}: {report.total:g} / {report.max_total:g}"
    return {"score": report.total, "execution_time": round(seconds, 3),
            "output": summary if report.problem is None else f"{summary}\n\n{report.problem}",
            "output_format": "text", "visibility": visibility, "stdout_visibility": "hidden", "tests": tests}


def write_gradescope(assignment_name: str, submission: Path | str, results_path: Path | str,
                     points: dict[str, dict[str, float]] | None = None, visibility: str = "visible",
                     **options) -> Report:
    """Grade one submission (a file, or Gradescope's /autograder/submission folder) and write results.json,
    after its process is gone. If the grader itself fails, results.json still says so (0 points, "tell your
    instructor") before the error propagates to the console; `options` go to `grade`."""
    start = time.monotonic()
    points = points if points is not None else load_points()
    try:
        report = grade(assignment_name, submission, points, **options)
    except Exception as error:
        scores = [PropertyScore(prop.name, prop.checks, points_for(points, assignment_name)[prop.name], 0.0, None)
                  for prop in ASSIGNMENTS[assignment_name].properties]
        failed = Report(assignment_name, Path(submission), scores,
                        f"the autograder failed, tell your instructor: {type(error).__name__}: {error}")
        _write_json(results_path, gradescope_results(failed, time.monotonic() - start, visibility))
        raise
    _write_json(results_path, gradescope_results(report, time.monotonic() - start, visibility))
    return report


def _write_json(path: Path | str, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line (what was given, what is accepted), exit 2: no usage block to scroll past."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m minirspo.grade", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assignment", choices=sorted(ASSIGNMENTS), help="the assignment to grade")
    parser.add_argument("--submission", type=Path, metavar="FILE_OR_FOLDER",
                        help="the file to grade, or a folder holding one student's file (found by the student "
                             "file's name, else its only *.py) (default: the student file in tutorials/assignments/)")
    parser.add_argument("--submissions", type=Path, metavar="FOLDER", help="grade every *.py under this folder (needs --csv)")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="with --submissions: write one row per submission here")
    parser.add_argument("--gradescope", type=Path, metavar="RESULTS_JSON",
                        help="also write Gradescope's autograder results (one test per property) to this file, "
                             "e.g. /autograder/results/results.json")
    parser.add_argument("--visibility", choices=GRADESCOPE_VISIBILITY,
                        help="with --gradescope: when students see the tests' results (default: visible)")
    parser.add_argument("--points", type=Path, metavar="FILE", help=f"points file (default: {DEFAULT_POINTS})")
    parser.add_argument("--max-examples", type=int, default=MAX_EXAMPLES, metavar="N",
                        help="Hypothesis examples per property (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, metavar="SECONDS",
                        help="the submission's time per property, its import too; past it the property scores 0, "
                             "'timed out' (default: %(default)g)")
    parser.add_argument("--sandbox-user", metavar="USER",
                        help="run submissions as this unprivileged user (the grader must run as root; "
                             "run_autograder passes 'student')")
    args = parser.parse_args(argv)
    for problem in argument_problems(args):
        parser.error(problem)
    return args


def argument_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the flags that can be told before grading starts (the first one is shown)."""
    problems = []
    if (args.submissions is None) != (args.csv is None):
        problems.append("--submissions and --csv go together")
    if args.submissions is not None and args.submission is not None:
        problems.append("give either --submission FILE or --submissions DIR, not both")
    if args.submissions is not None and args.gradescope is not None:
        problems.append("--gradescope grades one submission: give --submission FILE_OR_FOLDER, not --submissions")
    if args.visibility is not None and args.gradescope is None:
        problems.append("--visibility applies to --gradescope results only")
    if args.max_examples < 1:
        problems.append(f"--max-examples must be >= 1, got {args.max_examples}")
    if not 0 < args.time_limit < math.inf:
        problems.append(f"--time-limit must be a number of seconds > 0, got {args.time_limit:g}")
    if args.submission is not None and not args.submission.is_dir() and not args.submission.is_file():
        problems.append(f"--submission {args.submission}: no such file or folder")
    elif args.submission is not None and args.submission.is_file() and args.submission.suffix != ".py":
        problems.append(f"--submission {args.submission}: give a .py file or a folder holding one")
    if args.submissions is not None and not args.submissions.is_dir():
        problems.append(f"--submissions {args.submissions}: no such folder")
    elif args.submissions is not None and not any(args.submissions.rglob("*.py")):
        problems.append(f"--submissions {args.submissions}: no *.py file in it")
    for flag, path in (("--csv", args.csv), ("--gradescope", args.gradescope)):
        if path is not None and path.is_dir():
            problems.append(f"{flag} {path} is a folder: give a file name")
    if args.csv is not None and not args.csv.parent.is_dir():
        problems.append(f"--csv {args.csv}: folder {args.csv.parent} does not exist")
    if args.sandbox_user is not None:
        problems.extend(_sandbox_user_problems(args.sandbox_user))
    return problems


def _sandbox_user_problems(user: str) -> list[str]:
    try:
        record = pwd.getpwnam(user)
    except KeyError:
        return [f"--sandbox-user {user}: no such user"]
    if os.geteuid() != 0:
        return [f"--sandbox-user {user}: only a grader running as root can run submissions as another user"]
    if record.pw_uid == 0:
        return [f"--sandbox-user {user}: give an unprivileged user, not root"]
    return []


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    try:
        points = load_points(args.points)
        points_for(points, args.assignment, str(args.points or DEFAULT_POINTS))
    except (FileNotFoundError, ValueError) as error:
        print(f"python -m minirspo.grade: error: {error}", file=sys.stderr)
        sys.exit(2)
    if os.geteuid() == 0 and args.sandbox_user is None:
        print("note: the grader runs as root, so submissions do too: pass --sandbox-user USER (docs/instructors.md)",
              file=sys.stderr)
    options = {"max_examples": args.max_examples, "time_limit": args.time_limit, "user": args.sandbox_user}
    console = Console()
    if args.submissions is not None:
        reports = grade_folder(args.assignment, args.submissions, args.csv, points, **options)
        table = Table(title=f"{args.assignment}: {len(reports)} submissions -> {args.csv}")
        for column in ("submission", "total", "problem"):
            table.add_column(column)
        for report in reports:
            name = report.submission.relative_to(args.submissions.resolve()).as_posix()
            problem = report.problem.splitlines()[-1] if report.problem else ""
            table.add_row(name, f"{report.total:g} / {report.max_total:g}", Text(problem))
        console.print(table)
        return
    submission = args.submission or ASSIGNMENTS_DIR / ASSIGNMENTS[args.assignment].student_file
    if args.gradescope is not None:
        report = write_gradescope(args.assignment, submission, args.gradescope, points, args.visibility or "visible",
                                  **options)
        print_report(report, console)
        console.print(f"Gradescope results: {report.total:g} / {report.max_total:g} -> {args.gradescope}")
        return
    print_report(grade(args.assignment, submission, points, **options), console)


if __name__ == "__main__":
    main()
