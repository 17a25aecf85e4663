"""The grader's side of a submission's own process: start it, give it inputs, read back data, end it.

A `Sandbox` copies the submission into a fresh scratch folder with child.py, wire.py and a shim of the
package (only the names the assignment gives students, e.g. `LossOutput`), and starts child.py there with an
import path that holds no reference implementation and an environment that holds none of the grader's
variables. Every call is a round trip of JSON lines (wire.py), waited for against the property's time
budget; a child that overruns it is killed with its whole process group, and one that exits, crashes or
sends something unreadable ends the sandbox. The child never learns where results go: the grader writes
them after the child is gone.

With `user` (the grader running as root, as on Gradescope), the child runs as that unprivileged user, who
must be able to run the interpreter and read its libraries, and should not be able to read the package's
source or the results folder (run_autograder sets that up).
"""
import inspect
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minirspo.course import wire

HERE = Path(__file__).resolve().parent
CHILD_FILES = (HERE / "child.py", HERE / "wire.py")
STARTUP_SECONDS = 300  # importing torch in the child: slow only on a loaded machine, never the submission's time
MAX_REPLY_BYTES = 64 << 20
SHIM_HEADER = '''"""The grader's stand-in for {module}: only what the assignment gives you ({names}). The rest of the
package is the reference solution, and a submission runs without it."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

'''


class SubmissionError(Exception):
    """The file cannot be graded at all (does not import, lacks a function, uses the package's reference)."""


class ChildGone(Exception):
    """The child timed out, exited, crashed or sent garbage: the reason is what the student reads."""

    def __init__(self, reason: str, timed_out: bool = False):
        super().__init__(reason)
        self.timed_out = timed_out


class SubmissionRaised(Exception):
    """The submission's code raised: its exception's type names (most derived first), message and own frames."""

    def __init__(self, types: list[str], message: str, traceback: str):
        super().__init__(f"{types[0] if types else 'Exception'}: {message}")
        self.types, self.message, self.traceback = types, message, traceback

    def is_a(self, name: str) -> bool:
        return name in self.types


def reference_roots(packages) -> list[Path]:
    """The folders that hold the reference packages (e.g. the repository root of an editable install)."""
    return sorted({Path(package.__file__).resolve().parent.parent for package in packages})


