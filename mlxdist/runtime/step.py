"""What every rank needs to know to take one step: a step's flags, the commands, and the
control vector that carries them (the same for pipeline and lock-step runners)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import mlx.core as mx

CMD_STEP, CMD_STOP, CMD_STATS = 1, 2, 3
NEW, SAMPLE, LOGITS = 1, 2, 4  # step flags: new sequence, reply with a token, reply with logits
_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
_CTRL = 9  # int32 words in a control vector


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

    def encode(self) -> mx.array:
        fields = [self.cmd, self.length, self.flags, _DTYPES.index(self.dtype), self.seed]
        fields += [_f2i(self.temp), _f2i(self.top_p), self.slot, self.freed]
        return mx.array(fields, dtype=mx.int32)

    @classmethod
    def decode(cls, c: list[int]) -> Step:
        return cls(c[1], c[2], _DTYPES[c[3]], c[4], _i2f(c[5]), _i2f(c[6]), c[0], c[7], c[8])
