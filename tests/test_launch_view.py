"""The view a launch across agents gives rank 0 (RankSpec.view): start_agents_cluster on the
captured Mac Studios' facts (tests/data/macos/studio-1, studio-2: one Thunderbolt 5 cable with
its /30), its requests signed through the agents' own app and validation to each rank's command
line, caught where the process would start (as tests/test_rankspec.py does)."""

from __future__ import annotations

import json
from pathlib import Path

from test_rankspec import _agent_node, _rank_flags, started  # noqa: F401 - started: a fixture

from launcher.hostfacts import collect_macos, replay_runner
from launcher.rankspec import RankSpec

MACOS = Path(__file__).parent / "data" / "macos"


def test_rank_0_alone_gets_the_view_of_the_agents(started, tmp_path, monkeypatch):  # noqa: F811
    from launcher.agent import create_agent_app
    from launcher.cluster import _with_facts, start_agents_cluster
    from mlxdist.testing.make_model import make_model

    path = make_model("llama", tmp_path / "llama", {"num_key_value_heads": 4})
    monkeypatch.setattr("launcher.local.wait_ready", lambda running: {})  # no rank runs here
    secret = b"s" * 32
    nodes = []
    for r, mac in enumerate(("studio-1", "studio-2")):
        facts = collect_macos(replay_runner(MACOS / mac), tmp_path / mac, lambda: 0).to_dict()
        root = tmp_path / f"agent-{r}"
        app = create_agent_app(secret, root / "models", lambda f=facts: f, runs_dir=root / "runs")
        nodes.append(_agent_node(app, secret, mac, f"10.20.0.1{r + 1}"))
    monkeypatch.setattr("launcher.cluster.nodes_from_hosts", lambda *_: _with_facts(nodes))
    where = (tmp_path / "hosts.toml", None, [], secret, 256, None, "tensor", "ring", "push")
    start_agents_cluster(path, *where)
    specs = [RankSpec.from_argv(_rank_flags(c)) for c in started]
    assert [s.view is None for s in specs] == [False, True]
    view = json.loads(specs[0].view)
    assert [(n["name"], n["rank"], n["address"], n["chip"]) for n in view["nodes"]] == [
        ("studio-1", 0, "10.20.0.11", "Apple M3 Ultra"),
        ("studio-2", 1, "10.20.0.12", "Apple M3 Ultra"),
    ]
    assert view["nodes"][0]["memory_total"] == 512 * 2**30
    assert view["cables"] == [
        {"a": "studio-1", "b": "studio-2", "generation": "Thunderbolt 5", "rdma": False}
    ]
    assert view["ring"] == ["studio-1", "studio-2"]
    plan = view["plan"]
    assert (plan["parallel"], plan["backend"], plan["split"], plan["link"]) == (
        "tensor",
        "ring",
        None,
        "tb5",  # the ring over the cable's own /30
    )
    assert plan["predicted_tps"] > 0
