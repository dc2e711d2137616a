"""How fast a cluster decodes: predicted tokens/s from memory bandwidth, bytes read per token,
links and the parallel mode. Pure functions; nothing runs a model.

Decoding one token at batch 1 is bound by memory bandwidth: every weight the token touches is read
once. For a mixture of experts that is attention, the shared experts, the dense layers, the router,
`num_experts_per_tok` routed experts per MoE layer and the head; the embeddings are a lookup (one
row). A node reads at `efficiency` x its peak bandwidth; each distributed operation on a token's
path (a pipeline hop, an all_sum) costs a fixed `MESSAGE_OVERHEAD` (GPU work finished and handed
to the network, the framework's dispatch), the link's latency and the message over its bandwidth.

Modes, per token:
- pipeline: the token visits every stage in turn: the sum over stages of the bytes on that stage
  over its bandwidth, plus one message per hop (N hops round the ring, back to rank 0).
- tensor (mlx-lm's `shard()`): every node reads 1/N of each layer's shardable bytes in parallel
  (and all of what `shard()` replicates: MLA's down-projections, the router, norms, the head),
  with two all_sums per layer (after attention and after the MLP).
- expert: attention, shared experts, router and dense layers replicated; each node holds 1/N of
  each layer's routed experts and reads those the router picks there (the busiest node sets the
  pace: the expectation over uniform routing is used); one all_sum per MoE layer.

Calibration, once each, on published figures kept in tests/data/published_figures.json:
- EFFICIENCY: exo 1.0 on one M3 Ultra decodes DeepSeek V3.1 (R1's architecture) at 4 bits at
  21.1 tokens/s; 21.1 x 20.76 GB (R1's bytes per token at 4 bits) / 819 GB/s = 0.535 -> 0.53.
  This is MLX's own 4-bit format at batch 1, what mlxdist runs. (Apple Silicon is often quoted at
  0.6-0.7 of peak for quantised matmuls; an MoE decode also spends time on routing, expert
  gathers and MLA, which this one factor absorbs.)
- MESSAGE_OVERHEAD: exo 1.0 tensor parallel on two M3 Ultras over RDMA, 27.8 tokens/s, with that
  efficiency: the time left after the bytes and the RDMA latency, over the 122 all_sums per
  token: 77 us. It stands for what any distributed operation costs beyond the wire (the GPU's
  queue drained and handed to the network and back), so pipeline hops pay it too.
tests/test_perfmodel.py redoes both from the figures and checks that the constants are theirs.
Every other figure is a check, not a fit.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

from quantize.nodes import active_experts, is_routed_expert_tensor

from .chips import ChipSpec, chip, chip_of_node_name, default_chip
from .planner import ModelSpec, NodeSpec, is_mla, kv_bytes_per_token_per_layer
from .rankspec import PARALLEL

EFFICIENCY = 0.53  # fraction of peak memory bandwidth reached while decoding (see above)
MESSAGE_OVERHEAD = 77e-6  # seconds per distributed operation on the token's path (see above)
GB = 10**9
MODES = PARALLEL  # the modes a launch can run, each predicted


# --- chips and links ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth: float  # bytes/s one message moves at
    latency: float  # seconds per message on the wire and through the network stack
    thunderbolt: int  # the Thunderbolt generation it needs at both ends


# Assumptions, from public figures (none fitted here):
# - TCP over a Thunderbolt bridge (MLX's ring backend): about 300 us per message, the figure exo
#   and Jeff Geerling give for Thunderbolt networking before RDMA ("1.5 TB of VRAM on Mac Studio",
#   2025). Bandwidth: an assumption, well below the 40 / 80 Gb/s signalling rate once TCP/IP
#   runs over it (about 20 Gb/s on TB4 as commonly reported with iperf; TB5 taken at twice
#   that). Messages here are tens of KB, so the bandwidth hardly matters.
# - RDMA over Thunderbolt 5 (JACCL, macOS 26.2+): single-digit microseconds (exo's Alex Cheema:
#   "single digit microseconds"; 5-9 us reported by Stabilise.io); 8 us taken. Bandwidth: up to
#   7.4 GB/s between nodes, as a published TB5/JACCL cluster write-up measured.
# - LAN, the ring over the hosts' own addresses rather than the cables' /30s (no cables reported,
#   ssh hosts, a plan made again after a failure): TCP over 10 Gigabit Ethernet, the port of a
#   Mac Studio (https://www.apple.com/mac-studio/specs/; an assumption: a Mac mini has 1 GbE
#   unless built with 10, a MacBook only Wi-Fi). Bandwidth: 10 Gb/s less TCP/IP and Ethernet
#   framing at a 1500-byte MTU (1448 payload bytes in each 1538 on the wire): 1.18 GB/s.
#   Latency: the 300 us of TCP over Thunderbolt above (Jeff Geerling, https://www.jeffgeerling.com/
#   blog/2025/15-tb-vram-on-mac-studio-rdma-over-thunderbolt-5), which is the TCP/IP stack both
#   share rather than the wire; a switch adds microseconds (an assumption; Wi-Fi: milliseconds).
LINKS: dict[str, LinkSpec] = {
    "tb4": LinkSpec("tb4", 2.5 * GB, 300e-6, 4),
    "tb5": LinkSpec("tb5", 5.0 * GB, 300e-6, 5),
    "rdma": LinkSpec("rdma", 7.4 * GB, 8e-6, 5),
    "lan": LinkSpec("lan", 10e9 / 8 * 1448 / 1538, 300e-6, 0),
}


def node_chip(node: str | ChipSpec | NodeSpec) -> ChipSpec:
    """A node's chip; one that reports no chip, or one not in the table (the planner notes it),
    is taken by its memory (chips.default_chip)."""
    if isinstance(node, NodeSpec):
        known = chip_of_node_name(node.chip) if node.chip else None
        return known or default_chip(node.memory_total)
    return chip(node)


def link(name: str | LinkSpec) -> LinkSpec:
    if isinstance(name, LinkSpec):
        return name
    if name.lower() not in LINKS:
        raise ValueError(f"unknown link {name!r}: use one of {', '.join(LINKS)}")
    return LINKS[name.lower()]


def usable_link(requested: LinkSpec, chips: list[ChipSpec]) -> tuple[LinkSpec, str | None]:
    """The link the chips can use: Thunderbolt 5 or RDMA falls back to TB4 over TCP when a chip
    has only Thunderbolt 4 (as macOS does). Returns the link and why it changed, if it did."""
    oldest = min(c.thunderbolt for c in chips)
    if requested.thunderbolt <= oldest:
        return requested, None
    slow = sorted({c.name for c in chips if c.thunderbolt < requested.thunderbolt})
    return LINKS["tb4"], f"{requested.name} needs Thunderbolt 5; {', '.join(slow)} has 4: tb4"


# --- bytes per token ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBytes:
    attention: int  # self-attention projections and the layer's norms
    mlp: int  # a dense layer's MLP, or an MoE layer's shared experts and router
    routed: int  # the routed experts one token reads (num_experts_per_tok of them); 0 if dense
    experts: int  # routed experts the layer holds; 0 if dense
    replicated: int  # what tensor parallelism (mlx-lm's shard()) leaves whole on every node

    @property
    def read(self) -> int:
        return self.attention + self.mlp + self.routed


@dataclass(frozen=True)
class ActiveBytes:
    """What one decoded token reads, per layer and for the head."""

    layers: list[LayerBytes]
    head: int  # final norm and output projection
    embed_row: int  # one row of the embedding table
    experts_per_token: int
    kv_bytes_per_token_per_layer: int  # the cache each layer reads per token of context
    kv_split_by_heads: bool  # False for MLA, whose compressed cache is not split by heads
    hidden_bytes: int  # one token's hidden state: what a pipeline hop or an all_sum carries

    @property
    def per_layer(self) -> list[int]:
        return [layer.read for layer in self.layers]

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.head + self.embed_row

    def kv_read(self, context: int) -> int:
        """Per layer, at `context` tokens of context."""
        return self.kv_bytes_per_token_per_layer * context


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def bytes_per_token(
    config: dict,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    quantize: bool = True,
) -> ActiveBytes:
    """Built as quantize.estimate does: mlx-lm's model made lazily from config.json alone,
    quantised lazily with the conversion's own predicate (quantize=False: as stored, for a
    folder launched unquantised), each parameter's bytes summed; routed experts (SwitchGLU's
    stacked weights, wherever the family keeps them) count k / experts of their bytes, k the
    experts each token is routed to (active_experts)."""
    from quantize.checkpoint import layer_of
    from quantize.estimate import stored_parameters

    k = active_experts(config)

    n_layers = config["num_hidden_layers"]
    parts = [dict(attention=0, mlp=0, routed=0, experts=0, replicated=0) for _ in range(n_layers)]
    embed = head = 0
    stored = stored_parameters(
        config, bits=bits, group_size=group_size, mode=mode, recipe=recipe, quantize=quantize
    )
    for name, v, n in stored:
        layer = layer_of(name)
        if layer is None:
            if "embed_tokens" in name:
                embed += n
            else:
                head += n
            continue
        if layer >= n_layers:  # multi-token prediction: never read when decoding
            continue
        p = parts[layer]
        if is_routed_expert_tensor(name):
            p["experts"] = v.shape[0]
            p["routed"] += n * min(k, v.shape[0]) // v.shape[0]
        elif ".self_attn." in name:
            p["attention"] += n
            if _replicated_by_shard(name):
                p["replicated"] += n
        elif ".mlp." in name or ".block_sparse_moe." in name:  # MiniMax's MoE block
            p["mlp"] += n
            if _replicated_by_shard(name):
                p["replicated"] += n
        else:  # the layer's norms
            p["attention"] += n
            p["replicated"] += n
    vocab = config["vocab_size"]
    act = _DTYPE_BYTES.get(config.get("torch_dtype", ""), 2)
    tied = bool(config.get("tie_word_embeddings", False))
    return ActiveBytes(
        layers=[LayerBytes(**p) for p in parts],
        head=head + (embed if tied else 0),  # a tied head reads the embedding matrix
        embed_row=embed // vocab,
        experts_per_token=k,
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(config),
        kv_split_by_heads=not is_mla(config),
        hidden_bytes=config["hidden_size"] * act,
    )


# Names mlx-lm's shard() does not split: MLA's low-rank down-projections, norms, the MoE router
# (gpt-oss's router, MiniMax's gate and its score bias too).
_REPLICATED = re.compile(
    r"(q_a_proj|kv_a_proj|norm|\.mlp\.gate\.|shared_expert_gate|\.mlp\.router\."
    r"|\.block_sparse_moe\.gate\.|e_score_correction_bias)"
)


def _replicated_by_shard(name: str) -> bool:
    return bool(_REPLICATED.search(name))


# --- the prediction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePrediction:
    rank: int
    chip: str
    layers: int  # pipeline: layers on this stage; tensor/expert: all of them
    bytes_read: int  # per token, on this node
    seconds: float  # reading them: bytes / (bandwidth * efficiency)


@dataclass(frozen=True)
class Prediction:
    mode: str
    link: str
    tokens_per_s: float
    seconds_per_token: float
    compute_seconds: float  # on the token's critical path
    comm_seconds: float
    messages: int  # distributed operations on the token's path
    stages: list[StagePrediction]
    notes: list[str] = field(default_factory=list)


def even_split(layers: int, nodes: int) -> list[int]:
    """As the launcher splits by default: even, the first ranks take the remainder."""
    q, r = divmod(layers, nodes)
    return [q + (1 if i < r else 0) for i in range(nodes)]


def message_seconds(lk: LinkSpec, nbytes: int, overhead: float, steps: int = 1) -> float:
    """One distributed operation: its fixed overhead, then `steps` messages on the link."""
    return overhead + steps * (lk.latency + nbytes / lk.bandwidth)


def predict_decode(
    nodes: list[str | ChipSpec | NodeSpec],
    model: ActiveBytes,
    split: list[int] | None = None,
    mode: str = "pipeline",
    link_name: str | LinkSpec = "tb5",
    context: int = 0,
    efficiency: float = EFFICIENCY,
    overhead: float = MESSAGE_OVERHEAD,
) -> Prediction:
    """Decode tokens/s at batch 1 with `context` tokens already in the cache. `split` (layers per
    node) is the pipeline's, an even split when None; tensor and expert modes split every layer."""
    if not nodes:
        raise ValueError("no nodes to predict for")
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}: use one of {', '.join(MODES)}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], not {efficiency}")
    chips = [node_chip(n) for n in nodes]
    lk, why = usable_link(link(link_name), chips)
    notes = [why] if why else []
    speed = [c.bandwidth * efficiency for c in chips]
    if mode == "pipeline":
        stages, comm, messages = _pipeline(chips, speed, model, split, context, lk, overhead)
        compute = sum(s.seconds for s in stages)
    else:
        fn = _tensor if mode == "tensor" else _expert
        stages, compute, comm, messages = fn(chips, speed, model, context, lk, overhead)
        if len(chips) > 1 and len({c.name for c in chips}) > 1:
            notes.append(f"{mode} parallel runs at the pace of the slowest node")
    total = compute + comm
    return Prediction(
        mode=mode,
        link=lk.name,
        tokens_per_s=1 / total,
        seconds_per_token=total,
        compute_seconds=compute,
        comm_seconds=comm,
        messages=messages,
        stages=stages,
        notes=notes,
    )


