"""Log probabilities in OpenAI's shapes, from the Token events' `logprob` and `top`.

Chat: `logprobs.content`, one entry per token: `{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}`. Completions (the legacy shape): `{tokens, token_logprobs, top_logprobs:
[{token: logprob}], text_offset}`. A token's text is its own bytes (a piece of a character that
spans tokens shows as U+FFFD in `token`, whole in `bytes`).
"""

from __future__ import annotations

import functools

from mlxdist.serving.events import Token


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character standing for each
    byte in a byte-level BPE vocabulary (printable bytes stand for themselves; the rest, from
    256 on, in order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


class TokenBytes:
    """Each token id's bytes, from the tokenizer's vocabulary (cached per id)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        sample = list(vocab)[:5000]
        self.byte_level = any(t.startswith("Ġ") for t in sample)
        self.spm = not self.byte_level and any(t.startswith("▁") for t in sample)
        self._of = functools.lru_cache(maxsize=65536)(self._bytes)

    def __call__(self, token: int) -> bytes:
        return self._of(token)

    def _bytes(self, token: int) -> bytes:
        if not (self.byte_level or self.spm):
            return self.tokenizer.decode([token]).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return b""
        if self.spm:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode("utf-8")
        table = _byte_level()
        return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)

    def text(self, token: int) -> str:
        return self(token).decode("utf-8", "replace")


def chat_entry(of: TokenBytes, token: Token) -> dict:
    """One token's entry of a chat answer's logprobs.content."""
    return _entry(of, token.id, token.logprob) | {
        "top_logprobs": [_entry(of, i, lp) for i, lp in token.top or ()]
    }


def _entry(of: TokenBytes, token: int, logprob: float | None) -> dict:
    raw = of(token)
    return {
        "token": raw.decode("utf-8", "replace"),
        "logprob": logprob if logprob is not None else 0.0,
        "bytes": list(raw),
    }


class CompletionLogprobs:
    """A completion's logprobs in the legacy shape, gathered token by token."""

    def __init__(self, of: TokenBytes) -> None:
        self.of = of
        self.offset = 0

    def add(self, tokens: list[Token]) -> dict:
        """The logprobs object of these tokens (text_offset going on from those before)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            text = self.of.text(t.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self.of.text(i): lp for i, lp in t.top or ()})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out
