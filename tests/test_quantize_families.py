"""`mlxdist quantize` on every family's tiny checkpoint, as `mlxdist testing make-model` writes
it, in bfloat16 as the Hub stores them (FP8 where the family's Hub checkpoint is):
every tensor equals mlx_lm.convert's on the same folder, bit for bit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import run_cli

from mlxdist.testing.families import family_names
from quantize.checkpoint import layer_of

FAMILIES = family_names()  # every family make-model writes


MOE = {"qwen3_moe", "glm4_moe", "minimax", "deepseek_v32", "kimi_k2", "gpt_oss"}
_STACKED = re.compile(r"\.(switch_mlp|experts)\.(gate_proj|up_proj|down_proj)\.scales$")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def as_stored_on_the_hub(folder: Path) -> Path:
    """make-model stores the mixture-of-experts families in float32 (MLX's CPU expert matmul
    runs only in it); their Hub checkpoints are bfloat16, so the float32 tensors become that."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("torch_dtype") != "float32":
        return folder
    for f in folder.glob("*.safetensors"):
        loaded = mx.load(str(f))
        cast = {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in loaded.items()}
        mx.save_safetensors(str(f), cast, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}))
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """mlx_lm.convert's 4-bit model and ours, from the same tiny checkpoint."""
    from mlx_lm import convert

    from mlxdist.testing.make_model import make_model

    base = tmp_path_factory.mktemp(request.param)
    source = as_stored_on_the_hub(make_model(request.param, base / "source"))
    convert(str(source), str(base / "mlx_lm"), quantize=True, q_bits=4, q_group_size=64)
    result = run_cli("quantize", str(source), str(base / "ours"), "--bits", "4")
    assert result.returncode == 0, result.stderr
    return request.param, tensors(base / "mlx_lm"), tensors(base / "ours"), source


def test_tensors_equal_mlx_lm_convert(converted):
    family, theirs, ours, _ = converted
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert mx.array_equal(got, expected).item(), name
    print(f"{family}: {len(ours)} tensors equal, bit for bit")


def stacked_layers(tensors: dict) -> set[int]:
    """The layers whose routed experts are one stacked, quantised tensor per projection."""
    return {layer_of(k) for k in tensors if _STACKED.search(k)}


def test_every_layers_experts_are_stacked_and_quantised(converted):
    """MiniMax's sanitize() stacks experts only when it sees layer 0, so a layer converted on
    its own once kept its experts one by one and unquantised."""
    family, theirs, ours, _ = converted
    assert not [k for k in ours if _PER_EXPERT.search(k)]
    assert stacked_layers(ours) == stacked_layers(theirs)
    assert bool(stacked_layers(ours)) == (family in MOE), family


def test_experts_stored_one_by_one_are_converted_a_few_at_a_time(converted):
    """Experts the checkpoint stores one by one (all but gpt-oss's, stored stacked) are read and
    quantised in chunks of experts, never as a whole layer at once: memory stays near a layer's."""
    from quantize.convert import Settings, make_plan

    family, _, ours, source = converted
    plan = make_plan(source, Settings(bits=4))
    streamed = {u.layer for u in plan.units if u.kind == "experts"}
    assert streamed == (stacked_layers(ours) if family in MOE - {"gpt_oss"} else set())
