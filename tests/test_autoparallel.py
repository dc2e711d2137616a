"""`--parallel auto`: the mode the performance model predicts fastest for simulated clusters and
links, with one line saying why. Pure (mlx-lm's model classes built lazily, never run)."""

import json

import pytest
from conftest import ROOT

from launcher import perfmodel
from launcher.autoparallel import (
    LOOPBACK,
    choose_parallel,
    link_for,
    local_nodes,
    tensor_refusal,
)
from launcher.perfmodel import bytes_per_token
from launcher.planner import GIB, NodeSpec, model_spec_from_config, simulated_nodes
from mlxdist.cli.plan import plan_command
from quantize.checkpoint import read_config

DATA = ROOT / "tests" / "data"
R1 = read_config(DATA / "deepseek-r1-config.json")
QWEN = read_config(DATA / "qwen3-235b-a22b-config.json")


@pytest.fixture(scope="module")
def r1():
    return model_spec_from_config(R1, bits=4), bytes_per_token(R1, bits=4)


@pytest.fixture(scope="module")
def qwen():
    return model_spec_from_config(QWEN, bits=4), bytes_per_token(QWEN, bits=4)


def choose(model, cluster: str, link: str, config=R1, **kw):
    spec, active = model
    nodes = simulated_nodes(cluster)
    refusal = kw.pop("tensor_refusal", tensor_refusal(config, len(nodes)))
    c = choose_parallel(nodes, spec, active, link, tensor_refusal=refusal, **kw)
    print(f"{cluster} over {link}: {c.line}")
    return c


def speeds(c) -> dict:
    return {o.mode: o.tokens_per_s for o in c.outcomes}


# --- the two cases ----------------------------------------------------------------------


def test_r1_on_six_m2_ultras_over_tcp_favours_the_pipeline(r1):
    c = choose(r1, "6xM2Ultra-192GB", "tb5")  # the M2 Ultra has Thunderbolt 4: TCP over tb4
    assert c.mode == "pipeline"
    assert c.line.startswith("auto: pipeline parallel over tb4, ")
    # 128 heads do not divide by 6; even if they did, the 122 all_sums a token over TCP lose
    assert "tensor: num_attention_heads=128 does not divide by 6 ranks" in c.line
    bare = choose(r1, "6xM2Ultra-192GB", "tb5", tensor_refusal=None)
    s = speeds(bare)
    assert bare.mode == "pipeline" and s["pipeline"] > s["expert"] > s["tensor"]


def test_r1_on_four_m3_ultras_over_rdma_favours_tensor(r1):
    c = choose(r1, "4xM3Ultra-512GB", "rdma")
    s = speeds(c)
    assert c.mode == "tensor" and s["tensor"] > s["expert"] > s["pipeline"]
    assert c.line == (
        f"auto: tensor parallel over rdma, {s['tensor']:.1f} tok/s predicted "
        f"(pipeline {s['pipeline']:.1f}, expert {s['expert']:.1f})"
    )


# --- the choice follows the nodes, their memory and their links ---------------------------------


@pytest.mark.parametrize(
    "cluster,link,mode,why",
    [
        # the same four M3 Ultras over TCP: 122 all_sums of 300 us each sink tensor and expert
        ("4xM3Ultra-512GB", "tb5", "pipeline", ""),
        # two over RDMA: tensor, as exo's published 2-node figure runs
        ("2xM3Ultra-512GB", "rdma", "tensor", ""),
        # three over RDMA: 128 heads do not divide by 3, expert is next fastest
        ("3xM3Ultra-512GB", "rdma", "expert", "tensor: num_attention_heads=128 does not divide"),
        # rdma asked of Thunderbolt 4 chips: TCP over tb4, so the pipeline
        ("4xM2Ultra-192GB", "rdma", "pipeline", ""),
        # 8 x 64 GB: neither the pipeline's whole layers nor expert mode's replicated part fit
        # under Metal's limits; a 1/8 tensor cut of every layer does
        ("8xM4Pro-64GB", "tb5", "tensor", "pipeline 6.7 but does not fit"),
        # 3 x 144 GB fits nothing under the limits: the pipeline, whose plan names the shortfall
        ("3x144GB", "tb5", "pipeline", "auto: pipeline, as no mode fits these nodes"),
    ],
)
def test_the_choice_by_cluster_and_link(r1, cluster, link, mode, why):
    c = choose(r1, cluster, link)
    assert c.mode == mode and why in c.line
    fitting = [o for o in c.outcomes if o.runs]
    if fitting:
        assert max(fitting, key=lambda o: o.tokens_per_s).mode == mode


