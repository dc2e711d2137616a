"""A node that dies or hangs mid-generation, injected into real clusters of real ranks: a rank
killed (SIGKILL) or stopped (SIGSTOP), rank 0 stopped, a whole agent killed on its own host (a
network namespace), and the chat of `mlxdist launch --replan` going on after a rank dies.
Each test asserts what the client is told, that every rank is gone, and how long it took."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pexpect
import pytest
from conftest import ROOT, rank_pids
from netns import available, bridged_hosts
from test_serve_chat import FIGURES, spawn

from launcher.hostfile import free_ports
from launcher.local import (
    NODE_FAILED,
    PEER_GONE,
    describe_failure,
    start_local,
    verdict,
    wait_ready,
)
from mlxdist.runtime.heartbeat import TOKEN_ENV, Monitor, parse_address

LONG = {"prompt": "Tell me a long story", "max_tokens": 100000, "temperature": 0.0}


def test_heartbeat_turns_strangers_away_and_names_a_lost_rank(monkeypatch):
    """Rank 0's monitor in this process, ranks played by raw sockets: a hello without the token
    (or for a rank that does not exist) is ignored; a real rank's lost connection is named."""
    monkeypatch.setenv(TOKEN_ENV, "a" * 32)
    port = free_ports(1)[0]
    failures: list[str] = []
    monitor = Monitor(("127.0.0.1", port), 3, "mac0", failures.append)
    monitor.start()
    try:
        for hello in ("hello 1 " + "b" * 32 + " mac1", "hello 7 " + "a" * 32 + " x", "GET / HTTP"):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(hello.encode() + b"\n")
                assert s.recv(64) == b""  # turned away
        for rank in (1, 2):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"hello {rank} {'a' * 32} mac{rank}\nbeat\n".encode())
            assert s.recv(5) == b"beat\n"  # rank 0 beats back
            if rank == 1:
                s.sendall(b"bye\n")  # a rank that leaves on purpose has not failed
            s.close()
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures == [
            "rank 2 on node mac2 failed: its connection was lost (the process exited or its "
            "host went away)"
        ]
    finally:
        monitor.release()


def test_failure_lines():
    said = "rank 1 on node mac1 failed: no heartbeat for 5 s (the process is stopped or hung)"
    assert verdict(f"[rank 0] serving\n[rank 0] node failure: {said}\n[ring] Socket 4") == said
    gone = ("rank 2", PEER_GONE, "[rank 2] leaving: rank 0 closed the heartbeat")
    assert describe_failure(said, [("rank 0", NODE_FAILED, "x"), gone]) == said
    killed = ("rank 1", -9, "[rank 1] loaded layers 2-3")
    assert describe_failure(said, [killed, gone]) == f"{said}; rank 1 was killed by SIGKILL"
    crashed = ("rank 1", 1, "ValueError: the file is truncated")
    assert describe_failure(None, [gone, crashed]) == f"rank 1 exited with code 1: {crashed[2]}"
    assert parse_address("[fe80::1%eth0]:52481") == ("fe80::1%eth0", 52481)
    with pytest.raises(ValueError):
        parse_address("52481")


