"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default `ci`).

ci:  few examples and a fixed seed, so the whole suite stays under 3 minutes on 2 cores and CI is reproducible.
dev: ten times the examples with fresh randomness each run; use it when changing a loss or its references:
     HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest -q tests/test_loss.py
"""

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

# deadline=None: the float64 references are deliberately slow Python loops, and first calls pay torch warm-up.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def digit_accuracy():
    """benchmarks/digit_accuracy.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("digit_accuracy", Path(__file__).parents[1] / "benchmarks/digit_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
