"""Stop sequences: generation ends where the decoded text first contains one, which is cut off;
and the end tokens a model names in its config.json and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path


class StopMatcher:
    """Fed the decoded text piece by piece, passes on only what cannot begin a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buf, self.held = self.held + text, ""
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return buf[: min(hits)]
        keep = self._held_suffix(buf)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """The text held back when the output ends without a stop string."""
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _held_suffix(self, text: str) -> int:
        longest = max(len(s) for s in self.stops) - 1
        for n in range(min(len(text), longest), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0


def end_token_ids(config: dict, generation_config: dict | None) -> list[int]:
    """Every token that ends an answer: config.json's eos_token_id and generation_config.json's
    (an id or a list). The two may differ: gpt-oss's config names only <|return|>, its generation
    config adds <|call|> and <|endoftext|>; GLM-4.5's adds <|user|> and <|observation|>."""
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        for i in [value] if isinstance(value, int) else value or []:
            if i not in ids:
                ids.append(i)
    return ids


def read_end_token_ids(model_dir: str | Path, config: dict) -> list[int]:
    """end_token_ids() with the folder's generation_config.json, when it has a readable one."""
    path = Path(model_dir) / "generation_config.json"
    try:
        generation = json.loads(path.read_text())
    except (OSError, ValueError):
        generation = None
    return end_token_ids(config, generation if isinstance(generation, dict) else None)
