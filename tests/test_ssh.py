"""Ranks over ssh, short of ssh itself: the remote script run by a real shell (the token read from
stdin into the environment, every value quoted, the files mlx.launch's environment names), and a
rank's watches of its starter (its stdin as a lifeline, its parent's pid)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT

from launcher.hostfile import ring_hostfile
from launcher.rankenv import rank_env
from launcher.rankspec import HEARTBEAT_TOKEN_ENV, PARENT_PID_ENV, STDIN_LIFELINE_ENV
from launcher.ssh import rank_script

# Stands in for the rank: writes what it was started with, then waits on its stdin.
DUMP = (
    "import json, os, sys; "
    "json.dump({'env': dict(os.environ), 'argv': sys.argv[1:], 'pid': os.getpid()}, "
    "open(os.environ['DUMP'], 'w')); sys.stdin.read()"
)
RING = [["169.254.0.1:32323"], ["169.254.0.2:32323"]]
RDMA = [[None, "rdma_en3"], ["rdma_en3", None]]
TOKEN = "ab" * 16
SHELLS = [s for s in ("sh", "bash", "zsh") if shutil.which(s)]

ENVS = {
    "ring": (rank_env(1, 2, "ring", RING), {"MLX_HOSTFILE": ring_hostfile(RING)}),
    "jaccl": (
        rank_env(1, 2, "jaccl", rdma=RDMA, coordinator="169.254.0.1:32323"),
        {"MLX_IBV_DEVICES": json.dumps(RDMA)},
    ),
    "single": (rank_env(0, 1), {}),
}


def run_script(shell: str, script: str, tmp_path, stdin: bytes) -> tuple[dict, subprocess.Popen]:
    """Runs script as ssh's remote shell would; returns what the stand-in rank saw."""
    dump = tmp_path / "dump.json"
    env = dict(os.environ, DUMP=str(dump))
    env.pop(HEARTBEAT_TOKEN_ENV, None)
    proc = subprocess.Popen([shell, "-c", script], stdin=subprocess.PIPE, env=env)
    proc.stdin.write(stdin)
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    while not dump.exists() or not dump.read_text().endswith("}"):
        assert proc.poll() is None, f"the script exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the stand-in rank did not start"
        time.sleep(0.05)
    return json.loads(dump.read_text()), proc


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", list(ENVS))
def test_the_remote_script_gives_the_rank_its_environment(kind, shell, tmp_path):
    env, files = ENVS[kind]
    argv = ["-c", DUMP, "/models/a b;rm -rf ~", "$(reboot)", "it's"]
    pidfile = tmp_path / "rank.pid"
    script = rank_script(env, sys.executable, argv, str(pidfile))
    assert TOKEN not in script
    seen, proc = run_script(shell, script, tmp_path, f"{TOKEN}\n".encode())
    try:
        got = seen["env"]
        assert got[HEARTBEAT_TOKEN_ENV] == TOKEN
        assert seen["argv"] == argv[2:]  # every value arrives as written
        assert int(pidfile.read_text()) == seen["pid"] == proc.pid  # the shell became the rank
        assert got[PARENT_PID_ENV] == str(os.getpid())  # the shell's parent: sshd on a Mac
        assert got[STDIN_LIFELINE_ENV] == "1"
        assert "MLX_WORLD_SIZE" not in got  # as mlx.launch
        for name, value in env.env.items():
            assert got[name] == value
        assert {n: open(got[n]).read() for n in env.files} == files
        assert proc.poll() is None  # still holding its stdin
    finally:
        proc.stdin.close()  # the stand-in rank reads to the end, then exits
        assert proc.wait(10) == 0


def test_without_a_token_the_rank_has_none(tmp_path):
    script = rank_script(rank_env(0, 1), sys.executable, ["-c", DUMP], str(tmp_path / "p"))
    seen, proc = run_script("sh", script, tmp_path, b"\n")
    proc.stdin.close()
    proc.wait(10)
    assert HEARTBEAT_TOKEN_ENV not in seen["env"]


WATCHED = "from mlxdist import rank; rank._start_watches(); import time; time.sleep(30)"


def watched(extra: dict) -> subprocess.Popen:
    """A process that keeps a rank's watches of its starter, and nothing else."""
    env = {k: v for k, v in os.environ.items() if k not in (PARENT_PID_ENV, STDIN_LIFELINE_ENV)}
    return subprocess.Popen(
        [sys.executable, "-c", WATCHED],
        cwd=ROOT,
        env=env | extra,
        stdin=subprocess.PIPE,
    )


def test_a_rank_leaves_when_its_stdin_lifeline_closes():
    proc = watched({STDIN_LIFELINE_ENV: "1"})
    time.sleep(1.0)
    assert proc.poll() is None  # alive while the pipe is open
    proc.stdin.close()
    assert proc.wait(10) == 3


def test_a_rank_started_by_an_agent_ignores_its_closed_stdin():
    proc = watched({})
    proc.stdin.close()  # as an agent's /dev/null: at its end from the start
    time.sleep(1.5)
    try:
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_rank_whose_starter_died_before_it_ran_leaves():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no parent of ours has
    proc = watched({PARENT_PID_ENV: str(gone.pid)})
    assert proc.wait(10) == 3


def test_a_rank_run_through_a_forking_wrapper_stays_while_its_starter_lives():
    """The starter (as an agent would) gives its pid; the rank's parent is a wrapper that
    forked it (a shell that does not exec). The rank stays while the starter lives, and leaves
    when the starter goes even though the wrapper stays."""
    starter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    env = {k: v for k, v in os.environ.items() if k not in (PARENT_PID_ENV, STDIN_LIFELINE_ENV)}
    wrapper = subprocess.Popen(
        ["bash", "-c", f'"{sys.executable}" -c "{WATCHED}"; sleep 30'],
        cwd=ROOT,
        env=env | {PARENT_PID_ENV: str(starter.pid)},
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.5)
        [rank] = psutil.Process(wrapper.pid).children()
        assert rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE
        starter.kill()
        starter.wait()
        rank.wait(10)  # not our child: psutil gives no exit code, only that it ended
        assert wrapper.poll() is None  # the wrapper, its parent, is still there
    finally:
        for p in (starter, wrapper):
            p.kill()
            p.wait()
    assert b"leaving: the process that started it is gone" in wrapper.stderr.read()
