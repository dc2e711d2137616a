"""`mlxdist bench` as a user runs it: a real cluster measured through its API, table or JSON."""

from __future__ import annotations

import json

import pytest
from conftest import rank_pids, run_cli

from mlxdist.runtime.lockstep import _WORDS


@pytest.mark.cluster
def test_bench_json_reports_speed_memory_and_traffic(tiny_r1):
    r = run_cli(
        "bench", str(tiny_r1), "--local", "3", "--json",
        "--prompt-tokens", "24", "--decode-tokens", "8", "--streams", "3",
        "--conversation-tokens", "40", "--long-prompt-tokens", "96",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    print(json.dumps(result, indent=1))
    assert (result["ranks"], result["parallel"], result["streams"]) == (3, "pipeline", 3)
    assert result["decode_tokens"] == 8  # ignore_eos: exactly the tokens asked for
    figures = ("time_to_first_token", "prompt_tps", "decode_tps", "aggregate_tps")
    figures += ("single_stream_tps", "streams_ratio", "first_turn_ttft", "followup_ttft")
    figures += ("followup_ratio", "long_prompt_tps")
    for key in figures:
        assert result[key] > 0, key
    # the follow-up: the first turn's 40 tokens, its 8-token answer, a new turn of 4
    assert (result["conversation_tokens"], result["followup_tokens"]) == (40, 52)
    assert 0 <= result["followup_cached_tokens"] < 52
    assert result["long_prompt_tokens"] == 96
    hidden = json.loads((tiny_r1 / "config.json").read_text())["hidden_size"] * 4  # float32
    sent = [r["bytes_per_token"] for r in result["per_rank"]]
    # a hidden state over each boundary (decode steps foreseen: no control vector), a token id
    assert sent == [hidden, hidden, 4]
    assert all(r["peak_rss"] > 50 * 2**20 for r in result["per_rank"])
    assert not rank_pids(str(tiny_r1) + " ")  # every rank stopped


@pytest.mark.cluster
def test_bench_prints_tables(tiny_r1):
    r = run_cli(
        "bench", str(tiny_r1), "--local", "2",
        "--prompt-tokens", "8", "--decode-tokens", "4", "--streams", "2",
        "--conversation-tokens", "16", "--long-prompt-tokens", "32",
        "--speculative", "mtp",  # tiny-r1's own MTP layer drafts
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "decode tok/s" in r.stdout and "bytes sent per token" in r.stdout
    assert "follow-up TTFT" in r.stdout and "(32 tokens)" in r.stdout
    assert "2 ranks, pipeline" in r.stdout
    assert "speculative decoding (mtp, up to 1 drafts a pass)" in r.stdout
    assert "tokens per pass" in r.stdout


def test_bench_refuses_local_with_hosts(tiny_r1, tmp_path):
    r = run_cli("bench", str(tiny_r1), "--local", "2", "--hosts", str(tmp_path / "h.toml"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --local")


@pytest.mark.cluster
def test_bench_expert_mode_reports_its_all_sum_traffic(tiny_r1):
    r = run_cli(
        "bench", str(tiny_r1), "--local", "2", "--parallel", "expert", "--json",
        "--prompt-tokens", "8", "--decode-tokens", "6", "--streams", "1",
        "--conversation-tokens", "0", "--long-prompt-tokens", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    print(json.dumps(result, indent=1))
    assert (result["ranks"], result["parallel"], result["decode_tokens"]) == (2, "expert", 6)
    config = json.loads((tiny_r1 / "config.json").read_text())
    hidden = config["hidden_size"] * 4  # float32 on the CPU
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    sent = [r["bytes_per_token"] for r in result["per_rank"]]
    # every rank gives each MoE layer's all_sum one hidden state (attention and dense MLPs too
    # when they are cut over the ranks), plus the control vector that carries the token (its
    # fields and the ids a batched step carries, int32 words)
    control = 4 * _WORDS
    assert all(s >= moe_layers * hidden for s in sent), sent
    assert all(s <= 2 * config["num_hidden_layers"] * hidden + control for s in sent), sent


def test_bench_takes_fetch_and_verify_as_launch_does(tiny_r1, tmp_path):
    """bench takes --fetch and --verify as launch and serve do, through the same check
    (mlxdist.cli.launch._across_ref), before any agent is asked."""
    command = "bench"
    r = run_cli(command, str(tiny_r1), "--hosts", str(tmp_path / "h.toml"), "--fetch", "rsync")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line == "error: --fetch 'rsync' is not one of auto, hub, push"
    usage = run_cli(command, "--help", env={"COLUMNS": "200"}).stdout
    assert "--fetch" in usage and "--verify" in usage and "hash again" in usage
