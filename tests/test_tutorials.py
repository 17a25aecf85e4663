"""Every tutorial runs top to bottom as a script in fast mode (MINIRSPO_FAST=1, what `make tutorials` runs
in full), writes every figure it saves, and converts to a notebook.

Each tutorial runs on a copy in a temporary folder, so its figures and runs land there and not in the
checkout. The copies share one folder, so tutorial 4 reuses the warm start that tutorial 3 trained, as in
`make tutorials`.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("[0-9][0-9]_*.py"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tutorials")


def saved_figures(source: str) -> list[str]:
    """The PNG names a tutorial passes to savefig(HERE / "...")."""
    return re.findall(r'savefig\(HERE / "([^"]+\.png)"', source)


def test_tutorials_are_found():
    assert [path.name[:2] for path in TUTORIALS] == [f"{i:02d}" for i in range(1, len(TUTORIALS) + 1)]
    assert len(TUTORIALS) >= 4


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_runs_in_fast_mode(tutorial, workdir):
    script = workdir / tutorial.name
    shutil.copy(tutorial, script)
    # one torch thread per tutorial: the suite runs with `pytest -n 2` on 2 cores, and oversubscribed cores
    # make torch's thread pool several times slower than a single thread on these small models
    environment = os.environ | {"MINIRSPO_FAST": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, script.name], cwd=workdir, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{tutorial.name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    figures = saved_figures(tutorial.read_text())
    assert figures, f"{tutorial.name} saves no figure"
    for name in figures:
        assert (workdir / name).read_bytes()[:8] == PNG_SIGNATURE, f"{tutorial.name} did not write {name}"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_converts_to_a_notebook(tutorial, tmp_path):
    jupytext = pytest.importorskip("jupytext", reason="the `tutorials` extra: pip install -e '.[tutorials]'")
    notebook_path = tmp_path / f"{tutorial.stem}.ipynb"
    jupytext.write(jupytext.read(tutorial), notebook_path)
    notebook = json.loads(notebook_path.read_text())
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert kinds[0] == "markdown" and kinds.count("code") >= 3 and kinds.count("markdown") >= 3
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