def test_a_dense_model_has_no_expert_mode():
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    model = (model_spec_from_config(config, bits=4), bytes_per_token(config, bits=4))
    c = choose(model, "2xM3Ultra-512GB", "rdma", config=config)
    assert "expert: no routed experts" in c.line
    assert c.mode in ("pipeline", "tensor")


def test_qwen3_on_rdma_and_tcp(qwen):
    """Qwen3-235B: 94 layers, 64 query and 4 KV heads (tensor needs a divisor of 4)."""
    assert choose(qwen, "4xM3Ultra-512GB", "rdma", config=QWEN).mode == "tensor"
    assert choose(qwen, "4xM3Ultra-512GB", "tb5", config=QWEN).mode == "pipeline"
    eight = choose(qwen, "8xM4Max-128GB", "rdma", config=QWEN)
    assert "tensor: num_key_value_heads=4 does not divide by 8 ranks" in eight.line


def test_one_node_is_a_pipeline(r1):
    spec, active = r1
    c = choose_parallel([NodeSpec("a", 512 * GIB)], spec, active, "rdma")
    assert c.mode == "pipeline" and c.line == "auto: pipeline (one node)"
    assert [o.mode for o in c.outcomes] == ["pipeline"]


# --- ranks on one machine -----------------------------------------------------------------------


def test_ranks_on_one_machine_share_it(r1):
    """--local N: the ranks split the machine's memory and GPU limit; tensor and expert ranks read
    at once and share its bandwidth, so the pipeline (stages in turn, whole bandwidth) wins."""
    machine = NodeSpec("here", 512 * GIB, 500 * GIB, "Apple M3 Ultra", 400 * GIB, "Metal")
    ranks = local_nodes(machine, 4)
    assert [n.memory_total for n in ranks] == [128 * GIB] * 4
    assert [n.gpu_limit for n in ranks] == [100 * GIB] * 4
    assert [n.memory_available for n in ranks] == [125 * GIB] * 4
    spec, active = r1
    c = choose_parallel(ranks, spec, active, LOOPBACK, shared_bandwidth=True)
    s = speeds(c)
    assert c.mode == "pipeline" and s["pipeline"] > s["expert"] and s["pipeline"] > s["tensor"]
    # without the sharing, the same four quarter-machines would favour tensor over loopback
    apart = choose_parallel(ranks, spec, active, LOOPBACK)
    assert apart.mode == "tensor"


@pytest.mark.parametrize(
    "backend,over_cables,link",
    [
        ("jaccl", False, "rdma"),
        ("jaccl-ring", False, "rdma"),
        ("ring", True, "tb5"),  # TCP on the cables' own /30s
        ("ring", False, "lan"),  # no cables, ssh hosts, a replan: the hosts' own addresses
    ],
)
def test_the_link_follows_the_backend_and_where_the_ring_runs(backend, over_cables, link):
    assert link_for(backend, over_cables) == link


def test_the_lan_link_is_10_gigabit_ethernet_under_tcp():
    """The figures stated in perfmodel: 10 Gb/s less framing at a 1500-byte MTU, and the TCP
    stack's 300 us that TCP over Thunderbolt pays too; no Thunderbolt needed at either end."""
    lan, tb5 = perfmodel.LINKS["lan"], perfmodel.LINKS["tb5"]
    assert lan.bandwidth == pytest.approx(1.177e9, rel=1e-3)
    assert lan.latency == tb5.latency and lan.bandwidth < perfmodel.LINKS["tb4"].bandwidth
    assert lan.thunderbolt == 0
    assert perfmodel.usable_link(lan, [perfmodel.chip("M2Ultra")]) == (lan, None)


@pytest.mark.parametrize(
    "cluster,link,mode",
    [
        # over the LAN as over TCP on Thunderbolt: the all_sums' 300 us each sink tensor
        ("4xM3Ultra-512GB", "lan", "pipeline"),
        ("6xM2Ultra-192GB", "lan", "pipeline"),
        # 8 x 64 GB: only the tensor cut fits under Metal's limits, whatever the link
        ("8xM4Pro-64GB", "lan", "tensor"),
    ],
)
def test_the_choice_over_the_lan(r1, cluster, link, mode):
    c = choose(r1, cluster, link)
    assert c.mode == mode and c.line.startswith(f"auto: {mode} parallel over lan, ")
    # the LAN's lower bandwidth makes each mode no faster than over TCP on TB5's cables
    tb5 = speeds(choose(r1, cluster, "tb5"))
    for o in c.outcomes:
        if o.tokens_per_s is not None:
            assert o.tokens_per_s <= tb5[o.mode]


# --- mlxdist plan shows the same choice ---------------------------------------------------------


