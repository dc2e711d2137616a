"""The pipeline around the ring: rank 0 -> 1 -> ... -> N-1 -> 0.

Each step, a rank receives the hidden states from the rank before it, runs its layers and passes
them on. A step's control vector (its length, flags, slot) goes before its hidden states only when
the receiver cannot foresee it: the steady round of decode steps travels as hidden states alone
(see `link.py`). The last rank computes the logits, samples, and sends only the token id (or,
when asked, the logits) back to rank 0, its ring neighbour.

Every step names a sequence slot, and every rank keeps one KV cache per slot, so rank 0 can put
the next step of one sequence into the ring while the later ranks still work on another's.
"""

from __future__ import annotations

from collections import deque

import mlx.core as mx

from mlxdist.runtime.link import BACK, DONE, NEXT, Link, escape, unescape
from mlxdist.runtime.mtp_drafter import with_drafts
from mlxdist.runtime.prefix_store import (
    KeepsPrefixes,
    PrefixStore,
    clone_all,
    obey_logged,
    trimmable,
)
from mlxdist.runtime.processors import Processors, SamplingExtras, sample_reply
from mlxdist.runtime.ringwait import RingWaiter
from mlxdist.runtime.runner import InterleavingRunner
from mlxdist.runtime.sampling import Sampler
from mlxdist.runtime.speculative import reply_words, verify
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
from quantize.memory import peak_rss


def gather_stats(runner, open_caches: int) -> list[dict]:
    """Every rank's traffic, steps, peak memory, open KV caches and kept prefix entries (count,
    bytes, a digest of which: equal on every rank); each rank joins the same all_gather."""
    row = [runner.rank, runner.data_bytes, runner.control_bytes, runner.steps, peak_rss()]
    figures = mx.array([[*row, open_caches, *runner.store.figures()]], mx.int64)
    if runner.size > 1:
        figures = mx.distributed.all_gather(figures, group=runner.group)
    mx.eval(figures)
    keys = ("rank", "data_bytes", "control_bytes", "steps", "peak_rss", "open_caches")
    keys += ("prefix_entries", "prefix_bytes", "prefix_digest", "prefix_checksum")
    return [dict(zip(keys, row)) for row in figures.tolist()]


def start_cache(runner, step: Step, caches: dict[int, list]) -> list:
    """A NEW step's caches: empty, or a copy of a kept entry or of a running slot's, cut."""
    if step.src > 0:
        return runner.store.start(step.src, step.keep)
    if step.src < 0:
        return clone_all(caches[-step.src], step.keep)
    return runner.stage.make_cache()


