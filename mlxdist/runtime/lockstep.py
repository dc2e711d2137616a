"""Ranks in lock step: expert and tensor parallelism, where every rank runs every layer.

Rank 0 broadcasts each step's control vector and token ids with all_sum (the others add zeros:
the ring backend sends and receives only between neighbours, but all_sum reaches every rank).
Then all ranks run the same layers on the same tokens; the layers' own all_sums combine their
parts. Only rank 0 computes logits and samples.

Every rank keeps a KV cache per sequence slot. A step of one sequence (its prompt, or a decode
step alone) runs on that slot's cache; a batched decode step runs several sequences' next tokens
in one forward pass, so one round of collectives serves them all (their caches joined as the
rows of a batch cache, see `batch_cache.py`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear

from mlxdist.runtime.batch_cache import Batch
from mlxdist.runtime.expert import shards
from mlxdist.runtime.mtp_drafter import with_drafts
from mlxdist.runtime.pipeline import gather_stats, no_tokenizer, start_cache
from mlxdist.runtime.prefix_store import KeepsPrefixes, PrefixStore, obey_logged, trimmable
from mlxdist.runtime.processors import Processors, SamplingExtras, sample_reply
from mlxdist.runtime.ringwait import RingWaiter
from mlxdist.runtime.runner import StepRunner
from mlxdist.runtime.sampling import Sampler
from mlxdist.runtime.speculative import verify
from mlxdist.runtime.stage import Stage, cache_offset
from mlxdist.runtime.step import (
    _CTRL,
    CMD_EVICT,
    CMD_KEEP,
    CMD_STATS,
    CMD_STEP,
    CMD_STOP,
    DRAFT,
    EXTRAS,
    LOGITS,
    NEW,
    SAMPLE,
    VERIFY,
    Step,
)
from quantize.light_mlx_lm import import_all

# A step flag of lock step only: a batched decode step, whose slot word is a bitmask of the
# slots decoded together and whose tokens are theirs, in ascending slot order.
BATCH = 8
# Token ids that travel in the control vector itself, after its fields: a batched decode step's
# (one per slot, so at least the 30 slots a bitmask names) and any step as short. Longer steps
# send their ids in a second all_sum.
_TAIL = 32
_WORDS = _CTRL + _TAIL


def cut_sums(model: nn.Module) -> int:
    """all_sums of the hidden states a step makes per position outside ExpertShard layers:
    one per sharded-to-all linear (o_proj, down_proj) and per MoE that mlx-lm's shard() cut."""
    cut = (ShardedToAllLinear, QuantizedShardedToAllLinear)
    modules = [m for _, m in model.named_modules()]
    return sum(
        isinstance(m, cut) or getattr(m, "sharding_group", None) is not None for m in modules
    )


def batchable(stage: Stage) -> bool:
    """Whether sequences' caches can be joined into batch caches: mlx-lm merges full, rotating
    and recurrent caches, but not quantised ones (nor is a batch cache quantised after a step)."""

    def merges(c) -> bool:
        inner = getattr(c, "caches", None)  # a cache list: each of its caches
        return all(map(merges, inner)) if inner is not None else hasattr(type(c), "merge")

    return getattr(stage, "kv_bits", None) is None and all(map(merges, stage.make_cache()))


def _stack_rows(replies: list[mx.array]) -> mx.array:
    """Replies of one row each, zero-padded to the widest: (rows, words)."""
    flat = [r.reshape(-1) for r in replies]
    width = max(r.size for r in flat)
    return mx.stack([mx.concatenate([r, mx.zeros((width - r.size,), mx.int32)]) for r in flat])


def slots_of(mask: int) -> list[int]:
    """The slots a bitmask names, ascending."""
    return [s for s in range(32) if mask >> s & 1]


