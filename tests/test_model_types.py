"""Which config.json model types mlxdist runs, with which of mlx-lm's code (quantize.checkpoint:
kimi_k2 runs deepseek_v3's), and which FP8 checkpoints it can read: an FP8 checkpoint of a family
whose mlx-lm sanitize() does not dequantise (Qwen3's, GLM-4.5's) is refused by quantize and
launch in one line, from config.json alone, before any weight is read."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
from conftest import run_cli
from mlx_lm.utils import MODEL_REMAPPING as MLX_LM_REMAPPING

from mlxdist.testing.make_model import family_config
from quantize.checkpoint import (
    FP8_CODE_FAMILIES,
    MODEL_REMAPPING,
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    code_family,
    inspect_model,
)

# Qwen/Qwen3-235B-A22B-FP8's and zai-org/GLM-4.5-FP8's quantization_config, as R1's.
FP8 = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def test_remapping_is_mlx_lms_own_for_the_supported_types():
    assert MODEL_REMAPPING == {
        t: MLX_LM_REMAPPING[t] for t in SUPPORTED_MODEL_TYPES if t in MLX_LM_REMAPPING
    }
    assert code_family({"model_type": "kimi_k2"}) == "deepseek_v3"
    assert code_family({"model_type": "qwen3_moe"}) == "qwen3_moe"


def test_fp8_families_are_those_whose_sanitize_dequantises():
    """The families named readable in FP8 are exactly those whose mlx-lm sanitize() reads
    weight_scale_inv, in the installed mlx-lm."""
    families = {code_family({"model_type": t}) for t in SUPPORTED_MODEL_TYPES}
    for family in families:
        sanitize = importlib.import_module(f"mlx_lm.models.{family}").Model.sanitize
        assert ("weight_scale_inv" in inspect.getsource(sanitize)) == (
            family in FP8_CODE_FAMILIES
        ), family


# (family, quantization_config, refused)
CHECKS = [
    ("kimi_k2", FP8, False),
    ("deepseek_v32", FP8, False),
    ("minimax", FP8, False),
    ("qwen3_moe", FP8, True),
    ("glm4_moe", FP8, True),
    ("qwen3", FP8, True),
    ("qwen3_moe", {"group_size": 64, "bits": 4}, False),  # mlx-community's, already MLX
    ("qwen3_moe", None, False),
]


@pytest.mark.parametrize(("family", "quant", "refused"), CHECKS)
def test_fp8_checked_from_config_alone(tmp_path, family, quant, refused):
    config = family_config(family) | {"quantization_config": quant}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if not refused:
        assert inspect_model(tmp_path).model_type == config["model_type"]
        return
    with pytest.raises(CheckpointError) as e:
        inspect_model(tmp_path)
    line = str(e.value)
    assert "\n" not in line
    assert f"is an FP8 checkpoint (128x128 blocks, weight_scale_inv) of {family}" in line
    assert "kimi_k2" in line and "quantize the bf16 checkpoint instead" in line


@pytest.mark.parametrize(
    "command",
    [["quantize", "SRC", "OUT"], ["launch", "SRC", "--local", "2", "--prompt", "hi"]],
    ids=["quantize", "launch"],
)
def test_cli_refuses_qwen3_fp8_before_reading_weights(tmp_path, command):
    """The folder holds only config.json: the refusal comes before any weight file is looked
    for (without it, quantize would say the folder holds no .safetensors files)."""
    src = tmp_path / "Qwen3-235B-A22B-FP8"
    src.mkdir()
    config = family_config("qwen3_moe") | {"quantization_config": FP8}
    (src / "config.json").write_text(json.dumps(config))
    args = [{"SRC": str(src), "OUT": str(tmp_path / "out")}.get(a, a) for a in command]
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {src} is an FP8 checkpoint (128x128 blocks, weight_scale_inv) of qwen3_moe, "
        "which mlxdist reads only for minimax_m2, minimax, deepseek_v3, deepseek_v32, kimi_k2: "
        "quantize the bf16 checkpoint instead (the same repo without -FP8), or run an "
        "MLX-quantised one"
    ]
    assert not (tmp_path / "out").exists()
