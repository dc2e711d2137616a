"""The prompt cache's default budget for a launch the user gave no --prompt-cache-bytes: what
the plan of the ranks as started leaves (launcher/planner.py Plan.prompt_cache_bytes), given to
rank 0; and how a launch line shows it."""

from __future__ import annotations

from pathlib import Path

from quantize.errors import UserError

from .planner import (
    NodeSpec,
    model_spec_as_stored,
    plan,
    plan_experts,
    tensor_prompt_cache_bytes,
)


def planned_budget(
    model: Path,
    nodes: list[NodeSpec],
    split: list[int],
    parallel: str = "pipeline",
    experts: list[int] | None = None,
    context: int = 4096,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> int | None:
    """Bytes of kept prefixes the ranks of this launch (nodes in rank order, each with its
    layers, experts or tensor share, and the MTP layer on the rank that drafts when speculative
    is "mtp") have room for at `context` tokens; None when the model cannot be planned here
    (rank 0 then takes its own default)."""
    try:
        spec = model_spec_as_stored(model, kv_bits, speculative)
        if parallel == "tensor":
            return tensor_prompt_cache_bytes(nodes, spec, context)
        if parallel == "expert":
            return plan_experts(nodes, spec, context=context, counts=experts).prompt_cache_bytes
        return plan(nodes, spec, context=context, split=list(split)).prompt_cache_bytes
    except (ValueError, KeyError, UserError):
        return None


def local_budget(
    model: Path,
    split: list[int],
    parallel: str = "pipeline",
    experts: list[int] | None = None,
    context: int = 4096,
    kv_bits: int | None = None,
    speculative: str = "none",
) -> int | None:
    """planned_budget for len(split) ranks sharing this machine, each with 1/N of its memory."""
    from .autoparallel import local_nodes
    from .hostfacts import collect
    from .planner import node_spec_from_facts

    machine = node_spec_from_facts("here", collect().to_dict())
    nodes = local_nodes(machine, len(split))
    return planned_budget(model, nodes, split, parallel, experts, context, kv_bits, speculative)


def describe(prompt_cache_bytes: int | None, kv_bits: int | None = None) -> str:
    """The launch line's words on the KV cache: its bits and the prompt cache's budget."""
    parts = [f"KV cache {kv_bits}-bit"] if kv_bits else []
    if prompt_cache_bytes == 0:
        parts.append("prompt cache off")
    elif prompt_cache_bytes is not None:
        parts.append(f"prompt cache {prompt_cache_bytes / 1e9:.2f} GB")
    return ", ".join(parts)
