"""OpenAI's response bodies for one chat or completion request: chunks as the answer streams, or
the whole answer; reasoning in `reasoning_content`, tool calls in `tool_calls`, log
probabilities when asked."""

from __future__ import annotations

import json
import time
import uuid

from mlxdist.serving.answer import Answer, Piece
from mlxdist.serving.api.logprobs import CompletionLogprobs, TokenBytes, chat_entry
from mlxdist.serving.api.openai_schema import Sampling
from mlxdist.serving.events import Done, Token
from mlxdist.serving.tool_calls import ToolCall


class Output:
    """One request's answer as OpenAI's response bodies: chunks as it streams, or whole.
    token_bytes: given when the request asked for log probabilities."""

    def __init__(
        self,
        req: Sampling,
        model: str,
        chat: bool,
        answer: Answer,
        token_bytes: TokenBytes | None = None,
    ):
        self.req, self.model, self.chat, self.answer = req, model, chat, answer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.ids: list[int] = []
        self.token_bytes = token_bytes
        self.tokens: list[Token] = []  # with log probabilities, when asked
        self.unsent = 0  # tokens whose log probabilities no chunk has carried yet
        self.legacy = None if chat or token_bytes is None else CompletionLogprobs(token_bytes)
        self.calls_sent = 0

    def token(self, token: Token) -> Piece:
        """Takes one token's event; returns what its text adds."""
        self.ids.append(token.id)
        if self.token_bytes is not None:
            self.tokens.append(token)
        return self.answer.token(token.text)

    def tail(self, done: Done) -> Piece:
        return self.answer.finish(done.text)

    def finish_reason(self, done: Done) -> str:
        if self.answer.calls:
            return "tool_calls"
        return "length" if done.finish_reason == "length" else "stop"

    def _head(self) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if self.chat and self.req.stream else ""
        )
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[Token]) -> dict | None:
        if self.token_bytes is None:
            return None
        if self.legacy is not None:
            return self.legacy.add(tokens)
        return {"content": [chat_entry(self.token_bytes, t) for t in tokens], "refusal": None}

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
        choice: dict = {"index": 0, "finish_reason": self.finish_reason(done)}
        if self.chat:
            message: dict = {"role": "assistant", "content": text.content}
            if self.answer.think is not None:
                message["reasoning_content"] = text.reasoning or None
            if text.calls:
                message["tool_calls"] = [tool_call(c) for c in text.calls]
                message["content"] = text.content if text.content.strip() else None
            choice["message"] = message
            if self.token_bytes is not None:
                choice["logprobs"] = self._logprobs(self.tokens)
        else:
            choice["text"] = text.content
            choice["logprobs"] = self._logprobs(self.tokens)
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
        if self.token_bytes is not None and self.unsent < len(self.tokens):
            # the tokens generated since the last chunk, whose text this one (or a later) holds
            choice["logprobs"] = self._logprobs(self.tokens[self.unsent :])
            self.unsent = len(self.tokens)
        choice["finish_reason"] = reason
        if ids is not None:
            choice["token_ids"] = ids
        return sse(self._head() | {"choices": [choice]})

    def usage_chunk(self, done: Done) -> str:
        """The last chunk, when the client asked for usage: no choices, the counts."""
        return sse(self._head() | {"choices": [], "usage": self.usage(done)})

    def deltas(self, piece: Piece, ids: list[int] | None = None) -> list[str]:
        """The chunks for a piece of output: its reasoning, its content, then its tool calls."""
        out = []
        r, c = piece.reasoning, piece.content
        if r:
            out.append(self.chunk({"reasoning_content": r}, ids=ids))
            ids = [] if ids is not None else None
        if c or (ids and not r):
            out.append(self.chunk({"content": c}, ids=ids))
        for call in piece.calls:
            out.append(self.chunk({"tool_calls": [tool_call(call, self.calls_sent)]}))
            self.calls_sent += 1
        return out


def tool_call(call: ToolCall, index: int | None = None) -> dict:
    """A call as OpenAI writes it: whole in a message, or with its index in a streamed delta."""
    body = {"id": call.id, "type": "function"}
    body["function"] = {"name": call.name, "arguments": call.arguments}
    return body if index is None else {"index": index} | body


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
