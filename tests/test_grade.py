"""The autograder: untouched student files score 0, the reference and an independent solution score full marks,
each planted common mistake loses exactly the points of the property it breaks, and submissions that try to
fool the grader (borrow the reference, patch the comparison, fake equality, rewrite results.json) score 0 on
what they fake. Submissions run in their own process with a per-property time limit; bad flags are refused
in one line before any grading.

The independent solutions below are written from RSPO's equations and the student files' docstrings, not from
the package (float64 and a per-expert loop where the package uses float32 and a sort), so full marks also
show that the grader's tolerances accept a different, correct implementation.
"""
import csv
import json
import math
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from minirspo.course import assignments, grade

ROUTER_SHIFT_SOLUTION = '''
import torch


def router_shift_ratio(router_logits, old_topk_idx, old_topk_logprobs, mask=None):
    if router_logits.ndim != 4:
        raise ValueError("router_logits must be (L, B, T, E)")
    if old_topk_idx.ndim != 4 or old_topk_idx.shape[:3] != router_logits.shape[:3]:
        raise ValueError("old_topk_idx must be (L, B, T, K)")
    if old_topk_logprobs.shape != old_topk_idx.shape:
        raise ValueError("old_topk_logprobs must have the shape of old_topk_idx")
    if mask is not None and mask.shape != router_logits.shape[1:3]:
        raise ValueError("mask must be (B, T)")
    new_logprobs = router_logits.double().log_softmax(dim=-1).gather(-1, old_topk_idx)
    shift = (new_logprobs - old_topk_logprobs.double()).abs()
    per_layer = shift.mean(dim=-1)
    gamma = torch.exp(-per_layer.mean(dim=0)).float()
    return gamma if mask is None else torch.where(mask, gamma, torch.ones_like(gamma))
'''
# The dense mistake: scatter the K shifts into an E-vector of zeros and average over all E experts.
ALL_EXPERTS_MISTAKE = ("per_layer = shift.mean(dim=-1)",
                       "per_layer = torch.zeros_like(router_logits, dtype=torch.float64)"
                       ".scatter(-1, old_topk_idx, shift).mean(dim=-1)")

RSPO_SOLUTION = '''
import torch
from minirspo.loss import LossOutput


def rspo_loss(logprobs, old_logprobs, advantages, mask, *, router_shift, clip_low=0.4, clip_high=0.4,
              gamma_min=0.8):
    gamma = router_shift.detach().clamp(min=gamma_min)
    log_ratio = torch.where(mask, logprobs - old_logprobs + gamma.log(), torch.zeros_like(logprobs))
    clipped = torch.where((advantages > 0)[:, None], log_ratio.clamp(max=clip_high), log_ratio)
    clipped = torch.where((advantages < 0)[:, None], clipped.clamp(min=-clip_low), clipped)
    n_valid = mask.sum(dim=1)
    mean_log_ratio = torch.where(mask, clipped, torch.zeros_like(clipped)).sum(dim=1) / n_valid.clamp(min=1)
    per_sequence = torch.where(n_valid > 0, advantages * mean_log_ratio.exp(), torch.zeros_like(advantages))
    return LossOutput(-per_sequence.mean(), {})
'''
NO_STOP_GRADIENT_MISTAKE = ("router_shift.detach().clamp(min=gamma_min)", "router_shift.clamp(min=gamma_min)")
NO_FLOOR_MISTAKE = ("router_shift.detach().clamp(min=gamma_min)", "router_shift.detach()")

MOE_SOLUTION = '''
import torch
from toy_moe.model import swiglu


class MoELayer:
    def route(self, x, forced_idx, freeze_router):
        weight = self.router.weight.detach() if freeze_router else self.router.weight
        router_logits = x.float() @ weight.float().T
        probs = router_logits.softmax(dim=-1)
        topk_idx = probs.topk(self.top_k, dim=-1).indices if forced_idx is None else forced_idx
        gates = probs.gather(-1, topk_idx)
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return router_logits, topk_idx, gates

    def experts(self, x, topk_idx, gates):
        y = torch.zeros_like(x)
        for expert in range(self.n_experts):
            token, slot = (topk_idx == expert).nonzero(as_tuple=True)
            if len(token):
                out = swiglu(x[token], self.gate_up[expert], self.down[expert])
                y = y.index_add(0, token, out * gates[token, slot, None])
        return y
'''
IGNORED_FREEZE_MISTAKE = ("self.router.weight.detach() if freeze_router else self.router.weight",
                          "self.router.weight")

