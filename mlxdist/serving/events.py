"""What rank 0's loop tells a request's handler: small frozen records on the job's queue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """One generated token and the text it adds (held back while it may begin a stop string)."""

    id: int
    text: str
    # When the request asked for log probabilities: the token's, and the most likely tokens'
    # (id, log probability), from the model's own distribution at that position.
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Done:
    """The answer is complete: the text held back till the end, why it ended, counts, timings."""

    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    tokens: list[int]
    prompt_tokens: int
    completion_tokens: int
    queue_time: float  # seconds from submission to the answer's start
    time_to_first_token: float  # seconds from submission
    decode_tokens_per_second: float
    cached_tokens: int = 0  # prompt tokens the prefix cache held, not computed again
    speculative: tuple[int, int, int] = (0, 0, 0)  # speculative steps, drafts, drafts accepted


@dataclass(frozen=True)
class Failed:
    """The request failed: a step raised, or a node failed."""

    message: str


@dataclass(frozen=True)
class Logits:
    """The logits at a prompt's last position."""

    values: list[float]


@dataclass(frozen=True)
class Stats:
    """Every rank's counters, and the most steps the ring has held at once."""

    ranks: list[dict]
    in_flight_peak: int
    prefix_cache: dict | None = None  # rank 0's index: entries, bytes, budget, hits
    speculative: dict | None = None  # drafts checked and accepted, when speculation is on


@dataclass(frozen=True)
class Gone:
    """The client went away before its whole answer was ready (put by the API itself)."""


Event = Token | Done | Failed | Logits | Stats | Gone
