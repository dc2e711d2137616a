"""The dashboard's view of a cluster from the nodes' facts (launcher/clusterview.py): nodes,
cables with their generation and RDMA, the ring and the plan, on captured macOS output.

Real captures (tests/data/macos/real, each folder's SOURCE.txt names its origin): the Thunderbolt
JSON of a Mac Studio and a MacBook Pro cabled to each other, and ibv_devices of an M3 Ultra and
an M4 Pro Mac mini. studio-1..3 and macbook-3port are the synthesised Macs of tests/data/macos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.clusterview import (
    agent_nodes,
    cables,
    generation,
    launch_view,
    local_view,
    ports_of,
    ring,
    view_text,
)
from launcher.hostfacts import (
    parse_hardware_ports,
    parse_ibv_devices,
    parse_thunderbolt,
    replayed_here,
    thunderbolt_ports,
)
from launcher.rankspec import MAX_VIEW_BYTES, RankSpec
from launcher.topology import Link, cable_graph

MACOS = Path(__file__).parent / "data" / "macos"
REAL = MACOS / "real"
TB_JSON = "system_profiler-SPThunderboltDataType.json"
GiB = 2**30


@pytest.fixture(scope="module")
def macs(tmp_path_factory) -> dict[str, dict]:
    """The synthesised Macs' facts by host name, as their agents report them."""
    ids = tmp_path_factory.mktemp("ids")
    folders = ("studio-1", "studio-2", "studio-3", "macbook-3port")
    facts = [replayed_here(MACOS / f, ids / f, {}).to_dict() for f in folders]
    return {f["hostname"]: f for f in facts}


# ---- nodes ----

MEMORY = [
    # wired_limit_mb, gpu_working_set -> memory_usable, wired_limit
    (0, 0, None, None),
    (0, 400 * GiB, 400 * GiB, 400 * GiB),
    (480 * 1024, 400 * GiB, 400 * GiB, 480 * GiB),
    (480 * 1024, 0, None, 480 * GiB),
]


@pytest.mark.parametrize("wired_mb,working_set,usable,wired", MEMORY)
def test_agent_node_memory(macs, wired_mb, working_set, usable, wired):
    facts = macs["studio-1"] | {"wired_limit_mb": wired_mb, "gpu_working_set": working_set}
    (node,) = agent_nodes([("studio-1", "169.254.100.2", facts)])
    assert node["memory_usable"] == usable
    assert node["wired_limit"] == wired


def test_agent_nodes_from_the_captures(macs):
    """Chip and memory as the captures' sysctl and vm_stat give them; used = total - available."""
    rows = [(name, f"169.254.100.{i + 2}", facts) for i, (name, facts) in enumerate(macs.items())]
    nodes = agent_nodes(rows, {"studio-1": [0], "studio-3": [2, 1]})
    by_name = {n["name"]: n for n in nodes}
    assert [n["name"] for n in nodes] == ["studio-1", "studio-2", "studio-3", "macbook-1"]
    s1, s3, mb = by_name["studio-1"], by_name["studio-3"], by_name["macbook-1"]
    assert (s1["chip"], s1["memory_total"]) == ("Apple M3 Ultra", 549755813888)  # hw.memsize
    assert s1["memory_used"] == 549755813888 - macs["studio-1"]["memory_available"]
    assert (s3["chip"], s3["memory_total"]) == ("Apple M2 Ultra", 206158430208)
    assert mb["chip"] == "Apple M4 Max"
    assert (s1["state"], s1["ranks"]) == ("running", [0])
    assert (s3["state"], s3["ranks"]) == ("running", [1, 2])
    assert (mb["state"], mb["ranks"]) == ("idle", [])
    assert s1["address"] == "169.254.100.2" and s1["rank"] is None
    # every field of the contract's node, those only a rank knows left empty
    fields = {"name", "rank", "address", "chip", "memory_total", "memory_usable", "memory_used"}
    fields |= {"wired_limit", "layers", "experts", "weights", "bytes_per_token"}
    fields |= {"heartbeat_age", "state", "load", "ranks"}
    assert all(set(n) == fields for n in nodes)
    assert s1["layers"] is None and s1["load"] is None


def test_an_agent_not_asked_for_its_ranks_has_none(macs):
    (node,) = agent_nodes([("studio-2", None, macs["studio-2"])])
    assert (node["state"], node["ranks"], node["address"]) == ("idle", None, None)


def test_a_host_without_memory_figures():
    (node,) = agent_nodes([("bare", "10.0.0.1", {"chip": "", "memory_total": 0})])
    assert (node["chip"], node["memory_total"], node["memory_used"]) == (None, None, None)


# ---- cables ----

