"""Ranks in lock step: expert and tensor parallelism, where every rank runs every layer.

Rank 0 broadcasts each step's control vector and token ids with all_sum (the others add zeros:
the ring backend sends and receives only between neighbours, but all_sum reaches every rank).
Then all ranks run the same layers on the same tokens; the layers' own all_sums combine their
parts. Only rank 0 computes logits and samples. A StepRunner: one step at a time, no interleaving.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear

from mlxdist.runtime.expert import shards
from mlxdist.runtime.pipeline import gather_stats, start_cache
from mlxdist.runtime.prefix_store import PrefixStore
from mlxdist.runtime.ringwait import RingWaiter
from mlxdist.runtime.runner import StepRunner
from mlxdist.runtime.sampling import Sampler
from mlxdist.runtime.stage import Stage, cache_offset
from mlxdist.runtime.step import (
    _CTRL,
    CMD_EVICT,
    CMD_KEEP,
    CMD_STATS,
    CMD_STEP,
    CMD_STOP,
    LOGITS,
    NEW,
    SAMPLE,
    Step,
)

# Lock step runs one sequence at a time, so the control vector's slot field is free to carry a
# decode step's one token id.
_TOKEN = 7


def cut_sums(model: nn.Module) -> int:
    """all_sums of the hidden states a step makes per position outside ExpertShard layers:
    one per sharded-to-all linear (o_proj, down_proj) and per MoE that mlx-lm's shard() cut."""
    cut = (ShardedToAllLinear, QuantizedShardedToAllLinear)
    modules = [m for _, m in model.named_modules()]
    return sum(
        isinstance(m, cut) or getattr(m, "sharding_group", None) is not None for m in modules
    )


class LockstepRunner(StepRunner):
    """One rank of an expert- or tensor-parallel group: the whole model's layers, its KV cache,
    and (on rank 0) sampling."""

    def __init__(self, stage: Stage, group: mx.distributed.Group, parallel: str):
        self.stage = stage
        self.group = group
        self.parallel = parallel
        self.rank = group.rank()
        self.size = group.size()
        self.cache = stage.make_cache()
        self.sampler = Sampler()
        self.data_bytes = 0  # token ids and the layers' all_sum payloads
        self.control_bytes = 0  # control vectors
        self.steps = 0
        self._shards = shards(stage.model)
        self._cut_sums = cut_sums(stage.model) if self.size > 1 else 0
        self.store = PrefixStore()  # the prefix cache's entries

    def _all_sum(self, x: mx.array, control: bool = False) -> mx.array:
        out = mx.distributed.all_sum(x, group=self.group)
        mx.eval(out)
        if control:
            self.control_bytes += x.nbytes
        else:
            self.data_bytes += x.nbytes
        return out

    def _layer_bytes(self) -> int:
        return sum(s.sent for s in self._shards)

    def _apply(self, step: Step, tokens: mx.array) -> mx.array | None:
        if step.flags & NEW:
            self.cache = start_cache(self, step, {0: self.cache})
            if self.rank == 0:
                self.sampler = Sampler(step.temp, step.top_p, step.seed)
        self.steps += 1
        before = self._layer_bytes()
        h = self.stage.forward(self.stage.embed(tokens), self.cache)
        self.data_bytes += self._layer_bytes() - before
        self.data_bytes += self._cut_sums * step.length * self.stage.hidden_size * h.dtype.size
        if self.rank != 0 or not step.flags & (SAMPLE | LOGITS):
            # Every rank evaluates the whole graph, so every rank joins every all_sum in it.
            mx.eval(h, [c.state for c in self.cache])
            return None
        logits = self.stage.logits(h[:, -1, :])
        if step.flags & LOGITS:
            out = logits.astype(mx.float32).reshape(-1)
        else:
            out = self.sampler(logits - mx.logsumexp(logits, keepdims=True)).astype(mx.int32)
        mx.eval(out, [c.state for c in self.cache])
        return out

    def _broadcast(self, step: Step, tokens: list[int] | None) -> tuple[Step, mx.array | None]:
        """Rank 0 gives step and tokens; every rank returns them. Decode steps take one all_sum."""
        ctrl = step.encode() if self.rank == 0 else mx.zeros((_CTRL,), mx.int32)
        if self.rank == 0 and tokens is not None and len(tokens) == 1:
            ctrl[_TOKEN] = tokens[0]
        if self.size > 1:
            ctrl = self._all_sum(ctrl, control=True)
        step = Step.decode(ctrl.tolist())
        if step.cmd != CMD_STEP:
            return step, None
        if step.length == 1:
            return step, ctrl[_TOKEN].reshape(1, 1)
        ids = mx.array(tokens, mx.int32) if self.rank == 0 else mx.zeros((step.length,), mx.int32)
        if self.size > 1:
            ids = self._all_sum(ids)
        return step, ids.reshape(1, -1)

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        """Rank 0: runs one step on every rank; returns the sampled id or the logits."""
        step.length = len(tokens)
        step, ids = self._broadcast(step, tokens)
        return self._apply(step, ids)

    def stop(self) -> None:
        """Rank 0: tells every other rank to leave its loop."""
        if self.size > 1:
            self._broadcast(Step(0, 0, cmd=CMD_STOP), None)

    def keep(self, slot: int, entry: int, length: int) -> int:
        """Rank 0: every rank keeps the first `length` positions of the cache as entry; returns
        the bytes rank 0 keeps."""
        return self._command(Step(length, 0, cmd=CMD_KEEP, slot=slot, src=entry))

    def evict(self, entry: int) -> None:
        """Rank 0: every rank drops entry."""
        self._command(Step(0, 0, cmd=CMD_EVICT, src=entry))

    def _command(self, step: Step) -> int:
        if self.size > 1:
            self._broadcast(step, None)
        return self._obey(step)

    def _obey(self, step: Step) -> int:
        if step.cmd == CMD_KEEP:
            return self.store.keep(step.src, self.cache, step.length)
        self.store.evict(step.src)
        return 0

    def _gather_stats(self) -> list[dict]:
        return gather_stats(self, int(cache_offset(self.cache) > 0))

    def stats(self) -> list[dict]:
        """Rank 0: every rank's bytes sent and steps taken so far (the request itself uncounted)."""
        counts = (self.data_bytes, self.control_bytes)
        if self.size > 1:
            self._broadcast(Step(0, 0, cmd=CMD_STATS), None)
        self.data_bytes, self.control_bytes = counts
        return self._gather_stats()

    def serve(self) -> None:
        """Ranks 1..N-1: take the steps rank 0 broadcasts until told to stop."""
        waiter = RingWaiter()
        while True:
            counts = (self.data_bytes, self.control_bytes)
            waiter.wait()  # asleep until rank 0 starts the next broadcast
            step, ids = self._broadcast(Step(0, 0), None)
            if step.cmd in (CMD_KEEP, CMD_EVICT):
                self._obey(step)
                continue
            if step.cmd in (CMD_STOP, CMD_STATS):
                self.data_bytes, self.control_bytes = counts
                if step.cmd == CMD_STOP:
                    return
                self._gather_stats()  # every rank joins the all_gather rank 0 started
                continue
            self._apply(step, ids)
