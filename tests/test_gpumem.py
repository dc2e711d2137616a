"""GPU memory: Metal's limit per node (wired limit, working set, or an estimate fitted on published
figures), chips as macOS names them, and plans that fit only above the limits. Pure."""

import json

import pytest
from conftest import ROOT

from launcher import chips, gpumem
from launcher.gpumem import ESTIMATE, METAL, MIB, WIRED, estimated_working_set, gpu_limit
from launcher.hostfacts import collect_macos, replay_runner
from launcher.planner import (
    GIB,
    ModelSpec,
    NodeSpec,
    node_spec_from_facts,
    plan,
    plan_experts,
    simulated_nodes,
)

DATA = json.loads((ROOT / "tests" / "data" / "gpu" / "working_set.json").read_text())
GB = 10**9


# --- the estimate against Apple's figures -------------------------------------------------------


@pytest.mark.parametrize(
    "figure", DATA["figures"], ids=lambda f: f"{f['memory_gib']}GiB-{f['source'][-6:]}"
)
def test_estimate_never_exceeds_a_published_working_set(figure):
    """Every figure in the data is at or above the estimate (a plan made on it fits), and equal
    to it, to the MiB, for every figure from macOS before 26."""
    estimate = estimated_working_set(figure["memory_gib"] * GIB) / MIB
    print(figure["memory_gib"], figure["working_set_mib"], round(estimate, 2), figure["macos"])
    assert estimate <= figure["working_set_mib"] + 0.01
    if figure["macos"] == "before 26":
        assert estimate == pytest.approx(figure["working_set_mib"], abs=0.01)


def test_the_figures_cover_both_fractions_and_name_their_source():
    before = {f["memory_gib"] for f in DATA["figures"] if f["macos"] == "before 26"}
    assert {16, 32} <= before and {64, 96} <= before  # 2/3 below 64 GiB, 3/4 from it
    for f in DATA["figures"] + DATA["raised"]:
        assert f["source"].startswith("https://") and f["quoted"]
    source = (ROOT / "tests" / "data" / "gpu" / "SOURCE.txt").read_text()
    assert all(f["source"] in source for f in DATA["figures"])


def test_a_raised_wired_limit_is_the_working_set_metal_then_reports():
    (raised,) = DATA["raised"]
    limit, source = gpu_limit(raised["memory_gib"] * GIB, wired_limit_mb=raised["wired_limit_mb"])
    assert (limit / MIB, source) == (raised["working_set_mib"], WIRED)


