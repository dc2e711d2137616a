"""`mlxdist quantize --parallel expert`: per-node folders holding every non-expert tensor and
their own slice of each stacked routed-expert tensor, with manifests the runtime checks."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import ROOT, cluster_logits, complete_ids, local_cluster, run_cli

from launcher.local import start_local, wait_ready
from quantize.checkpoint import CheckpointError, sha256_file
from quantize.convert import QuantizeError, Settings, make_plan, run
from quantize.nodes import (
    check_expert_node,
    check_node,
    damaged_files,
    expert_node_folder,
    node_folder,
)

COUNTS = [3, 3, 2]  # --nodes 3 over tiny-r1's 8 routed experts
SETS = [[0, 1, 4], [2, 5, 6], [3, 7]]  # a few of each of its 2 groups of 4 experts per node
MAX_FILE = "0.0005"  # GB: several files, so shared and expert tensors fill files of their own


def tensors(folder: Path) -> dict[str, mx.array]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        out.update(mx.load(str(folder / f)))
    assert sorted(out) == sorted(index)  # the index names exactly what the files hold
    return out


def is_expert(name: str) -> bool:
    return ".mlp.switch_mlp." in name


@pytest.fixture(scope="module")
def cut(tiny_r1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "r1-4bit"
    args = ("--nodes", "3", "--parallel", "expert", "--max-file-size", MAX_FILE)
    result = run_cli("quantize", str(tiny_r1), str(out), *args)
    assert result.returncode == 0, result.stderr
    print(result.stderr)
    assert "expert node folders" in result.stderr
    return out


def test_expert_slices_equal_the_whole_models_tensors(cut):
    whole = tensors(cut)
    stacked = [n for n in whole if is_expert(n)]
    # 3 MoE layers (layer 0 is dense) x gate/up/down x weight/scales/biases
    assert len(stacked) == 3 * 3 * 3 and all(whole[n].shape[0] == 8 for n in stacked)
    for rank, held in enumerate(SETS):
        node = tensors(cut / "nodes" / str(rank))
        assert sorted(node) == sorted(whole)  # the same names: the runtime loads them as they are
        for name, expected in whole.items():
            got = node[name]
            if is_expert(name):
                expected = expected[mx.array(held)]
                assert got.shape[0] == COUNTS[rank], name
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert mx.array_equal(got, expected).item(), (rank, name)
        config = json.loads((cut / "nodes" / str(rank) / "config.json").read_text())
        assert config == json.loads((cut / "config.json").read_text())
    print(f"3 node folders, {len(stacked)} expert tensors each sliced {COUNTS}, bit for bit")


def test_manifests_hold_the_contract(cut):
    top = json.loads((cut / "manifest.json").read_text())
    assert top["parallel"] == "expert" and top["plan"]["experts"] == COUNTS
    assert [n["experts"] for n in top["nodes"]] == SETS
    assert damaged_files(cut) == []  # every file it lists, expert slices included, is intact
    assert any(e["name"].startswith("nodes/2/model-experts-") for e in top["files"])
    for rank, held in enumerate(SETS):
        folder = cut / "nodes" / str(rank)
        m = json.loads((folder / "manifest.json").read_text())
        assert m["format"] == "mlxdist-node" and m["version"] == 1
        assert m["parallel"] == "expert" and m["experts"] == held and m["placement"] == "spread"
        assert m["n_routed_experts"] == 8
        assert m["plan"]["experts"] == COUNTS and m["plan"]["rank"] == rank
        assert m["plan"]["fingerprint"] == top["fingerprint"]
        assert m["layers"] == [0, 4] and m["embeddings"] and m["head"]
        on_disk = sorted(p.name for p in folder.glob("*.safetensors"))
        assert sorted(e["name"] for e in m["files"]) == on_disk
        for e in m["files"]:
            f = folder / e["name"]
            assert f.stat().st_size == e["size"] and sha256_file(f) == e["sha256"]
            if (cut / e["name"]).is_file():  # shared: one copy on disk for every node
                assert f.stat().st_ino == (cut / e["name"]).stat().st_ino
            else:
                assert all(is_expert(n) for n in mx.load(str(f)))
        shared = [e["name"] for e in m["files"] if (cut / e["name"]).is_file()]
        assert len(shared) == 2 and len(m["files"]) == 3
        assert not any(is_expert(n) for s in shared for n in mx.load(str(folder / s)))


def test_flipped_byte_in_an_expert_file_is_named(cut, tmp_path):
    model = shutil.copytree(cut, tmp_path / "damaged")  # real copies: the hardlinks are not shared
    victim = next((model / "nodes" / "1").glob("model-experts-*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside a tensor's data
    victim.write_bytes(bytes(data))
    assert damaged_files(model / "nodes" / "1") == [victim.name]
    assert damaged_files(model / "nodes" / "0") == []
    assert damaged_files(model) == [f"nodes/1/{victim.name}"]  # found before a launch of OUT


def test_check_expert_node_refuses_another_cut(cut):
    node = cut / "nodes" / "1"
    check_expert_node(node, COUNTS, 1)  # the cut it was made for
    check_expert_node(cut, [4, 4], 1)  # the whole model holds every expert
    with pytest.raises(CheckpointError, match=r"cut for rank 1 of experts \[3, 3, 2\].*\[4, 4\]"):
        check_expert_node(node, [4, 4], 1)
    with pytest.raises(CheckpointError, match=r"needs rank 0 of experts"):
        check_expert_node(node, COUNTS, 0)
    with pytest.raises(CheckpointError, match="cut for expert parallelism"):
        check_node(node, [4], 1)  # a pipeline launch of an expert folder
    assert expert_node_folder(cut, COUNTS, 2) == cut / "nodes" / "2"
    assert expert_node_folder(cut, [4, 4], 1) == cut  # not cut for these counts: the whole model
    assert node_folder(cut, [4], 0) == cut  # a one-stage pipeline never picks an expert folder


def test_folder_cut_before_experts_were_spread_is_refused(cut, tmp_path):
    """A node folder from before experts were spread over the groups holds other experts in
    its rows: the agent refuses it before starting a rank, in one line."""
    node = tmp_path / "old"
    node.mkdir()
    manifest = json.loads((cut / "nodes" / "1" / "manifest.json").read_text())
    del manifest["placement"]
    (node / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cut by an older mlxdist.*cut it again"):
        check_expert_node(node, COUNTS, 1)


def test_pipeline_folder_is_refused_for_expert_mode(tiny_r1, tmp_path):
    settings = Settings(bits=4, split=[2, 2])
    run(tiny_r1, tmp_path / "pipe", make_plan(tiny_r1, settings))
    node = tmp_path / "pipe" / "nodes" / "1"
    check_node(node, [2, 2], 1)
    with pytest.raises(CheckpointError, match=r"pipeline split \[2, 2\], not for expert"):
        check_expert_node(node, [4, 4], 1)


def test_interrupted_cut_resumes_to_the_same_files(tiny_r1, cut, tmp_path):
    out = tmp_path / "resumed"
    settings = Settings(experts=COUNTS, max_file_bytes=int(float(MAX_FILE) * 1e9))

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt  # as Ctrl-C, in the middle of the first expert slice

    with pytest.raises(KeyboardInterrupt):
        run(tiny_r1, out, make_plan(tiny_r1, settings), on_cut=stop)
    assert (
        not (out / "config.json").exists() and not (out / "nodes" / "0" / "manifest.json").exists()
    )
    result = run(tiny_r1, out, make_plan(tiny_r1, settings))
    assert len(result.skipped) == 5 and len(result.written) == 3  # the whole files were kept
    assert not list(out.glob("**/*.partial"))
    for rank in range(3):
        again = json.loads((out / "nodes" / str(rank) / "manifest.json").read_text())
        first = json.loads((cut / "nodes" / str(rank) / "manifest.json").read_text())
        assert again["files"] == first["files"]


@pytest.mark.parametrize(
    "cut_args,message",
    [
        ({"nodes": 9}, "expert mode needs 2 to 8 nodes"),
        ({"nodes": 1}, "expert mode needs 2 to 8 nodes"),
        ({"experts": "4,3"}, "must be positive and add up to 8 experts"),
        ({"experts": "4,x"}, "must be expert counts"),
        ({"experts": "8"}, "at least 2 nodes"),
        ({"nodes": 3, "experts": "4,4"}, "--nodes 3 but --experts gives 2 nodes"),
        ({"split": "2,2"}, "--split cuts layers"),
        ({}, "needs --nodes N, --experts"),
    ],
)
def test_expert_cut_arguments(cut_args, message):
    from mlxdist.cli.quantize import choose_cut

    config = json.loads((ROOT / "tests" / "data" / "deepseek-r1-config.json").read_text())
    config = config | {"n_routed_experts": 8}
    with pytest.raises(QuantizeError, match=message):
        choose_cut(config, parallel="expert", **cut_args)


def test_expert_cut_from_a_plan_file(tmp_path):
    from mlxdist.cli.quantize import choose_cut

    config = {"num_hidden_layers": 4, "n_routed_experts": 8, "model_type": "deepseek_v3"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"parallel": "expert", "split": [4], "experts": [5, 3]}))
    assert choose_cut(config, plan=plan, parallel="expert") == (None, [5, 3])
    with pytest.raises(QuantizeError, match="plans expert parallelism: add --parallel expert"):
        choose_cut(config, plan=plan)
    assert choose_cut(config, nodes=2) == ([2, 2], None)
    with pytest.raises(QuantizeError, match="no routed experts"):
        choose_cut({"num_hidden_layers": 4, "model_type": "llama"}, nodes=2, parallel="expert")


def test_cli_error_is_one_line(tiny_r1, tmp_path):
    result = run_cli("quantize", str(tiny_r1), str(tmp_path / "o"), "--experts", "4,4")
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "add --parallel expert" in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_each_nodes_expert_share():
    config = ROOT / "tests" / "data" / "deepseek-r1-config.json"
    args = ("--dry-run", "--parallel", "expert", "--nodes", "6")
    result = run_cli("quantize", str(config), *args)
    assert result.returncode == 0, result.stderr
    print(result.stderr)
    assert "expert parallel" in result.stderr
    assert "4-bit affine (chosen)" in result.stderr  # not bits/weight (4.5) rounded
    rows = re.findall(r"│\s+(\d) │\s+(\d+) │\s+([\d.]+) │", result.stderr)
    assert [int(n) for _, n, _ in rows] == [43, 43, 43, 43, 42, 42]
    # R1's 8 groups of 32: node 0 holds 5 or 6 of each (43 = 8 x 5 + 3)
    assert "node 0: 0-5,32-37,64-69,96-100,128-132,160-164,192-196,224-228" in result.stderr
    # 9,783,169,024 replicated + 43 or 42 x 1,436,811,264 (derived in test_planner.py)
    assert [float(gb) for *_, gb in rows] == [71.57] * 4 + [70.13] * 2


def _expert_answer(model: Path, prompt: list[int]) -> tuple[list[int], list[float], dict]:
    cluster = start_local(model, [1, 1, 1], parallel="expert")
    try:
        health = wait_ready(cluster, timeout=300)
        logs = [log.read_text() for log in cluster.logs]
        answer = complete_ids(cluster.url, prompt, 6), cluster_logits(cluster.url, prompt)
    finally:
        cluster.stop()
    return *answer, health | {"logs": logs}


@pytest.mark.cluster
def test_expert_cluster_runs_from_the_node_folders(cut, tmp_path):
    """Three expert-parallel ranks each load their own node folder (only their experts on disk)
    and answer exactly as three expert ranks reading their rows from the whole model do, and
    as one rank on the whole model does within bfloat16 rounding."""
    prompt = [5, 17, 42, 7, 99, 3]
    whole = tmp_path / "whole"  # the same files without the node folders and the manifest
    whole.mkdir()
    for f in cut.iterdir():
        if f.is_file() and f.name != "manifest.json":
            os.link(f, whole / f.name)
    with local_cluster(cut, [4]) as (url, _):
        alone = cluster_logits(url, prompt)
    tokens, logits, health = _expert_answer(cut, prompt)
    assert [n["experts"] for n in health["nodes"]] == SETS
    for rank, log in enumerate(health["logs"]):
        assert f"from {cut / 'nodes' / str(rank)} " in log, rank
    assert _expert_answer(whole, prompt)[:2] == (tokens, logits)
    # bfloat16 partial sums added in another order differ by rounding; wrong experts by ~1
    off = max(abs(a - b) for a, b in zip(alone, logits))
    print(f"expert cluster vs one rank, bfloat16: max |logit difference| {off:.3f}")
    assert off < 0.1