def stream_until_error(url: str, after: int, fault) -> tuple[dict | None, float, list[str]]:
    """Streams a long answer, injects fault() after `after` events; returns the error event, the
    seconds from the fault to it, and the lines after the error."""
    error, rest, t0, took = None, [], None, None
    body = LONG | {"stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for n, line in enumerate(r.iter_lines()):
            if n == after:
                fault()
                t0 = time.monotonic()
            if error is not None:
                rest.append(line)
            elif line.startswith("data: {") and "error" in json.loads(line[6:]):
                error = json.loads(line[6:])["error"]
                took = time.monotonic() - t0
    return error, took, [x for x in rest if x]


def wait_exit(procs, timeout: float) -> float:
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.cluster
def test_killed_rank_is_named_to_every_client_and_every_rank_exits(tiny_r1, tmp_path):
    cluster = start_local(tiny_r1, [2, 2], run_dir=tmp_path)
    try:
        wait_ready(cluster, timeout=120)
        # A second client waits for its whole answer behind the stream.
        whole: dict = {}

        def ask() -> None:
            r = httpx.post(cluster.url + "/v1/completions", json=LONG, timeout=60)
            whole["status"], whole["body"] = r.status_code, r.json()

        victim = cluster.procs[1]
        asker = threading.Thread(target=ask)
        error, took, rest = stream_until_error(
            cluster.url, 20, lambda: (asker.start(), victim.send_signal(signal.SIGKILL))
        )
        asker.join(30)
        gone = wait_exit(cluster.procs[:1], 10)
        print(f"\nkilled rank 1: error event after {took:.2f} s, rank 0 gone after {gone:.2f} s")
        print(error, whole, cluster.failure(), sep="\n")
        assert error["code"] == "node_failed" and error["type"] == "server_error"
        assert error["message"].startswith("rank 1 on node ")
        assert rest == ["data: [DONE]"]  # then the stream closes
        assert took < 10
        assert whole["status"] == 503
        assert whole["body"]["error"]["message"].startswith("rank 1 on node ")
        assert cluster.procs[0].returncode == NODE_FAILED
        assert "rank 1" in cluster.failure() and "SIGKILL" in cluster.failure()
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_stopped_rank_is_found_by_heartbeat(tiny_r1, tmp_path):
    cluster = start_local(tiny_r1, [1, 2, 1], run_dir=tmp_path)
    try:
        wait_ready(cluster, timeout=120)
        victim = cluster.procs[1]
        error, took, _ = stream_until_error(
            cluster.url, 20, lambda: victim.send_signal(signal.SIGSTOP)
        )
        gone = wait_exit([cluster.procs[0], cluster.procs[2]], 10)
        print(f"\nstopped rank 1: error event after {took:.2f} s, others gone {gone:.2f} s later")
        assert error["message"].startswith("rank 1 on node ") and "no heartbeat" in error["message"]
        assert took < 15
        # Rank 2 was blocked in a ring receive from the stopped rank; it left by itself.
        assert cluster.procs[0].returncode == NODE_FAILED
        assert cluster.procs[2].returncode == PEER_GONE
        assert "rank 1" in cluster.failure() and "no heartbeat" in cluster.failure()
    finally:
        cluster.stop()
    assert victim.returncode is not None  # the launcher ends the stopped rank too


@pytest.mark.cluster
def test_stopped_rank_0_does_not_hold_the_others(tiny_r1, tmp_path):
    cluster = start_local(tiny_r1, [2, 2], run_dir=tmp_path)
    try:
        wait_ready(cluster, timeout=120)
        cluster.procs[0].send_signal(signal.SIGSTOP)
        gone = wait_exit(cluster.procs[1:], 15)
        print(f"\nstopped rank 0: rank 1 left after {gone:.2f} s; {cluster.failure()}")
        assert cluster.procs[1].returncode == PEER_GONE and gone < 10
        assert "no heartbeat from rank 0" in cluster.failure()
    finally:
        cluster.stop()


def wait_listening(machine, port: int = 52417, timeout: float = 30) -> None:
    """Until the agent in machine's namespace accepts connections."""
    probe = f"import socket; socket.create_connection(({machine.ip!r}, {port}), timeout=1)"
    deadline = time.monotonic() + timeout
    while subprocess.run(machine.cmd(sys.executable, "-c", probe), capture_output=True).returncode:
        assert time.monotonic() < deadline, f"the agent on {machine.ip} did not start"
        time.sleep(0.3)


@pytest.mark.skipif(available() is not None, reason="needs network namespaces (Linux, root)")
@pytest.mark.cluster
def test_killed_agent_is_named_and_launch_replans_on_the_other_hosts(tiny_r1, tmp_path):
    """Three hosts in namespaces, the chat on a fourth; mac1's whole agent is killed mid-answer."""
    from test_cluster_hosts import (
        Machine,
        assert_no_rank_left,
        prepare,
        rank_processes,
        start_agents,
        stop_agents,
        write_hosts_file,
    )

    env, out = prepare(tiny_r1, tmp_path)  # tiny-r1 cut for three nodes
    with bridged_hosts(4, subnet="169.254.101") as hosts:
        machines = [Machine(h.name, h.ip, 52417) for h in hosts]
        agents = start_agents(machines[1:], "eth0", tmp_path, ["faults"] * 3)
        for m in machines[1:]:
            wait_listening(m)
        hosts_file = write_hosts_file(tmp_path, machines[1:], lambda m: [])
        args = ["launch", str(out), "--hosts", str(hosts_file), "--replan"]
        chat = pexpect.spawn(
            "ip",
            machines[0].cmd(sys.executable, "-m", "mlxdist.cli", *args)[1:],
            cwd=str(ROOT),
            env=env,
            encoding="utf-8",
            timeout=120,
            dimensions=(40, 200),
        )
        try:
            chat.expect_exact(">>> ")
            chat.sendline("/set max_tokens 4")
            chat.sendline("Hello")
            chat.expect(FIGURES, timeout=30)  # a first answer, kept in the conversation
            chat.sendline("/set max_tokens 1000000")
            chat.sendline("Tell me a very long story")
            chat.expect(r"\w", timeout=30)
            time.sleep(0.5)
            agents[1].kill()  # mac1's agent, and with it (by the kernel) its rank
            t0 = time.monotonic()
            chat.expect_exact("error: the cluster failed: rank 1 on node mac1", timeout=15)
            said = time.monotonic() - t0
            chat.expect(r"nodes: mac0 .*layers .*, mac2 ", timeout=30)  # mac1 is left out
            chat.expect_exact("relaunched; replaying the conversation, 3 messages)", timeout=60)
            chat.expect(r"\w", timeout=30)  # the answer comes again
            again = time.monotonic() - t0
            print(
                f"\nmac1's agent killed: said in {said:.2f} s; answering again after {again:.2f} s"
            )
            assert said < 10
            assert len(rank_processes(machines)) == 2  # mac0 and mac2 only
            chat.sendintr()
            chat.expect_exact("(stopped)", timeout=30)
            chat.sendline("/stats")  # the first answer and the replayed one
            chat.expect(r"2 answers: .*; \d messages in the conversation")
            chat.sendline("/quit")
            chat.expect(pexpect.EOF, timeout=30)
        except (pexpect.TIMEOUT, pexpect.EOF):
            print(chat.before)
            raise
        finally:
            chat.close(force=True)
            stop_agents(agents)
        assert_no_rank_left(machines)


@pytest.mark.cluster
def test_launch_chat_stays_open_with_its_conversation_after_a_rank_dies(tiny_r1, tmp_path):
    chat = spawn("launch", str(tiny_r1), "--local", "2", "--max-tokens", "4")
    marker = str(tiny_r1)
    try:
        chat.expect_exact(">>> ", timeout=120)
        chat.sendline("Hello")
        chat.expect(FIGURES, timeout=30)  # a first answer, kept in the conversation
        chat.sendline("/set max_tokens 1000000")
        chat.sendline("Tell me a very long story")
        chat.expect(r"\w", timeout=30)  # the answer has begun
        time.sleep(0.5)
        ranks = sorted(rank_pids(marker))
        assert len(ranks) == 2
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)  # rank 1 was started second
        chat.expect_exact("error: the cluster failed: rank 1 on node ", timeout=15)
        said = time.monotonic() - t0
        chat.expect_exact("the conversation is kept (2 messages)", timeout=15)
        chat.expect_exact(">>> ")
        print(f"\nrank 1 killed: the chat said so after {said:.2f} s")
        assert said < 10
        chat.sendline(f"/save {tmp_path / 'kept.json'}")
        chat.expect_exact("saved 2 messages")
        chat.sendline("/quit")
        chat.expect(pexpect.EOF, timeout=30)
    except (pexpect.TIMEOUT, pexpect.EOF):
        print(chat.before)
        raise
    finally:
        chat.close(force=True)
    kept = json.loads((tmp_path / "kept.json").read_text())["messages"]
    assert [m["role"] for m in kept] == ["user", "assistant"]
    assert rank_pids(marker) == []