def _pipeline(chips, speed, model: ActiveBytes, split, context, lk, overhead):
    n = len(chips)
    split = list(split) if split is not None else even_split(len(model.layers), n)
    if len(split) != n or sum(split) != len(model.layers) or min(split) < 1:
        raise ValueError(
            f"split {split} must give each of {n} nodes at least one of {len(model.layers)} layers"
        )
    stages, start = [], 0
    for r, (c, s, count) in enumerate(zip(chips, speed, split)):
        b = sum(model.per_layer[start : start + count]) + count * model.kv_read(context)
        b += model.embed_row if r == 0 else 0
        b += model.head if r == n - 1 else 0
        stages.append(StagePrediction(r, c.name, count, b, b / s))
        start += count
    hops = n if n > 1 else 0  # forward round the ring, and the token back to rank 0
    return stages, hops * message_seconds(lk, model.hidden_bytes, overhead), hops


def _tensor(chips, speed, model: ActiveBytes, context, lk, overhead):
    n = len(chips)
    kv = model.kv_read(context)
    kv_each = kv / n if model.kv_split_by_heads else kv
    per_node = sum(
        layer.replicated + (layer.read - layer.replicated) / n + kv_each for layer in model.layers
    )
    per_node = int(per_node) + model.head + model.embed_row
    stages = [
        StagePrediction(r, c.name, len(model.layers), per_node, per_node / s)
        for r, (c, s) in enumerate(zip(chips, speed))
    ]
    messages = 2 * len(model.layers) if n > 1 else 0
    # A small all_sum waits on N-1 messages: a ring's steps, or a mesh's peers in turn.
    comm = messages * message_seconds(lk, model.hidden_bytes, overhead, steps=n - 1)
    return stages, max(s.seconds for s in stages), comm, messages