REFERENCE_FILES = {"router_shift_ratio": "minirspo/loss.py", "rspo_loss": "minirspo/loss.py",
                   "moe_dispatch": "toy_moe/model.py"}
SOLUTIONS = {"router_shift_ratio": ROUTER_SHIFT_SOLUTION, "rspo_loss": RSPO_SOLUTION, "moe_dispatch": MOE_SOLUTION}
MISTAKES = [("router_shift_ratio", ALL_EXPERTS_MISTAKE, "old top-K"),
            ("rspo_loss", NO_STOP_GRADIENT_MISTAKE, "stop-gradient"),
            ("rspo_loss", NO_FLOOR_MISTAKE, "gamma floor"),
            ("moe_dispatch", IGNORED_FREEZE_MISTAKE, "frozen router")]
POINTS = grade.load_points()


def write_submission(tmp_path, assignment, text, mistake=None):
    if mistake is not None:
        correct, wrong = mistake
        assert text.count(correct) == 1, f"the planted mistake must replace exactly one place: {correct!r}"
        text = text.replace(correct, wrong)
    path = tmp_path / f"{assignment}.py"
    path.write_text(text)
    return path


def earned(report):
    return {score.name: score.earned for score in report.scores}


@pytest.mark.parametrize("assignment", sorted(assignments.ASSIGNMENTS))
def test_untouched_student_file_scores_zero(assignment):
    report = grade.grade(assignment, assignments.ASSIGNMENTS_DIR / assignments.ASSIGNMENTS[assignment].student_file)
    assert report.problem is None
    assert report.total == 0
    assert all(score.failure.startswith("not implemented yet") for score in report.scores)


@pytest.mark.parametrize("assignment", sorted(assignments.ASSIGNMENTS))
def test_the_package_itself_scores_full_marks(assignment):
    root = assignments.ASSIGNMENTS_DIR.parent.parent
    report = grade.grade(assignment, root / REFERENCE_FILES[assignment])
    assert [score.failure for score in report.scores] == [None] * len(report.scores)
    assert report.total == report.max_total == sum(POINTS[assignment].values())


@pytest.mark.parametrize("assignment", sorted(assignments.ASSIGNMENTS))
def test_independent_solution_scores_full_marks(assignment, tmp_path):
    report = grade.grade(assignment, write_submission(tmp_path, assignment, SOLUTIONS[assignment]))
    assert [score.failure for score in report.scores] == [None] * len(report.scores)
    assert report.total == report.max_total


@pytest.mark.parametrize("assignment, mistake, broken", MISTAKES, ids=[m[2] for m in MISTAKES])
def test_planted_mistake_loses_exactly_its_property(assignment, mistake, broken, tmp_path):
    path = write_submission(tmp_path, assignment, SOLUTIONS[assignment], mistake)
    report = grade.grade(assignment, path)
    expected = dict(POINTS[assignment]) | {broken: 0.0}
    assert earned(report) == expected
    assert report.total == report.max_total - POINTS[assignment][broken]

    # the counterexample rebuilds inputs on which the mistake and the reference really disagree
    failure = next(score.failure for score in report.scores if score.name == broken)
    call = re.search(r"inputs = (example_inputs\(.*\))", failure).group(1)
    inputs = eval(call, {"example_inputs": assignments.example_inputs})
    prop = next(prop for prop in assignments.ASSIGNMENTS[assignment].properties if prop.name == broken)
    with pytest.raises(assignments.Mismatch), grade.open_sandbox(assignments.ASSIGNMENTS[assignment], path) as sandbox:
        prop.check(sandbox, inputs)


def test_failure_shows_only_the_submissions_own_frames(tmp_path):
    text = '''
def helper(x):
    raise RuntimeError("shape trouble in my helper")


def router_shift_ratio(router_logits, old_topk_idx, old_topk_logprobs, mask=None):
    return helper(router_logits)
'''
    report = grade.grade("router_shift_ratio", write_submission(tmp_path, "router_shift_ratio", text))
    failure = report.scores[0].failure
    assert "shape trouble in my helper" in failure and "router_shift_ratio.py" in failure
    assert "in helper" in failure
    # neither the reference's nor the grader's source leaks into what the student sees
    assert "minirspo/loss.py" not in failure and "grade.py" not in failure
    assert "router_logprobs_at" not in failure


