"""What a request asks of sampling beyond temperature and top-p, on the rank that samples:
logit bias, repetition penalties, a grammar the answer must follow, and log probabilities.

Rank 0 writes a sequence's `SamplingExtras` as JSON; in a pipeline it travels with the
sequence's first step to the last rank, which samples. There the sequence's `Processors` change
the logits before the sampler draws (bias, then penalties, then the grammar's mask), and the
reply carries the token and, when asked, its log probability and the most likely tokens'.

The penalties follow mlx-lm's processors: over the last `context_size` tokens of the prompt and
the answer, presence and repetition counting a token once, frequency once per occurrence. The
log probabilities are the model's own (log-softmax of the raw logits), before any of these.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

CONTEXT_SIZE = 20  # mlx-lm's default window for its penalties
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingExtras:
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    context_size: int = CONTEXT_SIZE
    history: list[int] = field(default_factory=list)  # the prompt's last context_size tokens
    top_logprobs: int | None = None  # None: no log probabilities; 0: the chosen token's only
    grammar: str | None = None  # llguidance's grammar (mlxdist/runtime/grammar.py)
    # A reasoning budget (Anthropic's budget_tokens), for an answer that begins inside a think
    # block: after this many tokens without think_end (the </think> token), only it may follow.
    think_budget: int | None = None
    think_end: int | None = None

    def encode(self) -> bytes:
        body = asdict(self)
        body["logit_bias"] = [[int(k), float(v)] for k, v in self.logit_bias.items()]
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, data: bytes) -> SamplingExtras:
        body = json.loads(data)
        body["logit_bias"] = {int(k): float(v) for k, v in body["logit_bias"]}
        return cls(**body)

    @property
    def penalised(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )

    def reply_words(self) -> int:
        """int32 words a step's token reply takes: the token, and with log probabilities its
        own and `top_logprobs` (id, log probability) pairs."""
        return 1 if self.top_logprobs is None else 2 + 2 * self.top_logprobs


class Processors:
    """One sequence's extras on the sampling rank, with the tokens it has seen (for the
    penalties) and its grammar's state. tokenizer() gives the rank's tokenizer (loaded when a
    grammar first needs it)."""

    def __init__(self, extras: SamplingExtras, vocab_size: int, tokenizer=None):
        self.extras = extras
        self.seen: deque[int] = deque(extras.history[-extras.context_size :], extras.context_size)
        self.bias = None
        if extras.logit_bias:
            ids = mx.array(list(extras.logit_bias), mx.int32)
            self.bias = (ids, mx.array(list(extras.logit_bias.values()), mx.float32))
        self.thinking = extras.think_budget is not None and extras.think_end is not None
        self.thought = 0  # tokens of reasoning so far
        self.grammar = None
        self.failed = False  # the grammar could not go on: only an end token may follow
        if extras.grammar is not None:
            from mlxdist.runtime.grammar import GrammarMask  # llguidance only when asked

            self.ends = mx.zeros((vocab_size,), mx.bool_)
            try:  # rank 0 checked it: a failure here must not stop the rank
                wrapper = tokenizer()
                ends = np.zeros(vocab_size, np.bool_)
                ends[[i for i in wrapper.eos_token_ids if i < vocab_size]] = True
                self.ends = mx.array(ends)
                self.grammar = GrammarMask(wrapper, extras.grammar, vocab_size)
            except BaseException as e:  # llguidance's panics are BaseExceptions
                self._fail(e)

    def apply(self, logits: mx.array) -> mx.array:
        """logits (1, vocab) as the sampler should see them."""
        e = self.extras
        if self.bias is not None:
            ids, values = self.bias
            logits = logits.at[:, ids].add(values.astype(logits.dtype))
        if e.penalised and self.seen:
            logits = self._penalise(logits)
        if self.thinking and self.thought >= e.think_budget:  # the budget is spent: it ends
            keep = mx.arange(logits.shape[-1]) == e.think_end
            logits = mx.where(keep, logits, -mx.inf)
        if e.grammar is None:
            return logits
        if not self.failed and not self.grammar.done:
            try:
                return self.grammar.apply(logits)
            except BaseException as e:
                self._fail(e)
        return mx.where(self.ends, logits, -mx.inf)  # the answer ends here

    def _penalise(self, logits: mx.array) -> mx.array:
        e, seen = self.extras, list(self.seen)
        distinct = mx.array(sorted(set(seen)), mx.int32)
        if e.repetition_penalty != 1.0:
            picked = logits[:, distinct]
            picked = mx.where(
                picked < 0, picked * e.repetition_penalty, picked / e.repetition_penalty
            )
            logits[:, distinct] = picked
        if e.presence_penalty:
            logits[:, distinct] -= e.presence_penalty
        if e.frequency_penalty:
            logits = logits.at[:, mx.array(seen, mx.int32)].subtract(e.frequency_penalty)
        return logits

    def accept(self, token: int) -> None:
        self.seen.append(token)
        if self.thinking:
            self.thinking = token != self.extras.think_end
            self.thought += 1
        if self.grammar is None or self.failed or self.grammar.done:
            return
        try:
            self.grammar.accept(token)
        except BaseException as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """The grammar cannot go on (it should never happen: rank 0 checks every grammar and
        the mask allows only what it accepts): the answer ends rather than the rank."""
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error
        print(f"grammar failed, ending the answer: {error}", file=sys.stderr, flush=True)
        self.failed = True


def sample_reply(sampler, processors: Processors | None, logits: mx.array) -> mx.array:
    """A SAMPLE step's reply from the logits (1, vocab) at its last position: the token the
    sequence's sampler draws, and its log probabilities when the extras ask for them."""
    if processors is None:
        return sampler(logits - mx.logsumexp(logits, keepdims=True)).astype(mx.int32)
    n = processors.extras.top_logprobs
    if n is not None:  # before the processors, some of which write into the logits
        raw = logits.astype(mx.float32)
        raw = np.array((raw - mx.logsumexp(raw, axis=-1, keepdims=True)).reshape(-1))
    shaped = processors.apply(logits)
    token = sampler(shaped - mx.logsumexp(shaped, keepdims=True)).astype(mx.int32)
    t = token.item()
    processors.accept(t)
    if n is None:
        return token
    words = [t, _bits(raw[t])]
    if n:
        top = np.argpartition(-raw, n - 1)[:n]
        top = top[np.argsort(-raw[top], kind="stable")]
        for i in top:
            words += [int(i), _bits(raw[i])]
    return mx.array(words, mx.int32)


def read_logprobs(words: list[int]) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log probability and the top (id, log probability) pairs in a reply
    that sample_reply made (words[0] is the token)."""
    floats = np.array(words[1::2], np.int32).view(np.float32)
    ids = words[2::2]
    return float(floats[0]), [(int(i), float(f)) for i, f in zip(ids, floats[1:])]


def _bits(x: float) -> int:
    return int(np.array([x], np.float32).view(np.int32)[0])
