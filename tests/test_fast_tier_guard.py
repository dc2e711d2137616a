"""The fast tier's guard (tests/fast_tier/sitecustomize.py) names what only a `cluster` test may
start, and refuses it when installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import _load_guard

guard = _load_guard()

CASES = [
    ([sys.executable, "-m", "mlxdist.rank", "--model", "m", "--split", "2,2"], "a rank process"),
    (
        "ssh -o BatchMode=yes -- mac 'cd /tmp && python3 -m mlxdist.rank --model m'",
        "a rank process",
    ),
    (["/x/.venv/bin/mlxdist", "agent", "--cluster", "c"], "an agent process"),
    ([sys.executable, "-m", "mlxdist.cli", "agent", "--cluster", "c"], "an agent process"),
    (
        [sys.executable, "-c", "from launcher.agent import serve_agent; serve_agent(app)"],
        "an agent process",
    ),
    (["ip", "netns", "add", "h1"], "a network namespace"),
    (["ip", "-n", "h1", "addr"], "a network namespace"),
    ([sys.executable, "-m", "mlxdist.cli", "launch", "--help"], None),
    (["/x/.venv/bin/mlxdist", "status", "--cluster", "c"], None),
    (["ip", "addr"], None),
    ("echo agent", None),
]


@pytest.mark.parametrize(("argv", "what"), CASES)
def test_refused_names_what_only_a_cluster_test_may_start(argv, what):
    assert guard.refused(argv) == what


def test_an_installed_guard_refuses_a_rank_and_notes_it(tmp_path):
    notes = tmp_path / "refused.txt"
    with pytest.MonkeyPatch.context() as mp:
        guard.install(str(notes), mp.setattr)
        with pytest.raises(RuntimeError, match="a rank process"):
            subprocess.Popen([sys.executable, "-m", "mlxdist.rank", "--model", "m"])
        done = subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True, text=True)
    assert done.stdout == "7\n"
    assert "mlxdist.rank" in notes.read_text()
    notes.write_text("")  # noted on purpose here: the autouse check must not fail this test