def _expert(chips, speed, model: ActiveBytes, context, lk, overhead):
    n = len(chips)
    kv = model.kv_read(context)
    compute, moe_layers = 0.0, 0
    shared_bytes = [0.0] * n
    routed_bytes = [0.0] * n
    for layer in model.layers:
        for r in range(n):
            shared_bytes[r] += layer.attention + layer.mlp + kv
        if not layer.experts:
            compute += max((layer.attention + layer.mlp + kv) / s for s in speed)
            continue
        moe_layers += 1
        per_expert = layer.routed / model.experts_per_token
        busiest, loads = _expected_busiest(layer.experts, model.experts_per_token, speed)
        for r in range(n):
            routed_bytes[r] += loads[r] * per_expert
        compute += max((layer.attention + layer.mlp + kv) / s for s in speed)
        compute += busiest * per_expert
    edge = model.head + model.embed_row
    compute += max(edge / s for s in speed)
    stages = [
        StagePrediction(
            r,
            c.name,
            len(model.layers),
            int(shared_bytes[r] + routed_bytes[r] + edge),
            (shared_bytes[r] + routed_bytes[r] + edge) / speed[r],
        )
        for r, c in enumerate(chips)
    ]
    messages = moe_layers if n > 1 else 0
    comm = messages * message_seconds(lk, model.hidden_bytes, overhead, steps=n - 1)
    return stages, compute, comm, messages


