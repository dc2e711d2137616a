"""Facts about a model folder read from disk: its config, its tensors, their layers."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# Decoder models whose mlx-lm code has the embed_tokens / layers / norm / head shape that the
# pipeline runtime drives. Each one is proven by the cluster-equals-single-process test.
SUPPORTED_MODEL_TYPES = (
    *("llama", "mistral", "qwen3", "qwen3_moe", "glm4_moe"),
    *("gpt_oss", "minimax_m2", "minimax", "deepseek_v3", "deepseek_v32", "kimi_k2"),
)
# config.json model types that mlx-lm runs with another family's code: the entries of
# mlx_lm.utils.MODEL_REMAPPING for the types above, copied because the launcher reads configs
# without importing MLX (tests/test_model_types.py checks they agree with mlx-lm's).
MODEL_REMAPPING = {"mistral": "llama", "minimax_m2": "minimax", "kimi_k2": "deepseek_v3"}
# The families whose mlx-lm sanitize() dequantises FP8 block weights (`weight_scale_inv`), so
# their FP8 checkpoints load and quantise; any other family's FP8 checkpoint is refused.
FP8_CODE_FAMILIES = ("deepseek_v3", "deepseek_v32", "minimax")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CheckpointError(UserError):
    """A model folder that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: dict
    model_type: str
    num_layers: int
    tied_embeddings: bool


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"model path {path} does not exist: give a model folder or a .gguf file"
        )
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: is it a model folder?")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None


def code_family(config: dict) -> str:
    """The mlx-lm model module (mlx_lm.models.<name>) that runs this config.json: its
    model_type, or the family mlx-lm maps it to (kimi_k2 runs deepseek_v3's code)."""
    model_type = config.get("model_type", "")
    return MODEL_REMAPPING.get(model_type, model_type)


def check_fp8(path: Path, config: dict) -> None:
    """Refuses, from config.json alone, an FP8 checkpoint that mlx-lm cannot dequantise."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or code_family(config) in FP8_CODE_FAMILIES:
        return
    block = quant.get("weight_block_size")
    scales = f"{'x'.join(map(str, block))} blocks" if block else "a scale per tensor"
    folder = path.parent if path.name == "config.json" else path
    readable = [t for t in SUPPORTED_MODEL_TYPES if MODEL_REMAPPING.get(t, t) in FP8_CODE_FAMILIES]
    raise CheckpointError(
        f"{folder} is an FP8 checkpoint ({scales}, weight_scale_inv) of "
        f"{config.get('model_type')}, which mlxdist reads only for {', '.join(readable)}: "
        "quantize the bf16 checkpoint instead (the same repo "
        "without -FP8), or run an MLX-quantised one"
    )


def check_supported(path: Path, config: dict) -> None:
    """Refuses, from config.json alone, a model type the runtime cannot drive or weights in a
    format mlx-lm cannot read (one line naming what runs)."""
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model type {model_type or '(none)'!r} in {path} is not supported: "
            f"mlxdist runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    check_fp8(path, config)


def inspect_model(path: str | Path) -> ModelInfo:
    """Reads config.json and checks that the runtime can drive this model."""
    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type", "")
    check_supported(path, config)
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise CheckpointError(f"{path}/config.json has no valid num_hidden_layers")
    return ModelInfo(
        path=path,
        config=config,
        model_type=model_type,
        num_layers=num_layers,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def layer_of(key: str) -> int | None:
    """The decoder layer a tensor name belongs to, or None for embeddings, norm and head."""
    m = _LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name to file name, from the index when there is one, else from the file headers."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files")
    return {key: f.name for f in files for key in safetensors_header(f)}


def safetensors_header(file: Path) -> dict:
    """The tensor entries of a safetensors file (dtype, shape, data_offsets), reading only its
    header."""
    return safetensors_layout(file)[1]


def safetensors_layout(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's tensor data starts, and its tensor entries: the one parser of
    the format's header. An entry's data_offsets count from that start."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
