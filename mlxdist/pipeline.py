"""The pipeline around the ring: rank 0 -> 1 -> ... -> N-1 -> 0.

Each step, a rank receives a small control vector and the hidden states from the rank before it,
runs its layers and passes both on. The last rank computes the logits, samples, and sends only
the token id (or, when asked, the logits) back to rank 0, its ring neighbour.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .stage import Stage

CMD_STEP, CMD_STOP, CMD_STATS = 1, 2, 3
NEW, SAMPLE, LOGITS = 1, 2, 4  # step flags: new sequence, reply with a token, reply with logits
_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
_CTRL = 8


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

    def encode(self) -> mx.array:
        fields = [self.cmd, self.length, self.flags, _DTYPES.index(self.dtype), self.seed]
        fields += [_f2i(self.temp), _f2i(self.top_p), 0]
        return mx.array(fields, dtype=mx.int32)

    @classmethod
    def decode(cls, ctrl: mx.array) -> Step:
        c = ctrl.tolist()
        return cls(c[1], c[2], _DTYPES[c[3]], c[4], _i2f(c[5]), _i2f(c[6]), c[0])


class Runner:
    """One rank's part of the pipeline: its stage, its KV cache, and (on the last rank) sampling."""

    def __init__(self, stage: Stage, group: mx.distributed.Group):
        self.stage = stage
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.cache = stage.make_cache()
        self.sampler = make_sampler(0.0)
        self.data_bytes = 0  # hidden states, token ids, logits
        self.control_bytes = 0  # control vectors
        self.steps = 0

    def _send(self, x: mx.array, dst: int, control: bool = False) -> None:
        mx.eval(mx.distributed.send(x, dst, group=self.group))
        if control:
            self.control_bytes += x.nbytes
        else:
            self.data_bytes += x.nbytes

    def _recv(self, shape: tuple, dtype: mx.Dtype, src: int) -> mx.array:
        x = mx.distributed.recv(shape, dtype, src, group=self.group)
        mx.eval(x)
        return x

    def _apply(self, step: Step, h: mx.array) -> mx.array | None:
        if step.flags & NEW:
            self.cache = self.stage.make_cache()
            if self.stage.is_last:
                self.sampler = make_sampler(step.temp, step.top_p)
                if step.seed >= 0:
                    mx.random.seed(step.seed)
        self.steps += 1
        h = self.stage.forward(h, self.cache)
        if not self.stage.is_last:
            mx.eval(h)
            step.dtype = h.dtype  # layers may promote it (e.g. float32 norms on float16 input)
            self._send(step.encode(), self.rank + 1, control=True)
            self._send(h, self.rank + 1)
            return None
        if not step.flags & (SAMPLE | LOGITS):
            mx.eval([c.state for c in self.cache])
            return None
        logits = self.stage.logits(h[:, -1, :])
        if step.flags & LOGITS:
            out = logits.astype(mx.float32).reshape(-1)
        else:
            out = self.sampler(logits - mx.logsumexp(logits, keepdims=True)).astype(mx.int32)
        mx.eval(out)
        if self.rank != 0:
            self._send(out, 0)
        return out

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        """Rank 0: embeds tokens, runs the whole ring, returns the reply (token id or logits)."""
        h = self.stage.embed(mx.array([tokens]))
        step.length = len(tokens)
        out = self._apply(step, h)
        if out is not None or not step.flags & (SAMPLE | LOGITS):
            return out
        if step.flags & LOGITS:
            return self._recv((self.stage.vocab_size,), mx.float32, self.size - 1)
        return self._recv((1,), mx.int32, self.size - 1)

    def stop(self) -> None:
        """Rank 0: tells every other rank to leave its loop."""
        if self.size > 1:
            self._send(Step(0, 0, cmd=CMD_STOP).encode(), 1, control=True)

    def _gather_stats(self) -> list[dict]:
        mine = mx.array([[self.rank, self.data_bytes, self.control_bytes, self.steps]], mx.int64)
        if self.size > 1:
            mine = mx.distributed.all_gather(mine, group=self.group)
        mx.eval(mine)
        rows = mine.tolist()
        keys = ("rank", "data_bytes", "control_bytes", "steps")
        return [dict(zip(keys, row)) for row in rows]

    def stats(self) -> list[dict]:
        """Rank 0: every rank's bytes sent and steps taken so far (the request itself uncounted)."""
        counts = (self.data_bytes, self.control_bytes)
        if self.size > 1:
            self._send(Step(0, 0, cmd=CMD_STATS).encode(), 1, control=True)
        self.data_bytes, self.control_bytes = counts
        return self._gather_stats()

    def serve(self) -> None:
        """Ranks 1..N-1: take steps from the previous rank until told to stop."""
        prev = self.rank - 1
        while True:
            step = Step.decode(self._recv((_CTRL,), mx.int32, prev))
            if step.cmd in (CMD_STOP, CMD_STATS):
                if not self.stage.is_last:
                    counts = (self.data_bytes, self.control_bytes)
                    self._send(step.encode(), self.rank + 1, control=True)
                    self.data_bytes, self.control_bytes = counts
                if step.cmd == CMD_STOP:
                    return
                self._gather_stats()  # every rank joins the all_gather rank 0 started
                continue
            h = self._recv((1, step.length, self.stage.hidden_size), step.dtype, prev)
            self._apply(step, h)
