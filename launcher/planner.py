"""Which node holds which layers: a pipeline split that fits each Mac's memory.

Rank 0 holds the first layers and the embeddings, the last rank the final norm and head (and the
embeddings again when they are tied). Each node also holds the KV cache of its own layers.

Decisions, in one place:
- Memory sizes given by hand ("192GB" in --simulate, `memory_gb` in hosts.toml) are Apple's: a
  "192 GB" Mac has 192 GiB (192 * 2**30 bytes), so GB, G and GiB all mean 2**30 bytes there.
  Every figure the planner prints is in GB of 10**9 bytes, as the rest of mlxdist.
- Headroom, for macOS and other apps, defaults to 10% of each node's memory; a value of 1 or
  more is bytes. It is taken from the available memory when a node reports one, else the total.
- GPU memory: a node with a GPU limit (launcher/gpumem.py: the iogpu wired limit in force, else
  Metal's recommended working set, else an estimate from its memory) has for usable memory the
  smaller of that limit and its memory less the headroom. A plan that fits only above the limits
  does not fit; its message says so and gives the `sudo sysctl iogpu.wired_limit_mb=N` per node
  (N: the node's memory less the headroom) that would make it fit (Plan.raise_wired).
- A node whose reported chip is not in launcher/chips.py is named in the plan's notes.
- A node too small for even one layer makes the plan "does not fit", naming it; with
  drop_small=True it is left out instead, but only when the model then fits without it.
- The split minimises, lexicographically, the nodes' fill ratios (load / usable memory) sorted
  from the fullest: the fullest node is as empty as it can be, then the next, and so on. It is
  exact (a dynamic programme over contiguous splits), deterministic and gives every node a layer.
- Expert parallelism (`plan_experts`): every node holds every layer but only its routed experts,
  so each holds the replicated part (all weights but the routed experts, embeddings and head
  included), the KV cache of every layer for the whole context, the activations of a prefill
  step, and its experts. The expert counts minimise the fill ratios the same way, by the same
  exact split (a node with more memory takes more experts); every node takes at least one.
- KV cache quantised (`kv_bits` 4 or 8, mlx-lm's QuantizedKVCache): each cached vector of D
  values takes D x bits / 8 bytes plus a scale and a bias per group of 64 values, in the
  activation dtype (mlx.core.quantize's packing).
- R1's multi-token-prediction (MTP) layer (ModelSpec.mtp_bytes) is counted only for a launch
  that drafts with it (`--speculative mtp`), on the rank that drafts: the last pipeline rank,
  rank 0 in expert and tensor modes (which hold the whole layer there). Its `mtp.*` tensors
  (quantize --keep-mtp) are never the embeddings' or the head's; a checkpoint's own layer (index
  num_hidden_layers) is counted as its loader dequantises it (FP8 to bfloat16).
- The prompt cache's default budget (Plan.prompt_cache_bytes, given to rank 0 when the user
  gives no --prompt-cache-bytes): half of the least memory any node has left after its
  weights, its KV cache at the planned context and a prefill step's activations. Half, so the
  kept prefixes never take all that is left: the sizes are estimates and Metal's buffers round up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from launcher.chips import chip_of_node_name, default_chip, reported_chip
from launcher.gpumem import (
    ESTIMATE,
    estimated_working_set,
    gpu_limit,
    sysctl_command,
    wired_limit_mb_to_fit,
)
from launcher.rankspec import PREFILL_CHUNK
from quantize.checkpoint import (
    check_supported,
    code_family,
    layer_of,
    read_config,
    safetensors_header,
    weight_map,
)
from quantize.nodes import active_experts, is_routed_expert_tensor, routed_experts

GIB = 2**30
DEFAULT_HEADROOM = 0.1
_ACTIVATION_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Families whose attention caches the compressed latent (MLA), by the mlx-lm code that runs them.
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
KV_GROUP_SIZE = 64  # values per scale and bias of a quantised KV cache (mlx-lm's default)
PROMPT_CACHE_SHARE = 0.5  # of the least memory left on any node: the prompt cache's default


@dataclass(frozen=True)
class ActivationSpec:
    """What one layer's forward pass builds and frees again, the parts that grow with the
    prefill chunk and the context (see activation_bytes)."""

    score_bytes_per_pair: int = 0  # per (chunk token, context token): scores materialised
    expanded_kv_bytes_per_token: int = 0  # per token of context: K and V rebuilt per head
    bytes_per_chunk_token: int = 0  # per chunk token: hidden-size buffers, MLP widths, logits


@dataclass(frozen=True)
class NodeSpec:
    name: str
    memory_total: int  # bytes
    memory_available: int | None = None  # bytes, when the node reports it
    # e.g. "M3 Ultra" or "Apple M3 Ultra", for the performance model (launcher/perfmodel.py)
    chip: str | None = None
    gpu_limit: int | None = None  # bytes Metal lets the GPU hold; None: no limit (no Metal)
    gpu_limit_from: str = ""  # launcher.gpumem: WIRED, METAL or ESTIMATE
    disk_free: int | None = None  # bytes free in its agent's models folder, when reported
    hf_cache_free: int | None = None  # bytes free in its Hugging Face cache, when reported

    @property
    def memory_bytes(self) -> int:
        """What the node has: available if it reports it, else total."""
        return self.memory_available if self.memory_available is not None else self.memory_total

    def usable_bytes(self, headroom: float = DEFAULT_HEADROOM) -> int:
        """What the node has less the headroom, and no more than its GPU limit."""
        usable = self.memory_bytes - headroom_bytes(self, headroom)
        return usable if self.gpu_limit is None else min(usable, self.gpu_limit)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layer_bytes: list[int]  # per decoder layer
    embed_bytes: int
    tail_bytes: int  # final norm and head
    tied: bool
    kv_bytes_per_token_per_layer: int
    expert_bytes: list[int] = field(default_factory=list)  # per layer: its routed experts
    num_experts: int = 0  # routed experts per MoE layer; 0 for a dense model
    activation: ActivationSpec = ActivationSpec()
    # the MTP layer as --speculative mtp loads it; 0 when the launch does not draft with it
    mtp_bytes: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        """The model's weights, without the MTP layer (one rank alone loads it)."""
        return sum(self.layer_bytes) + self.embed_bytes + self.tail_bytes

    @property
    def replicated_bytes(self) -> int:
        """What every node holds in expert parallelism: all but the routed experts (and the
        MTP layer, rank 0's alone)."""
        return self.total_bytes - sum(self.expert_bytes)

    @property
    def bytes_per_expert(self) -> int:
        """One routed expert's share of every MoE layer (a layer's experts all weigh the same)."""
        return sum(self.expert_bytes) // self.num_experts if self.num_experts else 0


