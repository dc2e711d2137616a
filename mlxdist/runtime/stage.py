"""Load one pipeline stage of an mlx-lm decoder model: only its layers, reading only its tensors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import CacheList, make_prompt_cache

from launcher.modes import check_tensor_split
from quantize.checkpoint import code_family, inspect_model, layer_of, weight_map
from quantize.light_mlx_lm import get_classes, infer_quant_config
from quantize.mtp import is_mtp
from quantize.nodes import check_node, routed_experts, stage_needs
from quantize.units import renumber

# Models whose attention applies the mask with mx.where, so it must be an array, not "causal"
# (their own __call__ asks create_attention_mask for return_array=True; nothing else tells).
_ARRAY_MASK = {"deepseek_v3", "deepseek_v32"}
KV_GROUP_SIZE = 64  # values per scale and bias of a quantised KV cache (mlx-lm's default)


@dataclass
class Stage:
    model: nn.Module  # the mlx-lm Model, trimmed to this stage
    config: dict
    start: int  # first layer held
    end: int  # one past the last layer held
    is_last: bool  # holds the final norm and the head
    experts: tuple[int, ...] | None = None  # routed experts held, in expert parallelism
    # One empty cache per layer of the whole model, as the family's own make_cache builds them
    # (rotating caches for sliding-window layers, cache lists for indexed attention).
    templates: list = field(default_factory=list)
    # KV cache quantised to these bits after every forward, as mlx-lm's generate_step does with
    # kv_bits, kv_group_size and quantized_kv_start=0 (None: kept in the activation dtype)
    kv_bits: int | None = None
    kv_group_size: int = KV_GROUP_SIZE

    def __post_init__(self) -> None:
        if not self.templates:
            self.templates = make_prompt_cache(self.model)

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> list[nn.Module]:
        return self.inner.layers[self.start : self.end]

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def expert_nbytes(self) -> int:
        """Bytes of the routed experts held (the stacked switch_mlp tensors, gpt-oss's experts)."""
        from quantize.nodes import is_routed_expert_tensor

        params = tree_flatten(self.model.parameters())
        return sum(v.nbytes for k, v in params if is_routed_expert_tensor(k))

    def make_cache(self) -> list:
        return [copy.deepcopy(c) for c in self.templates[self.start : self.end]]

    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens)

    def forward(self, h: mx.array, cache: list) -> mx.array:
        """Runs this stage's layers on hidden states h of shape (batch, length, hidden).

        Each layer gets the mask its own cache makes, as the family's __call__ does: a causal
        mask for a full cache, a windowed one for a rotating cache; layers whose caches are
        alike share one."""
        as_array = code_family(self.config) in _ARRAY_MASK
        masks: dict[tuple, object] = {}
        for layer, c in zip(self.layers, cache):
            source = attention_cache(c)
            kind = (type(source), getattr(source, "max_size", None))
            if kind not in masks:
                masks[kind] = create_attention_mask(h, source, return_array=as_array)
            h = layer(h, masks[kind], cache=c)
        if self.kv_bits is not None:
            quantize_caches(cache, self.kv_bits, self.kv_group_size)
        return h

    def logits(self, h: mx.array) -> mx.array:
        h = self.inner.norm(h)
        if hasattr(self.model, "lm_head"):
            return self.model.lm_head(h)
        return self.inner.embed_tokens.as_linear(h)


def quantize_caches(cache: list, bits: int, group_size: int = KV_GROUP_SIZE) -> None:
    """Turns, in place, every cache that can be quantised (a full KV cache) into mlx-lm's
    QuantizedKVCache; others (already quantised, cache lists, recurrent states) stay. mlx-lm's
    maybe_quantize_kv_cache with quantized_kv_start=0 does the same after each model call."""
    for i, c in enumerate(cache):
        if hasattr(c, "to_quantized"):
            cache[i] = c.to_quantized(group_size=group_size, bits=bits)


def attention_cache(cache):
    """The cache a layer's attention mask is made from: the first of a cache list."""
    return cache[0] if isinstance(cache, CacheList) else cache


