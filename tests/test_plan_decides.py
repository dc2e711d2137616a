"""`mlxdist plan` over real nodes decides as `mlxdist launch` does: the same ring order, backend,
link and auto choice, from the nodes' facts (as their agents report them), through the same
function (launcher/cluster.py decide). Pure: the nodes are built from facts, no agent runs."""

from __future__ import annotations

import io
import json

import pytest
from conftest import ROOT, run_cli
from rich.console import Console

from launcher.autoparallel import ParallelError, choose_parallel, tensor_refusal
from launcher.backend import choose_backend
from launcher.cluster import _specs, decide, start_agents_cluster
from launcher.hostfacts import ThunderboltPort
from launcher.perfmodel import bytes_per_token
from launcher.planner import GIB, model_spec_from_config
from launcher.remote import Node
from launcher.topology import cable_graph
from mlxdist.cli.plan import FoundNodes, plan_nodes
from quantize.checkpoint import read_config

R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"
R1 = read_config(R1_CONFIG)


def macs(n: int, cables: list[tuple[int, int]] | None, rdma: bool = True, chip="M3 Ultra"):
    """n Macs of 512 GB as their agents report them, cabled as `cables` says (rank pairs; each
    cable on the next free port en2, en3, ... at both ends; None: every pair)."""
    names = [f"studio-{i + 1}" for i in range(n)]
    pairs = cables if cables is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    ports: dict[str, list[dict]] = {name: [] for name in names}
    for i, j in pairs:
        a, b = names[i], names[j]
        ia, ib = f"en{2 + len(ports[a])}", f"en{2 + len(ports[b])}"
        ports[a].append({"interface": ia, "domain_uuid": f"{a}-{ia}", "peer_uuids": [f"{b}-{ib}"]})
        ports[b].append({"interface": ib, "domain_uuid": f"{b}-{ib}", "peer_uuids": [f"{a}-{ia}"]})
    return [
        Node(
            name,
            f"10.0.0.{k + 1}",
            None,  # type: ignore[arg-type]  # no agent: the facts are all a decision reads
            {
                "os": "macOS 26.2",
                "chip": f"Apple {chip}",
                "memory_total": 512 * GIB,
                "memory_available": 500 * GIB,
                "thunderbolt": ports[name],
                "rdma_devices": [f"rdma_{p['interface']}" for p in ports[name]] if rdma else [],
                "bridges": {},
            },
        )
        for k, name in enumerate(names)
    ]


def plan_output(capsys, nodes, asked="auto", parallel="auto", model=R1_CONFIG, **kw) -> list[str]:
    found = FoundNodes(nodes, keep_order=True, backend=asked)
    code = plan_nodes(str(model), found, 4096, 1, 4, False, parallel=parallel, **kw)
    out = capsys.readouterr().out
    print(out)
    return [code, *out.splitlines()]


def launch_decision(nodes, asked="auto", model=R1_CONFIG):
    """What the launch path decides for the same nodes (start_agents_cluster's own call)."""
    return decide(model, nodes, asked, "auto", 4096, Console(file=io.StringIO()), bits=4)


# --- the backend, the link and the mode, as launch decides them ---------------------------------


@pytest.mark.parametrize(
    "nodes,asked,backend,link,mode",
    [
        # four M3 Ultras, every pair cabled over TB5 with RDMA: jaccl, so tensor parallelism
        (lambda: macs(4, None), "auto", "jaccl", "rdma", "tensor"),
        # the same Macs, ring asked: TCP over the cables' own /30s
        (lambda: macs(4, None), "ring", "ring", "tb5", "pipeline"),
        # no RDMA devices: jaccl cannot run, the ring runs on the cables
        (lambda: macs(4, None, rdma=False), "auto", "ring", "tb5", "pipeline"),
        # no cables at all: the ring over the hosts' own addresses, the LAN
        (lambda: macs(2, []), "auto", "ring", "lan", "pipeline"),
    ],
    ids=["jaccl-mesh", "ring-asked", "no-rdma", "no-cables"],
)
def test_plan_names_the_mode_and_link_launch_decides(capsys, nodes, asked, backend, link, mode):
    launch = launch_decision(nodes(), asked)
    assert (launch.backend.backend, launch.link, launch.parallel) == (backend, link, mode)
    code, *out = plan_output(capsys, nodes(), asked)
    assert code == 0
    # the backend's line (then any setup commands), the auto line last, as launch prints them
    assert out[-1] == launch.auto.line and launch.backend.why in out[:-1]
    assert out[-1].startswith(f"auto: {mode} parallel over {link}, ")
    assert f"link {link}" in "\n".join(out)  # the prediction's table title


