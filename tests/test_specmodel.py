"""The speculative-decoding model: tokens a pass yields, what a pass over several positions
reads, and R1 with its MTP layer on six M3 Ultras (the figures in docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.perfmodel import bytes_per_token, predict_decode
from launcher.specmodel import (
    break_even,
    mtp_bytes,
    over_positions,
    predict_speculative,
    tokens_per_pass,
)
from quantize.checkpoint import read_config

R1_CONFIG = Path(__file__).parent / "data" / "deepseek-r1-config.json"
SIX = ["M3 Ultra"] * 6


@pytest.fixture(scope="module")
def r1():
    return bytes_per_token(read_config(R1_CONFIG), bits=4)


@pytest.mark.parametrize(
    "acceptance, drafts, expected",
    [(0.85, 1, 1.85), (0.0, 4, 1.0), (1.0, 3, 4.0), (0.5, 2, 1.75)],
)
def test_tokens_per_pass(acceptance, drafts, expected):
    assert tokens_per_pass(acceptance, drafts) == pytest.approx(expected)


@pytest.mark.parametrize(
    "cost_ratio, drafts, expected",
    [(1.0, 1, 0.0), (1.5, 1, 0.5), (1.75, 2, 0.5), (2.0, 1, 1.0), (2.5, 1, None), (4.0, 3, 1.0)],
)
def test_break_even(cost_ratio, drafts, expected):
    got = break_even(cost_ratio, drafts)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-9))


def test_a_pass_over_more_positions_reads_more_experts_and_nothing_else(r1):
    one = over_positions(r1, 1)
    two = over_positions(r1, 2)
    assert [x.routed for x in one.layers] == pytest.approx([x.routed for x in r1.layers], rel=1e-3)
    moe = [i for i, x in enumerate(r1.layers) if x.experts]
    for i in moe:  # 8 of 256 experts, twice: 256 * (1 - (1 - 8/256)^2) = 15.75 distinct
        assert two.layers[i].routed == pytest.approx(r1.layers[i].routed * 15.75 / 8, rel=1e-3)
        assert two.layers[i].attention == r1.layers[i].attention
    assert two.head == r1.head


@pytest.mark.parametrize("mode", ["pipeline", "expert", "tensor"])
@pytest.mark.parametrize("link", ["tb5", "rdma"])
def test_r1_with_mtp_on_six_m3_ultras(r1, mode, link):
    draft = mtp_bytes(r1, read_config(R1_CONFIG)["hidden_size"])
    at = {a: predict_speculative(SIX, r1, a, 1, mode, link, draft_bytes=draft) for a in (0, 0.85)}
    print(f"{mode} {link}: {at[0.85]}")
    plain = predict_decode(SIX, r1, mode=mode, link_name=link)
    assert at[0.85].plain_tokens_per_s == pytest.approx(plain.tokens_per_s)
    assert at[0.85].speedup > 1.1  # 1.85 tokens a pass, for a pass that costs far less than two
    assert at[0].speedup < 1.0  # nothing accepted: only the pass's extra cost
    assert at[0.85].tokens_per_pass == pytest.approx(1.85)


def test_modes_bound_by_messages_gain_more_than_a_pipeline_bound_by_reads(r1):
    """A pass costs a pipeline the second token's extra experts, read on every stage in turn;
    in lock step the same reads are spread over the nodes, and the pass's many all_sums (a
    larger share of a step's time) are paid once for two tokens."""
    draft = mtp_bytes(r1, read_config(R1_CONFIG)["hidden_size"])
    gain = {
        mode: predict_speculative(SIX, r1, 0.85, 1, mode, "tb5", draft_bytes=draft).speedup
        for mode in ("pipeline", "expert", "tensor")
    }
    assert gain["pipeline"] < gain["expert"] and gain["pipeline"] < gain["tensor"]
