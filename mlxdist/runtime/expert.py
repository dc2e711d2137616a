"""Expert parallelism: every rank holds every layer but only its own routed experts.

The router, embeddings and norms are replicated; attention heads and dense MLPs are cut over the
ranks where they divide (or, as asked, kept whole). Each MoE layer computes the contributions of
the rank's experts (a few of every group, see quantize.nodes.expert_sets) and combines them
across ranks with one all_sum.

A token's routed slots rarely split evenly over the ranks, and the all_sum waits for the busiest.
So every rank holds the shared experts whole, in N pieces, and each token's pieces go to the
ranks with the fewest routed slots (every rank runs the router, so all agree without a word);
replicated shared experts are otherwise added by rank 0 alone, so they count exactly once.

That tuned layer is DeepSeek-V3's (R1's). Every other family keeps its own MoE block (router,
top-k, scoring, bias, shared experts, weighted sum) and has only its SwitchGLU / SwitchMLP
swapped for LocalExperts: the rank's experts fill their slots of the [..., k, hidden] output,
the others stay zero, and one all_sum fills every slot before the family weighs them; its
attention and shared experts are replicated.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from launcher.modes import EXPERT_FAMILIES
from mlxdist.runtime.stage import Stage, build_model, evaluate, read_tensors
from quantize.checkpoint import (
    CheckpointError,
    code_family,
    inspect_model,
    layer_of,
    safetensors_layout,
    weight_map,
)
from quantize.mtp import is_mtp
from quantize.nodes import (
    EXPERT_COUNT_KEYS,
    check_placement,
    even_split,
    model_expert_sets,
    node_manifest,
    routed_experts,
    row_runs,
    spans,
)

# One routed expert's tensor (DeepSeek's mlp.experts.E., MiniMax's block_sparse_moe.experts.E.)
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
# Experts stacked along axis 0 (mlx-lm's switch_mlp, gpt-oss's experts.gate_up_proj_blocks)
_STACKED_RE = re.compile(r"\.(switch_mlp|experts)\.(?!\d)")
# Families run by ExpertShard (shared experts in pieces, MLA heads cut), measured on R1; every
# other family by its own MoE block around LocalExperts.
_TUNED = {"deepseek_v3"}
# safetensors dtype -> (numpy dtype of the same width, MLX dtype to view it as, if different)
_DTYPES = {
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, None),
    "I32": (np.int32, None),
    "U8": (np.uint8, None),
    "F8_E4M3": (np.uint8, None),
}


class ExpertShard(nn.Module):
    """A DeepSeek MoE layer holding some of the routed experts the router chooses from."""

    def __init__(
        self,
        moe: nn.Module,
        sets: list[list[int]],
        rank: int,
        group: mx.distributed.Group | None,
    ):
        super().__init__()
        self.gate = moe.gate
        sw = moe.switch_mlp
        held = sets[rank]
        self.switch_mlp = SwitchGLU(sw.gate_proj.input_dims, sw.gate_proj.output_dims, len(held))
        if "shared_experts" in moe:
            self.shared_experts = moe.shared_experts
        num = sum(len(h) for h in sets)
        self._owner = np.zeros(num, np.int64)  # expert -> the rank that holds it
        self._local = np.zeros(num, np.int64)  # expert -> its row among its rank's
        for r, h in enumerate(sets):
            self._owner[h] = r
            self._local[h] = np.arange(len(h))
        self._ranks = len(sets)
        self._expert_hidden = sw.gate_proj.output_dims
        self._k = moe.num_experts_per_tok
        self._rank = rank
        self._group = group
        self.sent = 0  # bytes this rank contributed to all_sum

    def split_shared(self, n: int) -> None:
        """Holds the shared experts as n pieces of their hidden units, handed out per token."""
        whole = self.shared_experts
        # a piece's work per token, in routed experts' worth (R1: 1 shared expert, 1/n each)
        self._piece_weight = whole.gate_proj.weight.shape[0] / self._expert_hidden / n
        self.pieces = []
        for j in range(n):
            piece = copy.deepcopy(whole)
            part = _Part(j, n)
            shard_inplace(piece.gate_proj, "all-to-sharded", group=part)
            shard_inplace(piece.up_proj, "all-to-sharded", group=part)
            shard_inplace(piece.down_proj, "sharded-to-all", group=part)
            self.pieces.append(piece)
        del self.shared_experts

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.gate(x)
        y, flat = self._local_part(x, inds, scores)
        group = self._group
        if "pieces" in self:
            for j in self._my_pieces(flat):
                y = y + self.pieces[j](x)
        elif "shared_experts" in self and self._rank == 0:
            y = y + self.shared_experts(x)
        if group is not None and group.size() > 1:
            self.sent += y.nbytes
            y = mx.distributed.all_sum(y, group=group)
        return y

    def _my_pieces(self, flat: np.ndarray) -> list[int]:
        """The shared pieces this rank computes: each in turn to the rank with the least work
        so far (its routed slots, plus the pieces already given it, each worth its share of
        hidden units against a routed expert's), ties to the piece's own rank. Every rank
        reaches the same answer from the same router output."""
        n = len(self.pieces)
        load = np.bincount(self._owner[flat], minlength=self._ranks).astype(float).tolist()
        weight = flat.size // self._k * self._piece_weight
        mine = []
        for j in range(n):
            least = min(load)
            r = j if load[j] == least else load.index(least)
            load[r] += weight
            if r == self._rank:
                mine.append(j)
        return mine

    def _local_part(
        self, x: mx.array, inds: mx.array, scores: mx.array
    ) -> tuple[mx.array, np.ndarray]:
        """The weighted sum over the (token, slot) pairs routed to this rank's experts only,
        and the router's choice read back."""
        k = inds.shape[-1]
        # The router's choice is read back (one sync per layer) so that slots routed elsewhere
        # cost nothing here; measured cheaper than computing them with weight 0.
        flat = np.array(inds.reshape(-1))
        pairs = np.flatnonzero(self._owner[flat] == self._rank)
        rows_of = self._local[flat[pairs]]
        xf = x.reshape(-1, x.shape[-1])
        if xf.shape[0] == 1:  # one token (decode): its local slots, summed, no scatter
            if not pairs.size:
                return mx.zeros_like(x), flat
            out = self.switch_mlp(xf, mx.array(rows_of)[None])[0]
            w = scores.reshape(-1)[mx.array(pairs)]
            return (out * w[:, None]).sum(axis=0).astype(x.dtype).reshape(x.shape), flat
        # Summed in float32 and rounded once, as the whole layer sums its slots.
        y = mx.zeros(xf.shape, mx.float32)
        if pairs.size:
            rows = mx.array(pairs // k)
            out = self.switch_mlp(xf[rows], mx.array(rows_of)[:, None])[:, 0]
            w = scores.reshape(-1)[mx.array(pairs)]
            y = y.at[rows].add(out * w[:, None])
        return y.astype(x.dtype).reshape(x.shape), flat


class LocalExperts(nn.Module):
    """A family's SwitchGLU or SwitchMLP holding only this rank's routed experts, under the same
    parameter names. Called as the switch is, (x, indices) -> [..., k, output]: the slots routed
    to this rank's experts computed, the rest zero, then one all_sum fills them all (x + 0 is
    exact, so the family's weighted sum sees what one process computes)."""

    def __init__(
        self,
        switch: nn.Module,
        sets: list[list[int]],
        rank: int,
        group: mx.distributed.Group | None,
    ):
        super().__init__()
        held = len(sets[rank])
        for name, child in switch.children().items():
            setattr(self, name, child)
        # Only the rank's rows: load_weights fills them (the random full ones are never computed).
        self.update(tree_map(lambda p: p[:held], self.parameters()))
        self._run = type(switch).__call__  # the switch's own computation, on these children
        num = sum(len(h) for h in sets)
        self._owner = np.zeros(num, np.int64)
        self._local = np.zeros(num, np.int64)
        for r, h in enumerate(sets):
            self._owner[h] = r
            self._local[h] = np.arange(len(h))
        self._rank = rank
        self._group = group
        self.sent = 0  # bytes this rank contributed to all_sum

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        flat = np.array(indices.reshape(-1))  # read back: slots routed elsewhere cost nothing
        pairs = np.flatnonzero(self._owner[flat] == self._rank)
        xf = x.reshape(-1, x.shape[-1])
        if pairs.size:
            rows = mx.array(self._local[flat[pairs]])[:, None]
            out = self._run(self, xf[mx.array(pairs // k)], rows)[:, 0]
        else:  # one row's work, for the output's width and dtype, which every rank must share
            out = self._run(self, xf[:1], mx.zeros((1, 1), mx.uint32))[:0, 0]
        y = mx.zeros((flat.size, out.shape[-1]), out.dtype)
        if pairs.size:
            y = y.at[mx.array(pairs)].add(out)
        group = self._group
        if group is not None and group.size() > 1:
            self.sent += y.nbytes
            y = mx.distributed.all_sum(y, group=group)
        return y.reshape(*indices.shape, -1)


def localize_experts(
    model: nn.Module, sets: list[list[int]], rank: int, group: mx.distributed.Group | None
) -> int:
    """Swaps every layer's SwitchGLU / SwitchMLP, wherever its family keeps it, for LocalExperts;
    how many were swapped."""
    swapped = 0
    for layer in model.model.layers:
        found = [(p, m) for p, m in layer.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]
        for path, switch in found:
            *parents, name = path.split(".")
            parent = layer
            for part in parents:
                parent = getattr(parent, part)
            setattr(parent, name, LocalExperts(switch, sets, rank, group))
            swapped += 1
    return swapped


def _set_expert_count(args: object, count: int) -> None:
    """The model's own count of routed experts, which its sanitize stacks, set to count."""
    for key in EXPERT_COUNT_KEYS:
        if getattr(args, key, None):
            setattr(args, key, count)


class _Part:
    """Piece j of n, in the shape of a group for mlx's shard_inplace (which asks only these)."""

    def __init__(self, j: int, n: int):
        self._j, self._n = j, n

    def rank(self) -> int:
        return self._j

    def size(self) -> int:
        return self._n


def shards(model: nn.Module) -> list[ExpertShard | LocalExperts]:
    kinds = (ExpertShard, LocalExperts)
    return [m for _, m in model.named_modules() if isinstance(m, kinds)]


def shard_attention(model: nn.Module, group: mx.distributed.Group) -> None:
    """Cuts every layer's attention heads and dense MLP over the group, as mlx-lm's shard()
    does (one more all_sum per layer). What does not divide by the group's size stays whole."""
    n, r = group.size(), group.rank()
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.num_heads % n == 0:
            if attn.q_lora_rank is None:
                attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
            else:
                attn.q_b_proj = shard_linear(attn.q_b_proj, "all-to-sharded", group=group)
            attn.num_heads //= n
            heads = slice(r * attn.num_heads, (r + 1) * attn.num_heads)
            attn.embed_q.apply(lambda w, heads=heads: w[heads])
            attn.unembed_out.apply(lambda w, heads=heads: w[heads])
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        moe = layer.mlp
        if not isinstance(moe, ExpertShard):  # a dense MLP (R1's first 3 layers): as mlx-lm
            if moe.gate_proj.weight.shape[0] % n == 0:
                moe.gate_proj = shard_linear(moe.gate_proj, "all-to-sharded", group=group)
                moe.up_proj = shard_linear(moe.up_proj, "all-to-sharded", group=group)
                moe.down_proj = shard_linear(moe.down_proj, "sharded-to-all", group=group)


def split_shared(model: nn.Module, n: int) -> None:
    """Holds each MoE layer's shared experts in n pieces handed out per token (summed by the
    layer's own all_sum, so no more traffic); whole where they do not divide, added by rank 0."""
    for moe in shards(model):
        if not isinstance(moe, ExpertShard) or "shared_experts" not in moe:
            continue
        if moe.shared_experts.gate_proj.weight.shape[0] % n == 0:
            moe.split_shared(n)


def _check_expert_node(path: Path, held: list[int], num_experts: int) -> bool:
    """True when path is a node folder cut for exactly these experts; refuses any other cut."""
    manifest = node_manifest(path)
    if manifest is None:
        return False
    if manifest.get("parallel") != "expert":
        raise CheckpointError(
            f"{path} was cut for a pipeline split, not for expert parallelism: launch the "
            f"whole model, or cut it again with mlxdist quantize for expert mode"
        )
    check_placement(path, manifest)
    cut = [int(e) for e in manifest.get("experts", [])]
    if cut != held or manifest.get("n_routed_experts") != num_experts:
        raise CheckpointError(
            f"{path} holds experts {spans(cut)} of {manifest.get('n_routed_experts')}, but this "
            f"rank needs experts {spans(held)} of {num_experts}: launch with the --experts the "
            f"folder was cut for, or cut it again"
        )
    return True


def read_rows(file: Path, key: str, rows: list[int]) -> mx.array:
    """Rows of a tensor in a safetensors file (ascending), reading only those bytes from disk."""
    data_start, header = safetensors_layout(file)
    entry = header[key]
    np_dtype, view = _DTYPES[entry["dtype"]]
    shape = entry["shape"]
    begin, end = entry["data_offsets"]
    row = (end - begin) // shape[0]
    parts = []
    with open(file, "rb") as f:
        for first, count in row_runs(rows):
            f.seek(data_start + begin + first * row)
            count_items = count * row // np.dtype(np_dtype).itemsize
            parts.append(np.fromfile(f, dtype=np_dtype, count=count_items))
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    out = mx.array(data.reshape([len(rows), *shape[1:]]))
    return out.view(view) if view is not None else out


def _keep(key: str, num_layers: int, local: dict[int, int]) -> bool:
    layer = layer_of(key)
    if (layer is not None and layer >= num_layers) or is_mtp(key):
        return False  # R1's multi-token-prediction layer (mtp.*: loaded apart, by rank 0)
    m = _EXPERT_RE.search(key)
    return m is None or int(m.group(1)) in local


def _renumber(key: str, local: dict[int, int]) -> str:
    m = _EXPERT_RE.search(key)
    if m is None:
        return key
    return f"{key[: m.start()]}.experts.{local[int(m.group(1))]}.{key[m.end() :]}"


def load_expert_stage(
    path: str | Path,
    counts: list[int] | None,
    rank: int,
    size: int,
    group: mx.distributed.Group | None = None,
    dtype: mx.Dtype | None = None,
    attention: str = "sharded",
) -> Stage:
    """Every layer, with rank's share of the routed experts only, read alone from disk.
    For DeepSeek-V3, attention "sharded" (measured faster) also cuts attention heads and shared
    experts over the group where they divide; "replicated" keeps them whole on every rank. Other
    families keep them whole (their own modules, replicated)."""
    info = inspect_model(path)
    path, config = info.path, info.config
    num_experts = routed_experts(config)
    if not num_experts:
        raise CheckpointError(f"{path} has no routed experts: use --parallel pipeline or tensor")
    tuned = code_family(config) in _TUNED
    try:
        sets = model_expert_sets(config, counts or even_split(num_experts, size))
    except ValueError as e:
        raise CheckpointError(f"--experts: {e}") from None
    held = sets[rank]
    local = {e: i for i, e in enumerate(held)}
    presliced = _check_expert_node(path, held, num_experts)
    num_layers = info.num_layers

    def keep(k: str) -> bool:
        return _keep(k, num_layers, local) and (presliced or not _STACKED_RE.search(k))

    # Per-expert tensors (R1's format) are renumbered from 0 (a node folder's, already are);
    # stacked ones are read by rows.
    weights = read_tensors(path, keep)
    if not presliced:
        weights = {_renumber(k, local): v for k, v in weights.items()}
        for k, f in weight_map(path).items():
            if _STACKED_RE.search(k) and _keep(k, num_layers, local):
                weights[k] = read_rows(path / f, k, held)

    def prepare(model: nn.Module) -> None:
        # sanitize stacks experts 0..count-1: here, the ones this rank holds.
        _set_expert_count(model.args, len(held))
        if not tuned:
            if not localize_experts(model, sets, rank, group):
                raise CheckpointError(
                    f"expert mode cannot split {config['model_type']}: its mlx-lm model has no "
                    f"SwitchGLU or SwitchMLP experts (it runs {', '.join(EXPERT_FAMILIES)}): "
                    f"use --parallel pipeline"
                )
            return
        for layer in model.model.layers:
            if hasattr(layer.mlp, "switch_mlp"):
                layer.mlp = ExpertShard(layer.mlp, sets, rank, group)

    model = build_model(config, weights, prepare)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if tuned and group is not None and group.size() > 1:
        split_shared(model, group.size())
        if attention == "sharded":
            shard_attention(model, group)
    evaluate(model, config, model.model.layers, dtype)
    return Stage(model, config, 0, num_layers, True, experts=tuple(held))
