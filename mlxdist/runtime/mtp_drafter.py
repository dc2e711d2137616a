"""Drafting with R1's multi-token-prediction layer, on the rank that holds the head.

The MTP layer sees pairs: the main model's last hidden state at position i (after its final norm,
as R1's MTP was trained and vLLM feeds it) and the token at i+1, and predicts the token at i+2.
Its own KV cache holds one position per pair, and only real pairs: a pair is fed once the token
after its position is known (a prompt token, a sampled token, an accepted draft), never for a
rejected draft, so the cache needs no rollback when drafts fail.

After each step that samples, the pair (last real hidden state, token just sampled) gives the
first draft. More drafts chain the layer on its own output (its hidden state after its head's
norm for the next position, the draft just made as the token), as engines do with R1's one MTP
module; those chained positions are dropped from its cache right after: they are not real pairs.

Drafts are the layer's argmax: a drafter that proposes one token with certainty, which the
acceptance rule checks exactly (`speculative.verify` with no drafter distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from mlxdist.runtime.speculative import read_reply
from mlxdist.runtime.step import DRAFT, VERIFY, Step
from quantize.mtp_layer import MTPLayer


@dataclass
class _Slot:
    cache: list = field(default_factory=lambda: [KVCache()])
    # The last hidden state of a step that sampled nothing (a prompt chunk): its pair waits for
    # the next step's first token.
    pending: mx.array | None = None


class MTPDrafter:
    def __init__(
        self, layer: MTPLayer, k: int, lm_head: nn.Module | None = None, norm=None
    ) -> None:
        self.layer = layer
        self.k = k  # drafts made after each sampled token
        self.lm_head = lm_head  # the model's, when the layer shares it
        self.norm = norm if norm is not None else (lambda h: h)  # the model's final norm
        self.slots: dict[int, _Slot] = {}

    def start(self, slot: int) -> None:
        """A new sequence in slot: an empty cache (a prefix the main caches start from is not
        seen by the layer: only acceptance, never the answer, depends on it)."""
        self.slots[slot] = _Slot()

    def drop(self, slot: int) -> None:
        self.slots.pop(slot, None)

    def feed(self, slot: int, hidden: mx.array, ids: list[int], after: int | None) -> list[int]:
        """One step's real positions: hidden (1, m, H) the stage's output (before the final norm,
        which the layer's input gets here), ids their m input tokens, after the token sampled
        after them (None when the step sampled nothing). Returns k drafts of the tokens after
        `after` (none when after is None)."""
        state = self.slots.setdefault(slot, _Slot())
        hidden = self.norm(hidden)
        rows, tokens = hidden[0], list(ids[1:])
        if after is not None:
            tokens.append(after)
        else:
            rows = rows[:-1]
        if state.pending is not None:
            rows = mx.concatenate([state.pending, rows])
            tokens.insert(0, ids[0])
        state.pending = None if after is not None else hidden[0, -1:]
        if not tokens:
            return []
        out = self._run(rows[None], mx.array([tokens]), state.cache)
        if after is None:
            mx.eval([c.state for c in state.cache])
            return []
        return self._chain(out[:, -1:, :], state.cache)

    def _run(self, hidden: mx.array, tokens: mx.array, cache: list) -> mx.array:
        mask = create_attention_mask(hidden, cache[0], return_array=True)
        return self.layer(hidden, tokens, mask, cache[0])

    def _chain(self, x: mx.array, cache: list) -> list[int]:
        drafts = []
        for i in range(self.k):
            normed = self.layer.shared_head.norm(x)
            token = mx.argmax(self.layer.head(normed, self.lm_head), axis=-1)  # (1, 1)
            drafts.append(token)
            if i + 1 < self.k:
                x = self._run(normed, token, cache)
        out = mx.concatenate(drafts, axis=1).reshape(-1)
        mx.eval(out, [c.state for c in cache])
        if self.k > 1:
            cache[0].trim(self.k - 1)  # the chained positions were drafts, not real pairs
        return out.tolist()


def with_drafts(
    drafter: MTPDrafter | None, k: int, step: Step, ids: list[int], h: mx.array, out: mx.array
) -> mx.array:
    """The drafting rank's reply to a DRAFT step: its token reply, then k drafts, the layer fed
    the step's real positions (a VERIFY step's: its first token and the drafts accepted).
    Without a drafter (not loaded on this rank) the reply keeps its agreed size."""
    tokens, _ = read_reply(out, step.flags & ~DRAFT, step.length)
    m = len(tokens) if step.flags & VERIFY else step.length
    if drafter is None:
        drafts = [tokens[-1]] * k
    else:
        drafts = drafter.feed(step.slot, h[:, :m], ids[:m], tokens[-1])
    return mx.concatenate([out.reshape(-1), mx.array(drafts, mx.int32)])