def _expected_busiest(experts: int, k: int, speed: list[float]) -> tuple[float, list[float]]:
    """Experts dealt out evenly (the first nodes take the remainder), k picked uniformly without
    replacement: E[max over nodes of (picked on node / its speed)] in seconds per expert-byte,
    and each node's expected count. Exact (multivariate hypergeometric) when the number of
    outcomes is small, else the mean load of the slowest node."""
    n = len(speed)
    held = even_split(experts, n)
    mean = [k * h / experts for h in held]
    if n == 1:
        return k / speed[0], mean
    if math.comb(k + n - 1, n - 1) > 200_000:
        return max(m / s for m, s in zip(mean, speed)), mean
    total = math.comb(experts, k)
    expect = 0.0
    for counts in _compositions(k, n):
        if any(c > h for c, h in zip(counts, held)):
            continue
        p = math.prod(math.comb(h, c) for h, c in zip(held, counts)) / total
        expect += p * max(c / s for c, s in zip(counts, speed))
    return expect, mean


def _compositions(k: int, n: int):
    """Every way of writing k as n counts of 0 or more, in order."""
    for bars in itertools.combinations(range(k + n - 1), n - 1):
        prev, out = -1, []
        for b in bars:
            out.append(b - prev - 1)
            prev = b
        out.append(k + n - 1 - prev - 1)
        yield tuple(out)


# --- memory each node holds outside a pipeline ---------------------------------------------------


def held_per_node(spec: ModelSpec, active: ActiveBytes, nodes: int, mode: str) -> int:
    """Weights one node holds in tensor or expert mode (the planner sizes pipeline splits).
    tensor: 1/N of each layer but what shard() replicates; expert: attention, shared experts and
    dense layers whole, 1/N of the routed experts. Embeddings and head on every node."""
    if mode not in ("tensor", "expert"):
        raise ValueError(f"held_per_node is for tensor and expert modes, not {mode!r}")
    held = spec.embed_bytes + spec.tail_bytes
    for layer_bytes, layer in zip(spec.layer_bytes, active.layers):
        if mode == "tensor":
            held += layer.replicated + (layer_bytes - layer.replicated) / nodes
        else:
            whole = layer.attention + layer.mlp
            held += whole + (layer_bytes - whole) / nodes
    return int(held)
