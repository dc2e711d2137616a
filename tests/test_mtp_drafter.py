"""The MTP drafter's bookkeeping (tiny-r1's layer, random: only the mechanics are checked): fed a
sequence in prompt chunks and speculative steps with rejected drafts, its cache and drafts equal
those of the layer run once over the sequence's real pairs (hidden state at i after the model's
final norm, token at i+1)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from mlxdist.runtime.mtp_drafter import MTPDrafter
from mlxdist.runtime.stage import load_mtp_layer, load_stage


@pytest.fixture(scope="module")
def parts(tiny_r1):
    stage = load_stage(tiny_r1, [4], 0)
    return stage, load_mtp_layer(tiny_r1)


def _hidden(stage, tokens: list[int]) -> mx.array:
    return stage.forward(stage.embed(mx.array([tokens])), stage.make_cache())


def test_no_mtp_layer_is_none(tiny_r1_no_mtp):
    assert load_mtp_layer(tiny_r1_no_mtp) is None


@pytest.mark.parametrize("k", [1, 3])
def test_chunks_and_rejections_leave_only_real_pairs(parts, k):
    stage, layer = parts
    head = stage.model.lm_head
    answer = [40, 41, 42, 43, 44, 45, 46]
    prompt = list(range(3, 13))
    sequence = prompt + answer
    h = _hidden(stage, sequence)  # causal: each position's state as in any split into steps
    drafter = MTPDrafter(layer, k, head, stage.inner.norm)
    drafter.start(1)
    # the prompt in two chunks; its last chunk samples answer[0]
    assert drafter.feed(1, h[:, :6], sequence[:6], None) == []
    drafts = drafter.feed(1, h[:, 6:10], sequence[6:10], answer[0])
    assert len(drafts) == k
    # a VERIFY step over [answer[0], answer[1], wrong...]: one accepted, the rest rejected, then
    # answer[2] follows; the real positions are answer[0] and answer[1]
    drafter.feed(1, h[:, 10:12], sequence[10:12], answer[2])
    # a plain step over answer[2], then answer[3] follows
    last = drafter.feed(1, h[:, 12:13], sequence[12:13], answer[3])
    cache = drafter.slots[1].cache[0]

    # at once: pairs (h_i, token i+1) for every position up to answer[2]'s
    whole = KVCache()
    pairs = stage.inner.norm(h[:, :13])  # the layer reads the model's states after its norm
    tokens = mx.array([sequence[1:14]])
    x = layer(pairs, tokens, create_attention_mask(pairs, whole, return_array=True), whole)
    assert cache.offset == whole.offset == 13
    keys, want = cache.state[0], whole.state[0]
    assert mx.allclose(keys[..., :13, :], want[..., :13, :], atol=1e-5).item()
    assert last[0] == mx.argmax(layer.logits(x[:, -1:, :], head), axis=-1).item()
    # chained drafts: the layer's own state after its head's norm, and the draft just made
    x, chain = x[:, -1:, :], []
    for d in last[:-1]:
        normed = layer.shared_head.norm(x)
        x = layer(normed, mx.array([[d]]), None, whole)
        chain.append(mx.argmax(layer.logits(x, head), axis=-1).item())
    assert last[1:] == chain

    drafter.drop(1)
    assert 1 not in drafter.slots
