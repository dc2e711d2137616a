"""An answer as the Responses API's output items: `reasoning` (the model's reasoning as
`reasoning_text`), `message` (`output_text`) and `function_call`, in the order the model wrote
them. Every change is also a streaming event (`response.output_item.added`, ...`.delta`,
...`.done`), so a streamed answer and a whole one are built by the same code; the route adds
each event's `sequence_number`.
"""

from __future__ import annotations

import json
import secrets

from mlxdist.serving.answer import Piece

# An open item's kind -> (its delta event's name, its content part's type)
_TEXT = {
    "reasoning": ("response.reasoning_text", "reasoning_text"),
    "message": ("response.output_text", "output_text"),
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _part(kind: str, text: str) -> dict:
    part = {"type": _TEXT[kind][1], "text": text}
    return part | ({"annotations": [], "logprobs": []} if kind == "message" else {})


class Items:
    """The output items of one answer."""

    def __init__(self) -> None:
        self.output: list[dict] = []
        self.open: str | None = None  # the kind of the last item while it takes deltas
        self.text = ""  # the open item's text so far

    def add(self, piece: Piece) -> list[dict]:
        events: list[dict] = []
        if piece.reasoning:
            events += self._delta("reasoning", piece.reasoning)
        if piece.content:
            events += self._delta("message", piece.content)
        for call in piece.calls:
            events += self.close()
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress"}
            item |= {"call_id": call.id, "name": call.name, "arguments": ""}
            events.append(self._added(item))
            where = {"item_id": item["id"], "output_index": len(self.output) - 1}
            events.append(
                {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments}
            )
            done = {"arguments": call.arguments, "name": call.name}
            events.append({"type": "response.function_call_arguments.done", **where, **done})
            self.output[-1] = item | {"arguments": call.arguments, "status": "completed"}
            events.append(self._item_done())
        return events

    def close(self) -> list[dict]:
        """Ends the open reasoning or message item."""
        kind, self.open = self.open, None
        if kind is None:
            return []
        item = self.output[-1]
        where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
        name = _TEXT[kind][0] + ".done"
        extra = {"logprobs": []} if kind == "message" else {}
        events = [{"type": name, **where, "text": self.text, **extra}]
        events.append(
            {"type": "response.content_part.done", **where, "part": _part(kind, self.text)}
        )
        item["content"] = [_part(kind, self.text)]
        item["status"] = "completed"
        events.append(self._item_done())
        return events

    def _delta(self, kind: str, text: str) -> list[dict]:
        events = []
        if self.open != kind:
            events += self.close()
            item: dict = {"id": new_id("rs" if kind == "reasoning" else "msg"), "type": kind}
            if kind == "reasoning":
                item |= {"summary": [], "content": [], "status": "in_progress"}
            else:
                item |= {"status": "in_progress", "role": "assistant", "content": []}
            events.append(self._added(item))
            where = {"item_id": item["id"], "output_index": len(self.output) - 1}
            part = {"part": _part(kind, "")}
            events.append(
                {"type": "response.content_part.added", **where, "content_index": 0, **part}
            )
            self.open, self.text = kind, ""
        self.text += text
        where = {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}
        extra = {"logprobs": []} if kind == "message" else {}
        delta = {"type": _TEXT[kind][0] + ".delta", **where, "content_index": 0, "delta": text}
        events.append(delta | extra)
        return events

    def _added(self, item: dict) -> dict:
        self.output.append(json.loads(json.dumps(item)))  # the event keeps the item as added
        return {
            "type": "response.output_item.added",
            "output_index": len(self.output) - 1,
            "item": item,
        }

    def _item_done(self) -> dict:
        index = len(self.output) - 1
        item = json.loads(json.dumps(self.output[index]))
        return {"type": "response.output_item.done", "output_index": index, "item": item}
