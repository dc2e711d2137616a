"""The contract between every starter of a rank (local, agent, ssh) and the rank itself: its
settings, its command line `python -m mlxdist.rank FLAGS`, and what it tells its starter back.

Imported by the rank process too: the standard library only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

RANK_MODULE = "mlxdist.rank"  # a rank is `python -m RANK_MODULE *RankSpec.to_argv()`
NODE_FAILED = 4  # rank 0's exit code when another rank failed; its log's last line names it
PEER_GONE = 5  # the exit code of any other rank that left because rank 0 went away
HEARTBEAT_TOKEN_ENV = "MLXDIST_HEARTBEAT_TOKEN"  # in the environment: no one reads it in `ps`
# Set by a starter whose rank must leave when its stdin closes (ssh: the launcher holds it open).
STDIN_LIFELINE_ENV = "MLXDIST_STDIN_LIFELINE"
PARENT_PID_ENV = "MLXDIST_PARENT_PID"  # the starter's pid, so a rank sees a parent gone early
MAX_CONTEXT_ENV = "MLXDIST_MAX_CONTEXT"  # the rank's --max-context when none is given
API_KEY_ENV = "MLXDIST_API_KEY"  # rank 0's API key: in the environment, never on a command line
MAX_BODY_MB = 4  # the largest request body the API reads, by default
AGENT_PORT = 52417  # a host's agent, unless hosts.toml gives its agent_port
# As mlx-lm's generate_step: the prompt but its last token is prefilled in chunks of this size,
# then the last token is a step of its own, so the numbers match a single process exactly.
PREFILL_CHUNK = 2048
MAX_VIEW_BYTES = 64 * 1024  # the dashboard's cluster view on rank 0's command line

PARALLEL = ("pipeline", "expert", "tensor")
BACKENDS = ("ring", "jaccl")  # MLX's: TCP over any network, RDMA over Thunderbolt 5
ATTENTION = ("replicated", "sharded")
KV_BITS = (None, 4, 8)  # as mlx-lm's quantised KV cache
# How tokens are drafted for speculative decoding: prompt lookup on rank 0, or R1's MTP layer on
# the rank that holds the head (pipeline) or rank 0 (lock step).
SPECULATIVE = ("none", "ngram", "mtp")
DRAFT_TOKENS = 4  # drafted tokens a speculative step checks, by default


@dataclass(frozen=True)
class RankSpec:
    """One rank's settings. A pipeline rank has a split (its ranks are len(split)); an expert or
    tensor rank has ranks and, in expert mode, maybe its routed experts per rank."""

    model: str
    parallel: str = "pipeline"
    split: tuple[int, ...] | None = None  # layers per rank
    ranks: int | None = None
    experts: tuple[int, ...] | None = None  # routed experts per rank (default: as even as can be)
    attention: str = "sharded"
    name: str | None = None  # the model's name in the API (default: its folder's)
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = "ring"
    heartbeat: str | None = None  # HOST:PORT where rank 0 hears the ranks
    node: str | None = None  # this host's name, as the launcher calls it
    max_context: int | None = None  # None: MAX_CONTEXT_ENV's, else the model's own limit
    # rank 0's API (the key itself travels in API_KEY_ENV): body limit, docs, Host names, CORS
    max_body_mb: int = MAX_BODY_MB
    docs: bool = False
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    kv_bits: int | None = None  # every rank: KV cache quantised to 4 or 8 bits (None: not)
    # rank 0: bytes of KV cache every rank keeps for known prefixes (None: the rank's default)
    prompt_cache_bytes: int | None = None
    # speculative decoding ("none", "ngram": prompt lookup, "mtp": R1's MTP layer) and drafts
    # per step: rank 0's, and with "mtp" every rank's (the drafting rank loads the layer)
    speculative: str = "none"
    draft_tokens: int = DRAFT_TOKENS
    # rank 0: the launcher's view of the cluster for the dashboard (JSON: each node's chip and
    # memory, the cables, the ring order, the predicted speed); None: the ranks' own figures only
    view: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts or ()))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins or ()))
        if self.max_body_mb < 1:
            raise ValueError("max_body_mb must be at least 1")
        if self.kv_bits not in KV_BITS:
            raise ValueError("kv_bits must be 4 or 8")
        if self.prompt_cache_bytes is not None and self.prompt_cache_bytes < 0:
            raise ValueError("prompt_cache_bytes must be 0 (off) or more")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}")
        if self.view is not None and len(self.view.encode()) > MAX_VIEW_BYTES:
            raise ValueError(f"view must be at most {MAX_VIEW_BYTES} bytes of JSON")
        if not 1 <= self.draft_tokens <= 16:
            raise ValueError("draft_tokens must be between 1 and 16")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.parallel == "pipeline":
            if not self.split:
                raise ValueError("--split is needed in pipeline mode")
            object.__setattr__(self, "split", tuple(self.split))
            object.__setattr__(self, "ranks", len(self.split))
        elif self.split is not None:
            raise ValueError(f"a split is for pipeline mode; {self.parallel} mode takes ranks")
        elif not self.ranks or self.ranks < 1:
            raise ValueError(f"--ranks is needed in {self.parallel} mode")
        if self.experts and self.parallel != "expert":
            raise ValueError(f"--experts is for expert mode, not {self.parallel}")
        object.__setattr__(self, "experts", tuple(self.experts) if self.experts else None)

    @classmethod
    def for_split(
        cls,
        model: str,
        split: Sequence[int],
        parallel: str = "pipeline",
        experts: Sequence[int] | None = None,
        **settings,
    ) -> RankSpec:
        """A rank of a launch given as layers per rank; in expert and tensor mode only the
        number of ranks counts."""
        if parallel == "pipeline":
            return cls(model, parallel, split=tuple(split), experts=experts, **settings)
        return cls(model, parallel, ranks=len(split), experts=experts, **settings)

    def to_argv(self) -> list[str]:
        """The flags after `python -m mlxdist.rank`, each followed by its one value (but --docs)."""
        argv = ["--model", self.model]
        if self.parallel == "pipeline":
            argv += ["--split", _join(self.split)]
        else:
            argv += ["--parallel", self.parallel, "--ranks", str(self.ranks)]
        if self.experts:
            argv += ["--experts", _join(self.experts)]
        argv += ["--host", self.host, "--port", str(self.port)]
        if self.name is not None:
            argv += ["--name", self.name]
        argv += ["--backend", self.backend]
        if self.attention != "sharded":
            argv += ["--attention", self.attention]
        if self.max_context:
            argv += ["--max-context", str(self.max_context)]
        if self.heartbeat:
            argv += ["--heartbeat", self.heartbeat]
        if self.node:
            argv += ["--node", self.node]
        if self.max_body_mb != MAX_BODY_MB:
            argv += ["--max-body-mb", str(self.max_body_mb)]
        if self.docs:
            argv += ["--docs"]
        for name in self.allowed_hosts:
            argv += ["--allowed-host", name]
        for origin in self.cors_origins:
            argv += ["--cors-origin", origin]
        if self.kv_bits:
            argv += ["--kv-bits", str(self.kv_bits)]
        if self.prompt_cache_bytes is not None:
            argv += ["--prompt-cache-bytes", str(self.prompt_cache_bytes)]
        if self.speculative != "none":
            argv += ["--speculative", self.speculative, "--draft-tokens", str(self.draft_tokens)]
        if self.view is not None:
            argv += ["--view", self.view]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> RankSpec:
        """The spec a rank's flags give (sys.argv's when None); exits with a usage error, as
        argparse does, for flags it cannot take."""
        p = _parser()
        a = p.parse_args(argv)
        if a.parallel == "pipeline":
            if not a.split:
                p.error("--split is needed in pipeline mode")
            split = _ints(p, "--split", a.split)
        elif not a.ranks or a.ranks < 1:
            p.error(f"--ranks is needed in {a.parallel} mode")
        else:
            split = None
        experts = _ints(p, "--experts", a.experts) if a.experts else None
        settings = {f.name: getattr(a, f.name) for f in fields(cls)}
        try:
            return cls(**settings | {"split": split, "experts": experts})
        except ValueError as e:
            p.error(str(e))


def _join(counts: Sequence[int]) -> str:
    return ",".join(str(n) for n in counts)


def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        p.error(f"{flag} takes whole numbers separated by commas, not {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=RANK_MODULE)
    p.add_argument("--model", required=True)
    p.add_argument("--split", help="layers per rank, e.g. 15,15 (pipeline)")
    p.add_argument("--parallel", choices=PARALLEL, default="pipeline")
    p.add_argument("--ranks", type=int, help="ranks in the group (expert and tensor)")
    p.add_argument("--experts", help="routed experts per rank, e.g. 3,3,2 (expert)")
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        default="sharded",
        help="expert mode: attention heads and shared experts cut over the ranks where they "
        "divide (measured faster), or whole on every rank",
    )
    p.add_argument("--name", default=None, help="model name shown by the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", choices=BACKENDS, default="ring")
    p.add_argument("--heartbeat", default=None, help="HOST:PORT where rank 0 hears the ranks")
    p.add_argument("--node", default=None, help="this host's name, as the launcher calls it")
    p.add_argument(
        "--max-context",
        type=int,
        default=int(os.environ.get(MAX_CONTEXT_ENV, "0")) or None,
        help="tokens of prompt and answer a request may use (default: the model's own limit)",
    )
    p.add_argument("--max-body-mb", type=int, default=MAX_BODY_MB, help="largest request body")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc, /openapi.json")
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[])
    p.add_argument("--cors-origin", dest="cors_origins", action="append", default=[])
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None, help="quantised KV cache")
    p.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=None,
        help="KV cache kept for known prefixes, in bytes per rank (0: off)",
    )
    p.add_argument("--speculative", choices=SPECULATIVE, default="none")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS)
    p.add_argument("--view", default=None, help="the cluster as the launcher sees it (JSON)")
    return p