def test_the_launch_decision_is_the_backend_and_the_model_over_its_link():
    """Checked against the parts it is made of: choose_backend over the nodes' facts and cables,
    then choose_parallel over RDMA for the four Macs (R1 at 4 bits)."""
    nodes = macs(4, None)
    facts = {n.name: n.facts for n in nodes}
    links = cable_graph(
        {n.name: [ThunderboltPort.from_dict(p) for p in n.facts["thunderbolt"]] for n in nodes}
    )
    backend = choose_backend([n.name for n in nodes], facts, links)
    assert backend.backend == "jaccl"
    spec, active = model_spec_from_config(R1, bits=4), bytes_per_token(R1, bits=4)
    expected = choose_parallel(_specs(nodes), spec, active, "rdma", 4096, 1, tensor_refusal=None)
    got = launch_decision(nodes)
    assert got.backend == backend and got.auto == expected and got.parallel == "tensor"
    assert tensor_refusal(R1, 4) is None


def test_an_explicit_link_overrides_the_backends(capsys):
    code, *out = plan_output(capsys, macs(4, None), link="tb5")
    assert out[-2].startswith("jaccl: ")  # the backend is still named
    assert out[-1].startswith("auto: pipeline parallel over tb5, ")


def test_a_folder_cut_for_the_pipeline_decides_as_its_launch(tmp_path, capsys):
    """A quantised folder with pipeline node folders for 4 nodes and no whole model: tensor mode
    cannot launch it, so plan and launch both pick among what the folder is cut for."""
    folder = tmp_path / "r1-4n"
    (folder / "nodes" / "0").mkdir(parents=True)
    config = {**R1, "quantization": {"group_size": 64, "bits": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    manifest = {"format": "mlxdist-node", "parallel": "pipeline", "plan": {"split": [16] * 4}}
    (folder / "nodes" / "0" / "manifest.json").write_text(json.dumps(manifest))
    launch = launch_decision(macs(4, None), model=folder)
    assert launch.backend.backend == "jaccl" and launch.parallel == "pipeline"
    assert "tensor" in launch.auto.line and "no whole model in the folder" in launch.auto.line
    code, *out = plan_output(capsys, macs(4, None), model=folder)
    assert out[-1] == launch.auto.line and code == 0


# --- --parallel tensor in plan ------------------------------------------------------------------


def test_plan_parallel_tensor_predicts_and_says_whether_it_fits(capsys):
    code, *out = plan_output(capsys, macs(4, None), parallel="tensor")
    assert code == 0
    tensor = next(line for line in out if line.startswith("tensor parallel over rdma: "))
    assert "1/4 of every layer on each node fits" in tensor and "tok/s predicted" in tensor
    assert out[-1].startswith("jaccl: ")  # no auto line: the mode was asked
    # 128 heads do not divide by 3: refused in one line, exit 1
    code, *out = plan_output(capsys, macs(3, None), parallel="tensor")
    assert code == 1
    assert "tensor: num_attention_heads=128 does not divide by 3 ranks" in out


def test_plan_simulate_parallel_tensor_json():
    done = run_cli(
        "plan", str(R1_CONFIG), "--simulate", "2x192GB", "--parallel", "tensor", "--json"
    )
    data = json.loads(done.stdout)
    # 2 x 192 GB: half of R1 at 4 bits (about 190 GB) and its cache does not fit either node
    assert done.returncode == 1 and data["tensor"]["fits"] is False
    assert data["tensor"]["line"].startswith("tensor parallel over tb4: 1/2 of every layer")


# --- an unknown --parallel ----------------------------------------------------------------------


def test_launch_hosts_refuses_an_unknown_parallel_mode(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[hosts]]\nname = "a"\naddress = "10.0.0.1"\nmemory_gb = 64\n')
    done = run_cli("launch", "x", "--hosts", str(hosts), "--parallel", "bogus", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "error: --parallel must be auto, pipeline, expert, tensor, not 'bogus'"
    )


def test_start_agents_cluster_refuses_an_unknown_mode():
    with pytest.raises(ParallelError, match="not 'bogus'"):
        start_agents_cluster(R1_CONFIG.parent, None, "c", [], b"", 4096, None, "bogus")