class Runner(KeepsPrefixes, InterleavingRunner):
    """One rank's part of the pipeline: its stage, a KV cache per sequence slot, and (on the
    last rank) a sampler per slot."""

    def __init__(self, stage: Stage, group: mx.distributed.Group):
        self.stage = stage
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.caches: dict[int, list] = {0: stage.make_cache()}
        self.samplers: dict[int, Sampler] = {0: Sampler()}
        # the last rank: the sampling extras of slots that have them (bias, penalties, grammar,
        # log probabilities); rank 0: the int32 words their token replies take
        self.processors: dict[int, Processors] = {}
        self.widths: dict[int, int] = {}
        # the rank's tokenizer, loaded when a grammar first needs it (set by mlxdist/rank.py)
        self.tokenizer = no_tokenizer
        if self.rank == 0 or stage.is_last:  # the ranks that tokenize
            import_all()
        # rank 0: the flags, lengths and slots of steps whose reply is due
        self.replies: deque[tuple[int, int, int]] = deque()
        self.ready: deque[mx.array] = deque()  # rank 0 alone: replies computed in place
        self.data_bytes = 0  # hidden states, token ids, logits
        self.control_bytes = 0  # control vectors
        self.steps = 0
        self.inbox = Link(stage.hidden_size, _CTRL)  # what the previous rank sends next
        self.outbox = Link(stage.hidden_size, _CTRL)  # what the next rank expects
        self.waiter = RingWaiter() if self.size > 1 else None
        self.store = PrefixStore()  # the prefix cache's entries, for this stage's layers
        # Takes VERIFY steps (speculative decoding) when every layer's cache can drop rejected
        # drafts: not a sliding window (gpt-oss), whose filled buffer cannot be cut back.
        self.verifies = all(trimmable(t) for t in stage.templates)
        # --speculative mtp: the drafts a DRAFT step's reply ends with (every rank knows it), and
        # on the last rank the drafter (mlxdist.runtime.mtp_drafter.MTPDrafter).
        self.mtp_k = 0
        self.mtp = None

    @property
    def cache(self) -> list:
        return self.caches[0]

    @property
    def sampler(self) -> Sampler:
        return self.samplers[0]

    def _send(self, x: mx.array, dst: int, control: bool = False) -> None:
        mx.eval(mx.distributed.send(x, dst, group=self.group))
        if control:
            self.control_bytes += x.nbytes
        else:
            self.data_bytes += x.nbytes

    def _recv(self, shape: tuple, dtype: mx.Dtype, src: int) -> mx.array:
        self.waiter.wait()  # asleep until bytes come, not spinning in MLX's receive
        x = mx.distributed.recv(shape, dtype, src, group=self.group)
        mx.eval(x)
        return x

    def _apply(self, step: Step, h: mx.array) -> mx.array | None:
        if step.flags & NEW or step.slot not in self.caches:
            self.caches[step.slot] = start_cache(self, step, self.caches)
            if self.stage.is_last:
                self.samplers[step.slot] = Sampler(step.temp, step.top_p, step.seed)
                self._start_processors(step)
                if self.mtp is not None:
                    self.mtp.start(step.slot)
        cache = self.caches[step.slot]
        if step.trim:  # the drafts the slot's last step rejected
            for c in cache:
                c.trim(step.trim)
        self.steps += 1
        h = self.stage.forward(h, cache)
        if not self.stage.is_last:
            mx.eval(h)
            step.dtype = h.dtype  # layers may promote it (e.g. float32 norms on float16 input)
            self._pass_on(step, h)
            return None
        if not step.flags & (SAMPLE | LOGITS):
            if step.flags & DRAFT and self.mtp is not None:
                self.mtp.feed(step.slot, h, step.ids, None)
            mx.eval([c.state for c in cache])
            return None
        if step.flags & VERIFY:
            out = verify(self.stage.logits(h[0]), step.drafts, self.samplers[step.slot])
        elif step.flags & LOGITS:
            out = self.stage.logits(h[:, -1, :]).astype(mx.float32).reshape(-1)
        else:
            logits = self.stage.logits(h[:, -1, :])
            sampler = self.samplers[step.slot]
            out = sample_reply(sampler, self.processors.get(step.slot), logits)
        mx.eval(out)
        if step.flags & DRAFT and not step.flags & LOGITS:
            out = with_drafts(self.mtp, self.mtp_k, step, step.ids, h, out)
        if self.rank != 0:
            self._send(out, 0)
        return out

    def _start_processors(self, step: Step) -> None:
        self.processors.pop(step.slot, None)
        if step.flags & EXTRAS:
            extras = SamplingExtras.decode(step.extras)
            vocab = self.stage.vocab_size
            self.processors[step.slot] = Processors(extras, vocab, self.tokenizer)

    def _pass_on(self, step: Step, h: mx.array) -> None:
        link = self.outbox
        if not step.trim and link.bare(step.slot, step.length, step.flags, step.dtype, SAMPLE):
            link.took(step.slot, BACK)
        else:
            self._send_control(step)
            if step.flags & (VERIFY | DRAFT):
                self._send(mx.array(step.ids, mx.int32), self.rank + 1, control=True)
            if step.flags & EXTRAS:  # its length, then its bytes
                self._send(mx.array([len(step.extras)], mx.int32), self.rank + 1, control=True)
                data = mx.array(list(step.extras), mx.uint8)
                self._send(data, self.rank + 1, control=True)
        self._send(h, self.rank + 1)

    def _send_control(self, step: Step) -> None:
        """A step's or a command's control vector to the next rank: plain while it expects no
        decode step, else dressed as a hidden state."""
        link = self.outbox
        step.freed, link.leaving = link.leaving, 0
        words = step.encode()
        if link.due:
            words = escape(words.tolist(), self.stage.hidden_size, link.dtype)
        self._send(words, self.rank + 1, control=True)
        _record(link, step)

    def _next_step(self) -> tuple[Step, mx.array | None]:
        """Ranks 1..N-1: the next step or command, and the hidden states when they came bare."""
        link, prev = self.inbox, self.rank - 1
        if link.due:
            x = self._recv((1, 1, self.stage.hidden_size), link.dtype, prev)
            words = unescape(x)
            if words is None:
                slot = link.due[0]
                link.took(slot, BACK)
                return Step(1, SAMPLE, link.dtype, slot=slot), x
        else:
            words = self._recv((_CTRL,), mx.int32, prev).tolist()
        step = Step.decode(words[:_CTRL])
        for slot in _record(link, step):
            self._release(slot)
        if step.cmd == CMD_STEP and step.flags & (VERIFY | DRAFT):
            step.ids = self._recv((step.length,), mx.int32, prev).tolist()
            step.drafts = step.ids[1:] if step.flags & VERIFY else []
        if step.cmd == CMD_STEP and step.flags & EXTRAS:
            (n,) = self._recv((1,), mx.int32, prev).tolist()
            step.extras = bytes(self._recv((n,), mx.uint8, prev).tolist())
        return step, None

    def send(self, tokens: list[int], step: Step) -> bool:
        """Rank 0: embeds tokens, runs its own layers and puts the step into the ring.

        Returns whether the step has a reply (a token id or logits) for `receive` to collect;
        replies come back in the order the steps were sent."""
        h = self.stage.embed(mx.array([tokens]))
        step.length = len(tokens)
        step.ids = list(tokens) if step.flags & (VERIFY | DRAFT) else []
        step.drafts = list(tokens[1:]) if step.flags & VERIFY else []
        if step.flags & NEW:
            self.widths.pop(step.slot, None)
            if step.flags & EXTRAS:
                self.widths[step.slot] = SamplingExtras.decode(step.extras).reply_words()
        out = self._apply(step, h)
        if not step.flags & (SAMPLE | LOGITS):
            return False
        if out is not None:
            self.ready.append(out)
        else:
            self.replies.append((step.flags, step.length, step.slot))
        return True

    def receive(self) -> mx.array:
        """Rank 0: the reply of the oldest step still due: a token id, logits, or a VERIFY
        step's [n, n tokens, padding] (see speculative.verify)."""
        if self.ready:
            return self.ready.popleft()
        flags, length, slot = self.replies.popleft()
        if flags & LOGITS:
            return self._recv((self.stage.vocab_size,), mx.float32, self.size - 1)
        words = reply_words(flags, length, self.mtp_k)
        if not flags & VERIFY:  # log probabilities follow the token
            words += self.widths.get(slot, 1) - 1
        return self._recv((words,), mx.int32, self.size - 1)

    def step(self, tokens: list[int], step: Step) -> mx.array | None:
        """Rank 0: one step through the whole ring, waiting for its reply (token id or logits)."""
        return self.receive() if self.send(tokens, step) else None

    def free(self, slot: int) -> None:
        """Rank 0: every rank drops the KV cache of a finished sequence (the others when the
        next control vector tells them, see `link.py`)."""
        self._release(slot)

    def _release(self, slot: int) -> None:
        self._drop(slot)
        if self.size > 1 and not self.stage.is_last:
            self.outbox.leaving |= 1 << slot

    def _drop(self, slot: int) -> None:
        self.caches.pop(slot, None)
        self.samplers.pop(slot, None)
        self.processors.pop(slot, None)
        self.widths.pop(slot, None)
        if self.mtp is not None:
            self.mtp.drop(slot)
        if slot == 0:  # slot 0 always has a cache, for the one-rank decode that uses it directly
            self.caches[0] = self.stage.make_cache()
            self.samplers[0] = Sampler()

    def stop(self) -> None:
        """Rank 0: tells every other rank to leave its loop."""
        if self.size > 1:
            self._send_control(Step(0, 0, cmd=CMD_STOP))

    def _command(self, step: Step) -> int:
        if self.size > 1:
            self._send_control(step)
        return self._obey(step)

    def _obey(self, step: Step) -> int:
        if step.cmd == CMD_KEEP:
            # The entry takes the slot's caches; the slot gets fresh ones (its sequence ended).
            caches, self.caches[step.slot] = self.caches[step.slot], self.stage.make_cache()
            return self.store.keep(step.src, caches, step.length)
        self.store.evict(step.src)
        return 0

    def _gather_stats(self) -> list[dict]:
        return gather_stats(self, sum(1 for c in self.caches.values() if cache_offset(c) > 0))

    def stats(self) -> list[dict]:
        """Rank 0: every rank's bytes sent, steps taken and peak memory so far (the request
        itself uncounted)."""
        counts = (self.data_bytes, self.control_bytes)
        if self.size > 1:
            self._send_control(Step(0, 0, cmd=CMD_STATS))
        self.data_bytes, self.control_bytes = counts
        return self._gather_stats()

    def serve(self) -> None:
        """Ranks 1..N-1: take steps from the previous rank until told to stop."""
        prev = self.rank - 1
        while True:
            step, h = self._next_step()
            if step.cmd in (CMD_KEEP, CMD_EVICT):
                if not self.stage.is_last:
                    self._send_control(step)
                obey_logged(self._obey, step, self.rank)
                continue
            if step.cmd in (CMD_STOP, CMD_STATS):
                if not self.stage.is_last:
                    counts = (self.data_bytes, self.control_bytes)
                    self._send_control(step)
                    self.data_bytes, self.control_bytes = counts
                if step.cmd == CMD_STOP:
                    return
                self._gather_stats()  # every rank joins the all_gather rank 0 started
                continue
            if h is None:
                h = self._recv((1, step.length, self.stage.hidden_size), step.dtype, prev)
            self._apply(step, h)


def no_tokenizer():
    raise RuntimeError("this rank has no tokenizer to enforce a grammar with")


def _record(link: Link, step: Step) -> list[int]:
    """Both ends of a link, after a control vector: which decode steps it now expects.
    Returns the slots whose sequences ended."""
    freed = link.left(step.freed)
    if step.cmd == CMD_STEP:
        then = BACK if step.flags & SAMPLE else DONE if step.flags & LOGITS else NEXT
        link.took(step.slot, then, step.dtype)
    return freed
