"""Expert parallelism: every rank holds every layer but only its own routed experts.

The router, dense MLPs, embeddings and norms are replicated; attention heads and shared experts
are cut over the ranks where they divide (or, as asked, replicated). Each MoE layer computes the
contributions of the rank's experts [lo, hi) and combines them across ranks with one all_sum;
replicated shared experts are added by rank 0 only, so they count exactly once.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx_lm.models.switch_layers import SwitchGLU

from quantize.checkpoint import CheckpointError, inspect_model, layer_of, weight_map
from quantize.nodes import even_split, expert_ranges, node_manifest

from .stage import Stage, build_model, evaluate, read_tensors

_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.")
_STACKED = ".mlp.switch_mlp."
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
    """A DeepSeek MoE layer holding routed experts [lo, hi) of all the router chooses from."""

    def __init__(self, moe: nn.Module, lo: int, hi: int, group: mx.distributed.Group | None):
        super().__init__()
        self.gate = moe.gate
        sw = moe.switch_mlp
        self.switch_mlp = SwitchGLU(sw.gate_proj.input_dims, sw.gate_proj.output_dims, hi - lo)
        if "shared_experts" in moe:
            self.shared_experts = moe.shared_experts
        self._lo, self._hi = lo, hi
        self._group = group
        self._shared_cut = False  # shared experts cut over the group: every rank adds its part
        self.sent = 0  # bytes this rank contributed to all_sum

    def __call__(self, x: mx.array) -> mx.array:
        inds, scores = self.gate(x)
        y = self._local_part(x, inds, scores)
        group = self._group
        first = group is None or group.rank() == 0
        if "shared_experts" in self and (first or self._shared_cut):
            y = y + self.shared_experts(x)
        if group is not None and group.size() > 1:
            self.sent += y.nbytes
            y = mx.distributed.all_sum(y, group=group)
        return y

    def _local_part(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        """The weighted sum over the (token, slot) pairs routed to this rank's experts only."""
        lo, hi = self._lo, self._hi
        k = inds.shape[-1]
        # The router's choice is read back (one sync per layer) so that slots routed elsewhere
        # cost nothing here; measured cheaper than computing them with weight 0.
        flat = np.array(inds.reshape(-1))
        pairs = np.flatnonzero((flat >= lo) & (flat < hi))
        xf = x.reshape(-1, x.shape[-1])
        if xf.shape[0] == 1:  # one token (decode): its local slots, summed, no scatter
            if not pairs.size:
                return mx.zeros_like(x)
            out = self.switch_mlp(xf, mx.array(flat[pairs] - lo)[None])[0]
            w = scores.reshape(-1)[mx.array(pairs)]
            return (out * w[:, None]).sum(axis=0).astype(x.dtype).reshape(x.shape)
        # Summed in float32 and rounded once, as the whole layer sums its slots.
        y = mx.zeros(xf.shape, mx.float32)
        if pairs.size:
            rows = mx.array(pairs // k)
            out = self.switch_mlp(xf[rows], mx.array(flat[pairs] - lo)[:, None])[:, 0]
            w = scores.reshape(-1)[mx.array(pairs)]
            y = y.at[rows].add(out * w[:, None])
        return y.astype(x.dtype).reshape(x.shape)


def shards(model: nn.Module) -> list[ExpertShard]:
    return [m for _, m in model.named_modules() if isinstance(m, ExpertShard)]


def shard_attention(model: nn.Module, group: mx.distributed.Group) -> None:
    """Cuts every layer's attention heads over the group, as mlx-lm's shard() does (one more
    all_sum per layer, after o_proj), and the shared experts' hidden units (summed by the MoE
    layer's own all_sum, so no more traffic). What does not divide by the group's size stays
    replicated; dense MLPs stay replicated."""
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
        if isinstance(moe, ExpertShard) and "shared_experts" in moe:
            shared = moe.shared_experts
            if shared.gate_proj.weight.shape[0] % n:
                continue  # hidden units that do not divide stay replicated, added by rank 0
            shard_inplace(shared.gate_proj, "all-to-sharded", group=group)
            shard_inplace(shared.up_proj, "all-to-sharded", group=group)
            shard_inplace(shared.down_proj, "sharded-to-all", group=group)
            moe._shared_cut = True


def _check_expert_node(path: Path, lo: int, hi: int, num_experts: int) -> bool:
    """True when path is a node folder cut for exactly these experts; refuses any other cut."""
    manifest = node_manifest(path)
    if manifest is None:
        return False
    if manifest.get("parallel") != "expert":
        raise CheckpointError(
            f"{path} was cut for a pipeline split, not for expert parallelism: launch the "
            f"whole model, or cut it again with mlxdist quantize for expert mode"
        )
    held = [int(e) for e in manifest.get("experts", [])]
    if held != [lo, hi] or manifest.get("n_routed_experts") != num_experts:
        raise CheckpointError(
            f"{path} holds experts {held} of {manifest.get('n_routed_experts')}, but this rank "
            f"needs experts [{lo}, {hi}) of {num_experts}: launch with the --experts the folder "
            f"was cut for, or cut it again"
        )
    return True


def read_rows(file: Path, key: str, lo: int, hi: int) -> mx.array:
    """Rows [lo, hi) of a tensor in a safetensors file, reading only those bytes from disk."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[key]
        np_dtype, view = _DTYPES[entry["dtype"]]
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
        row = (end - begin) // shape[0]
        f.seek(8 + n + begin + lo * row)
        data = np.fromfile(f, dtype=np_dtype, count=(hi - lo) * row // np.dtype(np_dtype).itemsize)
    out = mx.array(data.reshape([hi - lo, *shape[1:]]))
    return out.view(view) if view is not None else out


def _keep(key: str, num_layers: int, lo: int, hi: int) -> bool:
    layer = layer_of(key)
    if layer is not None and layer >= num_layers:
        return False  # R1's multi-token-prediction layer
    m = _EXPERT_RE.search(key)
    return m is None or lo <= int(m.group(1)) < hi


def _renumber(key: str, lo: int) -> str:
    m = _EXPERT_RE.search(key)
    if m is None:
        return key
    return f"{key[: m.start()]}.mlp.experts.{int(m.group(1)) - lo}.{key[m.end() :]}"


def load_expert_stage(
    path: str | Path,
    counts: list[int] | None,
    rank: int,
    size: int,
    group: mx.distributed.Group | None = None,
    dtype: mx.Dtype | None = None,
    attention: str = "sharded",
) -> Stage:
    """Every layer, with routed experts [lo, hi) of rank's share only, read alone from disk.
    attention "sharded" (measured faster) also cuts attention heads and shared experts over
    the group where they divide; "replicated" keeps them whole on every rank."""
    info = inspect_model(path)
    path, config = info.path, info.config
    num_experts = config.get("n_routed_experts")
    if not num_experts:
        raise CheckpointError(f"{path} has no routed experts: use --parallel pipeline or tensor")
    try:
        lo, hi = expert_ranges(num_experts, counts or even_split(num_experts, size))[rank]
    except ValueError as e:
        raise CheckpointError(f"--experts: {e}") from None
    presliced = _check_expert_node(path, lo, hi, num_experts)
    num_layers = info.num_layers

    def keep(k: str) -> bool:
        return _keep(k, num_layers, lo, hi) and (presliced or _STACKED not in k)

    # Per-expert tensors (R1's format) are renumbered from 0; stacked ones are read by rows.
    weights = {_renumber(k, lo): v for k, v in read_tensors(path, keep).items()}
    if not presliced:
        for k, f in weight_map(path).items():
            if _STACKED in k and _keep(k, num_layers, lo, hi):
                weights[k] = read_rows(path / f, k, lo, hi)

    def prepare(model: nn.Module) -> None:
        # sanitize stacks experts 0..n_routed_experts-1: here, the ones this rank holds.
        model.args.n_routed_experts = hi - lo
        for layer in model.model.layers:
            if hasattr(layer.mlp, "switch_mlp"):
                layer.mlp = ExpertShard(layer.mlp, lo, hi, group)

    model = build_model(config, weights, prepare)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if attention == "sharded" and group is not None and group.size() > 1:
        shard_attention(model, group)
    evaluate(model, config, model.model.layers, dtype)
    return Stage(model, config, 0, num_layers, True, True, experts=(lo, hi))