class Sandbox:
    """One submission in its own process. Use as a context manager; `load()` before `run()`."""

    def __init__(self, submission: Path, display: str, graded: tuple[str, ...], given: tuple, packages: tuple,
                 time_limit: float, user: str | None = None):
        self.submission, self.display, self.graded, self.time_limit, self.user = (
            submission, display, graded, time_limit, user)
        self.budget = time_limit
        self.scratch = Path(tempfile.mkdtemp(prefix="minirspo-grade-"))
        work = self.scratch / "work"
        work.mkdir()
        self.copy = work / submission.name
        shutil.copyfile(submission, self.copy)
        for file in CHILD_FILES:
            shutil.copyfile(file, self.scratch / file.name)
        write_shim(self.scratch / "shim", given, packages)
        roots = reference_roots(packages)
        self.forbidden = [str(root / package.__name__) for package in packages for root in roots
                          if (root / package.__name__).is_dir()]
        path = [str(self.scratch / "shim"), str(self.scratch)] + child_path(roots)
        if user is not None:
            _hand_over(self.scratch, user)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(self.scratch / "child.py")], cwd=work,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            env=_child_environment(self.scratch), **_as_user(user))
        self.buffer, self.closed = b"", False
        self._send({"path": path})

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        """Import the submission in the child within the time limit; SubmissionError says what is wrong."""
        self._receive(time.monotonic() + STARTUP_SECONDS, "started")
        self._send({"scratch": str(self.scratch), "forbidden": self.forbidden, "file": str(self.copy),
                    "display": self.display, "graded": list(self.graded)})
        reply = self._receive(time.monotonic() + self.time_limit, f"importing {Path(self.display).name}")
        if "problem" in reply:
            raise SubmissionError(str(reply["problem"]))
        if reply.get("loaded") != sorted(self.graded):
            raise ChildGone("your file's grading process sent something the grader cannot read")

    def run(self, function: str, inputs: dict, leaves: tuple[str, ...] = (), parts: tuple[tuple, ...] = ()):
        """(output, gradients) of the submission's `function` as wire.run_call gives them, rebuilt from data;
        SubmissionRaised if its code raised, ChildGone if the child is no longer usable."""
        start = time.monotonic()
        self._send({"call": function, "inputs": {name: wire.encode(value) for name, value in inputs.items()},
                    "leaves": list(leaves), "parts": [list(path) for path in parts]})
        try:
            reply = self._receive(start + self.budget, "running your code")
        finally:
            self.budget -= time.monotonic() - start
        try:
            if "raised" in reply:
                raised = reply["raised"]
                raise SubmissionRaised([str(name) for name in raised["types"]], str(raised["message"]),
                                       str(raised["traceback"]))
            grads = reply["grads"]
            return wire.decode(reply["output"]), None if grads is None else {
                str(name): None if grad is None else wire.decode(grad) for name, grad in dict(grads).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            self.close()
            raise ChildGone("your file's grading process sent something the grader cannot read") from None

    def close(self) -> None:
        """Kill the child's whole process group (whatever it started too) and remove the scratch folder."""
        if self.closed:
            return
        self.closed = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group outlives its leader while a member lives
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _send(self, message: dict) -> None:
        try:
            self.process.stdin.write(wire.dumps(message))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _receive says how

    def _receive(self, deadline: float, doing: str) -> dict:
        """The child's next line as a dict, or ChildGone (the child killed first) past the deadline, at its
        exit, or when the line is not JSON."""
        stream = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stream], [], [], left)[0]:
                self.close()
                raise ChildGone(f"timed out after {self.time_limit:g} s ({doing})", timed_out=True)
            chunk = os.read(stream, 1 << 16)
            if not chunk or len(self.buffer) > MAX_REPLY_BYTES:
                code = self.process.wait() if not chunk else None
                self.close()
                raise ChildGone(f"your file's grading process ended while {doing}" +
                                (f" (exit code {code})" if code is not None else " (it sent too much)"))
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self.close()
            raise ChildGone("your file's grading process sent something the grader cannot read")
        return reply


def write_shim(folder: Path, given: tuple, packages: tuple) -> None:
    """Empty packages named like the reference packages, and in the modules of `given` their source alone."""
    for package in packages:
        (folder / package.__name__).mkdir(parents=True)
        (folder / package.__name__ / "__init__.py").write_text(f'"""The grader\'s stand-in for {package.__name__}."""\n')
    by_module: dict[str, list] = {}
    for obj in given:
        by_module.setdefault(obj.__module__, []).append(obj)
    for module, objects in by_module.items():
        names = ", ".join(obj.__name__ for obj in objects)
        source = SHIM_HEADER.format(module=module, names=names) + "\n\n".join(inspect.getsource(obj) for obj in objects)
        (folder / Path(*module.split("."))).with_suffix(".py").write_text(source)


def child_path(roots: list[Path]) -> list[str]:
    """The grader's import path less the working folder and every folder holding a reference package."""
    path = []
    for entry in sys.path:
        resolved = Path(entry).resolve() if entry else None
        if resolved is None or resolved in roots or not resolved.is_dir():
            continue
        path.append(str(resolved))
    for root in roots:
        if (root / "torch").is_dir():
            raise SubmissionError(f"the package is installed beside torch in {root}, so a submission could import "
                                  f"the reference: install it editable (pip install -e)")
    return path


def _child_environment(scratch: Path) -> dict:
    """None of the grader's variables (tokens, paths to results): only what Python and torch need."""
    return {"PATH": os.defpath, "HOME": str(scratch), "TMPDIR": str(scratch / "work"), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _as_user(user: str | None) -> dict:
    if user is None:
        return {}
    record = pwd.getpwnam(user)
    return {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}


def _hand_over(scratch: Path, user: str) -> None:
    """Give the scratch folder to the child's user: it is private to the grader until then."""
    record = pwd.getpwnam(user)
    for folder, _, files in os.walk(scratch):
        os.chown(folder, record.pw_uid, record.pw_gid)
        for name in files:
            os.chown(Path(folder) / name, record.pw_uid, record.pw_gid)
