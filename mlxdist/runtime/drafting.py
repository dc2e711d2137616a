"""Prompt lookup: drafting the next tokens of an answer from the text it already holds.

When an answer quotes, edits or summarises (a file given back with one change, a passage cited),
the tokens after its last few tokens have often appeared before, in the prompt or in the answer.
The drafter finds the latest earlier occurrence of the answer's last n tokens (the longest n
from `max_n` down that has one) and proposes what followed it. It needs no weights; the target
model checks every draft, so a wrong one costs only the positions it adds to a pass.

Each token extends an index of where every n-gram (n <= max_n) last began, so drafting is a few
dictionary lookups whatever the context's length. It runs on rank 0, which alone holds the tokens
(the other ranks see hidden states).
"""

from __future__ import annotations

from collections.abc import Iterable


class PromptLookup:
    remote = False  # drafts here, on rank 0

    def __init__(self, tokens: Iterable[int] = (), max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError("prompt lookup needs 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._last: list[dict[tuple, int]] = [{} for _ in range(max_n + 1)]  # n -> gram -> start
        self._before: list[int | None] = [None] * (max_n + 1)  # n -> the tail's earlier start
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens)
            for n in range(1, self.max_n + 1):
                if end < n:
                    self._before[n] = None
                    continue
                gram = tuple(self.tokens[end - n :])
                self._before[n] = self._last[n].get(gram)
                self._last[n][gram] = end - n

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching
        tail; none when no tail of min_n or more tokens occurred before."""
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            start = self._before[n]
            if start is not None:
                return self.tokens[start + n : start + n + k]
        return []


class ReplyDrafts:
    """Drafts made on the rank that drafts with R1's MTP layer (mlxdist/runtime/mtp_drafter.py):
    each step's reply brings the next step's, which rank 0 keeps until then."""

    remote = True  # the sequence's steps carry the DRAFT flag

    def __init__(self) -> None:
        self.next: list[int] = []

    def offer(self, drafts: list[int]) -> None:
        self.next = list(drafts)

    def extend(self, tokens: Iterable[int]) -> None:
        pass  # the drafting rank sees every token: nothing to index here

    def draft(self, k: int) -> list[int]:
        return self.next[: max(0, k)]
