"""Announced agents and their hellos: every advertised address is tried, the ones that do not
prove themselves are named with the reason, a flood of announcements costs a bounded time, and
an agent without a node id in its facts keeps one across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_agent import running_agent
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

import launcher.auth
from launcher.agent import create_agent_app
from launcher.discovery import MAX_ANNOUNCEMENTS, SERVICE, Agent, browse, verified
from launcher.hostfile import free_ports
from launcher.secret import create_secret, load_secret

pytestmark = pytest.mark.cluster  # real agent processes

NODE = "node-real"
STRANGER = "127.0.0.2"  # on loopback too (all of 127/8), a different address from the agent's


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with running_agent(
        tmp_path_factory.mktemp("a"), facts={"hostname": "real", "node_id": NODE}
    ) as a:
        yield a


class _Claims(BaseHTTPRequestHandler):
    """A stranger answering every request as the real node, with nothing to prove it."""

    def do_GET(self):
        body = json.dumps({"node_id": NODE, "boot_id": "0" * 32}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Mlxdist-Node", NODE)
        self.send_header("X-Mlxdist-Boot", "0" * 32)
        self.send_header("X-Mlxdist-Response-Signature", "ab" * 32)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stranger(port: int):
    server = ThreadingHTTPServer((STRANGER, port), _Claims)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def announced(port: int, *addresses: str, node: str = NODE) -> Agent:
    return Agent(node, "c", list(addresses), port, {"host": "real"})


def test_a_stranger_answering_for_an_agents_name_does_not_hide_it(agent):
    """The stranger's address comes first (as a planted record would put it): the agent's own
    address still proves it, and it is the one kept."""
    with stranger(agent.port):
        notes = []
        found = verified([announced(agent.port, STRANGER, "127.0.0.1")], agent.secret, notes=notes)
        assert [(a.url, c.node_id) for a, c in found] == [(agent.url, NODE)]
        assert notes == []
        # The stranger's address alone: left out, and the line says why.
        assert verified([announced(agent.port, STRANGER)], agent.secret, notes=notes) == []
        assert notes == [
            "the agent announced as real (node node-real) is left out: does not know this "
            "cluster's secret"
        ]


def test_a_first_address_out_of_reach_does_not_hide_the_agent(agent):
    """192.0.2.1 (TEST-NET-1) is routed nowhere: its hello fails or times out."""
    started = time.monotonic()
    found = verified([announced(agent.port, "192.0.2.1", "127.0.0.1")], agent.secret, timeout=2)
    assert [a.url for a, _ in found] == [agent.url]
    assert found[0][0].addresses == ["127.0.0.1", "192.0.2.1"]
    assert time.monotonic() - started < 4


def test_each_announcement_that_does_not_prove_itself_is_named_with_the_reason(agent, monkeypatch):
    notes = []
    assert verified([announced(agent.port, "127.0.0.1")], os.urandom(32), notes=notes) == []
    closed = free_ports(1)[0]
    assert verified([announced(closed, "127.0.0.1", node="gone")], agent.secret, notes=notes) == []
    # A launcher whose clock runs 60 s ahead of the agent's.
    clock = time.time
    monkeypatch.setattr(launcher.auth, "time", type("Clock", (), {"time": lambda: clock() + 60}))
    assert verified([announced(agent.port, "127.0.0.1")], agent.secret, notes=notes) == []
    wrong, gone, stale = notes
    assert wrong.endswith("(node node-real) is left out: does not know this cluster's secret")
    assert "(node gone) is left out: cannot reach the agent at http://127.0.0.1:" in gone
    assert str(closed) in gone
    assert stale.endswith(
        "is left out: its clock differs from this machine's by more than 30 s: "
        "run `mlxdist doctor` on it"
    )


def test_announcements_that_never_answer_cost_the_deadline_and_hide_no_agent(agent):
    """A flood of announcements at a port that accepts and never answers, the real agent last."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)
    port = silent.getsockname()[1]
    fakes = [announced(port, "127.0.0.1", node=f"fake-{i}") for i in range(MAX_ANNOUNCEMENTS - 1)]
    notes = []
    started = time.monotonic()
    try:
        found = verified([*fakes, announced(agent.port, "127.0.0.1")], agent.secret, 30, notes, 2)
    finally:
        silent.close()
    took = time.monotonic() - started
    assert [c.node_id for _, c in found] == [NODE]
    assert len(notes) == MAX_ANNOUNCEMENTS - 1
    assert all(n.endswith("is left out: no answer in time") for n in notes), notes[:3]
    assert took < 10, took  # the deadline (2 s) and a loaded machine's slack, not 30 s
    print(f"{len(fakes)} silent announcements: {took:.1f} s")


def test_browse_looks_at_64_announcements_at_most_and_says_so():
    """100 announcements of the cluster on loopback (real zeroconf)."""

    async def flood(n: int):
        azc = AsyncZeroconf(interfaces=["127.0.0.1"])
        try:
            infos = [
                ServiceInfo(
                    SERVICE,
                    f"fake-{i:03d}.{SERVICE}",
                    addresses=[socket.inet_aton("127.0.0.1")],
                    port=9,
                    properties={"cluster": "flood", "id": f"fake-{i:03d}"},
                    server=f"fake-{i:03d}.local.",
                )
                for i in range(n)
            ]
            notes = []
            started = time.monotonic()
            looking = asyncio.to_thread(browse, "flood", ["127.0.0.1"], 2.0, notes)
            looking = asyncio.ensure_future(looking)
            # Announced while the browse listens: announcements go out multicast, where an
            # answer to its first query may go unicast to another process's port 5353.
            await asyncio.sleep(0.3)
            sent = [azc.async_register_service(i, cooperating_responders=True) for i in infos]
            await asyncio.gather(*await asyncio.gather(*sent))
            found = await looking
            return found, notes, time.monotonic() - started
        finally:
            await azc.async_close()

    found, notes, took = asyncio.run(flood(100))
    assert len(found) == MAX_ANNOUNCEMENTS
    assert len(notes) == 1, notes
    seen = re.fullmatch(r"(\d+) announcements were seen, .* (\d+) left unread", notes[0])
    assert seen and int(seen[2]) == int(seen[1]) - MAX_ANNOUNCEMENTS > 0, notes
    assert took < 8, took  # the 2 s window, then the cache: nothing resolved name by name


def test_an_agent_without_a_node_id_in_its_facts_keeps_one_across_restarts(tmp_path):
    secret = load_secret(create_secret(tmp_path / "secret"))
    ids = [create_agent_app(secret, tmp_path / "models", dict).state.node_id for _ in range(2)]
    assert ids[0] == ids[1] == (tmp_path / "node_id").read_text().strip()
    (tmp_path / "other").mkdir()
    other = create_agent_app(secret, tmp_path / "other" / "models", dict).state.node_id
    assert other != ids[0]