def cache_offset(cache: list) -> int:
    """How many positions a stage's cache holds (0 when empty)."""
    return attention_cache(cache[0]).offset if cache else 0


def stage_range(split: list[int], rank: int) -> tuple[int, int]:
    start = sum(split[:rank])
    return start, start + split[rank]


def load_stage(
    path: str | Path, split: list[int], rank: int, dtype: mx.Dtype | None = None
) -> Stage:
    """Builds the model from config.json and loads the tensors of rank's layers, nothing else.

    Layers at or past num_hidden_layers (R1's multi-token-prediction layer) are never read.
    """
    info = inspect_model(path)
    path = info.path
    check_node(path, split, rank)
    start, end = stage_range(split, rank)
    first, last = rank == 0, rank == len(split) - 1
    weights = read_tensors(
        path, lambda k: stage_needs(k, start, end, first, last, info.tied_embeddings)
    )
    model = build_model(info.config, weights, first_layer=start)
    templates = make_prompt_cache(model)  # before the layers are cut: it may read them

    inner = model.model
    inner.layers = inner.layers[:end]
    inner.layers[:start] = [None] * start
    if not (first or (last and info.tied_embeddings)):
        del inner.embed_tokens
    if not last:
        del inner.norm
        if hasattr(model, "lm_head"):
            del model.lm_head
    model.load_weights(list(weights.items()), strict=True)
    del weights
    evaluate(model, info.config, inner.layers[start:end], dtype)
    return Stage(model, info.config, start, end, last, templates=templates)


def read_tensors(path: Path, keep: Callable[[str], bool]) -> dict[str, mx.array]:
    """The tensors whose names keep(name) accepts, mapped lazily: nothing is read from disk yet."""
    index = weight_map(path)
    keys = {k for k in index if keep(k)}
    weights: dict[str, mx.array] = {}
    for f in sorted({index[k] for k in keys}):
        # mx.load maps safetensors lazily: tensors left out are never read from disk.
        loaded = mx.load(str(path / f))
        weights.update({k: v for k, v in loaded.items() if k in keys})
        del loaded
    return weights


def build_model(
    config: dict,
    weights: dict,
    prepare: Callable[[nn.Module], None] | None = None,
    first_layer: int = 0,
) -> nn.Module:
    """The mlx-lm model for config, its checkpoint tensors renamed by sanitize (in place),
    quantised where they were saved quantised. prepare(model) may change modules before that.

    weights hold layers from first_layer on: sanitize sees them numbered from 0, since some
    decide by layer 0's tensors whether to convert at all (MiniMax's), then they go back."""
    model_class, args_class = get_classes(config)
    model = model_class(args_class.from_dict(config))
    if prepare is not None:
        prepare(model)
    if hasattr(model, "sanitize"):
        # dict(): some sanitize() return the very dict they were given.
        sanitized = dict(model.sanitize(renumber(weights, -first_layer)))
        weights.clear()
        weights.update(renumber(sanitized, first_layer))
    _quantize_like(model, config, weights)
    model.eval()
    return model


# Told after each layer's weights are read: (bytes read, bytes in all). The rank process sets it
# to report its loading (the dashboard's progress bars); None: no one is told.
on_load: Callable[[int, int], None] | None = None


def _nbytes(module: nn.Module) -> int:
    return sum(getattr(v, "nbytes", 0) for _, v in tree_flatten(module.parameters()))


def evaluate(model: nn.Module, config: dict, layers: list, dtype: mx.Dtype | None) -> None:
    """Casts to the run dtype; evaluates layer by layer, so peak memory stays near what is kept."""
    dtype = dtype or run_dtype(config)
    if dtype is not None:
        model.set_dtype(dtype)
    told = on_load or (lambda done, total: None)
    total, done = _nbytes(model), 0
    told(0, total)
    for layer in layers:
        mx.eval(layer.parameters())
        done += _nbytes(layer)
        told(min(done, total), total)
    mx.eval(model.parameters())
    told(total, total)


