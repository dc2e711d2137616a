"""The module that runs R1's multi-token-prediction layer (names and rules: quantize/mtp.py)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import code_family
from .light_mlx_lm import get_classes
from .mtp import DECODER_LAYERS


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
        model_class, args_class = get_classes(config)
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
