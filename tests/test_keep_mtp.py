"""`mlxdist quantize --keep-mtp`: R1's multi-token-prediction layer survives with the tensors a
direct conversion of that layer gives, in the folder and node folders that hold the head."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import run_cli
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.utils import _get_classes

from mlxdist.testing.make_model import make_model
from mlxdist.testing.tiny_r1 import to_bf16
from quantize.checkpoint import safetensors_layout
from quantize.estimate import estimate
from quantize.mtp import mlx_name
from quantize.mtp_layer import MTPLayer
from quantize.nodes import damaged_files

EIGHT = "mtp.block.mlp.switch_mlp.*"  # an --override of the MTP layer's experts


def folder_tensors(folder: Path) -> dict[str, mx.array]:
    """The tensors a folder's index lists (a node folder's own, not its neighbours')."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        out.update(mx.load(str(folder / f)))
    assert sorted(out) == sorted(index)
    return out


def mtp_of(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    return {k: v for k, v in tensors.items() if k.startswith("mtp.")}


def direct(src: Path, own_head: bool, eight: str | None = None) -> dict[str, mx.array]:
    """The MTP layer converted directly, without mlxdist's converter: the checkpoint's layer-N
    tensors numbered 0 through mlx-lm's sanitize, named by mlx_name, loaded into MTPLayer, cast
    as mlx_lm.convert casts, and quantised by nn.quantize at 4 bits (8 for eight's modules)."""
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    weights = {}
    for f in src.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    head = f"model.layers.{n}."
    layer = {
        "model.layers.0." + k[len(head) :]: v for k, v in weights.items() if k.startswith(head)
    }
    if not own_head:
        del layer["model.layers.0.shared_head.head.weight"]
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    sanitized = model.sanitize(layer)
    mtp = MTPLayer(config, own_head=own_head)
    mtp.load_weights([(mlx_name(k).removeprefix("mtp."), v) for k, v in sanitized.items()])
    cast = [
        (
            k,
            v.astype(mx.bfloat16)
            if model.cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating)
            else v,
        )
        for k, v in tree_flatten(mtp.parameters())
    ]
    mtp.load_weights(cast)

    def bits(path: str, module: nn.Module):
        wide = eight is not None and fnmatch.fnmatchcase(f"mtp.{path}", eight)
        return {"group_size": 64, "bits": 8 if wide else 4, "mode": "affine"}

    nn.quantize(mtp, class_predicate=lambda p, m: hasattr(m, "to_quantized") and bits(p, m))
    return {f"mtp.{k}": v for k, v in tree_flatten(mtp.parameters())}


def assert_same(got: dict[str, mx.array], expected: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(expected)
    for name, e in expected.items():
        assert got[name].dtype == e.dtype and got[name].shape == e.shape, name
        assert mx.array_equal(got[name], e).item(), name


def quantize(src: Path, out: Path, *args: str) -> Path:
    result = run_cli("quantize", str(src), str(out), "--bits", "4", *args)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def pipeline(tiny_r1, tmp_path_factory) -> Path:
    return quantize(
        tiny_r1, tmp_path_factory.mktemp("mtp") / "split", "--keep-mtp", "--split", "2,1,1"
    )


@pytest.fixture(scope="module")
def other_head(tiny_r1, tmp_path_factory) -> Path:
    """tiny-r1 whose MTP layer's head copy differs from lm_head (R1's official one is equal)."""
    src = tmp_path_factory.mktemp("mtp") / "other-head"
    shutil.copytree(tiny_r1, src)
    name = "model.layers.4.shared_head.head.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    start, header = safetensors_layout(shard)
    entry = header[name]
    values = np.random.default_rng(1).standard_normal(entry["shape"]).astype(np.float32) * 0.02
    with open(shard, "r+b") as f:
        f.seek(start + entry["data_offsets"][0])
        f.write(to_bf16(values).tobytes())
    return src


@pytest.fixture(scope="module")
def experts(other_head, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mtp") / "experts"
    args = ("--keep-mtp", "--parallel", "expert", "--nodes", "2", "--override", f"{EIGHT}=8")
    return quantize(other_head, out, *args)


def test_mtp_layer_equals_a_direct_conversion(tiny_r1, pipeline):
    expected = direct(tiny_r1, own_head=False)
    assert "mtp.block.mlp.switch_mlp.gate_proj.scales" in expected  # quantised, experts stacked
    assert "mtp.block.self_attn.embed_q.weight" in expected  # kv_b_proj split by sanitize
    assert_same(mtp_of(folder_tensors(pipeline)), expected)
    assert_same(mtp_of(folder_tensors(pipeline / "nodes" / "2")), expected)
    manifest = json.loads((pipeline / "nodes" / "2" / "manifest.json").read_text())
    assert manifest["mtp"] == {"layer": 4, "own_head": False}
    # --dry-run's estimate, from config.json alone, counts the kept layer's bytes exactly
    config = json.loads((tiny_r1 / "config.json").read_text())
    assert estimate(config, bits=4, mtp=True).mtp_bytes == sum(v.nbytes for v in expected.values())
    # mtp*.safetensors, apart: mlx_lm.load still opens the folder (it reads model*.safetensors)
    assert [f.name for f in pipeline.glob("mtp*")] == ["mtp.safetensors"]
    load(str(pipeline))


def test_only_the_last_pipeline_node_holds_the_mtp_layer(pipeline):
    for rank in (0, 1):
        folder = pipeline / "nodes" / str(rank)
        assert not mtp_of(folder_tensors(folder)), rank
        assert json.loads((folder / "manifest.json").read_text())["mtp"] is None
    # every manifest's sizes and sha256 hold, the MTP layer's own files included
    for folder in [pipeline, *(pipeline / "nodes").iterdir()]:
        assert damaged_files(folder) == [], folder


def test_expert_node_0_holds_the_whole_mtp_layer_and_a_head_that_differs(other_head, experts):
    expected = direct(other_head, own_head=True, eight=EIGHT)
    assert expected["mtp.block.mlp.switch_mlp.up_proj.weight"].shape[0] == 8  # every expert
    assert "mtp.shared_head.head.weight" in expected
    assert_same(mtp_of(folder_tensors(experts / "nodes" / "0")), expected)
    assert not mtp_of(folder_tensors(experts / "nodes" / "1"))
    assert_same(mtp_of(folder_tensors(experts)), expected)
    config = json.loads((experts / "nodes" / "0" / "config.json").read_text())
    assert config["quantization"]["mtp.block.mlp.switch_mlp.down_proj"]["bits"] == 8
    manifests = [json.loads((experts / p / "manifest.json").read_text()) for p in ("", "nodes/1")]
    assert manifests[0]["mtp"] == {"layer": 4, "own_head": True} and manifests[1]["mtp"] is None
    for folder in [experts, *(experts / "nodes").iterdir()]:
        assert damaged_files(folder) == [], folder


def one_line_refusal(result, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


def test_refuses_a_model_without_mtp_and_another_family(tiny_r1_no_mtp, tmp_path):
    result = run_cli("quantize", str(tiny_r1_no_mtp), str(tmp_path / "a"), "--keep-mtp")
    one_line_refusal(result, "--keep-mtp", "num_nextn_predict_layers is 0")
    # GLM-4.5 ships an MTP layer too, but mlxdist runs DeepSeek's only
    glm = make_model("glm4_moe", tmp_path / "glm")
    assert json.loads((glm / "config.json").read_text())["num_nextn_predict_layers"] == 1
    result = run_cli("quantize", str(glm), str(tmp_path / "b"), "--keep-mtp")
    one_line_refusal(result, "--keep-mtp", "glm4_moe")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