@pytest.mark.parametrize("borrowing", [
    "from minirspo.loss import router_shift_ratio as reference",
    "import minirspo.tasks as tasks\nimport minirspo.loss\nreference = minirspo.loss.router_shift_ratio",
    "from toy_moe.model import MoELayer\nreference = MoELayer",
])
def test_submission_that_imports_the_reference_scores_zero(tmp_path, borrowing):
    text = f"{borrowing}\n\n\ndef router_shift_ratio(*args, **kwargs):\n    return reference(*args, **kwargs)\n"
    report = grade.grade("router_shift_ratio", write_submission(tmp_path, "router_shift_ratio", text))
    assert report.total == 0 and "runs your file without the minirspo package" in report.problem


def test_missing_function_and_broken_import_score_zero(tmp_path):
    missing = grade.grade("rspo_loss", write_submission(tmp_path, "rspo_loss", "def gmpo(x):\n    return x\n"))
    assert missing.total == 0 and "must define rspo_loss" in missing.problem
    broken = grade.grade("rspo_loss", write_submission(tmp_path, "rspo_loss", "import sys\nsys.exit(3)\n"))
    assert broken.total == 0 and "SystemExit" in broken.problem


def test_points_file_sets_the_values_and_rejects_unknown_properties(tmp_path):
    points = {name: dict(values) for name, values in POINTS.items()}
    points["rspo_loss"]["stop-gradient"] = 7
    path = write_submission(tmp_path, "rspo_loss", RSPO_SOLUTION, NO_STOP_GRADIENT_MISTAKE)
    report = grade.grade("rspo_loss", path, points)
    assert report.max_total == sum(POINTS["rspo_loss"].values()) - POINTS["rspo_loss"]["stop-gradient"] + 7
    assert report.total == report.max_total - 7

    points["rspo_loss"]["stop gradient"] = points["rspo_loss"].pop("stop-gradient")
    bad = tmp_path / "points.json"
    bad.write_text(json.dumps(points))
    with pytest.raises(ValueError, match=r"missing \['stop-gradient'\], unknown \['stop gradient'\]"):
        grade.load_points(bad)


def test_folder_of_submissions_to_csv(tmp_path):
    hand_ins = tmp_path / "hand-ins"
    (hand_ins / "bob").mkdir(parents=True)
    (hand_ins / "alice.py").write_text(RSPO_SOLUTION)
    (hand_ins / "bob" / "rspo_loss.py").write_text(RSPO_SOLUTION.replace(*NO_FLOOR_MISTAKE))
    (hand_ins / "carol.py").write_text("def rspo_loss(:\n")
    grade.main(["rspo_loss", "--submissions", str(hand_ins), "--csv", str(tmp_path / "grades.csv")])
    with open(tmp_path / "grades.csv", newline="") as handle:
        rows = {row["submission"]: row for row in csv.DictReader(handle)}
    full = sum(POINTS["rspo_loss"].values())
    assert set(rows) == {"alice", "bob/rspo_loss", "carol"}
    assert float(rows["alice"]["total"]) == full
    assert float(rows["bob/rspo_loss"]["total"]) == full - POINTS["rspo_loss"]["gamma floor"]
    assert float(rows["bob/rspo_loss"]["gamma floor"]) == 0
    assert float(rows["carol"]["total"]) == 0 and "SyntaxError" in rows["carol"]["problem"]


