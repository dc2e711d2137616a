"""How rank 0 speculates: the drafter and how many tokens it drafts per step."""

from __future__ import annotations

from dataclasses import dataclass

# ngram: prompt lookup (mlxdist/runtime/drafting.py); mtp: R1's multi-token-prediction layer
# (mlxdist/runtime/mtp_drafter.py)
MODES = ("none", "ngram", "mtp")
DEFAULT_DRAFT_TOKENS = 4


@dataclass
class Speculation:
    mode: str = "none"
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    # rank 0's figures for /mlxdist/stats: VERIFY passes, tokens drafted and accepted
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    whole: int = 0  # passes whose drafts were all accepted
    none: int = 0  # passes whose first draft was rejected

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculative must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 1 <= self.draft_tokens <= 16:
            raise ValueError("draft tokens must be between 1 and 16")

    def count(self, drafted: int, accepted: int) -> None:
        self.passes += 1
        self.drafted += drafted
        self.accepted += accepted
        self.whole += accepted == drafted
        self.none += accepted == 0

    def figures(self) -> dict:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        per_pass = (self.accepted + self.passes) / self.passes if self.passes else 0.0
        return {
            "mode": self.mode,
            "draft_tokens": self.draft_tokens,
            "passes": self.passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "passes_all_accepted": self.whole,
            "passes_none_accepted": self.none,
            "acceptance_rate": round(rate, 4),
            "tokens_per_pass": round(per_pass, 3),
        }
