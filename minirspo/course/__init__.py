"""The course: assignments whose reference solution is the package itself, and their autograder.

    assignments.py   what each assignment asks for and the Hypothesis properties that check it
    grade.py         running the properties, points, score tables, CSV and Gradescope results, the CLI
                     (`python -m minirspo.grade`)
    sandbox.py       the grader's side of a submission's own process: start, time limit, round trips
    child.py         that process's main: imports the submission without the package, answers calls
    wire.py          what crosses between them (JSON data, never pickle) and the one way both call code
"""
from minirspo.course.assignments import ASSIGNMENTS, example_inputs

__all__ = ["ASSIGNMENTS", "example_inputs"]