@dataclass(frozen=True)
class NodePlan:
    rank: int
    name: str
    first_layer: int
    layers: int
    weights_bytes: int  # layers plus embeddings / norm / head on the end ranks
    kv_bytes: int
    total_bytes: int
    memory_bytes: int  # what the node has (available if reported, else total)
    usable_bytes: int  # memory_bytes less the headroom
    free_bytes: int  # usable_bytes - total_bytes; negative when short
    experts: int | None = None  # expert mode: how many routed experts it holds
    activation_bytes: int | None = None  # expert mode: a prefill step's activations
    gpu_limit_bytes: int | None = None  # Metal's limit on the node, when it has one
    gpu_limit_from: str = ""  # launcher.gpumem: WIRED, METAL or ESTIMATE


@dataclass(frozen=True)
class Plan:
    model: str
    order: list[str]
    split: list[int]
    fits: bool
    shortfalls: dict[str, int]
    nodes: list[NodePlan]
    message: str
    context: int
    batch: int
    dropped: list[str] = field(default_factory=list)
    parallel: str = "pipeline"  # or "expert": then split is [all layers] on every node
    experts: list[int] = field(default_factory=list)  # expert mode: routed experts per node
    notes: list[str] = field(default_factory=list)  # e.g. a node's chip not in the chip table
    raise_wired: dict[str, int] = field(default_factory=dict)  # node -> wired_limit_mb to fit
    prompt_cache_bytes: int = 0  # the default budget of kept prefixes (see the module docstring)
    mtp_bytes: int = 0  # the MTP layer, in the weights of the rank that drafts with it


# --- the model's side ---------------------------------------------------------------------------


def activation_bytes(config: dict) -> int:
    """Bytes per value of activations, and so of the KV cache."""
    return _ACTIVATION_BYTES.get(config.get("torch_dtype", ""), 2)


def is_mla(config: dict) -> bool:
    """Whether the model's attention is DeepSeek's multi-head latent attention (Kimi K2 runs
    deepseek_v3's code under its own model_type)."""
    return code_family(config) in _MLA_MODEL_TYPES