GENERATIONS = [
    # the ends' speed texts, as system_profiler gives them -> the cable's generation
    (["80 Gb/s", "80 Gb/s"], "Thunderbolt 5"),
    (["120 Gb/s", "80 Gb/s"], "Thunderbolt 5"),  # Bandwidth Boost one way
    (["80 Gb/s", "Up to 120 Gb/s"], "Thunderbolt 5"),  # the negotiated end tells
    (["40 Gb/s", "40 Gb/s"], "Thunderbolt 4"),
    (["40 Gb/s", "Up to 120 Gb/s"], "Thunderbolt 4"),
    (["Up to 120 Gb/s", "Up to 40 Gb/s"], "Thunderbolt 4"),  # neither negotiated: the slower
    (["20 Gb/s", "40 Gb/s"], "20 Gb/s"),
    (["", ""], None),
    (["fast", ""], None),
]


@pytest.mark.parametrize("speeds,expected", GENERATIONS)
def test_generation(speeds, expected):
    assert generation(speeds) == expected


def _real_pair() -> dict:
    """The real Studio and MacBook ports, on the stated port map of test_real_captures.py:
    "Thunderbolt N" is en(N+1) on the Studio (en2..en7, as the M3 Ultra's rdma_en2..rdma_en7 in
    MLX's docs) and en(N) on the MacBook; networksetup was not published for them."""
    maps = {
        "macbook": "".join(f"Hardware Port: Thunderbolt {n}\nDevice: en{n}\n\n" for n in (1, 2, 3)),
        "studio": "".join(
            f"Hardware Port: Thunderbolt {n}\nDevice: en{n + 1}\n\n" for n in range(1, 7)
        ),
    }
    folders = {"macbook": "m5-max-macbookpro-omlx", "studio": "m3-ultra-studio-omlx"}
    return {
        h: thunderbolt_ports(
            parse_thunderbolt((REAL / folders[h] / TB_JSON).read_text()),
            parse_hardware_ports(maps[h]),
            {},
        )
        for h in folders
    }


def _rdma(folder: str) -> list[str]:
    return parse_ibv_devices((REAL / folder / "ibv_devices.txt").read_text())


# The Studio's devices are the M3 Ultra's of MLX's docs (rdma_en2..en7); the MacBook's, the M4
# Pro Mac mini's of Apple's TN3205 (rdma_en2..en4): neither names the MacBook's en1, then one
# that does.
RDMA = [
    ([], [], False),
    (_rdma("m3-ultra-mlx-docs"), [], False),
    (_rdma("m3-ultra-mlx-docs"), _rdma("m4-pro-macmini-tn3205"), False),
    (_rdma("m3-ultra-mlx-docs"), ["rdma_en1"], True),
    (["rdma_en2"], ["rdma_en1"], False),  # the Studio's device is another port's
]


@pytest.mark.parametrize("studio,macbook,rdma", RDMA)
def test_the_real_cabled_pair(studio, macbook, rdma):
    """Both ends report 80 Gb/s: Thunderbolt 5; RDMA only with a device on each end's port."""
    ports = _real_pair()
    facts = {"studio": {"rdma_devices": studio}, "macbook": {"rdma_devices": macbook}}
    assert cable_graph(ports) == [Link("macbook", "en1", "studio", "en3")]
    assert cables(ports, facts) == [
        {"a": "macbook", "b": "studio", "generation": "Thunderbolt 5", "rdma": rdma}
    ]


def test_the_synthesised_macs_cables(macs):
    found = cables(ports_of(macs), macs)
    assert found == [
        # MacBook en1 (80 Gb/s) to the Studio's en6, idle-reading "Up to 120 Gb/s"
        {"a": "macbook-1", "b": "studio-1", "generation": "Thunderbolt 5", "rdma": False},
        {"a": "studio-1", "b": "studio-2", "generation": "Thunderbolt 5", "rdma": False},
        # the M2 Ultra's ports are Thunderbolt 4 (40 Gb/s)
        {"a": "studio-1", "b": "studio-3", "generation": "Thunderbolt 4", "rdma": False},
        {"a": "studio-2", "b": "studio-3", "generation": "Thunderbolt 4", "rdma": False},
    ]


# ---- ring ----


def test_ring_along_the_cables_else_as_given(macs):
    trio = {k: v for k, v in macs.items() if k.startswith("studio")}
    links = cable_graph(ports_of(trio))
    assert ring(["studio-3", "studio-1", "studio-2"], links) == ["studio-1", "studio-2", "studio-3"]
    # with the MacBook (one cable only) no ring passes through all: the names as given
    everyone = cable_graph(ports_of(macs))
    assert ring(list(macs), everyone) == list(macs)
    assert ring(["b", "a"], []) == ["b", "a"]


# ---- the view rank 0 is given ----