class LockstepRunner(KeepsPrefixes, StepRunner):
    """One rank of an expert- or tensor-parallel group: the whole model's layers, a KV cache per
    sequence slot, and (on rank 0) a sampler per slot."""

    def __init__(self, stage: Stage, group: mx.distributed.Group, parallel: str):
        self.stage = stage
        self.group = group
        self.parallel = parallel
        self.rank = group.rank()
        self.size = group.size()
        self.caches: dict[int, list] = {0: stage.make_cache()}  # slots not in the batch
        self.samplers: dict[int, Sampler] = {0: Sampler()}  # rank 0
        # rank 0: the sampling extras of slots that have them (bias, penalties, grammar, log
        # probabilities; such a sequence decodes in steps of its own, not in the batch)
        self.processors: dict[int, Processors] = {}
        self.tokenizer = no_tokenizer  # rank 0's, for grammars (set by mlxdist/rank.py)
        if self.rank == 0:  # the rank that tokenizes
            import_all()
        self.batch = Batch()  # the slots decoded together, in one batch cache
        self.batches = batchable(stage)  # else rank 0 decodes one sequence per step
        self.leaving = 0  # rank 0: slots freed since the last control vector, as bits
        self.data_bytes = 0  # token ids and the layers' all_sum payloads
        self.control_bytes = 0  # control vectors
        self.steps = 0
        self._shards = shards(stage.model)
        self._cut_sums = cut_sums(stage.model) if self.size > 1 else 0
        self.store = PrefixStore()  # the prefix cache's entries
        # Takes VERIFY steps (speculative decoding) when every layer's cache can drop rejected
        # drafts, as a pipeline decides it.
        self.verifies = all(trimmable(t) for t in stage.templates)
        # --speculative mtp: the drafts a DRAFT step's reply ends with, and on rank 0 (which
        # samples) the drafter (mlxdist.runtime.mtp_drafter.MTPDrafter)
        self.mtp_k = 0
        self.mtp = None

    @property
    def cache(self) -> list:
        return self.slot_cache(0)

    @property
    def sampler(self) -> Sampler:
        return self.samplers[0]

    def slot_cache(self, slot: int) -> list:
        """Slot's caches: its own, or a copy of its row when it decodes in the batch."""
        return self.batch.extract(slot) if slot in self.batch else self.caches[slot]

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

    def _apply(self, step: Step, ids: mx.array) -> mx.array | None:
        if step.flags & BATCH:
            return self._decode(step, ids)
        slot = step.slot
        if slot in self.batch:  # a step of its own: it leaves the batch with its row
            self.caches[slot] = self.batch.extract(slot)
            self.batch.remove([slot])
        if step.flags & NEW or slot not in self.caches:
            sources = {-step.src: self.slot_cache(-step.src)} if step.src < 0 else {}
            self.caches[slot] = start_cache(self, step, sources)
            if self.rank == 0:
                self.samplers[slot] = Sampler(step.temp, step.top_p, step.seed)
                self.processors.pop(slot, None)
                if step.flags & EXTRAS:
                    extras = SamplingExtras.decode(step.extras)
                    vocab = self.stage.vocab_size
                    self.processors[slot] = Processors(extras, vocab, self.tokenizer)
                if self.mtp is not None:
                    self.mtp.start(slot)
        cache = self.caches[slot]
        if step.trim:  # the drafts the slot's last step rejected
            for c in cache:
                c.trim(step.trim)
        h = self._forward(step, ids.reshape(1, -1), cache)
        drafts = self.rank == 0 and step.flags & DRAFT and not step.flags & LOGITS
        if drafts and not step.flags & SAMPLE and self.mtp is not None:
            self.mtp.feed(slot, h, ids.tolist(), None)  # a prompt chunk: the layer reads it
        if self.rank != 0 or not step.flags & (SAMPLE | LOGITS):
            # Every rank evaluates the whole graph, so every rank joins every all_sum in it.
            mx.eval(h, [c.state for c in cache])
            return None
        out = self._reply(step, ids, h)
        if drafts:
            mx.eval(out)
            out = with_drafts(self.mtp, self.mtp_k, step, ids.tolist(), h, out)
        mx.eval(out, [c.state for c in cache])
        return out

    def _reply(self, step: Step, ids: mx.array, h: mx.array) -> mx.array:
        """Rank 0's reply to a step of one sequence, from h, its layers' output (before the
        final norm) at each of the step's ids: the logits, the sampled token, or a VERIFY
        step's [n, the n tokens, padding] (its drafts are ids[1:])."""
        if step.flags & LOGITS:
            return self.stage.logits(h[:, -1, :]).astype(mx.float32).reshape(-1)
        sampler = self.samplers[step.slot]
        if step.flags & VERIFY:
            return verify(self.stage.logits(h[0]), ids[1:].tolist(), sampler)
        logits = self.stage.logits(h[:, -1, :])
        return sample_reply(sampler, self.processors.get(step.slot), logits)

    def _forward(self, step: Step, ids: mx.array, cache: list) -> mx.array:
        """The layers on ids (batch, length), counting what the step's all_sums carry."""
        self.steps += 1
        before = self._layer_bytes()
        h = self.stage.forward(self.stage.embed(ids), cache)
        self.data_bytes += self._layer_bytes() - before
        self.data_bytes += self._cut_sums * ids.size * self.stage.hidden_size * h.dtype.size
        return h

    def _decode(self, step: Step, ids: mx.array) -> mx.array | None:
        """One decode step of the slots step.slot names, ids theirs in ascending slot order;
        rank 0 returns their sampled tokens in that order. One slot not in the batch decodes on
        its own caches, exactly as a sequence alone."""
        slots = slots_of(step.slot)
        if len(slots) == 1 and slots[0] not in self.batch:
            rows, cache, order = slots, self.caches[slots[0]], None
        else:
            self.batch.form(slots, self.caches)
            rows, cache, order = self.batch.slots, self.batch.caches, self.batch.order(slots)
        x = ids if order is None else ids[order]
        h = self._forward(step, x.reshape(-1, 1), cache)
        if self.rank != 0:
            mx.eval(h, [c.state for c in cache])
            return None
        logits = self.stage.logits(h[:, -1, :])
        if any(s in self.processors for s in rows):
            out = self._replies(rows, logits)
            if order is not None:
                out = out[mx.array([rows.index(s) for s in slots])]
            mx.eval(out, [c.state for c in cache])
            return out
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [self.samplers[s] for s in rows]
        if all(s.temp == 0 for s in samplers):
            out = mx.argmax(logprobs, axis=-1)
        else:  # each row with its own sampler (and random key), as the sequence alone
            out = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
        out = out.astype(mx.int32)
        if order is not None:
            out = out[mx.array([rows.index(s) for s in slots])]
        mx.eval(out, [c.state for c in cache])
        return out

    def _replies(self, rows: list[int], logits: mx.array) -> mx.array:
        """A batched step's replies when some rows have sampling extras: each row's reply as
        the sequence alone would get it, zero-padded to the widest (rows, words)."""
        return _stack_rows(
            [
                sample_reply(self.samplers[s], self.processors.get(s), logits[i : i + 1])
                for i, s in enumerate(rows)
            ]
        )

    def _broadcast(self, step: Step, tokens: list[int] | None) -> tuple[Step, mx.array | None]:
        """Rank 0 gives step and tokens; every rank returns them. A step of up to _TAIL tokens
        takes one all_sum, a longer one two."""
        if self.rank == 0:
            step.freed, self.leaving = self.leaving, 0
            tail = tokens if tokens is not None and len(tokens) <= _TAIL else []
            words = step.encode().tolist() + list(tail)
            words = mx.array(words + [0] * (_WORDS - len(words)), mx.int32)
        else:
            words = mx.zeros((_WORDS,), mx.int32)
        if self.size > 1:
            words = self._all_sum(words, control=True)
        values = words.tolist()
        step = Step.decode(values[:_CTRL])
        if self.rank != 0:
            for slot in slots_of(step.freed):
                self._drop(slot)
        if step.cmd != CMD_STEP:
            return step, None
        if step.length <= _TAIL:
            return step, mx.array(values[_CTRL : _CTRL + step.length], mx.int32)
        ids = mx.array(tokens, mx.int32) if self.rank == 0 else mx.zeros((step.length,), mx.int32)
        if self.size > 1:
            ids = self._all_sum(ids)
        return step, ids

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        """Rank 0: runs one step of sequence step.slot on every rank; returns the sampled id,
        the logits, or a VERIFY step's reply (its tokens: the last sampled one, then drafts)."""
        step.length = len(tokens)
        extras = step.extras  # rank 0's own: only it samples
        step, ids = self._broadcast(step, tokens)
        step.extras = extras
        return self._apply(step, ids)

    def decode(self, slots: list[int], tokens: list[int]) -> mx.array:
        """Rank 0: one decode step of the sequences in slots (ascending), each fed its token, in
        one forward pass on every rank (one after another when their caches cannot be joined);
        their sampled tokens, in the same order, or with sampling extras in the batch their
        replies, one row each (see _replies)."""
        if len(slots) > 1 and not self.batches:
            outs = [self.decode([s], [t]) for s, t in zip(slots, tokens)]
            return _stack_rows(outs) if any(o.ndim == 2 for o in outs) else mx.concatenate(outs)
        mask = sum(1 << s for s in slots)
        step, ids = self._broadcast(Step(len(slots), SAMPLE | BATCH, slot=mask), tokens)
        return self._apply(step, ids)

    def free(self, slot: int) -> None:
        """Rank 0: every rank drops a finished sequence's caches (the others when the next
        control vector tells them)."""
        self._drop(slot)
        if self.size > 1:
            self.leaving |= 1 << slot

    def _drop(self, slot: int) -> None:
        self.caches.pop(slot, None)
        self.samplers.pop(slot, None)
        self.processors.pop(slot, None)
        if self.mtp is not None:
            self.mtp.drop(slot)
        self.batch.remove([slot])
        if slot == 0:  # slot 0 always has a cache, for the one-rank decode that uses it directly
            self.caches[0] = self.stage.make_cache()
            self.samplers[0] = Sampler()

    def stop(self) -> None:
        """Rank 0: tells every other rank to leave its loop."""
        if self.size > 1:
            self._broadcast(Step(0, 0, cmd=CMD_STOP), None)

    def _command(self, step: Step) -> int:
        if self.size > 1:
            self._broadcast(step, None)
        return self._obey(step)

    def _obey(self, step: Step) -> int:
        if step.cmd == CMD_KEEP:
            # The entry takes the slot's caches (a copy of its row, if batched); the slot gets
            # fresh ones (its sequence ended).
            slot = step.slot
            caches = self.slot_cache(slot)
            self.batch.remove([slot])
            self.caches[slot] = self.stage.make_cache()
            return self.store.keep(step.src, caches, step.length)
        self.store.evict(step.src)
        return 0

    def _gather_stats(self) -> list[dict]:
        held = sum(1 for c in self.caches.values() if cache_offset(c) > 0)
        return gather_stats(self, held + len(self.batch))

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
                obey_logged(self._obey, step, self.rank)
                continue
            if step.cmd in (CMD_STOP, CMD_STATS):
                self.data_bytes, self.control_bytes = counts
                if step.cmd == CMD_STOP:
                    return
                self._gather_stats()  # every rank joins the all_gather rank 0 started
                continue
            self._apply(step, ids)
