"""Autograder of the minirspo course assignments: grade one file, a folder of hand-ins, or a Gradescope submission.

Every property of the assignment (minirspo/course/assignments.py) runs as a Hypothesis test and earns the
points that the points file (tutorials/assignments/points.json) gives it, all or nothing. A failure is
reported as the call that rebuilds its inputs, e.g. `example_inputs("rspo_loss", "mask", batch=1, tokens=2,
seed=0)`, next to the expected and received numbers. The grader never shows the reference's source: a
traceback keeps only the frames of the submitted file. A submission that imports the reference
implementation scores 0.

Examples:
    python -m minirspo.grade router_shift_ratio              # the student file in tutorials/assignments/
    python -m minirspo.grade rspo_loss --submission my_rspo.py
    python -m minirspo.grade rspo_loss --submission minirspo/loss.py     # the reference: full marks
    python -m minirspo.grade moe_dispatch --submission toy_moe/model.py
    python -m minirspo.grade rspo_loss --submissions hand-ins/ --csv grades.csv
    python -m minirspo.grade rspo_loss --submission /autograder/submission --gradescope /autograder/results/results.json
    python -m minirspo.grade rspo_loss --points my_points.json --max-examples 100
"""
import argparse
import csv
import hashlib
import importlib.util
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple

import torch
from hypothesis import HealthCheck, Phase, given, settings
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from minirspo.course.assignments import ASSIGNMENTS, ASSIGNMENTS_DIR, Assignment, Mismatch, Property, short_repr

DEFAULT_POINTS = ASSIGNMENTS_DIR / "points.json"
MAX_EXAMPLES = 25  # per property; every example is a few tiny tensors, so a whole assignment takes seconds


# ---------------------------------------------------------------------------------------------------
# Loading a submission and the points
# ---------------------------------------------------------------------------------------------------

class SubmissionError(Exception):
    """The file cannot be graded at all (does not import, lacks a function, borrows the reference)."""