def kv_bytes_per_token_per_layer(config: dict, kv_bits: int | None = None) -> int:
    """What one token adds to one layer's KV cache, as mlx-lm's attention caches it; with
    kv_bits, as its quantised cache holds it."""
    size = activation_bytes(config)

    def held(values: int) -> int:  # one cached vector of this many values
        if kv_bits is None:
            return values * size
        return values * kv_bits // 8 + 2 * -(-values // KV_GROUP_SIZE) * size

    if is_mla(config):
        # MLA caches the compressed kv_latent and the shared rotary key k_pe, not per-head K and V;
        # V3.2's indexer adds its keys and a zero array of their shape as the values.
        v32 = code_family(config) == "deepseek_v32"
        indexer = 2 * held(config.get("index_head_dim", 0)) if v32 else 0
        return held(config["kv_lora_rank"]) + held(config["qk_rope_head_dim"]) + indexer
    kv_heads, head_dim = kv_heads_and_dim(config)
    return 2 * kv_heads * held(head_dim)


def kv_heads_and_dim(config: dict) -> tuple[int, int]:
    """KV heads and the values per head a layer caches for each token (not MLA)."""
    try:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]}: cannot size the KV cache") from None
    return kv_heads, head_dim


def activation_spec(config: dict) -> ActivationSpec:
    """The sizes activation_bytes scales, from config.json."""
    size = activation_bytes(config)
    hidden = config["hidden_size"]
    k = active_experts(config)
    width = max(
        config.get("intermediate_size") or 0, k * (config.get("moe_intermediate_size") or 0)
    )
    # the residual, normed input, attention output and MLP output, plus k expert outputs
    # before their weighted sum; gate, up and their product; the chunk's logits
    per_token = size * ((4 + k) * hidden + 3 * width + config.get("vocab_size", 0))
    if not is_mla(config):
        # Metal's fused attention never materialises the scores of a causal prefill.
        return ActivationSpec(0, 0, per_token)
    heads = config["num_attention_heads"]
    # mlx-lm's MLA prefill: the rotary scores, heads x chunk x context, as the attention mask,
    # and K and V rebuilt per head from the compressed cache over the whole context.
    return ActivationSpec(
        heads * size, heads * (config["qk_nope_head_dim"] + config["v_head_dim"]) * size, per_token
    )


def activation_bytes_at(spec: ActivationSpec, context: int, batch: int = 1) -> int:
    """A prefill step's transient memory in its largest layer, at the end of the context: the
    chunk attends to every token before it. Freed after each layer, so one layer counts."""
    chunk = min(PREFILL_CHUNK, context)
    return batch * (
        chunk * context * spec.score_bytes_per_pair
        + context * spec.expanded_kv_bytes_per_token
        + chunk * spec.bytes_per_chunk_token
    )


