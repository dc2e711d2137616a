"""OpenAI's response bodies for one chat or completion request: chunks as the answer streams, or
the whole answer."""

from __future__ import annotations

import json
import time
import uuid

from mlxdist.serving.answer import Answer, Piece
from mlxdist.serving.api.openai_schema import Sampling
from mlxdist.serving.events import Done, Token
from mlxdist.serving.reasoning import Start


class Output:
    """One request's answer as OpenAI's response bodies: chunks as it streams, or whole."""

    def __init__(self, req: Sampling, model: str, chat: bool, think: Start | None):
        self.req, self.model, self.chat = req, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.answer = Answer(think)
        self.ids: list[int] = []

    def token(self, token: Token) -> Piece:
        """Takes one token's event; returns what its text adds."""
        self.ids.append(token.id)
        return self.answer.token(token.text)

    def tail(self, done: Done) -> Piece:
        return self.answer.finish(done.text)

    def _head(self) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if self.chat and self.req.stream else ""
        )
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, done: Done) -> dict:
        usage = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
            # mlxdist's timings, in seconds from the request's arrival
            "queue_time": round(done.queue_time, 6),
            "time_to_first_token": round(done.time_to_first_token, 6),
            "decode_tokens_per_second": round(done.decode_tokens_per_second, 3),
        }
        if self.answer.think is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.answer.reasoning_tokens}
        passes, drafted, accepted = done.speculative
        if passes:  # mlxdist's: what speculative decoding did for this answer
            usage["speculative"] = {"passes": passes, "drafted": drafted, "accepted": accepted}
        return usage

    def whole(self, done: Done) -> dict:
        self.tail(done)
        text = self.answer.whole()
        choice: dict = {"index": 0, "finish_reason": finish_reason(done.finish_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text.content}
            if self.answer.think is not None:
                choice["message"]["reasoning_content"] = text.reasoning or None
        else:
            choice["text"] = text.content
            choice["logprobs"] = None
        if self.req.return_token_ids:
            choice["token_ids"] = self.ids
        return self._head() | {"choices": [choice], "usage": self.usage(done)}

    def chunk(
        self, delta: dict | None = None, reason: str | None = None, ids: list[int] | None = None
    ) -> str:
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = (delta or {}).get("content", "")
            choice["logprobs"] = None
        choice["finish_reason"] = reason
        if ids is not None:
            choice["token_ids"] = ids
        return sse(self._head() | {"choices": [choice]})

    def usage_chunk(self, done: Done) -> str:
        """The last chunk, when the client asked for usage: no choices, the counts."""
        return sse(self._head() | {"choices": [], "usage": self.usage(done)})

    def deltas(self, piece: Piece, ids: list[int] | None = None) -> list[str]:
        """The chunks for a piece of text: its reasoning first, then its content."""
        out = []
        r, c = piece.reasoning, piece.content
        if r:
            out.append(self.chunk({"reasoning_content": r}, ids=ids))
            ids = [] if ids is not None else None
        if c or (ids and not r):
            out.append(self.chunk({"content": c}, ids=ids))
        return out


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"