@pytest.mark.parametrize(
    "memory_gib,wired_mb,working_set,expected",
    [
        (192, 0, 0, (144 * GIB, ESTIMATE)),
        (32, 0, 0, (32 * GIB * 2 // 3, ESTIMATE)),
        (192, 0, 150 * GIB, (150 * GIB, METAL)),
        (192, 180_000, 150 * GIB, (180_000 * MIB, WIRED)),  # the wired limit in force wins
        (0, 0, 0, (0, ESTIMATE)),
    ],
)
def test_gpu_limit_prefers_the_wired_limit_then_metal(memory_gib, wired_mb, working_set, expected):
    assert gpu_limit(memory_gib * GIB, wired_mb, working_set) == expected


@pytest.mark.parametrize(
    "memory_gib,headroom_gib,mb", [(192, 19.2, 176947), (512, 51.2, 471859), (96, 6, 92160)]
)
def test_the_wired_limit_that_leaves_the_headroom(memory_gib, headroom_gib, mb):
    assert gpumem.wired_limit_mb_to_fit(memory_gib * GIB, int(headroom_gib * GIB)) == mb
    assert gpumem.sysctl_command(mb) == f"sudo sysctl iogpu.wired_limit_mb={mb}"


# --- chips as macOS names them ------------------------------------------------------------------


@pytest.mark.parametrize(
    "brand,name",
    [
        ("Apple M3 Ultra", "M3 Ultra"),
        ("Apple M2 Ultra", "M2 Ultra"),
        ("Apple M4 Max", "M4 Max"),
        ("Apple M4 Pro", "M4 Pro"),
        ("Apple M1", "M1"),
        ("Apple M4", "M4"),
        ("apple   m3  ultra", "M3 Ultra"),
        ("APPLE M2 MAX", "M2 Max"),
        ("  Apple M3 Ultra\n", "M3 Ultra"),
        ("M3 Ultra", "M3 Ultra"),
        ("m3ultra", "M3 Ultra"),
    ],
)
def test_a_brand_string_names_its_chip(brand, name):
    assert chips.chip(brand).name == name
    assert chips.reported_chip(brand) == (name, None)


@pytest.mark.parametrize(
    "brand,note",
    [
        ("Apple M9 Hyper", "chip 'Apple M9 Hyper' is not in launcher/chips.py"),
        ("Intel(R) Xeon(R) Processor", "chip 'Intel(R) Xeon(R) Processor' is not in"),
        ("Apple", "chip 'Apple' is not in"),
        ("", None),
    ],
)
def test_an_unknown_chip_is_noted_not_dropped(brand, note):
    name, said = chips.reported_chip(brand)
    assert name is None
    assert (said is None) if note is None else said.startswith(note)


def test_the_plan_notes_a_node_whose_chip_is_unknown():
    model = ModelSpec("m", [GB] * 4, GB // 10, GB // 10, False, 0)
    nodes = [NodeSpec("a", 64 * GIB, chip="Apple M3 Ultra"), NodeSpec("b", 64 * GIB, chip="M9")]
    p = plan(nodes, model)
    assert p.fits and p.notes == [
        "b: chip 'M9' is not in launcher/chips.py; the performance model assumes M2 Ultra"
    ]


# --- a node's GPU limit from its facts ----------------------------------------------------------


@pytest.mark.parametrize(
    "facts,expected",
    [
        (  # a Mac with Metal's figure and no wired limit
            {
                "os": "macOS 15.5",
                "chip": "Apple M3 Ultra",
                "memory_total": 512 * GIB,
                "memory_available": 500 * GIB,
                "wired_limit_mb": 0,
                "gpu_working_set": 400 * GIB,
            },
            (400 * GIB, METAL, "Apple M3 Ultra", 500 * GIB),
        ),
        (  # the wired limit raised with sysctl
            {
                "os": "macOS 26.2",
                "chip": "Apple M3 Ultra",
                "memory_total": 512 * GIB,
                "memory_available": 500 * GIB,
                "wired_limit_mb": 480_000,
                "gpu_working_set": 0,
            },
            (480_000 * MIB, WIRED, "Apple M3 Ultra", 500 * GIB),
        ),
        (  # a Mac whose MLX reported no working set: estimated
            {
                "os": "macOS 15.5",
                "chip": "Apple M2 Ultra",
                "memory_total": 192 * GIB,
                "memory_available": 180 * GIB,
            },
            (144 * GIB, ESTIMATE, "Apple M2 Ultra", 180 * GIB),
        ),
        (  # a host over ssh: only the memory from hosts.toml, taken for a Mac
            {"memory_total": 192 * GIB, "memory_available": 192 * GIB},
            (144 * GIB, ESTIMATE, None, 192 * GIB),
        ),
        (  # a Linux stand-in: MLX on the CPU, no Metal limit
            {
                "os": "Linux 6.8",
                "chip": "Intel(R) Xeon(R)",
                "memory_total": 16 * GIB,
                "memory_available": 12 * GIB,
            },
            (None, "", "Intel(R) Xeon(R)", 12 * GIB),
        ),
    ],
)
def test_node_spec_from_facts(facts, expected):
    n = node_spec_from_facts("n", facts)
    assert (n.gpu_limit, n.gpu_limit_from, n.chip, n.memory_bytes) == expected


@pytest.mark.parametrize(
    "folder,chip,memory_gib", [("studio-1", "M3 Ultra", 512), ("studio-3", "M2 Ultra", 192)]
)
def test_a_captured_macs_facts_plan_with_its_gpu_limit(folder, chip, memory_gib, tmp_path):
    facts = collect_macos(
        replay_runner(ROOT / "tests" / "data" / "macos" / folder),
        node_id_path=tmp_path / "node-id",
        working_set=lambda: 0,  # as replayed on Linux: no Metal to ask
    ).to_dict()
    n = node_spec_from_facts(folder, facts)
    assert chips.chip(n.chip).name == chip and n.memory_total == memory_gib * GIB
    assert (n.gpu_limit, n.gpu_limit_from) == (memory_gib * GIB * 3 // 4, ESTIMATE)
    assert n.usable_bytes() == min(n.memory_bytes - memory_gib * GIB // 10, n.gpu_limit)


# --- plans under the GPU limits -----------------------------------------------------------------


def uniform(layers: int, layer_gb: float) -> ModelSpec:
    return ModelSpec("u", [int(layer_gb * GB)] * layers, GB // 10, GB // 10, False, 0)


def test_usable_memory_is_the_smaller_of_memory_less_headroom_and_the_gpu_limit():
    (node,) = simulated_nodes("192GB")
    assert node.gpu_limit == 144 * GIB and node.usable_bytes() == 144 * GIB
    unlimited = NodeSpec("n", 192 * GIB)
    assert unlimited.usable_bytes() == 192 * GIB - int(192 * GIB * 0.1)
    low_wired = NodeSpec("n", 192 * GIB, gpu_limit=200 * GIB)  # above the memory: no effect
    assert low_wired.usable_bytes() == unlimited.usable_bytes()


@pytest.mark.parametrize(
    "cluster,layer_gb,fits,commands",
    [
        # 2 x 144 GiB = 309 GB under the limits: 60 layers of 4.5 GB (270 GB) fit
        ("2x192GB", 4.5, True, {}),
        # 60 x 5.5 = 330 GB: over the limits, under 2 x 185.5 GB less headroom: the sysctl
        ("2x192GB", 5.5, False, {"node0": 176947, "node1": 176947}),
        # 60 x 6.5 = 390 GB: does not fit even with the limits raised
        ("2x192GB", 6.5, False, {}),
        # 600 GB over 412.3 + 154.6 GB of limits: each node's N leaves its own headroom
        ("m3ultra-512,m2ultra-192", 10, False, {"m3ultra": 471859, "m2ultra": 176947}),
    ],
)
def test_a_plan_that_fits_only_above_the_gpu_limits_says_so(cluster, layer_gb, fits, commands):
    p = plan(simulated_nodes(cluster), uniform(60, layer_gb))
    print(p.message)
    assert p.fits is fits and p.raise_wired == commands
    if commands:
        assert p.message.startswith("does not fit under the GPU memory limits (")
        for node, mb in commands.items():
            assert f"sudo sysctl iogpu.wired_limit_mb={mb} on" in p.message and node in p.message
        raised = [
            NodeSpec(n.name, n.memory_total, chip=n.chip, gpu_limit=commands[n.name] * MIB)
            for n in simulated_nodes(cluster)
        ]
        assert plan(raised, uniform(60, layer_gb)).fits  # the printed sysctl makes it fit
    elif not fits:
        assert "GPU" not in p.message and "short by" in p.message


def test_an_expert_plan_over_the_gpu_limits_gives_the_sysctl():
    # 4 experts of 40 GB and 3 GB every node holds, on 2 x 96 GB: 83 GB each, over Metal's
    # 72 GiB (77.3 GB) but within 96 GiB less 10% (92.8 GB)
    model = ModelSpec("moe", [GB] * 2 + [161 * GB], 0, 0, False, 0, [0, 0, 160 * GB], 4)
    p = plan_experts(simulated_nodes("2x96GB"), model)
    print(p.message)
    assert not p.fits and p.raise_wired == {"node0": 88473, "node1": 88473}
    assert "sudo sysctl iogpu.wired_limit_mb=88473 on node0, node1" in p.message
