"""Output sizes from config.json alone: the model is built lazily (no parameter is ever
evaluated, so even R1's 671B parameters cost nothing), quantised lazily with the same predicate
the conversion uses, and its parameter sizes are summed per layer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from .checkpoint import layer_of
from .mtp import is_mtp
from .mtp_layer import MTPLayer
from .nodes import is_routed_expert_tensor, routed_experts
from .recipes import Override, default_spec, make_predicate

_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


@dataclass
class Estimate:
    layer_bytes: list[int]  # per decoder layer
    embed_bytes: int
    tail_bytes: int  # final norm and head
    parameters: int  # before quantisation
    tied: bool
    expert_bytes: list[int] = field(default_factory=list)  # per layer: routed experts, stacked
    num_experts: int = 0  # routed experts per MoE layer
    mtp_bytes: int = 0  # the kept MTP layer (--keep-mtp), on the node that holds the head

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.tail_bytes + self.mtp_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.total_bytes * 8 / self.parameters

    def node_bytes(self, split: list[int]) -> list[int]:
        """What each node of a pipeline split holds."""
        out, start = [], 0
        for r, n in enumerate(split):
            b = sum(self.layer_bytes[start : start + n])
            if r == 0 or (self.tied and r == len(split) - 1):
                b += self.embed_bytes
            if r == len(split) - 1:
                b += self.tail_bytes + self.mtp_bytes
            out.append(b)
            start += n
        return out

    @property
    def replicated_bytes(self) -> int:
        """What every node holds in expert parallelism: all but the routed experts (and the
        MTP layer, which node 0 alone holds)."""
        return self.total_bytes - sum(self.expert_bytes) - self.mtp_bytes

    def expert_node_bytes(self, counts: list[int]) -> list[int]:
        """What each node of an expert-parallel cut holds: the replicated part, and its
        experts' share of every MoE layer (experts of a layer all weigh the same)."""
        per_expert = sum(self.expert_bytes) // self.num_experts if self.num_experts else 0
        shares = [self.replicated_bytes + c * per_expert for c in counts]
        return [b + (self.mtp_bytes if r == 0 else 0) for r, b in enumerate(shares)]


def lazy_model(config: dict) -> nn.Module:
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def stored_parameters(
    config: dict,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    overrides: tuple[Override, ...] = (),
    quantize: bool = True,
    mtp: bool = False,
) -> Iterator[tuple[str, mx.array, int]]:
    """Every parameter of the lazily built model as the conversion would store it: its name, its
    (never evaluated) array, and its bytes after the cast to config's torch_dtype. A config that
    is already quantised (an MLX folder's) keeps its own widths. With mtp, the MTP layer's too
    (mtp.*), its head taken as equal to lm_head, as in R1's official checkpoint."""
    q = config.get("quantization")
    if isinstance(q, dict):
        bits, group_size, mode = q.get("bits", bits), q.get("group_size"), q.get("mode", mode)
    model = lazy_model(config)
    layer = MTPLayer(config, own_head=False) if mtp else None
    if quantize:
        default = default_spec(bits, group_size, mode)
        predicate = make_predicate(model, default, recipe, overrides)
        nn.quantize(model, class_predicate=lambda p, m: predicate(p, m) or False)
        if layer is not None:
            nn.quantize(layer, class_predicate=lambda p, m: predicate(f"mtp.{p}", m) or False)
    dtype = _DTYPES.get(config.get("torch_dtype", ""))
    keep = getattr(model, "cast_predicate", lambda _: True)
    params = tree_flatten(model.parameters())
    if layer is not None:
        params += [(f"mtp.{n}", v) for n, v in tree_flatten(layer.parameters())]
    for name, v in params:
        n = v.nbytes
        if dtype is not None and keep(name) and mx.issubdtype(v.dtype, mx.floating):
            n = v.size * dtype.size
        yield name, v, n


def estimate(
    config: dict,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    overrides: tuple[Override, ...] = (),
    quantize: bool = True,
    mtp: bool = False,
) -> Estimate:
    layers = [0] * config["num_hidden_layers"]
    experts = [0] * config["num_hidden_layers"]
    embed = tail = mtp_bytes = 0
    parameters = sum(v.size for _, v in tree_flatten(lazy_model(config).parameters()))
    if mtp:
        mtp_layer = MTPLayer(config, own_head=False)
        parameters += sum(v.size for _, v in tree_flatten(mtp_layer.parameters()))
    stored = stored_parameters(
        config,
        bits=bits,
        group_size=group_size,
        mode=mode,
        recipe=recipe,
        overrides=overrides,
        quantize=quantize,
        mtp=mtp,
    )
    for name, _, n in stored:
        layer = layer_of(name)
        if is_mtp(name):  # before the embedding's test: mtp.embed_tokens is the MTP layer's
            mtp_bytes += n
        elif layer is not None:
            layers[layer] += n
            if is_routed_expert_tensor(name):
                experts[layer] += n
        elif "embed_tokens" in name:
            embed += n
        else:
            tail += n
    tied = bool(config.get("tie_word_embeddings", False))
    num_experts = routed_experts(config) if any(experts) else 0
    return Estimate(layers, embed, tail, parameters, tied, experts, num_experts, mtp_bytes)