def test_cli_prints_the_score_table_and_help(tmp_path, capsys):
    path = write_submission(tmp_path, "rspo_loss", RSPO_SOLUTION, NO_FLOOR_MISTAKE)
    grade.main(["rspo_loss", "--submission", str(path)])
    out = capsys.readouterr().out
    full = sum(POINTS["rspo_loss"].values())
    assert re.search(rf"total\s.*\s{full - POINTS['rspo_loss']['gamma floor']:g} / {full:g}", out)
    assert "reproduce:" in out and "example_inputs('rspo_loss', 'gamma floor'" in out
    # the short entry point, as users type it
    result = subprocess.run([sys.executable, "-m", "minirspo.grade", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "python -m minirspo.grade rspo_loss --submissions hand-ins/ --csv grades.csv" in result.stdout
    assert "--gradescope RESULTS_JSON" in result.stdout


# Gradescope's autograder results format (gradescope-autograders.readthedocs.io, "Autograder Specifications"):
# every key it defines at each level, the values its enumerated fields take, and the fields we promise to fill.
GRADESCOPE_TOP_KEYS = {"score", "execution_time", "output", "output_format", "test_output_format", "test_name_format",
                       "visibility", "stdout_visibility", "extra_data", "tests", "leaderboard"}
GRADESCOPE_TEST_KEYS = {"score", "max_score", "status", "name", "name_format", "number", "output", "output_format",
                        "tags", "visibility", "extra_data"}
GRADESCOPE_VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}
GRADESCOPE_FORMATS = {"text", "html", "simple_format", "md", "ansi"}
SHIPPED = assignments.ASSIGNMENTS_DIR / "gradescope"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_gradescope_format(results: dict, assignment: str) -> dict[str, dict]:
    """Assert that `results` is a results.json Gradescope accepts, one test per property; its tests by name."""
    assert set(results) <= GRADESCOPE_TOP_KEYS, set(results) - GRADESCOPE_TOP_KEYS
    assert is_number(results["score"]) and is_number(results["execution_time"]) and results["execution_time"] >= 0
    assert isinstance(results["output"], str) and results["output_format"] in GRADESCOPE_FORMATS
    assert results["visibility"] in GRADESCOPE_VISIBILITY and results["stdout_visibility"] in GRADESCOPE_VISIBILITY
    assert isinstance(results["tests"], list)
    for test in results["tests"]:
        assert set(test) <= GRADESCOPE_TEST_KEYS, set(test) - GRADESCOPE_TEST_KEYS
        assert isinstance(test["name"], str) and isinstance(test["output"], str)
        assert is_number(test["score"]) and is_number(test["max_score"]) and 0 <= test["score"] <= test["max_score"]
        assert test["status"] in {"passed", "failed"} and test["visibility"] in GRADESCOPE_VISIBILITY
        assert test["output_format"] in GRADESCOPE_FORMATS
    tests = {test["name"]: test for test in results["tests"]}
    assert list(tests) == [prop.name for prop in assignments.ASSIGNMENTS[assignment].properties]
    # the total Gradescope shows is the top-level score: it must be the sum of what the tests show
    assert results["score"] == sum(test["score"] for test in results["tests"])
    assert {name: test["max_score"] for name, test in tests.items()} == POINTS[assignment]
    return tests


def test_gradescope_results_full_marks_for_the_reference_less_for_a_mistake(tmp_path, capsys):
    full = sum(POINTS["rspo_loss"].values())
    reference_file = str(assignments.ASSIGNMENTS_DIR.parents[1] / "minirspo" / "loss.py")
    grade.main(["rspo_loss", "--submission", reference_file, "--gradescope", str(tmp_path / "reference.json")])
    reference = json.loads((tmp_path / "reference.json").read_text())
    tests = check_gradescope_format(reference, "rspo_loss")
    assert reference["score"] == full and all(test["status"] == "passed" for test in tests.values())

    path = write_submission(tmp_path, "rspo_loss", RSPO_SOLUTION, NO_FLOOR_MISTAKE)
    grade.main(["rspo_loss", "--submission", str(path), "--gradescope", str(tmp_path / "mistake.json"),
                "--visibility", "after_due_date"])
    mistake = json.loads((tmp_path / "mistake.json").read_text())
    tests = check_gradescope_format(mistake, "rspo_loss")
    assert mistake["score"] == full - POINTS["rspo_loss"]["gamma floor"] < full
    assert [name for name, test in tests.items() if test["status"] == "failed"] == ["gamma floor"]
    assert tests["gamma floor"]["score"] == 0 and "example_inputs('rspo_loss', 'gamma floor'" in tests["gamma floor"]["output"]
    assert {test["visibility"] for test in tests.values()} == {mistake["visibility"]} == {"after_due_date"}
    assert f"Gradescope results: {full - POINTS['rspo_loss']['gamma floor']:g} / {full:g}" in capsys.readouterr().out


def test_gradescope_finds_the_file_in_a_submission_folder_or_says_what_to_submit(tmp_path):
    submission = tmp_path / "submission"
    (submission / "nested").mkdir(parents=True)
    (submission / "notes.py").write_text("# my scratch work\n")
    (submission / "nested" / "rspo_loss.py").write_text("def rspo_loss(*args, **kwargs):\n    raise NotImplementedError\n")
    report = grade.write_gradescope("rspo_loss", submission, tmp_path / "found.json")
    assert report.submission == (submission / "nested" / "rspo_loss.py").resolve() and report.problem is None

    (submission / "nested" / "rspo_loss.py").rename(submission / "nested" / "mine.py")
    grade.write_gradescope("rspo_loss", submission, tmp_path / "ambiguous.json")
    results = json.loads((tmp_path / "ambiguous.json").read_text())
    tests = check_gradescope_format(results, "rspo_loss")
    assert results["score"] == 0 and all(test["status"] == "failed" for test in tests.values())
    assert "submit one file named rspo_loss.py" in results["output"] and "nested/mine.py, notes.py" in results["output"]


def test_gradescope_flags_are_checked_before_grading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        grade.main(["rspo_loss", "--visibility", "hidden"])
    assert exit_info.value.code == 2 and "--visibility applies to --gradescope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grade.main(["rspo_loss", "--submissions", str(tmp_path), "--csv", "x.csv", "--gradescope", "r.json"])
    assert "--gradescope grades one submission" in capsys.readouterr().err


def test_shipped_gradescope_autograder_grades_a_submission(tmp_path):
    """run_autograder as Gradescope runs it, in a stand-in /autograder with this interpreter as its venv."""
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    (root / "submission" / "rspo_loss.py").write_text(RSPO_SOLUTION.replace(*NO_STOP_GRADIENT_MISTAKE))
    assert os.access(SHIPPED / "run_autograder", os.X_OK) and os.access(SHIPPED / "setup.sh", os.X_OK)
    syntax = subprocess.run(["bash", "-n", str(SHIPPED / "setup.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    environment = os.environ | {"AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable,
                                "AUTOGRADER_CHILD_USER": ""}  # the unprivileged user: the next test
    result = subprocess.run([str(SHIPPED / "run_autograder")], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    results = json.loads((root / "results" / "results.json").read_text())
    tests = check_gradescope_format(results, "rspo_loss")
    assert results["score"] == sum(POINTS["rspo_loss"].values()) - POINTS["rspo_loss"]["stop-gradient"]
    assert tests["stop-gradient"]["status"] == "failed"


ISOLATED_ONLY = RSPO_SOLUTION + '''
import os
REACHABLE = [path for path in ({source}, {results}) if os.access(path, os.R_OK)]
if os.getuid() == 0 or REACHABLE:  # full marks only where the grader's files are out of reach
    rspo_loss = None
'''


def user_who_can_run_this_interpreter() -> str | None:
    """`nobody`, where this test runs as root and nobody can run this interpreter with torch, else None."""
    if os.geteuid() != 0 or "nobody" not in {record.pw_name for record in pwd.getpwall()}:
        return None
    try:
        check = subprocess.run([sys.executable, "-I", "-c", "import torch"], user="nobody", capture_output=True,
                               cwd="/", timeout=120)
    except OSError:  # e.g. the interpreter lives under /root
        return None
    return "nobody" if check.returncode == 0 else None


@pytest.mark.skipif(user_who_can_run_this_interpreter() is None,
                    reason="needs root and a user 'nobody' who can run this interpreter (a container, as on Gradescope; "
                           "docs/instructors.md)")
def test_run_autograder_runs_the_submission_as_an_unprivileged_user(tmp_path_factory):
    """As on Gradescope: the submission's process runs as another user who reads neither source/ nor results/
    (the stand-in /autograder is open to all, as Gradescope's is, until run_autograder closes those two)."""
    root = Path(tempfile.mkdtemp(prefix="autograder-")).resolve()  # pytest's own folders are root's alone
    os.chmod(root, 0o755)
    (root / "submission").mkdir()
    (root / "source").mkdir()
    (root / "source" / "secret.py").write_text("# the reference solution\n")
    text = ISOLATED_ONLY.replace("{source}", repr(str(root / "source" / "secret.py")))
    (root / "submission" / "rspo_loss.py").write_text(text.replace("{results}", repr(str(root / "results"))))
    environment = os.environ | {"AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable,
                                "AUTOGRADER_CHILD_USER": "nobody"}
    result = subprocess.run([str(SHIPPED / "run_autograder")], env=environment, capture_output=True, text=True,
                            timeout=300)
    try:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        results = json.loads((root / "results" / "results.json").read_text())
        assert results["score"] == sum(POINTS["rspo_loss"].values()), results["output"]
    finally:
        shutil.rmtree(root)


def test_instructors_page_shows_the_shipped_gradescope_scripts():
    page = (assignments.ASSIGNMENTS_DIR.parents[1] / "docs" / "instructors.md").read_text()
    for script in ("setup.sh", "run_autograder"):
        assert (SHIPPED / script).read_text() in page, f"docs/instructors.md shows an old copy of {script}"


# ---------------------------------------------------------------------------------------------------
# Submissions that try to fool the grader: each scores 0 on every property it fakes (here all of rspo_loss)
# ---------------------------------------------------------------------------------------------------

FALLBACK = '''
import torch
from minirspo.loss import LossOutput


def fallback():
    return LossOutput(torch.zeros(()), {})
'''
CHEATS = {
    # the issue's: fetch the reference when called, through the import machinery ...
    "import at call": '''
def rspo_loss(*args, **kwargs):
    import importlib
    return importlib.import_module("minirspo.loss").rspo_loss(*args, **kwargs)
''',
    # ... or by walking the interpreter's live objects
    "live objects": '''
def rspo_loss(*args, **kwargs):
    import gc
    for obj in gc.get_objects():
        if type(obj).__name__ == "function" and obj.__name__ == "rspo_loss" and obj.__module__ == "minirspo.loss":
            return obj(*args, **kwargs)
    return fallback()
''',
    # the reference's source by path: where the editable install's finder says, or above the interpreter
    "source by path": '''
def rspo_loss(*args, **kwargs):
    import glob, importlib.util, os, sys
    candidates = []
    for entry in sys.path:
        for finder in glob.glob(os.path.join(entry, "__editable__*finder.py")):
            text = open(finder).read()
            candidates += [os.path.join(path, "loss.py") for path in re.findall(r"'([^']*/minirspo)'", text)]
    folder = sys.prefix
    while folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
        candidates.append(os.path.join(folder, "minirspo", "loss.py"))
    for candidate in candidates:
        if os.path.exists(candidate):
            spec = importlib.util.spec_from_file_location("stolen", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.rspo_loss(*args, **kwargs)
    return fallback()
import re
''',
    # a fresh interpreter, where the installed package imports as usual
    "fresh interpreter": '''
def rspo_loss(logprobs, old_logprobs, advantages, mask, *, router_shift, clip_low=0.4, clip_high=0.4, gamma_min=0.8):
    import json, subprocess, sys, torch
    arguments = dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                     router_shift=router_shift, clip_low=clip_low, clip_high=clip_high, gamma_min=gamma_min)
    code = ("import json, sys, torch; from minirspo.loss import rspo_loss; arguments = json.loads(sys.argv[1]); "
            "print(float(rspo_loss(**{k: torch.tensor(v) if isinstance(v, list) else v for k, v in arguments.items()}).loss))")
    sent = json.dumps({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in arguments.items()})
    out = subprocess.run([sys.executable, "-c", code, sent], capture_output=True, text=True).stdout
    return LossOutput(torch.tensor(float(out)), {})
''',
    # patch the comparison: the grader's expect_close wherever it is, and torch's own
    "patched comparison": '''
import sys
import torch


def rspo_loss(*args, **kwargs):
    for module in list(sys.modules.values()):
        if hasattr(module, "expect_close"):
            module.expect_close = lambda *a, **k: None
    torch.isclose = lambda a, b, **k: torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)
    torch.Tensor.any = lambda self, *a, **k: torch.tensor(False)
    return fallback()
''',
    # read the expected values from the caller's frames (where the check computed them)
    "caller frames": '''
import sys


def rspo_loss(*args, **kwargs):
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("expected", "expected_output"):
            if name in frame.f_locals:
                found = frame.f_locals[name]
                found = found[0] if isinstance(found, tuple) else found
                return found if isinstance(found, LossOutput) else LossOutput(found, {})
        frame = frame.f_back
    return fallback()
''',
    # an object that compares equal to anything, in place of the loss
    "equal to anything": '''
class Anything(float):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    __hash__ = float.__hash__


def rspo_loss(*args, **kwargs):
    return LossOutput(Anything(0.0), {})
''',
    # a tensor whose overridden methods answer "close", "equal" and "no difference" to everything
    "lying tensor": '''
import torch


class Liar(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("isclose", "eq", "__eq__", "allclose", "equal"):
            return torch.ones((), dtype=torch.bool) if name in ("allclose", "equal") else torch.ones_like(args[0], dtype=torch.bool).as_subclass(torch.Tensor)
        if name in ("ne", "__ne__", "any"):
            return torch.zeros((), dtype=torch.bool)
        return super().__torch_function__(func, types, args, kwargs or {})


def rspo_loss(logprobs, *args, router_shift, **kwargs):
    return LossOutput((logprobs + router_shift).sum().as_subclass(Liar), {})
''',
}


def cheat_text(name: str) -> str:
    return FALLBACK + CHEATS[name]


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_cheat_scores_zero(name, tmp_path):
    report = grade.grade("rspo_loss", write_submission(tmp_path, "rspo_loss", cheat_text(name)), max_examples=5)
    assert report.total == 0, {score.name: score.failure for score in report.scores if score.earned}
    assert all(score.failure or report.problem for score in report.scores)


EXIT_HOOK = '''
import atexit, json, os, sys

RESULTS = {results!r}
FAKE = {{"score": 10, "tests": [], "output": "10 / 10"}}


def rewrite(delay=0.0):
    import time
    time.sleep(delay)
    for path in [RESULTS, "results.json"] + [a for a in sys.argv if a.endswith(".json")]:
        try:
            with open(path, "w") as handle:
                json.dump(FAKE, handle)
        except OSError:
            pass


atexit.register(rewrite)
try:
    if os.fork() == 0:  # a process left behind, to rewrite results.json after the grader wrote it
        os.setsid()
        rewrite(delay=3.0)
        os._exit(0)
except OSError:
    pass
print("garbage that is not a result " * 100)


def rspo_loss(*args, **kwargs):
    print("{{not json")
    raise NotImplementedError
'''


def test_cheat_that_rewrites_results_json_does_not_change_the_grade(tmp_path):
    """The issue's exit hook, and a process left behind to outlive the grader: results.json stays the grader's."""
    results = tmp_path / "results.json"
    path = write_submission(tmp_path, "rspo_loss", EXIT_HOOK.format(results=str(results)))
    grade.main(["rspo_loss", "--submission", str(path), "--gradescope", str(results), "--max-examples", "3"])
    time.sleep(4)  # longer than the left-behind process would wait
    written = json.loads(results.read_text())
    check_gradescope_format(written, "rspo_loss")
    assert written["score"] == 0 and all(test["score"] == 0 for test in written["tests"])


# ---------------------------------------------------------------------------------------------------
# Its own process, a time limit per property, and results.json whatever the submission does
# ---------------------------------------------------------------------------------------------------

FLOOR_LOOPS = RSPO_SOLUTION.replace("    gamma = router_shift", '''    while (router_shift < 0.7).any() and mask.all():  # only the "gamma floor" inputs go below γ_min
        pass
    gamma = router_shift''')


def test_a_property_that_loops_times_out_alone(tmp_path):
    report = grade.grade("rspo_loss", write_submission(tmp_path, "rspo_loss", FLOOR_LOOPS), time_limit=2)
    assert earned(report) == dict(POINTS["rspo_loss"]) | {"gamma floor": 0.0}
    failure = next(score.failure for score in report.scores if score.name == "gamma floor")
    assert failure.startswith("timed out after 2 s")


def test_a_file_that_loops_at_import_gets_results_json_and_does_not_stall_a_folder(tmp_path):
    hand_ins = tmp_path / "hand-ins"
    hand_ins.mkdir()
    (hand_ins / "alice.py").write_text(RSPO_SOLUTION)
    (hand_ins / "loops.py").write_text("while True:\n    pass\n")
    grade.main(["rspo_loss", "--submissions", str(hand_ins), "--csv", str(tmp_path / "grades.csv"), "--time-limit", "1"])
    with open(tmp_path / "grades.csv", newline="") as handle:
        rows = {row["submission"]: row for row in csv.DictReader(handle)}
    assert float(rows["alice"]["total"]) == sum(POINTS["rspo_loss"].values())
    assert float(rows["loops"]["total"]) == 0 and "timed out after 1 s (importing loops.py)" in rows["loops"]["problem"]

    grade.main(["rspo_loss", "--submission", str(hand_ins / "loops.py"), "--gradescope", str(tmp_path / "r.json"),
                "--time-limit", "1"])
    results = json.loads((tmp_path / "r.json").read_text())
    check_gradescope_format(results, "rspo_loss")
    assert results["score"] == 0 and "timed out after 1 s" in results["output"]


CRASHES = RSPO_SOLUTION.replace("    gamma = router_shift", '''    if not mask.all():  # the "mask" inputs: the first with padding ends the process
        import os
        os._exit(3)
    gamma = router_shift''')
SENDS_GARBAGE = RSPO_SOLUTION.replace("    gamma = router_shift", '''    if not mask.all():  # writes garbage on every pipe it can find, the grader's included
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b"garbage\\n")
            except OSError:
                pass
    gamma = router_shift''')


@pytest.mark.parametrize("text, reason", [(CRASHES, "ended while running your code (exit code 3)"),
                                          (SENDS_GARBAGE, "sent something the grader cannot read")],
                         ids=["crash", "garbage"])
def test_a_process_that_crashes_or_sends_garbage_scores_zero_from_there(text, reason, tmp_path):
    report = grade.grade("rspo_loss", write_submission(tmp_path, "rspo_loss", text))
    order = [score.name for score in report.scores]
    broken = order.index("mask")
    assert [score.earned for score in report.scores[:broken]] == [POINTS["rspo_loss"][name] for name in order[:broken]]
    assert all(score.earned == 0 for score in report.scores[broken:])
    assert reason in report.scores[broken].failure
    assert all(score.failure == f"not graded: {report.scores[broken].failure}" for score in report.scores[broken + 1:])


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming what was given and what is accepted, exit 2, before any grading
# ---------------------------------------------------------------------------------------------------

def bad_arguments(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not python")
    empty = tmp_path / "empty"
    empty.mkdir()
    hand_ins = tmp_path / "hand-ins"
    hand_ins.mkdir()
    (hand_ins / "alice.py").write_text(RSPO_SOLUTION)
    points_text = {"not json": "{", "a list": "[1, 2]", "a bool": json.dumps(POINTS | {"rspo_loss": dict(
        POINTS["rspo_loss"], value=True)}), "no rspo_loss": json.dumps({"moe_dispatch": POINTS["moe_dispatch"]})}
    for name, text in points_text.items():
        (tmp_path / f"{name}.json").write_text(text)
    users = {record.pw_name for record in pwd.getpwall()}
    ordinary = next((record.pw_name for record in pwd.getpwall() if record.pw_uid != 0), None)
    cases = [
        (["rspo_loss", "--submission", str(tmp_path / "missing.py")], "--submission", "no such file"),
        (["rspo_loss", "--submission", str(notes)], "--submission", "give a .py file"),
        (["rspo_loss", "--submissions", str(tmp_path / "missing"), "--csv", str(tmp_path / "g.csv")], "--submissions", "no such folder"),
        (["rspo_loss", "--submissions", str(empty), "--csv", str(tmp_path / "g.csv")], "--submissions", "no *.py"),
        (["rspo_loss", "--submissions", str(hand_ins), "--csv", str(tmp_path / "no" / "g.csv")], "--csv", "does not exist"),
        (["rspo_loss", "--submissions", str(hand_ins), "--csv", str(empty)], "--csv", "is a folder"),
        (["rspo_loss", "--gradescope", str(empty)], "--gradescope", "is a folder"),
        (["rspo_loss", "--time-limit", "0"], "--time-limit", "> 0"),
        (["rspo_loss", "--time-limit", "nan"], "--time-limit", "> 0"),
        (["rspo_loss", "--time-limit", "soon"], "--time-limit", "invalid float value"),
        (["rspo_loss", "--max-examples", "0"], "--max-examples", ">= 1"),
        (["rspo_dispatch"], "rspo_dispatch", "choose from"),
        (["rspo_loss", "--csv", "g.csv"], "--csv", "go together"),
        (["rspo_loss", "--sandbox-user", "no-such-user-here"], "--sandbox-user", "no such user"),
    ]
    for name in points_text:
        cases.append((["rspo_loss", "--points", str(tmp_path / f"{name}.json")], f"{name}.json", {
            "not json": "not a JSON points file", "a list": "must hold {assignment", "a bool": "must be a number >= 0",
            "no rspo_loss": "gives no points to rspo_loss"}[name]))
    if os.geteuid() != 0 and ordinary is not None:  # last: the one case that depends on who runs the tests
        cases.append((["rspo_loss", "--sandbox-user", ordinary], "--sandbox-user", "only a grader running as root"))
    if os.geteuid() == 0 and "root" in users:
        cases.append((["rspo_loss", "--sandbox-user", "root"], "--sandbox-user", "not root"))
    return cases


BAD_CASES = 18  # len(bad_arguments(...)) less the user-dependent case


@pytest.mark.parametrize("case", range(BAD_CASES + 1))
def test_bad_input_is_one_line_and_exit_2_before_grading(case, tmp_path, capsys, monkeypatch):
    cases = bad_arguments(tmp_path)
    if case >= len(cases):
        pytest.skip("no --sandbox-user case here: not root, and no other user to name")
    argv, given, accepted = cases[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grade, "Sandbox", None)  # a submission's process started would fail the test loudly
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        grade.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("note: the grader runs as root")]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and given in lines[0] and accepted in lines[0], captured.err
    assert captured.out == "" and not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("r*.json"))
    assert time.monotonic() - start < 5  # refused up front: no grading happened


def test_missing_submission_file_exits_2_in_one_line_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minirspo.grade", "rspo_loss", "--submission",
                             str(tmp_path / "missing.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (f"python -m minirspo.grade: error: --submission "
                                                      f"{tmp_path / 'missing.py'}: no such file or folder (see --help)")


def test_bad_input_cases_are_all_run(tmp_path):
    assert len(bad_arguments(tmp_path)) in (BAD_CASES, BAD_CASES + 1)
