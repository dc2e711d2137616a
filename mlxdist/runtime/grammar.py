"""Structured output on the rank that samples: an llguidance matcher over the model's tokenizer,
whose token mask sets the logits of every token the grammar forbids to -inf, advanced by each
token sampled.

The next mask is computed on a worker thread as soon as a token is accepted (llguidance drops
the GIL while it computes, and so does mx.eval), so that it overlaps the next forward pass;
apply() starts the logits' evaluation, then waits for the mask.
llguidance.mlx's own apply is a Metal kernel (it raises "No Metal back-end" on MLX's CPU
backend): the mask is unpacked here with numpy and applied with mx.where, which runs on both.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from transformers import PreTrainedTokenizerFast

_tokenizers: dict[tuple[int, tuple[int, ...]], tuple[object, llguidance.LLTokenizer]] = {}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
# Errors without llguidance's parser state and grammar dump (it would echo the client's schema).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class GrammarViolation(ValueError):
    """A token the grammar's mask forbade was accepted: the sampler did not apply the mask."""


def ll_tokenizer(tokenizer, eos_ids=None) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (mlx-lm's TokenizerWrapper or a fast Hugging Face
    tokenizer), built once per tokenizer and end ids in this process (1.5 s for R1's 129k tokens
    on a slow CPU: best built before the first request needs it).
    `eos_ids` (default: the wrapper's eos_token_ids, else the tokenizer's eos) are the tokens the
    mask allows once the grammar is complete."""
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        hf, ends = tokenizer, [tokenizer.eos_token_id]
    else:  # mlx-lm's wrapper: the HF tokenizer, and the end ids of generation_config.json too
        hf, ends = tokenizer._tokenizer, tokenizer.eos_token_ids
    if eos_ids is None:
        eos_ids = ends
    ends = tuple(sorted(int(i) for i in eos_ids))
    key = (id(hf), ends)
    with _lock:
        held = _tokenizers.get(key)
        if held is None:  # the cache keeps hf alive, so its id is never reused for another
            held = (hf, llguidance.hf.from_tokenizer(hf, eos_token=list(ends)))
            _tokenizers[key] = held
        return held[1]


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:  # sequences in a batch compute their masks side by side
            _pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="grammar")
        return _pool


class GrammarMask:
    """One sequence's grammar (a string from mlxdist.serving.grammar) over logits `vocab_size`
    wide; ids the tokenizer does not have (the model's padding past its vocabulary) are never
    allowed."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int, eos_ids=None):
        self.tokenizer = ll_tokenizer(tokenizer, eos_ids)
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        if self.matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {self._error()}")
        self.vocab_size = vocab_size
        self._words = allocate_token_bitmask(1, self.tokenizer.vocab_size)
        self._done = self.matcher.is_stopped()
        self._next: Future | None = None  # the next mask, being computed
        self._mask: np.ndarray | None = None  # the next mask, once computed
        self._ahead()  # the first mask while the prompt is read

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but an end token may follow."""
        return self._done

    def allowed(self) -> np.ndarray:
        """The mask for the next token: a bool per id, vocab_size long."""
        if self._mask is None:
            if self._next is None:  # accept() raised: the matcher is in its error state
                raise GrammarViolation(f"the grammar failed: {self._error()}")
            self._mask, self._next = self._next.result(), None
        return self._mask

    def apply(self, logits: mx.array) -> mx.array:
        """`logits` ((V,) or (1, V)) with every token the grammar forbids here at -inf."""
        mx.async_eval(logits)  # the forward pass runs while the mask is awaited
        return mx.where(mx.array(self.allowed()), logits, -mx.inf)

    def accept(self, token: int) -> None:
        """Advance past `token`; then start computing the next mask."""
        token = int(token)
        if not 0 <= token < self.tokenizer.vocab_size:  # the model's padding past the vocabulary
            raise GrammarViolation(f"token {token} is not in the tokenizer's vocabulary")
        if self._next is not None:
            self._next.result()  # the matcher is not shared with a running computation
        self._next = self._mask = None
        if not self.matcher.consume_token(token):
            raise GrammarViolation(
                f"token {token} ({self.tokenizer.dbg_tokens([token])}) is not allowed by the "
                f"grammar here: {self._error() or 'the grammar is complete'}"
            )
        self._done = self.matcher.is_stopped()
        self._ahead()

    def _error(self) -> str:
        return self.matcher.get_error().strip().split("\n")[0]

    def _ahead(self) -> None:
        self._next = _executor().submit(self._compute)

    def _compute(self) -> np.ndarray:
        fill_next_token_bitmask(self.matcher, self._words)
        known = min(self.tokenizer.vocab_size, self.vocab_size)
        bits = np.unpackbits(self._words.view(np.uint8), count=known, bitorder="little")
        allowed = np.zeros(self.vocab_size, np.bool_)
        allowed[:known] = bits
        return allowed
