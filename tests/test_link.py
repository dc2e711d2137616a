"""The pipeline link's foresight (pure): which steps go as hidden states alone, and the escape
message that carries a control vector where a hidden state is expected."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxdist.runtime.link import BACK, DONE, NEXT, Link, escape, fits, unescape

SAMPLE = 2  # the pipeline's decode flags
F32 = mx.float32

# (events, the steps that go bare): an event is (slot, length, flags) for a step, or
# ("end", slot) for an answer that ends. Prompt chunks have flags 0 (1 = NEW), last tokens and
# decode steps SAMPLE.
CASES = [
    ("one answer alone", [(1, 5, 1), (1, 1, 2), (1, 1, 2), (1, 1, 2)], [1, 2, 3]),
    ("a one-token prompt carries its sampler: explicit", [(1, 1, 3), (1, 1, 2)], [1]),
    (
        "two answers take turns",
        [(1, 4, 1), (1, 1, 2), (2, 4, 1), (2, 1, 2), (1, 1, 2), (2, 1, 2), (1, 1, 2)],
        [1, 3, 4, 5, 6],
    ),
    (
        "an answer ends while another goes on: the next step is explicit, once",
        [(1, 1, 3), (2, 1, 3), (1, 1, 2), ("end", 2), (1, 1, 2), (1, 1, 2)],
        [2, 5],
    ),
    (
        "a long prompt: every chunk explicit, its last token bare",
        [(1, 8, 1), (1, 8, 0), (1, 1, 2), (1, 1, 2)],
        [2, 3],
    ),
    ("logits run alone: never foreseen", [(0, 6, 5), (0, 6, 5)], []),
    (
        "out of turn: explicit, and the round follows the new order",
        [(1, 1, 3), (2, 1, 3), (2, 1, 2), (1, 1, 2), (2, 1, 2)],
        [3, 4],
    ),
]


def _then(flags: int) -> int:
    return BACK if flags & SAMPLE else DONE if flags & 4 else NEXT


@pytest.mark.parametrize("name,events,bare", CASES, ids=[c[0] for c in CASES])
def test_both_ends_foresee_the_same_steps(name, events, bare):
    sender, receiver = Link(64, 9), Link(64, 9)
    went_bare = []
    for i, event in enumerate(events):
        if event[0] == "end":
            sender.leaving |= 1 << event[1]
            continue
        slot, length, flags = event
        if sender.bare(slot, length, flags, F32, SAMPLE):
            went_bare.append(i)
            assert receiver.due[0] == slot  # the receiver takes a bare hidden state as this
            sender.took(slot, BACK)
            receiver.took(slot, BACK)
        else:
            mask, sender.leaving = sender.leaving, 0
            for link in (sender, receiver):
                link.left(mask)
                link.took(slot, _then(flags), F32)
        assert sender.due == receiver.due
    assert went_bare == bare


def test_ended_answers_are_named_in_the_next_control_vector():
    link = Link(64, 9)
    for slot in (1, 3, 4):
        link.took(slot, BACK, F32)
    assert link.left(1 << 3 | 1 << 1) == [1, 3]
    assert list(link.due) == [4]


def test_no_foresight_when_a_hidden_state_cannot_hold_a_control_vector():
    link = Link(5, 9)  # 5 float32 values: too small for the marker and 9 words
    link.took(1, BACK, F32)
    assert not link.due and not link.bare(1, 1, SAMPLE, F32, SAMPLE)
    assert not fits(7, mx.bfloat16, 1)  # 14 bytes: not whole words
    assert fits(22, mx.bfloat16, 9)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_escape_carries_a_control_vector_and_hidden_states_are_not_taken_for_one(dtype):
    words = [1, 7, 2, 0, -1, 123456789, -5, 15, 1 << 30]
    x = escape(words, 64, dtype)
    assert x.shape == (1, 1, 64) and x.dtype == dtype
    assert unescape(x)[: len(words)] == words
    hidden = mx.random.normal((1, 1, 64)).astype(dtype) * 50
    assert unescape(hidden) is None
    nans = mx.full((1, 1, 64), float("nan"), dtype)  # a broken model's NaNs are not the marker
    assert unescape(nans) is None
