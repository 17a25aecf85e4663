"""`python -m minirspo.grade`: the course autograder under its short name; it lives in minirspo/course/.

Examples: `python -m minirspo.grade --help`.
"""
from minirspo.course.grade import main

if __name__ == "__main__":
    main()