def test_launch_view(macs):
    order = ["studio-1", "studio-2", "studio-3"]
    rows = [(n, f"169.254.100.{i + 2}", macs[n]) for i, n in enumerate(order)]
    view = launch_view(rows, "pipeline", [30, 20, 11], "jaccl-ring", 21.456, "rdma")
    assert [(n["name"], n["rank"], n["state"]) for n in view["nodes"]] == [
        ("studio-1", 0, "loading"),
        ("studio-2", 1, "loading"),
        ("studio-3", 2, "loading"),
    ]
    assert view["nodes"][2]["chip"] == "Apple M2 Ultra"
    assert view["ring"] == order
    assert len(view["cables"]) == 3
    assert view["plan"] == {
        "parallel": "pipeline",
        "backend": "jaccl",
        "split": [30, 20, 11],
        "predicted_tps": 21.46,
        "link": "rdma",
    }
    text = view_text(view)
    assert json.loads(text) == view
    assert RankSpec.from_argv(["--model", "m", "--split", "1", "--view", text]).view == text


@pytest.mark.parametrize("mode", ["expert", "tensor"])
def test_a_plan_that_runs_every_layer_has_no_split(macs, mode):
    view = launch_view([("studio-1", None, macs["studio-1"])], mode, [61], "ring")
    assert view["plan"]["split"] is None and view["plan"]["backend"] == "ring"
    assert view["plan"]["predicted_tps"] is None


def test_local_view(macs):
    view = local_view(macs["studio-3"] | {"gpu_working_set": 150 * GiB}, "tensor", None, 8.0)
    assert view["nodes"] == view["cables"] == view["ring"] == []
    assert view["machine"] == {
        "chip": "Apple M2 Ultra",
        "memory_total": 206158430208,
        "memory_usable": 150 * GiB,
        "wired_limit": 150 * GiB,
    }
    assert view["plan"]["link"] == "loopback" and view["plan"]["predicted_tps"] == 8.0


def test_a_view_too_large_loses_its_cables_then_is_not_sent(macs):
    many = [(f"mac-{i:03d}", "10.0.0.1", macs["studio-1"]) for i in range(64)]
    view = launch_view(many, "pipeline", [1] * 64, "ring")
    view["cables"] = [{"a": "x" * 1000, "b": "y", "generation": None, "rdma": False}] * 64
    text = view_text(view)
    assert text is not None and len(text.encode()) <= MAX_VIEW_BYTES
    assert json.loads(text)["cables"] == [] and len(json.loads(text)["nodes"]) == 64
    view["nodes"] = view["nodes"] * 4
    assert view_text(view) is None


# ---- the agent's StartRank carries the view to rank 0 ----

