"""Stop sequences: generation ends where the decoded text first contains one, which is cut off."""

from __future__ import annotations


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
