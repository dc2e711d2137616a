"""An answer as Anthropic's content blocks: thinking, text and tool_use, in the order the model
wrote them. Every change is also a streaming event (content_block_start / _delta / _stop), so a
streamed answer and a whole one are built by the same code.
"""

from __future__ import annotations

import hashlib
import json

from mlxdist.serving.answer import Piece


def signature(thinking: str) -> str:
    """A thinking block's `signature`: Anthropic's proves the block came from its model; here it
    is only a digest of the text (clients send it back; nothing checks it)."""
    return "mlxdist-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


class Blocks:
    """The content blocks of one answer. show_thinking False: the reasoning is left out."""

    def __init__(self, show_thinking: bool = True) -> None:
        self.show_thinking = show_thinking
        self.content: list[dict] = []
        self.open = False  # the last block still takes deltas

    def add(self, piece: Piece) -> list[dict]:
        """What a piece of output adds, as events: its reasoning, its text, then its calls."""
        events: list[dict] = []
        if piece.reasoning and self.show_thinking:
            events += self._delta("thinking", piece.reasoning)
        if piece.content:
            events += self._delta("text", piece.content)
        for call in piece.calls:
            events += self.close()
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            events.append(self._start(block))
            self.content[-1]["input"] = json.loads(call.arguments)
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            events.append(self._event("content_block_delta", delta))
            events += self.close()
        return events

    def close(self) -> list[dict]:
        """Ends the open block (a thinking block gets its signature first)."""
        if not self.open:
            return []
        self.open = False
        events = []
        last = self.content[-1]
        if last["type"] == "thinking":
            last["signature"] = signature(last["thinking"])
            sig = {"type": "signature_delta", "signature": last["signature"]}
            events.append(self._event("content_block_delta", sig))
        events.append({"type": "content_block_stop", "index": len(self.content) - 1})
        return events

    def _delta(self, kind: str, text: str) -> list[dict]:
        events = []
        if not self.open or self.content[-1]["type"] != kind:
            events += self.close()
            empty = (
                {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {}
            )
            events.append(self._start(empty or {"type": "text", "text": ""}))
        self.content[-1][kind] += text
        events.append(self._event("content_block_delta", {"type": f"{kind}_delta", kind: text}))
        return events

    def _start(self, block: dict) -> dict:
        self.content.append(dict(block))
        self.open = True
        return {
            "type": "content_block_start",
            "index": len(self.content) - 1,
            "content_block": block,
        }

    def _event(self, kind: str, delta: dict) -> dict:
        return {"type": kind, "index": len(self.content) - 1, "delta": delta}


def sse(event: dict) -> str:
    """One server-sent event as Anthropic writes them: its type as the event name."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
