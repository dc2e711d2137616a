"""From source tensors to output tensors, one unit of work at a time.

A unit is what is computed together: the non-expert tensors of one layer (through mlx-lm's own
`sanitize`: FP8 dequantisation, the MLA kv_b_proj split), the embeddings, the final norm and head,
or one stacked expert projection. An expert unit is made of pieces, one expert each, written
one after another into the stacked tensor, so no stacked tensor is ever whole in memory.
Every array is built lazily from a fresh `mx.load`, so nothing read stays in memory after use.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import layer_of, safetensors_header, safetensors_layout
from .mtp import PREFIX as MTP_PREFIX
from .mtp import is_mtp_source, mlx_name
from .nodes import is_routed_expert_tensor
from .safetensors_out import TensorSlot

_EXPERT_RE = re.compile(
    r"^(.*\.(?:mlp|block_sparse_moe))\.experts\.(\d+)\.(\w+)\.(weight|weight_scale_inv)$"
)
# MiniMax's expert projections, by the names mlx-lm's SwitchGLU gives them.
_PROJ_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# Source dtypes the conversion reads (F8_E4M3 arrives from mx.load as uint8).
SOURCE_DTYPES = {"F8_E4M3", "BF16", "F16", "F32", "U32", "U8", "I32"}


@dataclass
class Unit:
    layer: int | None  # decoder layer (the MTP layer's number), or None for embeddings / tail
    kind: str  # "embed", "layer", "experts", "tail"
    pieces: int  # pieces stacked along axis 0 (1 unless experts)
    make: Callable[[int], dict[str, mx.array]]  # piece i's output arrays, built lazily
    source_bytes: int
    rows: int = 1  # length of the stacked axis (experts); piece i starts at row i * chunk
    chunk: int = 1
    slots: list[TensorSlot] | None = None  # filled by plan_slots()
    mtp: bool = False  # a unit of the multi-token-prediction layer (named mtp.*)


class Source:
    """Lazy access to a checkpoint's tensors by name, one fresh mx.load per request."""

    def __init__(self, path: Path, weight_map: dict[str, str]):
        self.path = path
        self.weight_map = weight_map
        self.nbytes: dict[str, int] = {}
        for f in sorted(set(weight_map.values())):
            for name, entry in safetensors_header(path / f).items():
                start, end = entry["data_offsets"]
                self.nbytes[name] = end - start

    def get(self, keys: list[str]) -> dict[str, mx.array]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for k in keys:
            by_file[self.weight_map[k]].append(k)
        out = {}
        for f, names in by_file.items():
            loaded = mx.load(str(self.path / f))
            out.update({k: loaded[k] for k in names})
        return out

    def same(self, a: str, b: str) -> bool:
        """Whether two tensors hold the same bytes (dtype and shape too), read 64 MiB at a time:
        R1's head copy is 1.8 GB, not worth holding twice to compare."""
        entries = []
        for key in (a, b):
            file = self.path / self.weight_map[key]
            start, header = safetensors_layout(file)
            entry = header[key]
            entries.append((file, start + entry["data_offsets"][0], entry))
        (fa, sa, ea), (fb, sb, eb) = entries
        if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
            return False
        length = self.nbytes[a]
        with open(fa, "rb") as x, open(fb, "rb") as y:
            for at in range(0, length, 64 << 20):
                n = min(64 << 20, length - at)
                if os.pread(x.fileno(), n, sa + at) != os.pread(y.fileno(), n, sb + at):
                    return False
        return True


def _cast(name: str, a: mx.array, dtype: mx.Dtype | None, keep: Callable[[str], bool]):
    if dtype is None or not keep(name) or not mx.issubdtype(a.dtype, mx.floating):
        return a
    return a.astype(dtype)


def _quantised(path: str, w: mx.array, spec: dict) -> dict[str, mx.array]:
    q = mx.quantize(w, spec["group_size"], spec["bits"], mode=spec["mode"])
    out = {f"{path}.weight": q[0], f"{path}.scales": q[1]}
    if len(q) > 2 and q[2] is not None:
        out[f"{path}.biases"] = q[2]
    return out


