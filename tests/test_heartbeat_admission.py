"""Strangers crowding rank 0's heartbeat port cannot keep a rank out: the ranks' addresses wait
outside the strangers' total, a full total makes room by closing the oldest stranger of the
address holding the most, and a rank turned away before its first beat says hello again.
Real sockets, a real Monitor and Follower, on loopback with 127.0.0.x source addresses."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from launcher.hostfile import free_ports
from mlxdist.runtime import heartbeat
from mlxdist.runtime.heartbeat import TOKEN_ENV, Follower, Monitor, rank_hosts

TOKEN = "a" * 32


@pytest.fixture
def left(monkeypatch) -> list[str]:
    """Why a Follower would have ended this process: recorded, and its listener returns instead."""
    reasons: list[str] = []
    monkeypatch.setattr(heartbeat, "_leave", lambda rank, why: reasons.append(why))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return reasons


def _crowd(port: int, per_address: int, addresses: range) -> list[socket.socket]:
    """Idle connections that never say hello, per_address from each 127.0.0.x."""
    return [
        socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{x}", 0))
        for x in addresses
        for _ in range(per_address)
    ]


def _closed(s: socket.socket) -> bool:
    s.settimeout(1.0)
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _closed_now(conns: list[socket.socket]) -> int:
    """How many of conns rank 0 has closed by now (refused or evicted), without waiting."""
    closed = 0
    for s in conns:
        try:
            closed += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def _left(reasons: list[str], within: float) -> list[str]:
    """The reasons once a Follower has ended (waited for, so none outlives its test)."""
    deadline = time.monotonic() + within
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    return reasons


def _registered(monitor: Monitor, rank: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with monitor._lock:
            if rank in monitor._conns:
                return True
        time.sleep(0.05)
    return False


def test_a_rank_gets_in_past_48_strangers_and_the_strangers_still_time_out(left, monkeypatch):
    """48 idle strangers, 6 from each of 127.0.0.2-9 (the strangers' total is 34 for 2 ranks),
    then the Follower of rank 1 from its hostfile address (127.0.0.1) is registered and beats, as
    is a rank whose address is not known (127.0.0.10), in the place of an evicted stranger. Every
    stranger is closed once the (shortened) hello deadline has passed; the threads come back."""
    monkeypatch.setattr(heartbeat, "HELLO_DEADLINE", 1.0)
    port = free_ports(1)[0]
    failures: list[str] = []
    threads = threading.active_count()
    monitor = Monitor(("127.0.0.1", port), 3, "mac0", failures.append, known={"127.0.0.1"})
    monitor.start()
    strangers = _crowd(port, 6, range(2, 10))
    other = None
    try:
        time.sleep(0.3)
        with monitor._lock:
            waiting = sum(map(len, monitor._pending.values()))
        assert waiting == heartbeat.PENDING + 3  # the total, no more
        assert _closed_now(strangers) == 48 - waiting  # the rest turned away at accept
        Follower(("127.0.0.1", port), 1, "mac1")
        assert _registered(monitor, 1, within=1.0)
        assert _closed_now(strangers) == 48 - waiting  # the known address took no one's place
        other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.10", 0))
        other.sendall(f"hello 2 {TOKEN} mac2\n".encode())
        other.settimeout(2.0)
        assert other.recv(5) == b"beat\n"
        time.sleep(0.1)
        assert _closed_now(strangers) == 48 - waiting + 1  # a stranger made room for it
        with monitor._lock:
            assert monitor.nodes == {0: "mac0", 1: "mac1", 2: "mac2"}
        time.sleep(heartbeat.HELLO_DEADLINE + 0.3)
        assert all(_closed(s) for s in strangers)
        # Rank 0's two readers, the Follower's beat and listen threads, its watch and accept.
        assert threading.active_count() - threads <= 6
        assert failures == [] and left == []
        monitor.release()
        assert _left(left, within=3.0) == ["rank 0 closed the heartbeat"]
    finally:
        for s in [*strangers, other]:
            if s is not None:
                s.close()
        monitor.release()


def test_a_follower_turned_away_says_hello_again_and_beats(left, capfd):
    """Rank 1's address holds its whole share of idle connections, so its first hello is closed
    at accept; the idle ones go, and its next hello is heard."""
    port = free_ports(1)[0]
    failures: list[str] = []
    monitor = Monitor(("127.0.0.1", port), 2, "mac0", failures.append).start()
    crowd = _crowd(port, heartbeat.PENDING_PER_PEER + 2, range(1, 2))
    try:
        time.sleep(0.3)
        Follower(("127.0.0.1", port), 1, "mac1")
        time.sleep(0.4)  # turned away at least once
        for s in crowd:
            s.close()
        assert _registered(monitor, 1, within=3.0)
        assert "closed before its first beat: saying hello again" in capfd.readouterr().err
        time.sleep(heartbeat.INTERVAL * 1.5)
        with monitor._lock:
            assert time.monotonic() - monitor._seen[1] < heartbeat.INTERVAL * 1.5  # it beats
        assert failures == [] and left == []
        monitor.release()
        assert _left(left, within=3.0) == ["rank 0 closed the heartbeat"]
    finally:
        for s in crowd:
            s.close()
        monitor.release()


def test_a_follower_whose_rank_0_is_gone_leaves_after_its_tries(left, monkeypatch, capfd):
    """Rank 0 closes the heartbeat before any beat and stops listening: the Follower tries again
    RETRIES times (shorter waits here), then leaves saying why."""
    monkeypatch.setattr(heartbeat, "RETRY_WAIT", 0.02)
    server = socket.create_server(("127.0.0.1", free_ports(1)[0]))
    Follower(server.getsockname(), 1, "mac1")
    conn, _ = server.accept()
    conn.close()
    server.close()
    (why,) = _left(left, within=3.0)  # closed, or reset: the hello was not read
    assert why.startswith(("rank 0 closed the heartbeat", "the heartbeat to rank 0 failed"))
    assert capfd.readouterr().err.count("saying hello again") == heartbeat.RETRIES


def test_the_ranks_hosts_come_from_the_ring_hostfile(tmp_path, monkeypatch):
    path = tmp_path / "hostfile.json"
    path.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001", "[fe80::1]:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(path))
    assert rank_hosts() == {"10.0.0.1", "10.0.0.2", "fe80::1"}
    monkeypatch.delenv("MLX_HOSTFILE")
    assert rank_hosts() == set()