def _own_frames(error: BaseException, path: Path) -> str:
    """The error with only the traceback frames of the submitted file: the reference's never show."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename).resolve() == path]
    return "".join(traceback.format_list(frames)) + f"{type(error).__name__}: {error}"


def find_in_folder(assignment: Assignment, folder: Path) -> Path:
    """The file to grade in a folder of one student's files (Gradescope's /autograder/submission): the
    student file's name (e.g. rspo_loss.py) anywhere under it, else its only *.py file."""
    name = Path(assignment.student_file).name
    for candidates in (sorted(folder.rglob(name)), sorted(folder.rglob("*.py"))):
        if len(candidates) == 1:
            return candidates[0]
    found = ", ".join(path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*.py"))) or "no *.py file"
    raise SubmissionError(f"submit one file named {name}; {folder} holds {found}")


def load_submission(assignment: Assignment, path: Path | str) -> dict[str, Callable]:
    """Import the file and return its graded functions by name; SubmissionError says what is wrong."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SubmissionError(f"submission file not found: {path}")
    module_name = f"submission_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as error:  # SystemExit or KeyboardInterrupt from a student file must not end grading
        raise SubmissionError(f"importing {path.name} failed:\n{_own_frames(error, path)}") from None
    borrowed = sorted(name for name, value in vars(module).items()
                      if any(_reaches(value, reference) for reference in assignment.reference_objects))
    if borrowed:
        raise SubmissionError(f"{path.name} imports the reference implementation ({', '.join(borrowed)}); "
                              f"write your own")
    return {name: _graded_function(module, name, path) for name in assignment.graded}


def _reaches(value, reference) -> bool:
    """`value` is the reference object, or a package above the reference module (`import minirspo.loss`
    binds `minirspo`, through which `minirspo.loss.rspo_loss` is reachable)."""
    if value is reference:
        return True
    return (isinstance(value, ModuleType) and isinstance(reference, ModuleType)
            and reference.__name__.startswith(value.__name__ + "."))


def _graded_function(module: ModuleType, dotted_name: str, path: Path) -> Callable:
    target = module
    for part in dotted_name.split("."):
        if not hasattr(target, part):
            raise SubmissionError(f"{path.name} must define {dotted_name}")
        target = getattr(target, part)
    code = getattr(inspect.unwrap(target), "__code__", None)
    if code is None or Path(code.co_filename).resolve() != path:
        raise SubmissionError(f"{dotted_name} must be a function written in {path.name}")
    return target


def load_points(path: Path | str | None = None) -> dict[str, dict[str, float]]:
    """{assignment: {property: points}} from a JSON points file; every property needs a value >= 0."""
    path = Path(path) if path is not None else DEFAULT_POINTS
    if not path.is_file():
        raise FileNotFoundError(f"points file not found: {path} (pass --points FILE)")
    points = json.loads(path.read_text())
    for assignment_name, by_property in points.items():
        if assignment_name not in ASSIGNMENTS:
            raise ValueError(f"{path}: unknown assignment {assignment_name!r}; choose from {sorted(ASSIGNMENTS)}")
        names = {prop.name for prop in ASSIGNMENTS[assignment_name].properties}
        if set(by_property) != names:
            raise ValueError(f"{path}: {assignment_name} must give points to exactly {sorted(names)}; "
                             f"missing {sorted(names - set(by_property))}, unknown {sorted(set(by_property) - names)}")
        for name, value in by_property.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{path}: {assignment_name}.{name} must be a number >= 0, got {value!r}")
    return points


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


def run_property(assignment: Assignment, prop: Property, functions: dict[str, Callable], path: Path,
                 max_examples: int) -> str | None:
    """None if every example passed, else the shrunk counterexample as text."""
    failures: list[tuple[dict, BaseException]] = []
    not_implemented: list[NotImplementedError] = []

    # no explain phase: it re-runs the shrunk example many times only to annotate Hypothesis's own report
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink))
    @given(example=prop.examples)
    def test(example):
        try:
            prop.check(functions, prop.build(**example))
        except NotImplementedError as error:
            not_implemented.append(error)  # no counterexample to shrink: Hypothesis would only spend seconds
        except Exception as error:
            failures.append((example, error))
            raise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few entries: starting intra-op threads costs more than it saves
    try:
        test()
    except Exception:
        example, error = failures[-1]  # Hypothesis replays the shrunk example last
        return _describe_failure(assignment, prop, example, error, path)
    finally:
        torch.set_num_threads(threads)
    if not_implemented:
        return f"not implemented yet: {not_implemented[0]}"
    return None


def _describe_failure(assignment: Assignment, prop: Property, example: dict, error: BaseException,
                      path: Path) -> str:
    arguments = ", ".join(f"{key}={value!r}" for key, value in example.items())
    inputs = prop.build(**example)
    shown = "\n".join(f"    {name} = {short_repr(value) if isinstance(value, Tensor) else repr(value)}"
                      for name, value in inputs.items() if name != "self")
    what = str(error) if isinstance(error, Mismatch) else f"your code raised:\n{_own_frames(error, path)}"
    return (f"{what}\nreproduce:\n    from minirspo.course import example_inputs\n"
            f"    inputs = example_inputs({assignment.name!r}, {prop.name!r}, {arguments})\n"
            f"    {prop.function or assignment.graded[0]}(**inputs)\ninputs:\n{shown}")


def grade(assignment_name: str, submission: Path | str, points: dict[str, dict[str, float]] | None = None,
          max_examples: int = MAX_EXAMPLES) -> Report:
    """Grade one file (or the one file of a student's folder): every property of the assignment, all or nothing."""
    if assignment_name not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment_name!r}; choose one of {sorted(ASSIGNMENTS)}")
    assignment = ASSIGNMENTS[assignment_name]
    points = (points if points is not None else load_points())[assignment_name]
    path = Path(submission).resolve()
    try:
        if path.is_dir():
            path = find_in_folder(assignment, path)
        functions = load_submission(assignment, path)
    except SubmissionError as error:
        scores = [PropertyScore(prop.name, prop.checks, points[prop.name], 0.0, None)
                  for prop in assignment.properties]
        return Report(assignment_name, path, scores, str(error))
    scores = []
    for prop in assignment.properties:
        failure = run_property(assignment, prop, functions, path, max_examples)
        scores.append(PropertyScore(prop.name, prop.checks, points[prop.name],
                                    points[prop.name] if failure is None else 0.0, failure))
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
                 points: dict[str, dict[str, float]] | None = None, max_examples: int = MAX_EXAMPLES) -> list[Report]:
    """Grade every *.py under `folder` (student = path without .py) and write one CSV row per student."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py submissions under {folder}")
    points = points if points is not None else load_points()
    reports = [grade(assignment_name, path, points, max_examples) for path in files]
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
                     points: dict[str, dict[str, float]] | None = None, max_examples: int = MAX_EXAMPLES,
                     visibility: str = "visible") -> Report:
    """Grade one submission (a file, or Gradescope's /autograder/submission folder) and write results.json."""
    start = time.monotonic()
    report = grade(assignment_name, submission, points, max_examples)
    results = gradescope_results(report, time.monotonic() - start, visibility)
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minirspo.grade", description=__doc__,
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
    args = parser.parse_args(argv)
    if (args.submissions is None) != (args.csv is None):
        parser.error("--submissions and --csv go together")
    if args.submissions is not None and args.submission is not None:
        parser.error("give either --submission FILE or --submissions DIR, not both")
    if args.submissions is not None and args.gradescope is not None:
        parser.error("--gradescope grades one submission: give --submission FILE_OR_FOLDER, not --submissions")
    if args.visibility is not None and args.gradescope is None:
        parser.error("--visibility applies to --gradescope results only")
    if args.max_examples < 1:
        parser.error(f"--max-examples must be >= 1, got {args.max_examples}")
    console = Console()
    try:
        points = load_points(args.points)
        if args.submissions is not None:
            reports = grade_folder(args.assignment, args.submissions, args.csv, points, args.max_examples)
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
            report = write_gradescope(args.assignment, submission, args.gradescope, points, args.max_examples,
                                      args.visibility or "visible")
            print_report(report, console)
            console.print(f"Gradescope results: {report.total:g} / {report.max_total:g} -> {args.gradescope}")
            return
        print_report(grade(args.assignment, submission, points, args.max_examples), console)
    except (FileNotFoundError, ValueError) as error:
        Console(stderr=True).print(f"[red]error:[/] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
