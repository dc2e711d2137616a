"""What each end of one pipeline link expects next, so a decode step can travel without its
control vector.

Rank 0 puts a sequence's next decode step into the ring when that sequence's token comes back,
and tokens come back in the order their steps went out. So, between requests joining and
leaving, the decode steps on a link follow a fixed round: both ends keep the same queue of the
slots whose next step is due, and a plain decode step (one token, no flags beyond SAMPLE, the
link's dtype) for the slot at the head of that queue goes as its hidden state alone. Anything
else goes with its control vector first: as the plain vector when nothing is expected, or as an
escape message the size of a hidden state, marked by two NaN words no arithmetic produces.
A prompt chunk's sequence is expected next (its next chunk or last token follows at once), and
the sequences that ended are named in the next control vector, so an answer's end costs no
message of its own.
"""

from __future__ import annotations

from collections import deque

import mlx.core as mx

# Two NaN bit patterns in float32, and in either 16-bit float read half by half; computed NaNs
# carry the canonical payload, never these.
MAGIC = (0x7FBA7FBA, 0x7FA57FA5)


DONE, BACK, NEXT = 0, 1, 2  # after a step, its sequence: stops, comes round again, goes on now


class Link:
    """One end of a link; the sender and the receiver each update their own copy alike."""

    def __init__(self, hidden: int, words: int):
        self.hidden = hidden
        self.words = words  # int32 words in a control vector
        self.due: deque[int] = deque()  # slots whose next decode step is expected, in order
        self.dtype: mx.Dtype | None = None  # hidden state dtype of the last explicit step
        self.leaving = 0  # sender: slots freed since the last control vector, as a bit mask

    def bare(self, slot: int, length: int, flags: int, dtype: mx.Dtype, plain: int) -> bool:
        """Whether a step may go as its hidden state alone (`plain`: a decode step's flags)."""
        head = self.due[0] if self.due else None
        return head == slot and length == 1 and flags == plain and dtype == self.dtype

    def took(self, slot: int, then: int, dtype: mx.Dtype | None = None) -> None:
        """Both ends, after each step for slot (dtype given when its control vector went)."""
        if dtype is not None:
            self.dtype = dtype
        if slot in self.due:
            self.due.remove(slot)
        if then == DONE or self.dtype is None or not fits(self.hidden, self.dtype, self.words):
            return
        if then == BACK:  # its token comes back after the steps already in the ring
            self.due.append(slot)
        else:  # a prompt chunk: its next chunk or last token follows at once
            self.due.appendleft(slot)

    def left(self, mask: int) -> list[int]:
        """Both ends, when a control vector says which sequences ended: they are due no more."""
        slots = [s for s in range(mask.bit_length()) if mask >> s & 1]
        for s in slots:
            self.took(s, DONE)
        return slots


def escape(words: list[int], hidden: int, dtype: mx.Dtype) -> mx.array:
    """A control vector dressed as one hidden state of the link's dtype."""
    n = hidden * dtype.size // 4
    padded = [*MAGIC, *words] + [0] * (n - len(words) - len(MAGIC))
    return mx.array(padded, dtype=mx.int32).view(dtype).reshape(1, 1, hidden)


def unescape(x: mx.array) -> list[int] | None:
    """The control vector carried by x, or None when x is a hidden state."""
    words = x.reshape(-1).view(mx.int32)
    head = words[: len(MAGIC)].tolist()
    if [w & 0xFFFFFFFF for w in head] != list(MAGIC):
        return None
    return words[len(MAGIC) :].tolist()


def fits(hidden: int, dtype: mx.Dtype, words: int) -> bool:
    """Whether one hidden state has room for the marker and a control vector of `words`."""
    nbytes = hidden * dtype.size
    return nbytes % 4 == 0 and nbytes // 4 >= len(MAGIC) + words
