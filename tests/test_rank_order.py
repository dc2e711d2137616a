"""Rank order without a hosts file: from verified node ids and the cables, never from the host
names agents advertise (anyone can announce a name that sorts first)."""

from __future__ import annotations

import pytest

from launcher.agent_client import AgentClient
from launcher.cluster import ring
from launcher.remote import Node

SECRET = b"s" * 32


def node(name: str, node_id: str, ports: list[dict] | None = None) -> Node:
    client = AgentClient("http://127.0.0.1:9", SECRET)
    client.node_id = node_id  # as its signed hello would have bound it
    return Node(name, "127.0.0.1", client, facts={"thunderbolt": ports or []})


def cabled_ring(names: list[str], ids: dict[str, str]) -> list[Node]:
    """names cabled in a ring in this order: each host's port 0 to the next host's port 1."""
    n = len(names)
    nodes = []
    for i, name in enumerate(names):
        nxt, prev = names[(i + 1) % n], names[i - 1]
        ports = [
            {"interface": "en1", "domain_uuid": f"{name}-0", "peer_uuids": [f"{nxt}-1"]},
            {"interface": "en2", "domain_uuid": f"{name}-1", "peer_uuids": [f"{prev}-0"]},
        ]
        nodes.append(node(name, ids[name], ports))
    return nodes


@pytest.fixture(autouse=True)
def launcher_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXDIST_CONFIG", str(tmp_path / "conf"))
    (tmp_path / "conf").mkdir()
    return tmp_path / "conf"


def test_without_cables_the_verified_node_id_orders_not_the_name():
    nodes = [node("000-sorts-first", "node-c"), node("mac-a", "node-a"), node("mac-b", "node-b")]
    assert [n.name for n in ring(nodes, keep_order=False)] == ["mac-a", "mac-b", "000-sorts-first"]


def test_the_launchers_own_agent_is_rank_0(launcher_config):
    (launcher_config / "node_id").write_text("node-z\n")
    nodes = [node("a", "node-a"), node("here", "node-z"), node("b", "node-b")]
    assert [n.name for n in ring(nodes, keep_order=False)] == ["here", "a", "b"]


@pytest.mark.parametrize(
    "ids, expected",
    [
        # the ring a-b-c-d-a, from the least node id towards its lesser neighbour
        ({"a": "4", "b": "2", "c": "1", "d": "3"}, ["c", "b", "a", "d"]),
        ({"a": "4", "b": "3", "c": "1", "d": "2"}, ["c", "d", "a", "b"]),
        ({"a": "1", "b": "2", "c": "3", "d": "4"}, ["a", "b", "c", "d"]),
    ],
)
def test_along_the_cables_from_the_least_node_id(ids, expected):
    nodes = cabled_ring(["a", "b", "c", "d"], ids)
    order = [n.name for n in ring(nodes, keep_order=False)]
    assert order == expected
    # Each rank is cabled to the next, the last to the first.
    for x, y in zip(order, order[1:] + order[:1]):
        assert abs("abcd".index(x) - "abcd".index(y)) in (1, 3)


def test_a_hosts_file_keeps_its_order():
    nodes = [node("z", "node-1"), node("a", "node-0")]
    assert [n.name for n in ring(nodes, keep_order=True)] == ["z", "a"]
