"""R1's multi-token-prediction (MTP) layer: its tensors' names in a checkpoint and in mlxdist's
MLX folders, and which folders can draft with it. No MLX here (the planner and the agents read
these rules); the module that runs the layer is quantize/mtp_layer.py.

DeepSeek-V3 and R1 ship, after their decoder layers, one more layer (checkpoint index
num_hidden_layers, 61 for R1) trained to predict the token after next (the V3 report, section
2.2): the normed hidden state the main model made at position i and the normed embedding of token
i+1 go through one projection (`eh_proj`, over [embedding; hidden]; the hidden state is the one
after the model's final norm, as the modeling code shipped with R1-0528 MTP checkpoints passes it
and vLLM feeds it), a decoder block like the
model's own (its MoE included), a norm and the head, and give token i+2. R1 stores the layer
with its own copies of the embedding and the head; DeepSeek shares them with the main model, and
the official checkpoint's copies are equal to the main ones.

In an MLX folder the layer's tensors are named `mtp.<part>` (`mtp.enorm.weight`,
`mtp.block.mlp.switch_mlp.gate_proj.weight`, ...): no mlx-lm model has them, so loaders that
know nothing of them leave them alone by prefix. `mtp.shared_head.head` is absent when the
conversion found it equal to the model's `lm_head` (the runtime then uses that).

This module is names and rules only (no MLX: the planner and the agents read it); the module
itself is quantize/mtp_layer.py.
"""

from __future__ import annotations

from .checkpoint import code_family, layer_of

PREFIX = "mtp."
# Families whose MTP layer this module builds, with their decoder layer's class in mlx-lm.
DECODER_LAYERS = {"deepseek_v3": "DeepseekV3DecoderLayer"}
# The layer's own parts; the rest of it is the decoder block.
OWN_PARTS = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head")


def mtp_count(config: dict) -> int:
    """MTP layers the checkpoint declares (R1: 1)."""
    return int(config.get("num_nextn_predict_layers") or 0)


def supports_mtp(config: dict) -> bool:
    return code_family(config) in DECODER_LAYERS and mtp_count(config) > 0


def is_mtp_source(key: str, config: dict) -> bool:
    """A checkpoint tensor of the first MTP layer (the one mlxdist keeps; R1 has only one)."""
    return layer_of(key) == int(config["num_hidden_layers"])


def is_mtp(name: str) -> bool:
    """A tensor of the MTP layer in an MLX folder."""
    return name.startswith(PREFIX)


def mlx_name(sanitized: str) -> str:
    """The MLX name of an MTP tensor as the family's sanitize gives it once the layer is numbered
    0: `model.layers.0.enorm.weight` -> `mtp.enorm.weight`, `model.layers.0.self_attn.x` ->
    `mtp.block.self_attn.x`."""
    head = "model.layers.0."
    if not sanitized.startswith(head):
        raise ValueError(f"{sanitized} is not a tensor of layer 0")
    rest = sanitized[len(head) :]
    return PREFIX + (rest if rest.split(".")[0] in OWN_PARTS else f"block.{rest}")


def mtp_problem(config: dict, tensor_names) -> str | None:
    """Why a model folder (its config.json and tensor names) cannot draft with an MTP layer, in
    one line that says what to do; None when it can."""
    names = list(tensor_names)
    if any(is_mtp(k) for k in names):
        return None
    family = code_family(config)
    if family not in DECODER_LAYERS:
        return (
            f"mlxdist drafts only with DeepSeek-V3/R1's MTP layer, not {family}'s: "
            "use --speculative ngram"
        )
    if not mtp_count(config):
        return "the model has no MTP layer (num_nextn_predict_layers is 0): use --speculative ngram"
    if any(is_mtp_source(k, config) for k in names):
        return None  # the checkpoint's own format: the layer after the decoder layers
    return (
        "this model folder holds no MTP layer: convert the checkpoint with "
        "`mlxdist quantize --keep-mtp`, or use --speculative ngram"
    )