def _quantize_like(model: nn.Module, config: dict, weights: dict) -> None:
    """Turns the modules whose weights were saved quantised into quantised modules."""
    quantization = quantization_of(config)
    if quantization is None:
        return
    overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}

    def predicate(p: str, m: nn.Module):
        if p in overrides:
            return overrides[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


# Checkpoints that state their packing only in quantization_config, read as mlx-lm reads them
# (OpenAI's gpt-oss: MXFP4 experts).
_PACKED_METHODS = {
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    "mxfp8": {"group_size": 32, "bits": 8, "mode": "mxfp8"},
}


def quantization_of(config: dict) -> dict | None:
    """How the checkpoint's quantised weights are packed, or None when none are."""
    if "quantization" in config:
        return config["quantization"]
    method = (config.get("quantization_config") or {}).get("quant_method")
    return _PACKED_METHODS.get(method)


def run_dtype(config: dict) -> mx.Dtype | None:
    """The dtype every stage runs in; the same on all ranks so hidden states agree."""
    # On the CPU, MLX's unquantised expert matmul (gather_mm) runs only in float32.
    experts = routed_experts(config) > 0
    unquantised_experts = experts and quantization_of(config) is None
    if unquantised_experts and mx.default_device() == mx.cpu:
        return mx.float32
    return None


def load_tensor_stage(path: str | Path, group: mx.distributed.Group) -> Stage:
    """The whole model cut by mlx-lm's own shard(group): every rank holds 1/N of each layer."""
    info = inspect_model(path)
    check_tensor_split(info.config, group.size())
    check_node(info.path, [info.num_layers], 0)
    num_layers = info.num_layers
    # The MTP layer (mtp.*) is loaded apart, by the rank that drafts with it.
    weights = read_tensors(info.path, lambda k: (layer_of(k) or 0) < num_layers and not is_mtp(k))
    model = build_model(info.config, weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    model.shard(group)
    evaluate(model, info.config, model.model.layers, None)
    return Stage(model, info.config, 0, num_layers, True)


def load_mtp_layer(path: str | Path, dtype: mx.Dtype | None = None):
    """The model folder's MTP layer, built and loaded as saved, quantised or not: its `mtp.*`
    tensors (written by `quantize --keep-mtp`), or in a checkpoint of the family's own format,
    the layer after the decoder layers; None when the folder has neither."""
    from quantize.mtp import PREFIX, is_mtp, is_mtp_source, mlx_name, supports_mtp
    from quantize.mtp_layer import MTPLayer

    info = inspect_model(path)
    weights = read_tensors(info.path, is_mtp)
    if weights:
        weights = {k[len(PREFIX) :]: v for k, v in weights.items()}
    elif supports_mtp(info.config):
        raw = read_tensors(info.path, lambda k: is_mtp_source(k, info.config))
        if not raw:
            return None
        model_class, args_class = get_classes(info.config)
        # sanitize reads only the model's arguments: it dequantises FP8 and stacks experts
        owner = SimpleNamespace(args=args_class.from_dict(info.config))
        layer_index = int(info.config["num_hidden_layers"])
        raw = model_class.sanitize(owner, renumber(raw, -layer_index))
        weights = {mlx_name(k)[len(PREFIX) :]: v for k, v in raw.items()}
    else:
        return None
    layer = MTPLayer(info.config, own_head="shared_head.head.weight" in weights)
    quantization = quantization_of(info.config)
    if quantization is not None:
        saved = {k: v for k, v in quantization.items() if isinstance(v, dict)}

        def predicate(p: str, m: nn.Module):
            if PREFIX + p in saved:
                return saved[PREFIX + p]
            if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
                return False
            return infer_quant_config(p, m, weights)

        mode = quantization.get("mode", "affine")
        group, bits = quantization["group_size"], quantization["bits"]
        nn.quantize(layer, group_size=group, bits=bits, mode=mode, class_predicate=predicate)
    layer.load_weights(list(weights.items()), strict=True)
    layer.eval()
    dtype = dtype or run_dtype(info.config)
    if dtype is not None:
        layer.set_dtype(dtype)
    mx.eval(layer.parameters())
    return layer
