"""One request's answer as it grows: tokens in, text and a final summary out as job events."""

from __future__ import annotations

import time
from collections import deque

from mlxdist.runtime.drafting import PromptLookup, ReplyDrafts
from mlxdist.runtime.processors import read_logprobs
from mlxdist.serving.events import Done, Token
from mlxdist.serving.job import Job
from mlxdist.serving.prefix_cache import NO_MATCH
from mlxdist.serving.stops import StopMatcher


class Sequence:
    def __init__(self, job: Job, tokenizer, eos_ids: set[int], slot: int = 0):
        self.job = job
        self.slot = slot
        self.eos_ids = frozenset() if job.ignore_eos else eos_ids
        self.detok = tokenizer.detokenizer  # a fresh copy on every access
        self.stops = StopMatcher(job.stop)
        self.tokens: list[int] = []
        self.reason = "length"
        self.start = time.perf_counter()
        self.first: float | None = None
        self.prefill: deque[tuple[list[int], int]] | None = None  # prompt steps still to send
        self.fed: list[int] = []  # the tokens its caches hold (or will, once sent steps land)
        self.source = NO_MATCH  # the prefix cache's source its caches start from
        self.drafter: PromptLookup | ReplyDrafts | None = None  # speculative decoding's, when on
        self.sent = (0, 0)  # flags and length of its step in flight
        self.drafted = 0  # drafts in the step in flight
        self.trim = 0  # positions its next step drops: the drafts its last step rejected
        self.passes = self.drafted_total = self.accepted = 0  # its speculative figures
        # the words of its token replies (the token, its log probabilities), when it has extras
        self.width = job.extras.reply_words() if job.extras is not None else 1
        self._logprob: tuple[float, list] | None = None  # the next token's, when asked

    def read(self, out) -> None:
        """A token reply's (an array, or its words) log probabilities, for the token add()
        takes next (when asked)."""
        if self.width > 1:
            words = out if isinstance(out, list) else out.reshape(-1).tolist()
            self._logprob = read_logprobs(words[: self.width])

    def add(self, t: int) -> bool:
        """Takes the next sampled token; returns True when the answer is complete."""
        if self.first is None:
            self.first = time.perf_counter()
        if t in self.eos_ids:
            self.reason = "stop"
            return True
        self.tokens.append(t)
        self.detok.add_token(t)
        logprob, top = self._logprob or (None, None)
        self._logprob = None
        text = self.stops.feed(self.detok.last_segment)
        self.job.emit(Token(t, text, logprob, None if top is None else tuple(top)))
        if self.stops.stopped:
            self.reason = "stop"
            return True
        if self.job.cancelled.is_set():
            self.reason = "cancelled"
            return True
        return len(self.tokens) >= self.job.max_tokens

    def settle(self, tokens: list[int], tally) -> None:
        """After a VERIFY step's reply (tokens: the accepted drafts and the token after them):
        the rejected drafts leave `fed` now (its caches at its next step: `trim`), and the
        step's figures go to tally(drafted, accepted) and to its own."""
        if not self.drafted:
            return
        accepted = len(tokens) - 1
        self.trim = self.drafted - accepted
        del self.fed[len(self.fed) - self.trim :]
        tally(self.drafted, accepted)
        self.count(self.drafted, accepted)
        self.drafted = 0

    def take(self, tokens: list[int]) -> bool:
        """A step's tokens, one by one (its drafter sees each); True once the answer is
        complete (the tokens after that are dropped)."""
        for t in tokens:
            if self.add(t):
                return True
            if self.drafter is not None:
                self.drafter.extend([t])
        return False

    def count(self, drafted: int, accepted: int) -> None:
        """One speculative step's figures."""
        self.passes += 1
        self.drafted_total += drafted
        self.accepted += accepted

    def finish(self) -> None:
        self.detok.finalize()
        stops = self.stops
        tail = "" if stops.stopped else stops.feed(self.detok.last_segment) + stops.finish()
        end = time.perf_counter()
        first = self.first or end
        decode_time = end - first
        n = len(self.tokens)
        self.job.emit(
            Done(
                text=tail,
                finish_reason=self.reason,
                tokens=self.tokens,
                prompt_tokens=len(self.job.prompt),
                cached_tokens=self.source.keep,
                speculative=(self.passes, self.drafted_total, self.accepted),
                completion_tokens=n,
                queue_time=self.start - self.job.submitted,
                time_to_first_token=first - self.job.submitted,
                decode_tokens_per_second=(n - 1) / decode_time if decode_time > 0 else 0.0,
            )
        )