def test_plan_auto_states_the_choice(capsys):
    code = plan_command(
        str(DATA / "deepseek-r1-config.json"),
        None,
        "4xM3Ultra-512GB",
        4096,
        1,
        4,
        False,
        link="rdma",
        parallel="auto",
    )
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "auto: tensor parallel over rdma," in out.splitlines()[-1]
    assert "GPU limit GB" in out and "412.3 est." in out  # 3/4 of 512 GiB


def test_plan_auto_json_names_the_mode(capsys):
    code = plan_command(
        str(DATA / "deepseek-r1-config.json"), None, "6x192GB", 4096, 1, 4, True, parallel="auto"
    )
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["choice"]["mode"] == "pipeline" and data["parallel"] == "pipeline"
    assert data["choice"]["line"].startswith("auto: pipeline parallel over tb4")
    assert [n["gpu_limit_from"] for n in data["nodes"]] == ["estimate"] * 6
    modes = data["prediction"]["modes"]
    assert f"{modes['pipeline']['tokens_per_s']:.1f} tok/s" in data["choice"]["line"]
    assert perfmodel.MODES == ("pipeline", "expert", "tensor")


# --- across hosts, only the modes the folder is cut for compete ---------------------------------


def _cut(folder, parallel: str | None, counts: list[int], whole: bool = True):
    """A model folder as mlxdist quantize leaves it: the whole model, and node folders whose
    manifests say what they were cut for."""
    from quantize.nodes import NODE_FORMAT

    folder.mkdir(parents=True)
    if whole:
        (folder / "model.safetensors").write_bytes(b"")
    if parallel:
        node = folder / "nodes" / "0"
        node.mkdir(parents=True)
        key = "experts" if parallel == "expert" else "split"
        manifest = {"format": NODE_FORMAT, "parallel": parallel, "plan": {key: counts}}
        node.joinpath("manifest.json").write_text(json.dumps(manifest))
    return folder


NOT_CUT_2 = "not cut for 2 nodes"
NO_WHOLE = "no whole model in the folder"


@pytest.mark.parametrize(
    "parallel,counts,whole,nodes,expected",
    [
        # the whole model beside pipeline folders: expert mode reads its experts from it
        ("pipeline", [31, 30], True, 2, {}),
        ("pipeline", [20, 21, 20], True, 2, {"pipeline": NOT_CUT_2}),
        ("expert", [128, 128], True, 2, {"pipeline": NOT_CUT_2}),
        # an uncut folder: every mode but a pipeline (which needs its node folders)
        (None, [], True, 4, {"pipeline": "not cut for 4 nodes"}),
        ("expert", [64] * 4, False, 4, {"pipeline": "not cut for 4 nodes", "tensor": NO_WHOLE}),
        # node folders for other nodes and no whole model: nothing runs on 2
        (
            "expert",
            [64] * 4,
            False,
            2,
            {
                "pipeline": NOT_CUT_2,
                "expert": f"{NOT_CUT_2}, and {NO_WHOLE}",
                "tensor": NO_WHOLE,
            },
        ),
    ],
)
def test_folder_readiness(tmp_path, parallel, counts, whole, nodes, expected):
    from launcher.autoparallel import folder_readiness

    assert folder_readiness(_cut(tmp_path / "m", parallel, counts, whole), nodes) == expected


def test_a_mode_the_folder_is_not_cut_for_does_not_win(r1):
    fastest = choose(r1, "4xM3Ultra-512GB", "rdma")
    assert fastest.mode == "tensor"
    cut = choose(r1, "4xM3Ultra-512GB", "rdma", not_ready={"tensor": "no whole model"})
    assert cut.mode == "expert"  # the next fastest that fits, as predicted
    assert speeds(cut) == speeds(fastest)
    assert "tensor" in cut.line and "no whole model" in cut.line


def test_an_uncut_folder_launches_in_expert_mode(tmp_path):
    """Across hosts, --parallel expert (or auto's pick of it) on a folder holding the whole
    model and no expert node folders: the plan's expert counts, each rank reading only its own
    experts from the whole model; a folder with neither is refused in one line saying how to
    cut it."""
    from launcher.cluster import choose_experts
    from launcher.local import LaunchError
    from launcher.remote import Node
    from mlxdist.testing.make_model import make_model

    model = make_model("qwen3_moe", tmp_path / "qwen3_moe")
    nodes = [Node(f"mac{i}", "127.0.0.1", None, {"memory_total": 8 * GIB}) for i in range(3)]
    assert choose_experts(model, nodes, 4096) == [3, 3, 2]  # 8 routed experts, none cut
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(LaunchError, match="has no expert node folders for 3 nodes: cut them"):
        choose_experts(config_only, nodes, 4096)