RANK0 = {"model": "tiny", "split": [4], "rank": 0, "http_host": "127.0.0.1"}
RANK0 |= {"http_port": 18080, "name": "tiny"}
TWO_RANKS = {"split": [2, 2], "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5000"]]}
BAD_VIEWS = [
    ({"view": "not json"}, "view must be JSON text"),
    ({"view": "[1, 2]"}, "view must be a JSON object"),
    ({"view": '"text"'}, "view must be a JSON object"),
    ({"view": json.dumps({"a": "x" * MAX_VIEW_BYTES})}, "at most 65536"),
    (
        {"view": json.dumps({"a": "é" * (MAX_VIEW_BYTES // 2)}, ensure_ascii=False)},
        "at most 65536 bytes",
    ),
    ({"view": {"nodes": []}}, "valid string"),  # strict: JSON text, not an object
    (TWO_RANKS | {"rank": 1, "view": "{}"}, "view is rank 0's"),
]


@pytest.mark.parametrize("change,message", BAD_VIEWS)
def test_start_rank_refuses_a_bad_view(change, message):
    from pydantic import ValidationError

    from launcher.agent.requests import StartRank

    with pytest.raises(ValidationError, match=message):
        StartRank.model_validate(RANK0 | change)


def test_start_rank_gives_rank_0_its_view(macs):
    from launcher.agent.ranks import rank_argv
    from launcher.agent.requests import StartRank

    text = view_text(launch_view([("studio-1", None, macs["studio-1"])], "pipeline", [4], "ring"))
    argv = rank_argv("/py", Path("/m/tiny"), StartRank.model_validate(RANK0 | {"view": text}))
    assert argv[argv.index("--view") + 1] == text
    plain = rank_argv("/py", Path("/m/tiny"), StartRank.model_validate(RANK0))
    assert "--view" not in plain


# ---- the prediction the view carries (launcher/cluster.py) ----

R1_CONFIG = Path(__file__).parent / "data" / "deepseek-r1-config.json"


def test_the_view_carries_the_launchs_own_prediction(macs):
    """--parallel auto's figure for the mode it chose, as its line printed it; else the
    performance model on these nodes, mode and split; None without a model or a link."""
    from launcher.autoparallel import choose_for_nodes, model_inputs
    from launcher.cluster import _specs, predicted_tps
    from launcher.perfmodel import predict_decode
    from launcher.remote import Node

    nodes = [Node(n, "10.0.0.1", None, macs[n]) for n in ("studio-1", "studio-2", "studio-3")]
    auto = choose_for_nodes(R1_CONFIG, _specs(nodes), "tb5", 4096)
    said = float(auto.line.split(", ")[1].split()[0])  # "auto: expert parallel over tb4, 6.1 tok/s"
    got = predicted_tps(R1_CONFIG, nodes, auto.mode, [61] * 3, "tb5", 4096, auto)
    assert round(got, 1) == said
    active = model_inputs(R1_CONFIG, 3)[1]
    split = [25, 25, 11]
    direct = predict_decode(_specs(nodes), active, split, "pipeline", "tb5", 4096).tokens_per_s
    assert predicted_tps(R1_CONFIG, nodes, "pipeline", split, "tb5", 4096) == direct
    assert predicted_tps(R1_CONFIG, nodes, "pipeline", split, None, 4096) is None
    assert predicted_tps(Path("/no/model"), nodes, "pipeline", split, "tb5", 4096) is None
    # A chip without figures (a Linux node) would be taken for an Apple chip of its memory.
    pc = Node("pc", "10.0.0.9", None, dict(macs["studio-1"], chip="Intel(R) Xeon(R) Processor"))
    assert predicted_tps(R1_CONFIG, [pc, *nodes[1:]], "pipeline", split, "tb5", 4096) is None
    assert predicted_tps(R1_CONFIG, [pc, *nodes[1:]], auto.mode, split, "tb5", 4096, auto) is None
    from launcher.localview import predicted_here

    assert (
        predicted_here(R1_CONFIG, dict(macs["studio-1"], chip="AMD EPYC"), "pipeline", 2, 4096)
        is None
    )


# ---- the view of ranks on this machine (launcher/localview.py) ----


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_view_here_from_a_captured_mac(tmp_path, monkeypatch, mode):
    """This machine taken for the captured M2 Ultra (MLXDIST_FACTS_FROM, as the agents in the
    cluster tests): its chip and memory for every rank, and the speed predicted for the mode."""
    from launcher.autoparallel import LOOPBACK, local_nodes, mode_outcome, model_inputs
    from launcher.hostfacts import FACTS_FROM_ENV
    from launcher.localview import view_here
    from launcher.planner import node_spec_from_facts
    from mlxdist.testing.make_model import make_model

    path = make_model("llama", tmp_path / "llama", {"num_key_value_heads": 4})
    monkeypatch.setenv(FACTS_FROM_ENV, str(MACOS / "studio-3"))
    monkeypatch.setenv("MLXDIST_CONFIG", str(tmp_path / "config"))
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    split = [layers // 2, layers - layers // 2]
    view = json.loads(view_here(path, mode, split, 256))
    assert view["nodes"] == [] and view["machine"]["chip"] == "Apple M2 Ultra"
    assert view["machine"]["memory_total"] == 206158430208
    assert view["plan"]["split"] == (split if mode == "pipeline" else None)
    facts = replayed_here(MACOS / "studio-3", tmp_path / "id", {}).to_dict()
    spec, active, refusal = model_inputs(path, 2)
    nodes = local_nodes(node_spec_from_facts("here", facts), 2)
    outcome = mode_outcome(mode, nodes, spec, active, LOOPBACK, 256, refusal=refusal, shared=True)
    assert view["plan"]["predicted_tps"] == round(outcome.tokens_per_s, 2)
    assert view["plan"]["link"] == "loopback"


def test_memory_available_now(tmp_path, monkeypatch):
    """What an agent's live facts read every few seconds: this machine's figure (Linux's
    /proc/meminfo here), or a captured Mac's own (its vm_stat's free, inactive, speculative and
    purgeable pages)."""
    import sys

    from launcher.hostfacts import FACTS_FROM_ENV, parse_meminfo
    from launcher.localview import memory_available

    if sys.platform.startswith("linux"):
        now = parse_meminfo(Path("/proc/meminfo").read_text())[1]
        assert abs(memory_available() - now) < GiB
    monkeypatch.setenv(FACTS_FROM_ENV, str(MACOS / "studio-3"))
    monkeypatch.setenv("MLXDIST_CONFIG", str(tmp_path / "config"))
    assert (
        memory_available()
        == replayed_here(MACOS / "studio-3", tmp_path / "id", {}).memory_available
    )
