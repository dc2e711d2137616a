"""What every rank needs to know to take one step: a step's flags, the commands, and the
control vector that carries them (the same for pipeline and lock-step runners)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import mlx.core as mx

CMD_STEP, CMD_STOP, CMD_STATS = 1, 2, 3
# The prefix cache's commands: a slot's cache kept as entry `src`, entry `src` dropped.
CMD_KEEP, CMD_EVICT = 4, 5
NEW, SAMPLE, LOGITS = 1, 2, 4  # step flags: new sequence, reply with a token, reply with logits
# A speculative step: its tokens are the last sampled one and drafts, and the reply is the
# drafts the model accepts and the token after them (lock step keeps 8 for a flag of its own).
VERIFY = 16
# A step of a sequence the MTP layer drafts for: its token ids travel with it to the rank that
# drafts, which feeds the layer its positions; a reply with tokens ends with that rank's drafts.
DRAFT = 32
# A NEW step of a sequence with sampling extras (mlxdist/runtime/processors.py): their JSON
# travels after the control vector (and ids) to the rank that samples.
EXTRAS = 64
_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
_CTRL = 12  # int32 words in a control vector


def _f2i(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<f", struct.pack("<i", x))[0]


@dataclass
class Step:
    """What every rank needs to know to take one step."""

    length: int
    flags: int
    dtype: mx.Dtype = mx.float32
    seed: int = -1
    temp: float = 0.0
    top_p: float = 1.0
    cmd: int = CMD_STEP
    slot: int = 0  # which sequence: every rank keeps a KV cache per slot
    freed: int = 0  # slots whose sequences ended since the last control vector: bits of an int32
    # A NEW step's cache starts as a copy of kept entry `src` (> 0) or of running slot `-src`,
    # cut to its first `keep` positions; 0: an empty cache.
    src: int = 0
    keep: int = 0
    # Positions the slot's caches drop before this step: the drafts its last step rejected.
    trim: int = 0
    # A VERIFY step's drafted token ids, and (VERIFY or DRAFT) all its token ids: they travel
    # after the control vector, not in it.
    drafts: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    extras: bytes = b""  # an EXTRAS step's SamplingExtras, as JSON

    def encode(self) -> mx.array:
        fields = [self.cmd, self.length, self.flags, _DTYPES.index(self.dtype), self.seed]
        fields += [_f2i(self.temp), _f2i(self.top_p), self.slot, self.freed, self.src, self.keep]
        fields += [self.trim]
        return mx.array(fields, dtype=mx.int32)

    @classmethod
    def decode(cls, c: list[int]) -> Step:
        return cls(
            c[1],
            c[2],
            _DTYPES[c[3]],
            c[4],
            _i2f(c[5]),
            _i2f(c[6]),
            c[0],
            c[7],
            c[8],
            c[9],
            c[10],
            c[11],
        )
