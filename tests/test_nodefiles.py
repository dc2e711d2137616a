"""Which files each node needs (launcher/nodefiles.py), on tiny-r1's index and R1's layout."""

from __future__ import annotations

import json

import pytest

from launcher.diskfree import disk_facts
from launcher.nodefiles import (
    EVERY_FILE,
    DiskError,
    Share,
    UnlistedError,
    check_disk,
    disk_shortfalls,
    node_files,
    shares,
)
from launcher.planner import NodeSpec, node_spec_from_facts
from mlxdist.testing.tiny_r1 import R1_CONFIG, _entries, _shard_name, tensor_specs
from quantize.checkpoint import weight_map
from quantize.nodes import stage_needs as _needed

SMALL = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
T1, T2 = "model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"


def _repo(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _loader_opens(weights, split, rank, tied) -> set[str]:
    """The weight files the stage loader itself opens for rank (mlxdist/runtime/stage.py)."""
    start = sum(split[:rank])
    end, last = start + split[rank], rank == len(split) - 1
    return {f for k, f in weights.items() if _needed(k, start, end, rank == 0, last, tied)}


@pytest.mark.parametrize(
    "split, rank, weights",
    [
        ([2, 2], 0, [T1]),  # layers 0-1 and the embedding: the first file only
        ([2, 2], 1, [T1, T2]),  # layer 2 sits in the first file; 3, norm and head in the second
        ([3, 1], 1, [T2]),
        ([1, 3], 0, [T1]),
        ([1, 1, 2], 1, [T1]),
        ([4], 0, [T1, T2]),
    ],
)
def test_pipeline_on_tiny_r1(tiny_r1, split, rank, weights):
    files = node_files(weight_map(tiny_r1), _repo(tiny_r1), "pipeline", split, rank)
    assert files == sorted(SMALL + weights)
    opened = _loader_opens(weight_map(tiny_r1), split, rank, False)
    assert set(files) - set(SMALL) == opened


@pytest.mark.parametrize("mode", ["expert", "tensor"])
def test_expert_and_tensor_need_every_file(tiny_r1, mode):
    for rank in range(3):
        files = node_files(weight_map(tiny_r1), _repo(tiny_r1), mode, [1, 1, 1], rank)
        assert files == _repo(tiny_r1)
    assert mode in EVERY_FILE[mode] and "every file" in EVERY_FILE[mode]


def test_node_folders_manifest_and_a_repos_other_files_stay_behind():
    """What a real Hub repo holds besides the model (.gitattributes, README, PyTorch and GGUF
    copies, Mistral's consolidated.safetensors) goes to no node, in any mode."""
    weights = {"model.layers.0.w": "a.safetensors", "lm_head.weight": "b.safetensors"}
    repo = ["config.json", "manifest.json", "nodes/0/a.safetensors", "a.safetensors"]
    repo += ["b.safetensors", "README.md", ".gitattributes", "pytorch_model.bin", "m.gguf"]
    repo += ["consolidated.safetensors", "tokenizer.json", "chat_template.jinja", "tiktoken.model"]
    small = ["chat_template.jinja", "config.json", "tiktoken.model", "tokenizer.json"]
    assert node_files(weights, repo, "pipeline", [1], 0) == sorted(
        small + ["a.safetensors", "b.safetensors"]
    )
    for mode in ("expert", "tensor"):
        assert node_files(weights, repo, mode, [1, 1], 1) == sorted(
            small + ["a.safetensors", "b.safetensors"]
        )
    assert "nodes/0/a.safetensors" not in node_files(weights, repo, "tensor", [1, 1], 0)


def test_tied_embeddings_go_to_the_last_stage():
    weights = {
        "model.embed_tokens.weight": "e.safetensors",
        "model.layers.0.w": "a.safetensors",
        "model.layers.1.w": "b.safetensors",
        "model.norm.weight": "b.safetensors",
    }
    repo = ["config.json", "a.safetensors", "b.safetensors", "e.safetensors"]
    assert node_files(weights, repo, "pipeline", [1, 1], 1, tied=False) == [
        "b.safetensors",
        "config.json",
    ]
    assert node_files(weights, repo, "pipeline", [1, 1], 1, tied=True) == [
        "b.safetensors",
        "config.json",
        "e.safetensors",
    ]


def _r1_layout(files: int = 163) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """R1's tensors (its config, FP8 with scales, the multi-token-prediction layer 61) in R1's
    163 files of about 4.3 GB, filled in storage order (a layer's experts span files)."""
    specs = [s for g in tensor_specs(R1_CONFIG) for s in g]
    sizes = [sum(e.nbytes for e in _entries(s)) for s in specs]
    total, done = sum(sizes), 0
    weights: dict[str, str] = {}
    file_bytes: dict[str, int] = {}
    tensor_bytes: dict[str, int] = {}
    for spec, size in zip(specs, sizes):
        name = _shard_name(min(files, 1 + int((done + size / 2) * files / total)), files)
        for e in _entries(spec):
            weights[e.name] = name
            tensor_bytes[e.name] = e.nbytes
        file_bytes[name] = file_bytes.get(name, 0) + size
        done += size
    return weights, file_bytes, tensor_bytes


@pytest.mark.parametrize("split", [[31, 30], [16, 15, 15, 15], [8] * 7 + [5]])
def test_r1_layout_each_node_gets_about_its_share(split):
    weights, file_bytes, tensor_bytes = _r1_layout()
    assert len(file_bytes) == 163
    sizes = {**file_bytes, "config.json": len(json.dumps(R1_CONFIG))}
    rows = shares(weights, sizes, "pipeline", split)
    weights_total = sum(file_bytes.values())
    mtp_files = {weights[k] for k in weights if k.startswith("model.layers.61.")}
    needed = set().union(*(r.files for r in rows)) - {"config.json"}
    # Every file is fetched by some node except those holding only the multi-token layer.
    assert needed | mtp_files == set(file_bytes)
    for r in rows:
        assert "config.json" in r.files
        assert r.files == sorted(r.files)
        assert set(r.files) - {"config.json"} == _loader_opens(weights, split, r.rank, False)
        # its files weigh its tensors plus at most the rest of a file at each end of its layers
        start, end = sum(split[: r.rank]), sum(split[: r.rank + 1])
        last = r.rank == len(split) - 1
        own = sum(
            tensor_bytes[k] for k in weights if _needed(k, start, end, r.rank == 0, last, False)
        )
        assert own <= r.bytes - sizes["config.json"] <= own + 2 * max(file_bytes.values())
    # neighbours share at most the one file their boundary layer straddles
    for a, b in zip(rows, rows[1:]):
        assert len(set(a.files) & set(b.files) - {"config.json"}) <= 1
    assert sum(r.bytes for r in rows) <= weights_total + len(rows) * (
        sizes["config.json"] + max(file_bytes.values())
    )


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown parallel mode"):
        node_files({}, [], "sequence", [1], 0)


WEIGHTS = {
    "embed": "model-00001-of-00002.safetensors",
    "model.layers.0.w": "model-00001-of-00002.safetensors",
    "model.layers.1.w": "sub/model-00002-of-00002.safetensors",
    "lm_head": "sub/model-00002-of-00002.safetensors",
}


@pytest.mark.parametrize(
    "listed, missing",
    [
        (["config.json", *WEIGHTS.values()], None),  # a file in a subfolder, listed: planned
        (["config.json", "model-00001-of-00002.safetensors"], "sub/model-00002-of-00002"),
        (["config.json"], "model-00001-of-00002.safetensors, sub/model-00002"),
    ],
)
@pytest.mark.parametrize("mode", ["pipeline", "expert", "tensor"])
def test_index_files_missing_from_the_listing_are_refused_by_name(listed, missing, mode):
    sizes = {f: 10 for f in listed}
    if missing is None:
        rows = shares(WEIGHTS, sizes, mode, [1, 1], repo="org/m")
        assert set().union(*(r.files for r in rows)) == set(listed)
        assert all(r.bytes == 10 * len(r.files) for r in rows)
        return
    with pytest.raises(UnlistedError) as e:
        shares(WEIGHTS, sizes, mode, [1, 1], repo="org/m")
    line = str(e.value)
    assert "\n" not in line and "org/m" in line and missing in line


def _nodes(*free: int | None) -> list[NodeSpec]:
    return [NodeSpec(f"m{i}", 64 * 2**30, disk_free=f, hf_cache_free=f) for i, f in enumerate(free)]


@pytest.mark.parametrize(
    "free, have, short",
    [
        ((500, 500), None, []),
        ((500, 299), None, ["m1"]),
        ((99, 299), None, ["m0", "m1"]),
        ((None, 60), [0, 250], []),  # no figure is no verdict; bytes already there count
        ((100, 300), None, []),
    ],
)
def test_disk_shortfalls_name_each_short_node(free, have, short):
    rows = [Share(0, ["a"], 100), Share(1, ["b", "c"], 300)]
    for fetch in ("push", "hub"):
        found = disk_shortfalls(_nodes(*free), rows, fetch, have)
        assert [line.split()[1] for line in found] == short
    if short:
        with pytest.raises(DiskError) as e:
            check_disk(_nodes(*free), rows, "push", have)
        assert "\n" not in str(e.value) and "models folder" in str(e.value)
        assert f"({free[int(short[-1][1])]} bytes) free" in str(e.value)
    else:
        check_disk(_nodes(*free), rows, "push", have)


def test_hub_fetch_is_judged_against_the_hf_cache():
    node = NodeSpec("m0", 2**30, disk_free=10**12, hf_cache_free=10)
    rows = [Share(0, ["a"], 100)]
    assert disk_shortfalls([node], rows, "push") == []
    [line] = disk_shortfalls([node], rows, "hub")
    assert "Hugging Face cache" in line and "100 bytes" in line


def test_free_disk_comes_through_the_facts(tmp_path):
    import shutil

    facts = {"memory_total": 2**36, "os": "Linux"} | disk_facts(tmp_path / "models")
    node = node_spec_from_facts("n", facts)
    assert 0 < node.disk_free <= shutil.disk_usage(tmp_path).total
    assert node.hf_cache_free is not None and node.hf_cache_free > 0
    assert node_spec_from_facts("n", {"memory_total": 2**36}).disk_free is None


def test_the_mtp_layer_goes_to_the_last_stage_alone():
    weights = {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.w": "model-00001-of-00002.safetensors",
        "model.layers.1.w": "model-00002-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "mtp.embed_tokens.weight": "mtp.safetensors",  # quantize --keep-mtp's own file
        "mtp.block.mlp.gate.weight": "mtp.safetensors",
    }
    repo = ["config.json", *sorted(set(weights.values()))]
    first = node_files(weights, repo, "pipeline", [1, 1], 0)
    last = node_files(weights, repo, "pipeline", [1, 1], 1)
    assert "mtp.safetensors" not in first and "mtp.safetensors" in last
