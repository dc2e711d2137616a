"""The fast tier's guard: no rank process, no agent process and no network namespace.

tests/conftest.py installs it in the pytest process when no selected test is marked `cluster`
(as in `pytest -m "not cluster"`) and puts this folder first on PYTHONPATH, so that every Python
process started from there (an `mlxdist` command, and what that starts) loads this file as its
sitecustomize and is guarded too. A refused start raises, and is written to the file that
MLXDIST_TEST_FAST_TIER names, where conftest finds it and fails the test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

NOTES_ENV = "MLXDIST_TEST_FAST_TIER"


def refused(argv) -> str | None:
    """What argv would start that only a `cluster` test may, or None."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = os.fsdecode(argv).split()  # a shell command line, or a bare program
    words = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
    text = " ".join(words)
    if "mlxdist.rank" in text:  # `python -m mlxdist.rank`, also inside an ssh or sh -c script
        return "a rank process"
    if "serve_agent(" in text:  # an agent started by a `python -c` script
        return "an agent process"
    for word, after in zip(words, words[1:]):
        if (word == "mlxdist.cli" or os.path.basename(word) == "mlxdist") and after == "agent":
            return "an agent process"
    if words and os.path.basename(words[0]) == "ip" and ("netns" in words or "-n" in words):
        return "a network namespace"
    return None


def _check(argv, notes: str) -> None:
    what = refused(argv)
    if what is None:
        return
    line = f"refused to start {what} (pid {os.getpid()}): {argv!r}"
    with open(notes, "a") as f:
        f.write(line + "\n")
    raise RuntimeError(f"fast tier: {line}; a test that starts it is marked `cluster`")


def install(notes: str, set_attr: Callable = setattr, pty: bool = False) -> None:
    """Guards every subprocess.Popen from now on (and ptyprocess's spawn, which pexpect uses,
    when pty); refusals are written to the file notes. set_attr: the pytest process passes a
    MonkeyPatch's, so that the guard is undone after the run."""
    popen_init = subprocess.Popen.__init__

    def guarded_init(self, args, *a, **kw):
        _check(args, notes)
        popen_init(self, args, *a, **kw)

    set_attr(subprocess.Popen, "__init__", guarded_init)
    if pty:
        import ptyprocess

        spawn = ptyprocess.PtyProcess.spawn.__func__

        def guarded_spawn(cls, argv, *a, **kw):
            _check(argv, notes)
            return spawn(cls, argv, *a, **kw)

        set_attr(ptyprocess.PtyProcess, "spawn", classmethod(guarded_spawn))


if os.environ.get(NOTES_ENV) and __name__ == "sitecustomize":
    install(os.environ[NOTES_ENV])
