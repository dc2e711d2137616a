"""A tiny random checkpoint of any supported family, in that family's on-disk format.

The weights are mlx-lm's own random initialisation of the family's model class, renamed to the
names the Hub's checkpoints store (what the family's sanitize() expects), saved in sharded
safetensors with an index; the tokenizer is tiny-r1's byte-level BPE with the family's special
tokens and chat template. The same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxdist.testing.families import FAMILIES, Family
from mlxdist.testing.tiny_r1 import CORPUS, _merge, quantize_fp8, to_bf16


class UnknownFamily(ValueError):
    pass


# config.json fields that count something (layers, heads, widths, experts): whole numbers, at
# least 1 unless the family may have none of them.
_COUNT = re.compile(r"^(num_|n_)|_(size|dim|rank|layers|heads|tok|replace|step|group|embeddings)$")
_MAY_BE_ZERO = {
    *("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"),
    "shared_intermediate_size",
}


def check_overrides(base: dict, overrides: dict, prefix: str = "") -> None:
    """Each --set value has the type of the field it replaces; raises ValueError naming it."""
    for key, value in overrides.items():
        name, was = f"{prefix}{key}", base.get(key)
        shown = f"--set {name}={json.dumps(value)}"
        if isinstance(was, dict) and isinstance(value, dict):
            check_overrides(was, value, f"{name}.")
        elif isinstance(was, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{shown}: give true or false")
        elif isinstance(was, dict) and value is None:
            continue  # a block taken out, as rope_scaling=null
        elif isinstance(was, list | dict | str) and not isinstance(value, type(was)):
            kind = {list: "a JSON list", dict: "a JSON object", str: "text"}[type(was)]
            raise ValueError(f"{shown}: give {kind}, as the family's {was!r}")
        elif _COUNT.search(key) and (isinstance(was, int) or key not in base):
            least = 0 if key in _MAY_BE_ZERO else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{shown}: give a whole number, {least} or more")
        elif isinstance(was, int | float) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ValueError(f"{shown}: give a number")


def family_config(family: str, overrides: dict | None = None) -> dict:
    if family not in FAMILIES:
        raise UnknownFamily(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    check_overrides(spec.config, overrides or {})
    config = _merge(spec.config, overrides or {})
    config["bos_token_id"] = 0 if spec.bos else None
    config["eos_token_id"] = 1 if spec.bos else 0
    if spec.moe:  # stored in float32: MLX's CPU expert matmul takes nothing else
        config["torch_dtype"] = "float32"
    return config


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """mlx-lm's random initialisation of the family's model, as float32 arrays by mlx-lm name."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(dict(config)))
    params = tree_flatten(model.parameters())
    mx.eval([v for _, v in params])
    return {k: np.array(v.astype(mx.float32)) for k, v in params}


def with_mtp(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights, with the multi-token-prediction layers the checkpoint stores after the
    last decoder layer (num_nextn_predict_layers of them, as DeepSeek and GLM write them: a
    whole decoder layer plus its own embedding, norms, projection and head); mlx-lm drops them."""
    extra = int(config.get("num_nextn_predict_layers") or 0)
    n = config["num_hidden_layers"]
    weights = random_weights(dict(config, num_hidden_layers=n + extra), seed)
    h, v = config["hidden_size"], config["vocab_size"]
    rng = np.random.default_rng(seed)
    for layer in range(n, n + extra):
        p = f"model.layers.{layer}"
        weights[f"{p}.embed_tokens.weight"] = weights["model.embed_tokens.weight"].copy()
        weights[f"{p}.shared_head.head.weight"] = rng.normal(0, 0.02, (v, h)).astype(np.float32)
        weights[f"{p}.eh_proj.weight"] = rng.normal(0, 0.02, (h, 2 * h)).astype(np.float32)
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            weights[f"{p}.{norm}.weight"] = np.ones(h, np.float32)
    return weights


def _layer(key: str) -> int:
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def _encode(
    key: str, value: np.ndarray, dtype: str, fp8: Callable[[str, np.ndarray], bool]
) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """One tensor as stored: FP8 E4M3 with its 128x128 block weight_scale_inv where the family
    keeps it so, else in the checkpoint's dtype."""
    if fp8(key, value):
        codes, scale_inv = quantize_fp8(np.ascontiguousarray(value, np.float32))
        return {
            key: ("F8_E4M3", value.shape, codes.tobytes()),
            f"{key}_scale_inv": ("F32", scale_inv.shape, scale_inv.tobytes()),
        }
    if value.dtype == np.uint8:  # packed codes and scales, as they are
        return {key: ("U8", value.shape, np.ascontiguousarray(value).tobytes())}
    if dtype == "float32":
        return {key: ("F32", value.shape, np.ascontiguousarray(value, np.float32).tobytes())}
    return {key: ("BF16", value.shape, to_bf16(value).tobytes())}


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [pos, pos + len(data)],
        }
        pos += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _, _, data in tensors.values():
            f.write(data)
    return pos


def _save(out: Path, weights: dict[str, np.ndarray], spec: Family, config: dict) -> None:
    """Two shards, split at the middle layer as the Hub's indexes split by size, and an index."""
    half = config["num_hidden_layers"] // 2
    shards: list[dict[str, Any]] = [{}, {}]
    for key in sorted(weights):
        layer = _layer(key)
        second = layer >= half or (layer < 0 and not key.startswith("model.embed_tokens"))
        shards[second].update(_encode(key, weights[key], config["torch_dtype"], spec.fp8))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(out / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index, sort_keys=True)


def build_tokenizer(spec: Family, vocab_size: int) -> Any:
    """Byte-level BPE trained on tiny-r1's corpus: BOS (when the family has one) and EOS first,
    the family's chat markers last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    specials = [t for t in (spec.bos, spec.eos) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(spec.added),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((p.strip() for p in CORPUS.split("\n\n")), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    return tok


def _write_tokenizer(out: Path, spec: Family, config: dict) -> None:
    tok = build_tokenizer(spec, config["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": False,  # the chat template writes BOS itself
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": spec.chat_template,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    ends = [config["eos_token_id"], *(tok.token_to_id(t) for t in spec.ends)]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": ends}
    _write_json(out / "generation_config.json", generation)


def _write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def make_model(family: str, out: str | Path, overrides: dict | None = None, seed: int = 0) -> Path:
    """Writes a tiny random checkpoint of family into out. Raises ValueError, with the line
    to show, for an unknown family, a bad override or seed, or an out it cannot write."""
    out = Path(out)
    config = family_config(family, overrides)
    spec = FAMILIES[family]
    if config["vocab_size"] < 2 + 256 + len(spec.added):
        raise ValueError("vocab_size is too small for the byte-level tokenizer")
    if seed < 0:
        raise ValueError(f"--seed {seed}: give a whole number, 0 or more")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a folder to write the model into")
    try:
        weights = spec.to_hub(with_mtp(config, seed), config)
    except Exception as e:  # mlx-lm's own check of the fields, whatever it raises
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"mlx-lm cannot build a {family} model with these fields: {first}") from e
    try:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("model-*-of-*.safetensors"):
            old.unlink()
        _save(out, weights, spec, config)
        _write_json(out / "config.json", config)
        _write_tokenizer(out, spec, config)
    except OSError as e:
        raise ValueError(f"cannot write the model into {out}: {e.strerror or e}") from None
    return out
