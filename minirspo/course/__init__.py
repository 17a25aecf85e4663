"""The course: assignments whose reference solution is the package itself, and their autograder.

    assignments.py   what each assignment asks for and the Hypothesis properties that check it
    grade.py         loading a submission, points, score tables, CSV and Gradescope results, the CLI
                     (`python -m minirspo.grade`)
"""
from minirspo.course.assignments import ASSIGNMENTS, example_inputs

__all__ = ["ASSIGNMENTS", "example_inputs"]
