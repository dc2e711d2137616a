"""Which of a model's files each node needs: pure, from the safetensors index and the file list.

Pipeline: the small files (config, tokenizer, index, ...) and the weight files holding the
node's layers, plus the embedding on the first stage (and on the last when tied) and the final
norm and head on the last; the same rule as the stage loader (mlxdist/runtime/stage.py).
Expert and tensor: every rank reads every layer, so every node needs every file.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from quantize.checkpoint import human_bytes
from quantize.errors import UserError
from quantize.mtp import is_mtp
from quantize.nodes import stage_needs

from .planner import NodeSpec

WEIGHT_SUFFIX = ".safetensors"
EVERY_FILE = {
    "expert": "every node needs every file in expert mode (each rank reads every layer)",
    "tensor": "every node needs every file in tensor mode (each rank reads a cut of every tensor)",
}


class DiskError(UserError):
    """A node whose share of the model does not fit its free disk."""


class UnlistedError(UserError):
    """An index naming weight files the repo's listing does not hold."""


@dataclass(frozen=True)
class Share:
    """One node's files and what they weigh."""

    rank: int
    files: list[str]
    bytes: int


# The files besides the weights a model needs to load, as mlx-lm fetches them; a repo's
# README, .gitattributes, PyTorch or GGUF copies and images are not sent to any node.
SMALL_PATTERNS = (
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
)


def is_small(name: str) -> bool:
    """A file every node gets: config, tokenizer and template files at the top of the repo (node
    folders and the quantizer's manifest, which lists files a node does not get, stay behind)."""
    if "/" in name or name == "manifest.json":
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in SMALL_PATTERNS)


def node_files(
    weights: dict[str, str],
    repo_files: list[str],
    mode: str,
    split: list[int],
    rank: int,
    tied: bool = False,
) -> list[str]:
    """The files rank needs, sorted: weights maps tensor name to file (the index's weight_map),
    repo_files lists every file of the model, split is layers per rank (pipeline) or one entry
    per rank (expert, tensor)."""
    small = [f for f in repo_files if is_small(f)]
    if mode in EVERY_FILE:  # the index's files (a consolidated.safetensors beside them is not)
        named = set(weights.values()) or {
            f for f in repo_files if f.endswith(WEIGHT_SUFFIX) and "/" not in f
        }
        return sorted(set(small) | named)
    if mode != "pipeline":
        raise ValueError(f"unknown parallel mode {mode!r}")
    start = sum(split[:rank])
    end = start + split[rank]
    first, last = rank == 0, rank == len(split) - 1
    mine = {f for k, f in weights.items() if stage_needs(k, start, end, first, last, tied)}
    # R1's MTP layer (`quantize --keep-mtp`): the rank that holds the head drafts with it
    mine |= {f for k, f in weights.items() if last and is_mtp(k)}
    return sorted(set(small) | mine)


def unlisted(weights: dict[str, str], sizes: dict[str, int]) -> list[str]:
    """The files the index's weight_map names that the listing (sizes) lacks, sorted."""
    return sorted(set(weights.values()) - set(sizes))


def shares(
    weights: dict[str, str],
    sizes: dict[str, int],
    mode: str,
    split: list[int],
    tied: bool = False,
    repo: str = "the model",
) -> list[Share]:
    """Every rank's files and bytes; sizes maps each of the model's files to its size. Refuses,
    naming them and repo, weight files the index names that sizes does not list."""
    missing = unlisted(weights, sizes)
    if missing:
        raise UnlistedError(
            f"the index of {repo} names {len(missing)} weight file(s) its file listing does not "
            f"hold: {', '.join(missing)}; the repo is incomplete or its index is wrong"
        )
    out = []
    for rank in range(len(split)):
        files = node_files(weights, list(sizes), mode, split, rank, tied)
        out.append(Share(rank, files, sum(sizes[f] for f in files)))
    return out


def every_file_note(mode: str) -> str | None:
    """The line a launch or plan prints when each node needs the whole model."""
    return EVERY_FILE.get(mode)


def disk_shortfalls(
    nodes: list[NodeSpec], rows: list[Share], fetch: str, have: list[int] | None = None
) -> list[str]:
    """One phrase per node whose share (less the have[r] bytes already there) exceeds the free
    disk where it lands: the Hugging Face cache when it fetches from the Hub, else its models
    folder. A node that reports no free disk is not judged."""
    short = []
    for node, row in zip(nodes, rows):
        free = node.hf_cache_free if fetch == "hub" else node.disk_free
        need = row.bytes - (have[row.rank] if have else 0)
        if free is not None and need > free:
            where = "Hugging Face cache" if fetch == "hub" else "models folder"
            short.append(
                f"node {node.name} needs {human_bytes(need)} ({need} bytes) for its files but has "
                f"{human_bytes(free)} ({free} bytes) free in its {where}"
            )
    return short


def check_disk(
    nodes: list[NodeSpec], rows: list[Share], fetch: str, have: list[int] | None = None
) -> None:
    """Refuses the launch, in one line, when any node's share does not fit its disk."""
    short = disk_shortfalls(nodes, rows, fetch, have)
    if short:
        raise DiskError("; ".join(short) + ": free disk space there, or give it fewer layers")
