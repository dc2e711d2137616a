"""How much speculative decoding speeds up decoding on a cluster, from the performance model's
cost of a step (perfmodel.py) and an acceptance rate. Pure functions; nothing runs a model.

A speculative pass feeds the last token and k drafts, and yields the drafts accepted up to the
first rejection, then one token of the model's own: with each draft accepted with probability a
(given the ones before it were), 1 + a + a^2 + ... + a^k tokens on average. It costs one step of
the model over k+1 positions, which on a Mac's GPU, bound by reading weights, reads every weight
once as a single token does, except routed experts: k+1 tokens route to more distinct experts
than one (the expectation under uniform routing). It pays the same messages as one token (a
pipeline's hops, lock step's all_sums: only their payload grows, by k+1 hidden states). A
multi-token-prediction drafter (R1's MTP layer) adds, per draft, one more decoder block with its
MoE, its projection of the two normed inputs and the shared head, read on the rank holding the
head, after the model's own pass.

DeepSeek's V3 report gives 85-90% acceptance of the second token from its one MTP module (k=1),
and a 1.8x decode speed-up; vLLM measured 81-82% on R1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .perfmodel import EFFICIENCY, ActiveBytes, LinkSpec, node_chip, predict_decode
from .planner import NodeSpec


@dataclass(frozen=True)
class SpeculativePrediction:
    mode: str
    link: str
    tokens_per_s: float  # with speculation
    plain_tokens_per_s: float  # without
    speedup: float
    tokens_per_pass: float
    pass_seconds: float


def tokens_per_pass(acceptance: float, drafts: int) -> float:
    """Expected tokens a pass yields: the accepted drafts, then the model's own token."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"acceptance must be in [0, 1], not {acceptance}")
    return sum(acceptance**i for i in range(drafts + 1))


def over_positions(model: ActiveBytes, positions: int) -> ActiveBytes:
    """What one step over `positions` tokens reads: every weight once, and the distinct routed
    experts the positions pick (k of E each, uniform routing: E * (1 - (1 - k/E)^positions))."""
    k = model.experts_per_token
    layers = []
    for layer in model.layers:
        if layer.experts and k:
            distinct = layer.experts * (1 - (1 - k / layer.experts) ** positions)
            layer = replace(layer, routed=round(layer.routed / k * distinct))
        layers.append(layer)
    return replace(model, layers=layers)


def mtp_bytes(model: ActiveBytes, hidden_size: int, bits: int = 4) -> int:
    """One MTP draft's reads: a decoder block like the model's last (its MoE included), the
    projection of the normed hidden state and embedding (2h x h at `bits`), the shared head."""
    return model.layers[-1].read + 2 * hidden_size * hidden_size * bits // 8 + model.head


def predict_speculative(
    nodes: list[str | NodeSpec],
    model: ActiveBytes,
    acceptance: float,
    drafts: int = 1,
    mode: str = "pipeline",
    link_name: str | LinkSpec = "tb5",
    context: int = 0,
    draft_bytes: int = 0,
) -> SpeculativePrediction:
    """Decode tokens/s with speculation against without. draft_bytes: what drafting one token
    reads on the rank holding the head (mtp_bytes for R1's MTP layer; 0 for prompt lookup)."""
    plain = predict_decode(nodes, model, mode=mode, link_name=link_name, context=context)
    wide = predict_decode(
        nodes, over_positions(model, drafts + 1), mode=mode, link_name=link_name, context=context
    )
    head = node_chip(nodes[-1] if mode == "pipeline" else nodes[0])
    drafting = drafts * draft_bytes / (head.bandwidth * EFFICIENCY)
    pass_seconds = wide.seconds_per_token + drafting
    per_pass = tokens_per_pass(acceptance, drafts)
    speed = per_pass / pass_seconds
    return SpeculativePrediction(
        mode=mode,
        link=plain.link,
        tokens_per_s=speed,
        plain_tokens_per_s=plain.tokens_per_s,
        speedup=speed / plain.tokens_per_s,
        tokens_per_pass=per_pass,
        pass_seconds=pass_seconds,
    )


def break_even(cost_ratio: float, drafts: int = 1) -> float | None:
    """The acceptance at which speculation starts to pay: where a pass's expected tokens equal
    its cost in plain steps (a pass over k+1 positions and the drafting, over one step's time).
    None when no acceptance pays (a pass costs more than k+1 steps)."""
    if cost_ratio <= 1:
        return 0.0
    if cost_ratio > drafts + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):  # tokens_per_pass rises with acceptance: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if tokens_per_pass(mid, drafts) < cost_ratio else (low, mid)
    return high
