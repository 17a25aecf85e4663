"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default `ci`).

ci:  few examples and a fixed seed, so the whole suite stays under 3 minutes on 2 cores and CI is reproducible.
dev: ten times the examples with fresh randomness each run; use it when changing a loss or its references:
     HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest -q tests/test_loss.py
"""

import os

from hypothesis import settings

# deadline=None: the float64 references are deliberately slow Python loops, and first calls pay torch warm-up.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
