"""The process that runs one submission (sandbox.py starts it): it imports the file and answers calls.

It runs as `python -I -S -B child.py` in the submission's scratch folder, with an import path the grader
chose: the shim first (minirspo.loss with LossOutput alone, toy_moe.model with swiglu alone: the names the
student files import), then the interpreter's own libraries, and no folder that holds the package. So the
reference implementation is in none of its modules, frames or objects, and nothing it does reaches the
grader's memory: it receives inputs and sends outputs and gradients as data (wire.py) on a private copy of
the pipe the grader talks on, while the submission's own prints go nowhere.

Before the submission runs, the child limits itself, as a speed bump for a local run (the real barrier on
Gradescope is the unprivileged user that run_autograder starts it as; see docs/instructors.md):
- no new processes or threads (RLIMIT_NPROC 0, binding for every user but root), so nothing outlives it to
  rewrite results after the grader wrote them, and no fresh interpreter imports the package;
- an audit hook (PEP 578; not a sandbox: it is Python code guarding Python code) refuses starting processes,
  sending signals, ctypes, reading files of the package's folders, and writing outside the scratch folder.
"""
import json
import linecache
import os
import sys
import traceback
import types

SPAWNING = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
            "signal.pthread_kill", "subprocess.Popen", "pty.spawn"}
PATH_CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod",
                "os.chown", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def main() -> None:
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    nowhere = os.open(os.devnull, os.O_RDWR)
    os.dup2(nowhere, 0)  # input() reads nothing, print() writes nothing: the pipes are the grader's
    os.dup2(nowhere, 1)
    setup = json.loads(requests.readline())
    sys.path[:] = setup["path"]
    import torch  # noqa: F401  (from the interpreter's libraries, now that the path is set)
    import wire

    torch.set_num_threads(1)  # tensors of a few entries; and no thread may start once RLIMIT_NPROC is 0
    replies.write(wire.dumps({"ready": True}))
    load = json.loads(requests.readline())
    limit_yourself(load["scratch"], tuple(load["forbidden"]))
    try:
        functions = import_submission(load["file"], load["display"], load["graded"])
    except Exception as problem:
        replies.write(wire.dumps({"problem": str(problem)}))
        return
    replies.write(wire.dumps({"loaded": sorted(functions)}))
    for line in requests:
        request = json.loads(line)
        replies.write(wire.dumps(answer(functions[request["call"]], request, load["display"], wire)))


def limit_yourself(scratch: str, forbidden: tuple[str, ...]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() != 0:  # root ignores it, and lowering root's limit would only hide that
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

    def guard(event, args, scratch=scratch, forbidden=forbidden, here=__file__):
        """No closure cells to empty: its settings are defaults, and resetting those (or any function's of
        this file) is refused below."""
        if event in SPAWNING or event.startswith("ctypes."):
            raise PermissionError(f"the grader does not let submissions run {event}")
        if (event == "object.__setattr__" and args[1] in ("__code__", "__defaults__", "__kwdefaults__")
                and getattr(getattr(args[0], "__code__", None), "co_filename", None) == here):
            raise PermissionError(f"the grader does not let submissions change its own {args[1]}")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            mode, flags = args[1] or "", args[2] or 0
            if any(path == root or path.startswith(root + os.sep) for root in forbidden):
                raise PermissionError(f"the grader does not let submissions read {path}")
            if (any(letter in mode for letter in "wax+") or flags & WRITE_FLAGS) and not path.startswith(scratch + os.sep):
                raise PermissionError(f"submissions may write in their working folder only, not {path}")
        if event in PATH_CHANGES:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)):
                    path = os.path.realpath(os.fsdecode(arg))
                    if not path.startswith(scratch + os.sep):
                        raise PermissionError(f"submissions may change files in their working folder only, not {path}")

    sys.addaudithook(guard)


def import_submission(file: str, display: str, graded: list[str]) -> dict:
    """Run the file as module `submission`, its code and tracebacks named after the file the student gave."""
    source = open(file, encoding="utf-8", errors="replace").read()
    linecache.cache[display] = (len(source), None, source.splitlines(keepends=True), display)
    module = types.ModuleType("submission")
    module.__file__ = display
    sys.modules["submission"] = module
    name = os.path.basename(display)
    try:
        exec(compile(source, display, "exec"), module.__dict__)
    except BaseException as error:  # SystemExit or KeyboardInterrupt from a student file must not end grading
        raise ImportError(f"importing {name} failed:\n{own_frames(error, display)}{package_hint(error)}") from None
    functions = {}
    for dotted in graded:
        target = module
        for part in dotted.split("."):
            if not hasattr(target, part):
                raise ImportError(f"{name} must define {dotted}")
            target = getattr(target, part)
        if not callable(target):
            raise ImportError(f"{dotted} in {name} must be a function, got {type(target).__name__}")
        functions[dotted] = target
    return functions


def package_hint(error: BaseException) -> str:
    """Say why an import of the package failed: the grader gives a submission only what its stub imports."""
    if isinstance(error, ImportError) and (error.name or "").split(".")[0] in ("minirspo", "toy_moe"):
        return ("\nthe grader runs your file without the minirspo package (it is the reference solution): only "
                "what the student file imports from it is there")
    return ""


def answer(function, request: dict, display: str, wire) -> dict:
    inputs = {name: wire.decode(value, modules=True) for name, value in request["inputs"].items()}
    try:
        output, grads = wire.run_call(function, inputs, tuple(request["leaves"]),
                                      tuple(tuple(path) for path in request["parts"]))
        return {"output": wire.encode(output),
                "grads": None if grads is None else {name: None if grad is None else wire.encode(grad)
                                                     for name, grad in grads.items()}}
    except BaseException as error:
        return {"raised": {"types": [cls.__name__ for cls in type(error).__mro__], "message": str(error)[:2000],
                           "traceback": own_frames(error, display)}}


def own_frames(error: BaseException, display: str) -> str:
    """The error with only the traceback frames of the submitted file."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == display]
    return "".join(traceback.format_list(frames)) + f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    main()
