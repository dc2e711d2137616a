"""The responses a server keeps for `previous_response_id` and GET /v1/responses/{id}: in memory
for its lifetime, least recently used first out.

Each entry holds its whole conversation (every input item since the first turn, and its output),
so a follow-up needs only its parent, and an evicted ancestor breaks no chain. That repeats each
turn's items in every later entry, so the store is bounded by bytes as well as by count: a
coordinator holds the model's first layers and serves for weeks, and its memory is not the
clients' to fill. 1000 responses or 64 MiB of JSON, whichever comes first.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

MAX_RESPONSES = 1000
MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Stored:
    items: list[dict]  # the conversation: input items (instructions apart) then the output
    body: dict  # the response object as it was answered
    size: int


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self.entries: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, items: list[dict], body: dict) -> None:
        size = len(json.dumps(items)) + len(json.dumps(body))
        with self._lock:
            if size > self.max_bytes:
                return  # one conversation past the whole budget is not kept
            old = self.entries.pop(response_id, None)
            self.bytes += size - (old.size if old else 0)
            self.entries[response_id] = Stored(items, body, size)
            while len(self.entries) > self.max_responses or self.bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.size

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            entry = self.entries.get(response_id)
            if entry is not None:
                self.entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self.entries.pop(response_id, None)
            if entry is not None:
                self.bytes -= entry.size
            return entry is not None
