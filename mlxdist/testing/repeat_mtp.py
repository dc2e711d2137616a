"""An MTP layer that drafts the token just chosen, for tests and benchmarks that need drafts the
model accepts (a random MTP layer's are all rejected) without fitting one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxdist.runtime.stage import load_mtp_layer


def repeat_mtp(src: Path, out: Path) -> Path:
    """A copy of src with `mtp.*` tensors (which the runtime prefers to the checkpoint's own
    layer) made from its MTP layer so that it repeats the token it is given: eh_proj passes the
    token's normed embedding through, the block adds nothing (its output projections are
    zero), and the head is the embedding, whose best match for a token's embedding is that
    token."""
    shutil.copytree(src, out)
    layer = load_mtp_layer(out)
    h = layer.eh_proj.weight.shape[0]
    params = dict(tree_flatten(layer.parameters()))
    params["eh_proj.weight"] = mx.concatenate([mx.eye(h), mx.zeros((h, h))], axis=1)
    for name in (
        "block.self_attn.o_proj.weight",
        "block.mlp.switch_mlp.down_proj.weight",
        "block.mlp.shared_experts.down_proj.weight",
    ):
        params[name] = mx.zeros_like(params[name])
    params["shared_head.head.weight"] = layer.embed_tokens.weight
    tensors = {f"mtp.{k}": v.astype(mx.float32) for k, v in params.items()}
    mx.save_safetensors(str(out / "mtp.safetensors"), tensors, metadata={"format": "mlx"})
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] |= {name: "mtp.safetensors" for name in tensors}
    index.write_text(json.dumps(data, indent=2))
    return out