def _module_outputs(
    tensors: dict[str, mx.array],
    modules: dict[str, nn.Module],
    predicate,
    dtype,
    keep,
) -> dict[str, mx.array]:
    """Casts and quantises sanitized tensors module by module, as mlx_lm.convert would."""
    by_module: dict[str, dict[str, mx.array]] = defaultdict(dict)
    for name, a in tensors.items():
        path, _, leaf = name.rpartition(".")
        by_module[path][leaf] = a
    out = {}
    for path, params in by_module.items():
        module = modules.get(path)
        already = "scales" in params  # saved quantised (a GGUF import): kept as it is
        spec = None
        if not already and module is not None and "weight" in params:
            spec = predicate(path, module)
        for leaf, a in params.items():
            name = f"{path}.{leaf}"
            a = a if already else _cast(name, a, dtype, keep)
            if spec is not None and leaf == "weight":
                out.update(_quantised(path, a, spec))
            else:
                out[name] = a
    return out


def make_units(
    source: Source,
    model: nn.Module,
    config: dict,
    predicate,
    dtype: mx.Dtype | None,
    mtp: nn.Module | None = None,
) -> list[Unit]:
    """Every unit of the conversion, in output order: embeddings, layers 0..L-1, norm and head,
    then, given the MTP layer's module (quantize.mtp.MTPLayer), the checkpoint's first MTP layer
    under its mtp.* names; its own head copy only when the module has one."""
    num_layers = config["num_hidden_layers"]
    modules = dict(model.named_modules())
    if mtp is not None:
        modules.update({MTP_PREFIX + p: m for p, m in mtp.named_modules() if p})
    keep = getattr(model, "cast_predicate", lambda _: True)
    groups: dict[tuple, list[str]] = defaultdict(list)
    experts: dict[tuple, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key in source.weight_map:
        layer = layer_of(key)
        if layer is not None and layer >= num_layers:
            if mtp is None or not is_mtp_source(key, config):
                continue  # multi-token-prediction layers: not used for generation
            if key.endswith(".shared_head.head.weight") and "head" not in mtp.shared_head:
                continue  # equal to lm_head: the runtime uses that
        m = _EXPERT_RE.match(key)
        if m:
            experts[(layer, m.group(1), m.group(3))][int(m.group(2))].append(key)
        elif layer is None:
            groups[("embed" if "embed_tokens" in key else "tail", None)].append(key)
        else:
            groups[("layer", layer)].append(key)

    def sanitized(keys: list[str], layer: int = 0, mtp: bool = False):
        def make(_: int) -> dict[str, mx.array]:
            tensors = None
            if hasattr(model, "sanitize"):
                # sanitize sees the layer as layer 0: some decide by layer 0's tensors whether
                # to convert at all (MiniMax's experts), then it goes back to its number; the
                # MTP layer keeps number 0, which quantize.mtp.mlx_name names from.
                tensors = model.sanitize(renumber(source.get(keys), -layer))
                back = 0 if mtp else layer
                tensors = renumber(dict(tensors), back) if tensors is not None else None
            tensors = tensors if tensors is not None else source.get(keys)
            if mtp:
                tensors = {mlx_name(k): v for k, v in tensors.items()}
            return _module_outputs(tensors, modules, predicate, dtype, keep)

        return make

    def stacked(prefix: str, proj: str, by_expert: dict[int, list[str]], chunk: int, out: str):
        path = f"{out}.switch_mlp.{_PROJ_NAMES.get(proj, proj)}"

        def dequantised(src: dict, e: int) -> mx.array:
            w = src[f"{prefix}.experts.{e}.{proj}.weight"]
            scale = src.get(f"{prefix}.experts.{e}.{proj}.weight_scale_inv")
            if scale is None:
                return w
            # mlx-lm's sanitize dequantises any "<x>.weight" with its "<x>.weight_scale_inv".
            return model.sanitize({"x.weight": w, "x.weight_scale_inv": scale})["x.weight"]

        def make(i: int) -> dict[str, mx.array]:
            experts = range(i * chunk, min(len(by_expert), (i + 1) * chunk))
            src = source.get([k for e in experts for k in by_expert[e]])
            w = mx.stack([dequantised(src, e) for e in experts])
            return _module_outputs({f"{path}.weight": w}, modules, predicate, dtype, keep)

        return make

    def nbytes(keys):
        return sum(source.nbytes[k] for k in keys)

    def layer_units(layer: int) -> list[Unit]:
        """One decoder layer's units: its non-expert tensors, then its stacked experts."""
        is_mtp = layer >= num_layers
        units = []
        keys = groups.get(("layer", layer), [])
        if keys:
            make = sanitized(keys, layer, is_mtp)
            units.append(Unit(layer, "layer", 1, make, nbytes(keys), mtp=is_mtp))
        for (lay, prefix, proj), by_expert in sorted(experts.items()):
            if lay != layer:
                continue
            n = len(by_expert)
            if sorted(by_expert) != list(range(n)):
                raise ValueError(f"layer {layer} {proj}: experts are not numbered 0..{n - 1}")
            src_bytes = sum(nbytes(k) for k in by_expert.values())
            # Experts go in chunks: few enough loads and evaluations to be fast, small enough
            # (an eighth of the layer, at most 256 MB) to keep memory near one layer.
            layer_bytes = nbytes(keys) + sum(
                nbytes(k)
                for (lay2, _, _), b in experts.items()
                if lay2 == layer
                for k in b.values()
            )
            per_expert = max(1, src_bytes // n)
            chunk = max(1, min(n, min(256 << 20, layer_bytes // 8) // per_expert))
            pieces = -(-n // chunk)
            out = mlx_name(f"model.layers.0.{prefix.split('.', 3)[3]}") if is_mtp else prefix
            make = stacked(prefix, proj, by_expert, chunk, out)
            units.append(
                Unit(layer, "experts", pieces, make, src_bytes, rows=n, chunk=chunk, mtp=is_mtp)
            )
        return units

    units = []
    if ("embed", None) in groups:
        keys = groups[("embed", None)]
        units.append(Unit(None, "embed", 1, sanitized(keys), nbytes(keys)))
    for layer in range(num_layers):
        units += layer_units(layer)
    if ("tail", None) in groups:
        keys = groups[("tail", None)]
        units.append(Unit(None, "tail", 1, sanitized(keys), nbytes(keys)))
    if mtp is not None:
        units += layer_units(num_layers)
    return units


def renumber(tensors: dict, delta: int) -> dict:
    """The same tensors with every decoder layer's number moved by delta."""
    if not delta:
        return tensors
    out = {}
    for key, value in tensors.items():
        layer = layer_of(key)
        if layer is not None:
            key = key.replace(f"layers.{layer}.", f"layers.{layer + delta}.", 1)
        out[key] = value
    return out


def is_routed_expert(name: str) -> bool:
    """A stacked routed-expert tensor of the output (experts along axis 0), which expert
    parallelism cuts: every output tensor is in mlx-lm's names, where the families' one rule
    (quantize.nodes.ROUTED_EXPERT_NAMES) finds only stacked ones."""
    return is_routed_expert_tensor(name)


def plan_slots(unit: Unit) -> list[TensorSlot]:
    """The unit's output tensors with their full shapes, from a lazy (unevaluated) piece."""
    piece = unit.make(0)
    slots = []
    for name in sorted(piece):
        a = piece[name]
        shape = tuple(a.shape)
        if unit.kind == "experts":
            shape = (unit.rows, *shape[1:])
        slots.append(TensorSlot(name, shape, a.dtype))
    unit.slots = slots
    return slots