def model_spec_from_config(
    config: dict,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    name: str | None = None,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> ModelSpec:
    """Sizes estimated from config.json alone; an already quantised config keeps its own bits.
    With speculative "mtp", the MTP layer as quantize --keep-mtp would write it."""
    from quantize.estimate import estimate  # builds a lazy mlx model: imported only when needed
    from quantize.mtp import supports_mtp

    mtp = speculative == "mtp" and supports_mtp(config)
    e = estimate(config, bits=bits, group_size=group_size, mode=mode, recipe=recipe, mtp=mtp)
    return ModelSpec(
        name=name or config.get("model_type", "model"),
        layer_bytes=e.layer_bytes,
        embed_bytes=e.embed_bytes,
        tail_bytes=e.tail_bytes,
        tied=e.tied,
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(config, kv_bits),
        expert_bytes=e.expert_bytes,
        num_experts=e.num_experts,
        activation=activation_spec(config),
        mtp_bytes=e.mtp_bytes,
    )


def model_spec_from_folder(
    path: str | Path, bits: int = 4, kv_bits: int | None = None, speculative: str = "none"
) -> ModelSpec:
    """A model folder or a bare config.json: sizes from the safetensors headers when the folder
    is already quantised, else estimated from config.json at `bits`; its KV cache quantised to
    kv_bits when given; its MTP layer counted when speculative is "mtp"."""
    path = Path(path)
    config = read_config(path)
    check_supported(path, config)
    name = path.name if path.is_dir() else config.get("model_type", path.name)
    if "quantization" in config and path.is_dir() and any(path.glob("*.safetensors")):
        return _spec_from_headers(path, config, name, kv_bits=kv_bits, speculative=speculative)
    if "quantization" in config and path.is_dir():  # a repo planned from its index alone
        from quantize.source import snapshot_headers

        headers = snapshot_headers(path)  # by byte ranges from the Hub, no weights
        if headers is not None:
            return _spec_from_headers(path, config, name, headers, kv_bits, speculative)
    return model_spec_from_config(
        config, bits=bits, name=name, kv_bits=kv_bits, speculative=speculative
    )


def model_spec_as_stored(
    path: str | Path, kv_bits: int | None = None, speculative: str = "none"
) -> ModelSpec:
    """A model folder as a launch runs it: sizes from its safetensors headers whenever it holds
    weights, quantised or not (else as model_spec_from_folder estimates them)."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        config = read_config(path)
        check_supported(path, config)
        return _spec_from_headers(path, config, path.name, kv_bits=kv_bits, speculative=speculative)
    return model_spec_from_folder(path, kv_bits=kv_bits, speculative=speculative)


def _spec_from_headers(
    path: Path,
    config: dict,
    name: str,
    headers: dict[str, dict] | None = None,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> ModelSpec:
    from quantize.mtp import is_mtp, supports_mtp

    num_layers = config["num_hidden_layers"]
    layers = [0] * num_layers
    experts = [0] * num_layers
    embed = tail = kept_mtp = source_mtp = 0
    own_mtp = supports_mtp(config)  # a checkpoint's own MTP layer, which the runtime can load
    files = sorted(headers) if headers is not None else sorted(set(weight_map(path).values()))
    for file in files:
        header = headers[file] if headers is not None else safetensors_header(path / file)
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            layer = layer_of(key)
            if is_mtp(key):  # before the embedding's test: mtp.embed_tokens is the MTP layer's
                kept_mtp += end - start
            elif layer is not None:
                if layer < num_layers:
                    layers[layer] += end - start
                    if is_routed_expert_tensor(key):
                        experts[layer] += end - start
                elif layer == num_layers and own_mtp:  # later MTP layers are never loaded
                    source_mtp += dequantised_bytes(key, entry, end - start)
            elif "embed_tokens" in key:
                embed += end - start
            else:
                tail += end - start
    # the runtime loads the mtp.* tensors when the folder has them, else the checkpoint's own
    mtp = (kept_mtp or source_mtp) if speculative == "mtp" else 0
    return ModelSpec(
        name=name,
        layer_bytes=layers,
        embed_bytes=embed,
        tail_bytes=tail,
        tied=bool(config.get("tie_word_embeddings", False)),
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(config, kv_bits),
        expert_bytes=experts,
        num_experts=routed_experts(config) if any(experts) else 0,
        activation=activation_spec(config),
        mtp_bytes=mtp,
    )


_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def dequantised_bytes(key: str, entry: dict, stored: int) -> int:
    """A checkpoint tensor's bytes once its family's sanitize has dequantised it: an FP8 weight
    becomes bfloat16 (2 bytes a value) and its scales are dropped; the rest stays as stored."""
    if key.endswith("_scale_inv"):
        return 0
    if entry.get("dtype") in _FP8_DTYPES:
        return 2 * math.prod(entry["shape"])
    return stored


# --- the split ----------------------------------------------------------------------------------


def headroom_bytes(node: NodeSpec, headroom: float) -> int:
    """Below 1: a fraction of the node's total memory; 1 or more: bytes."""
    if isinstance(headroom, bool) or headroom < 0:
        raise ValueError(f"headroom must be a fraction below 1 or bytes, not {headroom!r}")
    return int(node.memory_total * headroom) if headroom < 1 else int(headroom)


def fixed_bytes(rank: int, ranks: int, model: ModelSpec) -> int:
    """Embeddings on rank 0 (and on the last rank when tied), norm and head on the last rank,
    with the MTP layer when the launch drafts with it (the head's rank drafts)."""
    last = rank == ranks - 1
    b = model.embed_bytes if rank == 0 or (model.tied and last) else 0
    return b + (model.tail_bytes + model.mtp_bytes if last else 0)


def plan(
    nodes: list[NodeSpec],
    model: ModelSpec,
    context: int = 4096,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    order: list[str] | None = None,
    drop_small: bool = False,
    split: list[int] | None = None,
) -> Plan:
    """The split of model's layers over nodes (in `order`, else as given) that fills them most
    evenly, or the memory of the split given; see the module docstring for the rules."""
    if context < 0 or batch < 1:
        raise ValueError("context must be 0 or more tokens and batch at least 1")
    ranked = _in_order(nodes, order)
    if split is not None and (len(split) != len(ranked) or sum(split) != model.num_layers):
        raise ValueError(f"split {split} is not {model.num_layers} layers over {len(ranked)} nodes")

    def planned(these: list[NodeSpec]) -> Plan:
        if split is not None:
            return _plan_ranked(these, model, context, batch, headroom, split)
        return _plan_pipeline(these, model, context, batch, headroom, drop_small)

    return _within_gpu_limits(planned, ranked, headroom)


def _plan_pipeline(
    ranked: list[NodeSpec],
    model: ModelSpec,
    context: int,
    batch: int,
    headroom: float,
    drop_small: bool,
) -> Plan:
    first = _plan_ranked(ranked, model, context, batch, headroom)
    if first.fits or not drop_small:
        return first
    kept, result = list(ranked), first
    while not result.fits:
        small = [r for r in result.nodes if r.layers == 1 and r.free_bytes < 0]
        if not small or len(kept) == 1:
            return first  # dropping does not make it fit: the first plan says who is short
        smallest = min(small, key=lambda r: (r.usable_bytes, -r.rank))
        kept = [n for n in kept if n.name != smallest.name]
        result = _plan_ranked(kept, model, context, batch, headroom)
    kept_names = {n.name for n in kept}
    return replace(result, dropped=[n.name for n in ranked if n.name not in kept_names])


def _in_order(nodes: list[NodeSpec], order: list[str] | None) -> list[NodeSpec]:
    if not nodes:
        raise ValueError("no nodes to plan for")
    by_name = {n.name: n for n in nodes}
    if len(by_name) != len(nodes):
        raise ValueError("node names must differ")
    if order is None:
        return list(nodes)
    if sorted(order) != sorted(by_name):
        raise ValueError(f"order {order} must name each node once: {sorted(by_name)}")
    return [by_name[name] for name in order]


def _plan_ranked(
    nodes: list[NodeSpec],
    model: ModelSpec,
    context: int,
    batch: int,
    headroom: float,
    split: list[int] | None = None,
) -> Plan:
    n_layers, ranks = model.num_layers, len(nodes)
    if ranks > n_layers:
        raise ValueError(
            f"cannot split {n_layers} layers over {ranks} nodes: use at most {n_layers}"
        )
    kv_layer = model.kv_bytes_per_token_per_layer * context * batch
    usable = [n.usable_bytes(headroom) for n in nodes]
    fixed = [fixed_bytes(r, ranks, model) for r in range(ranks)]
    if split is None:
        split = best_split([b + kv_layer for b in model.layer_bytes], fixed, usable)
    rows, start = [], 0
    for r, (node, n) in enumerate(zip(nodes, split)):
        weights = fixed[r] + sum(model.layer_bytes[start : start + n])
        kv = n * kv_layer
        rows.append(
            NodePlan(
                rank=r,
                name=node.name,
                first_layer=start,
                layers=n,
                weights_bytes=weights,
                kv_bytes=kv,
                total_bytes=weights + kv,
                memory_bytes=node.memory_bytes,
                usable_bytes=usable[r],
                free_bytes=usable[r] - weights - kv,
                gpu_limit_bytes=node.gpu_limit,
                gpu_limit_from=node.gpu_limit_from,
            )
        )
        start += n
    shortfalls = {row.name: -row.free_bytes for row in rows if row.free_bytes < 0}
    return Plan(
        model=model.name,
        order=[n.name for n in nodes],
        split=split,
        fits=not shortfalls,
        shortfalls=shortfalls,
        nodes=rows,
        message=_message(rows, shortfalls),
        context=context,
        batch=batch,
        prompt_cache_bytes=prompt_cache_budget(
            [row.free_bytes for row in rows], activation_bytes_at(model.activation, context, batch)
        ),
        mtp_bytes=model.mtp_bytes,
    )


def prompt_cache_budget(free: list[int], activations: int = 0) -> int:
    """The prompt cache's default budget: PROMPT_CACHE_SHARE of the least memory any node has
    free (after weights and KV cache) less the activations of a prefill step not yet counted."""
    spare = min(free) - activations
    return int(max(0, spare) * PROMPT_CACHE_SHARE)


def best_split(layer_cost: list[int], fixed: list[int], usable: list[int]) -> list[int]:
    """Layers per rank (each at least 1) whose fill ratios, sorted from the fullest, are
    lexicographically smallest. Exact: adding the same ratio to two sorted vectors keeps their
    order, so the best split of a prefix extends to the best split of the whole."""
    n, ranks = len(layer_cost), len(fixed)
    prefix = [0]
    for c in layer_cost:
        prefix.append(prefix[-1] + c)

    def ratio(r: int, i: int, j: int) -> float:
        load = fixed[r] + prefix[j] - prefix[i]
        return load / usable[r] if usable[r] > 0 else math.inf

    # best[j]: (fill ratios sorted descending, split) of the ranks so far over the first j layers
    best: dict[int, tuple[tuple[float, ...], list[int]]] = {
        j: ((ratio(0, 0, j),), [j]) for j in range(1, n - ranks + 2)
    }
    for r in range(1, ranks):
        nxt: dict[int, tuple[tuple[float, ...], list[int]]] = {}
        for j in range(r + 1, n - ranks + r + 2):
            for i in range(r, j):
                ratios, split = best[i]
                cand = tuple(sorted((*ratios, ratio(r, i, j)), reverse=True))
                if j not in nxt or cand < nxt[j][0]:
                    nxt[j] = (cand, [*split, j - i])
        best = nxt
    return best[n][1]


# --- GPU limits and notes -----------------------------------------------------------------------


def _within_gpu_limits(planned, nodes: list[NodeSpec], headroom: float) -> Plan:
    """planned(nodes), with the nodes' notes; when it does not fit but would above the GPU
    limits, its message says so and raise_wired holds the sysctl per node that makes it fit."""
    result = planned(nodes)
    notes = chip_notes(nodes)
    if result.fits or all(n.gpu_limit is None for n in nodes):
        return replace(result, notes=notes)
    unlimited = planned([replace(n, gpu_limit=None) for n in nodes])
    if not unlimited.fits:
        return replace(result, notes=notes)
    by_name = {n.name: n for n in nodes}
    raise_wired = {
        row.name: wired_limit_mb_to_fit(
            by_name[row.name].memory_total, headroom_bytes(by_name[row.name], headroom)
        )
        for row in unlimited.nodes
        if by_name[row.name].gpu_limit is not None and row.total_bytes > by_name[row.name].gpu_limit
    }
    over = [row for row in unlimited.nodes if row.name in raise_wired]
    needs = "; ".join(
        f"{row.name} needs {row.total_bytes / 1e9:.1f} GB, limit "
        f"{by_name[row.name].gpu_limit / 1e9:.1f} GB{_limit_from(by_name[row.name])}"
        for row in over
    )
    commands = "; ".join(
        f"{sysctl_command(mb)} on {', '.join(n for n, m in raise_wired.items() if m == mb)}"
        for mb in sorted(set(raise_wired.values()))
    )
    message = (
        f"does not fit under the GPU memory limits ({needs}); raise them (until restart) "
        f"and it fits: {commands}"
    )
    return replace(result, message=message, notes=notes, raise_wired=raise_wired)


def _limit_from(node: NodeSpec) -> str:
    return " (est.)" if node.gpu_limit_from == ESTIMATE else ""


def chip_notes(nodes: list[NodeSpec]) -> list[str]:
    """One note per node whose reported chip is not in the chip table (never dropped silently)."""
    notes = []
    for n in nodes:
        _, note = reported_chip(n.chip or "")
        if note:
            assumed = default_chip(n.memory_total).name
            notes.append(f"{n.name}: {note}; the performance model assumes {assumed}")
    return notes


def node_spec_from_facts(name: str, facts: Mapping) -> NodeSpec:
    """What the planner needs of a node from its facts (HostFacts.to_dict(), or only the memory
    for a host without an agent): memory, the chip it reports, and its GPU limit (none on a
    node that reports another OS than macOS: MLX runs there without Metal)."""
    total = int(facts.get("memory_total", 0))
    available = facts.get("memory_available")
    os_name = str(facts.get("os", ""))
    node = NodeSpec(
        name,
        total,
        None if available is None else int(available),
        chip=str(facts.get("chip", "")).strip() or None,
        disk_free=_optional_int(facts.get("disk_free")),
        hf_cache_free=_optional_int(facts.get("hf_cache_free")),
    )
    if os_name and not os_name.startswith("macOS"):
        return node
    limit, source = gpu_limit(
        total, int(facts.get("wired_limit_mb") or 0), int(facts.get("gpu_working_set") or 0)
    )
    return replace(node, gpu_limit=limit, gpu_limit_from=source)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def with_estimated_gpu_limit(node: NodeSpec) -> NodeSpec:
    """A node given by hand (--simulate, hosts.toml memory_gb): its GPU limit estimated."""
    return replace(
        node, gpu_limit=estimated_working_set(node.memory_total), gpu_limit_from=ESTIMATE
    )


# --- expert parallelism -------------------------------------------------------------------------


def plan_experts(
    nodes: list[NodeSpec],
    model: ModelSpec,
    context: int = 4096,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    order: list[str] | None = None,
    counts: list[int] | None = None,
) -> Plan:
    """Routed experts per node (in `order`, else as given) for expert parallelism, or the
    memory of the counts given; see the module docstring for what each node holds."""
    if context < 0 or batch < 1:
        raise ValueError("context must be 0 or more tokens and batch at least 1")
    if not model.num_experts:
        raise ValueError(f"{model.name} has no routed experts: plan a pipeline instead")
    ranked = _in_order(nodes, order)
    if len(ranked) < 2:
        raise ValueError("expert parallelism needs at least 2 nodes")
    if len(ranked) > model.num_experts:
        raise ValueError(
            f"cannot share {model.num_experts} experts over {len(ranked)} nodes: "
            f"use at most {model.num_experts}"
        )

    if counts is not None and (len(counts) != len(ranked) or sum(counts) != model.num_experts):
        raise ValueError(f"experts {counts} are not {model.num_experts} over {len(ranked)} nodes")

    def planned(these: list[NodeSpec]) -> Plan:
        return _plan_experts(these, model, context, batch, headroom, counts)

    return _within_gpu_limits(planned, ranked, headroom)


def _plan_experts(
    ranked: list[NodeSpec],
    model: ModelSpec,
    context: int,
    batch: int,
    headroom: float,
    counts: list[int] | None = None,
) -> Plan:
    kv = model.kv_bytes_per_token_per_layer * context * batch * model.num_layers
    act = activation_bytes_at(model.activation, context, batch)
    fixed = model.replicated_bytes + kv + act
    usable = [n.usable_bytes(headroom) for n in ranked]
    # rank 0 samples, so it drafts: it alone holds the MTP layer
    own = [model.mtp_bytes if r == 0 else 0 for r in range(len(ranked))]
    if counts is None:
        counts = best_expert_counts(
            model.num_experts, model.bytes_per_expert, [fixed + b for b in own], usable
        )
    rows = []
    for r, (node, c) in enumerate(zip(ranked, counts)):
        weights = model.replicated_bytes + own[r] + c * model.bytes_per_expert
        total = weights + kv + act
        rows.append(
            NodePlan(
                rank=r,
                name=node.name,
                first_layer=0,
                layers=model.num_layers,
                weights_bytes=weights,
                kv_bytes=kv,
                total_bytes=total,
                memory_bytes=node.memory_bytes,
                usable_bytes=usable[r],
                free_bytes=usable[r] - total,
                experts=c,
                activation_bytes=act,
                gpu_limit_bytes=node.gpu_limit,
                gpu_limit_from=node.gpu_limit_from,
            )
        )
    shortfalls = {row.name: -row.free_bytes for row in rows if row.free_bytes < 0}
    return Plan(
        model=model.name,
        order=[n.name for n in ranked],
        split=[model.num_layers],
        fits=not shortfalls,
        shortfalls=shortfalls,
        nodes=rows,
        message=_expert_message(rows, shortfalls, fixed),
        context=context,
        batch=batch,
        parallel="expert",
        experts=counts,
        prompt_cache_bytes=prompt_cache_budget([row.free_bytes for row in rows]),
        mtp_bytes=model.mtp_bytes,
    )


def tensor_held_bytes(model: ModelSpec, context: int, ranks: int) -> list[int]:
    """What each rank holds in tensor parallelism: 1/N of the weights and of the KV cache, and
    on rank 0 (which samples and drafts) the whole MTP layer when the launch drafts with it."""
    kv = model.kv_bytes_per_token_per_layer * model.num_layers * context
    held = (model.total_bytes + kv) // ranks
    return [held + (model.mtp_bytes if r == 0 else 0) for r in range(ranks)]


def tensor_prompt_cache_bytes(
    nodes: list[NodeSpec], model: ModelSpec, context: int, headroom: float = DEFAULT_HEADROOM
) -> int:
    """The prompt cache's default budget in tensor parallelism: what tensor_held_bytes leaves
    (as launcher/cluster.py choose_tensor counts it)."""
    held = tensor_held_bytes(model, context, len(nodes))
    free = [n.usable_bytes(headroom) - h for n, h in zip(nodes, held)]
    return prompt_cache_budget(free, activation_bytes_at(model.activation, context))


def best_expert_counts(
    experts: int, per_expert: int, fixed: int | list[int], usable: list[int]
) -> list[int]:
    """Experts per node, each at least one, whose fill ratios (fixed + count x per_expert) /
    usable, sorted from the fullest, are lexicographically smallest: the experts are equal
    items in a row, so the pipeline's exact split deals them. It runs over the nodes in reverse
    so that ties give the first ranks the remainder, as even_split does. fixed: the same on
    every node, or each node's."""
    each = [fixed] * len(usable) if isinstance(fixed, int) else list(fixed)
    reverse = best_split([per_expert] * experts, each[::-1], usable[::-1])
    return reverse[::-1]


def _expert_message(rows: list[NodePlan], shortfalls: dict[str, int], fixed: int) -> str:
    if not shortfalls:
        return "fits"
    small = [row for row in rows if row.usable_bytes < fixed]
    if small:
        who = ", ".join(f"{row.name} ({row.usable_bytes / 1e9:.1f} GB)" for row in small)
        return (
            f"does not fit: {who} cannot hold even the {fixed / 1e9:.1f} GB every node holds "
            "before any expert (all weights but the routed experts, the whole KV cache, "
            "activations): use nodes with more memory, fewer bits or a shorter context"
        )
    parts = [f"node {n} is short by {_gb_short(b)} GB" for n, b in shortfalls.items()]
    return "does not fit: " + ", ".join(parts)


def _gb_short(n: int) -> str:
    """A shortfall in GB to a tenth, at least 0.1 so it never reads 0.0."""
    return f"{max(n / 1e9, 0.1):.1f}"


def _message(rows: list[NodePlan], shortfalls: dict[str, int]) -> str:
    if not shortfalls:
        return "fits"
    parts = []
    for row in rows:
        if row.name in shortfalls:
            why = " (too small for even one layer)" if row.layers == 1 else ""
            parts.append(f"node {row.name} is short by {_gb_short(shortfalls[row.name])} GB{why}")
    return "does not fit: " + ", ".join(parts)


# --- nodes given by hand ------------------------------------------------------------------------

_UNITS = {u: GIB for u in ("", "g", "gb", "gib")} | {u: 2**40 for u in ("t", "tb", "tib")}
# [COUNTx][NAME-]SIZE[UNIT]: "6x192GB", "m3ultra-512", "2xstudio-192"
_GROUP_RE = re.compile(
    r"^(?:(?P<count>\d+)\s*x\s*)?(?:(?P<name>[a-z_][\w.-]*?)-)?"
    r"(?P<size>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)$",
    re.IGNORECASE,
)


def parse_size(text: str) -> int:
    """Bytes in "192GB", "192" or "1.5TB", Apple's units: GB = GiB = 2**30 bytes, TB = 2**40."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip(), re.IGNORECASE)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size such as 192GB or 1.5TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_BYTE_UNITS = {"": 1, "b": 1} | {
    u + s: 2 ** (10 * p)
    for p, u in enumerate(("k", "m", "g", "t"), start=1)
    for s in ("", "b", "ib")
}


def parse_bytes(text: str) -> int:
    """Bytes in "0", "1000000", "512MiB" or "2GB": a bare number is bytes, a unit is Apple's
    (KB = KiB = 2**10 bytes, MB = MiB, GB = GiB, TB = TiB), as for memory sizes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip(), re.IGNORECASE)
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 0, 1000000, 512MiB or 2GB")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_simulate(spec: str) -> list[NodeSpec]:
    """Nodes from "6x192GB", "2x512GB,4x192GB" or "m3ultra-512,m2ultra-192" (sizes in GB as
    Apple sells them). Unnamed nodes are node<rank>; a named group of N is name0..name<N-1>.
    A name that spells an Apple chip ("6xM2Ultra-192GB", "m3ultra-512") also gives the chip."""
    nodes: list[NodeSpec] = []
    for group in spec.split(","):
        m = _GROUP_RE.match(group.strip())
        if not m:
            raise ValueError(
                f"--simulate group {group.strip()!r} is not COUNTxSIZE or NAME-SIZE, "
                "e.g. 6x192GB or 2x512GB,4x192GB or m3ultra-512,m2ultra-192"
            )
        count = int(m.group("count") or 1)
        if count < 1:
            raise ValueError(f"--simulate group {group.strip()!r} needs at least one node")
        size = parse_size(m.group("size") + m.group("unit"))
        name = m.group("name")
        known = chip_of_node_name(name) if name is not None else None
        for i in range(count):
            if name is None:
                label = f"node{len(nodes)}"
            else:
                label = name if count == 1 else f"{name}{i}"
            nodes.append(NodeSpec(label, size, chip=known.name if known else None))
    names = [n.name for n in nodes]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ValueError(f"--simulate names node {twice[0]} twice")
    return nodes


def simulated_nodes(spec: str) -> list[NodeSpec]:
    """parse_simulate's nodes as Macs: each with its GPU limit estimated from its memory."""
    return [with_estimated_gpu_limit(n) for n in parse_simulate(spec)]


# --- plan files ---------------------------------------------------------------------------------


def plan_to_json(p: Plan) -> dict:
    """What `mlxdist plan --json` prints; `mlxdist quantize --plan FILE` reads its "split"."""
    return {
        "model": p.model,
        "parallel": p.parallel,
        "order": list(p.order),
        "split": list(p.split),
        "experts": list(p.experts),
        "fits": p.fits,
        "message": p.message,
        "shortfalls": dict(p.shortfalls),
        "context": p.context,
        "batch": p.batch,
        "dropped": list(p.dropped),
        "notes": list(p.notes),
        "raise_wired": dict(p.raise_wired),
        "prompt_cache_bytes": p.prompt_cache_bytes,
        "mtp_bytes": p.mtp_bytes,
        "nodes": [asdict(row) for row in p.nodes],
    }
