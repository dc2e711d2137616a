"""R1's multi-token-prediction (MTP) layer: its tensors' names in a checkpoint and in mlxdist's
MLX folders, and the module that runs it.

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
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

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


class SharedHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, eps: float, own_head: bool):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        if own_head:
            self.head = nn.Linear(hidden, vocab, bias=False)


class MTPLayer(nn.Module):
    """One MTP layer. __call__ gives its hidden states; `logits` its predictions."""

    def __init__(self, config: dict, own_head: bool = True):
        super().__init__()
        family = code_family(config)
        if family not in DECODER_LAYERS:
            raise ValueError(f"{family} models have no MTP layer mlxdist can run")
        model_class, args_class = _get_classes(config)
        args = args_class.from_dict(config)
        layer_class = getattr(
            importlib.import_module(model_class.__module__), DECODER_LAYERS[family]
        )
        h, v, eps = args.hidden_size, args.vocab_size, args.rms_norm_eps
        self.embed_tokens = nn.Embedding(v, h)
        self.enorm = nn.RMSNorm(h, eps=eps)
        self.hnorm = nn.RMSNorm(h, eps=eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        # Numbered after the decoder layers, as in the checkpoint: a MoE layer like theirs.
        self.block = layer_class(args, args.num_hidden_layers)
        self.shared_head = SharedHead(h, v, eps, own_head)

    def __call__(self, hidden: mx.array, tokens: mx.array, mask, cache) -> mx.array:
        """hidden: (batch, length, hidden) the main model's last hidden states at positions i,
        after its final norm; tokens: (batch, length) the tokens at i+1."""
        e = self.enorm(self.embed_tokens(tokens))
        x = self.eh_proj(mx.concatenate([e, self.hnorm(hidden)], axis=-1))
        return self.block(x, mask, cache)

    def logits(self, x: mx.array, lm_head: nn.Module | None = None) -> mx.array:
        """The layer's predictions from its hidden states: its head's norm, then its own head,
        or the model's when the conversion found the two equal and kept one."""
        return self.head(self.shared_head.norm(x), lm_head)

    def head(self, normed: mx.array, lm_head: nn.Module | None = None) -> mx.array:
        """The head alone, on states its norm has made."""
        head = self.shared_head.get("head", lm_head)  # modules are dicts of their children
        if head is None:
            raise ValueError("this MTP layer shares the model's head: pass lm_head")
        return head(normed)


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
