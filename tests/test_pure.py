"""Pure functions: splits, the hostfile, the ring's control vector, tensor-to-layer mapping."""

import json

import mlx.core as mx
import pytest

from launcher.hostfile import free_ports, ring_hostfile
from mlxdist.cli.launch import _parse_split
from mlxdist.runtime.stage import stage_range
from mlxdist.runtime.step import CMD_STOP, LOGITS, NEW, SAMPLE, Step
from quantize.checkpoint import layer_of
from quantize.errors import UserError
from quantize.nodes import even_split, expert_sets, row_runs, spans
from quantize.nodes import stage_needs as _needed


@pytest.mark.parametrize(
    "layers,ranks,expected",
    [(30, 2, [15, 15]), (30, 4, [8, 8, 7, 7]), (5, 3, [2, 2, 1]), (4, 1, [4]), (3, 3, [1, 1, 1])],
)
def test_even_split(layers, ranks, expected):
    assert even_split(layers, ranks) == expected


@pytest.mark.parametrize(
    "experts,counts,groups,expected",
    [
        (8, [4, 4], 1, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (8, [4, 4], 2, [[0, 1, 4, 5], [2, 3, 6, 7]]),  # half of each group of 4
        (8, [3, 3, 2], 2, [[0, 1, 4], [2, 5, 6], [3, 7]]),
        (8, [3, 3, 2], 3, [[0, 1, 2], [3, 4, 5], [6, 7]]),  # groups that do not divide: in order
        (4, [4], 2, [[0, 1, 2, 3]]),
        (16, [4, 4, 4, 4], 4, [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]),
    ],
)
def test_expert_sets(experts, counts, groups, expected):
    assert expert_sets(experts, counts, groups) == expected


@pytest.mark.parametrize("experts,counts", [(8, [4, 3]), (8, [8, 0]), (8, [5, 4])])
def test_expert_sets_refuse_counts_that_do_not_cover(experts, counts):
    with pytest.raises(ValueError, match="add up to"):
        expert_sets(experts, counts)


@pytest.mark.parametrize(
    "rows,runs,text",
    [([0, 1, 4, 5], [(0, 2), (4, 2)], "0-1,4-5"), ([3], [(3, 1)], "3"), ([], [], "")],
)
def test_row_runs_and_spans(rows, runs, text):
    assert row_runs(rows) == runs and spans(rows) == text


@pytest.mark.parametrize(
    "split,rank,expected", [([15, 15], 0, (0, 15)), ([15, 15], 1, (15, 30)), ([2, 1, 3], 2, (3, 6))]
)
def test_stage_range(split, rank, expected):
    assert stage_range(split, rank) == expected


@pytest.mark.parametrize(
    "split,ranks,layers,expected",
    [(None, 2, 30, [15, 15]), ("10,20", 2, 30, [10, 20]), ("1,1,2", 3, 4, [1, 1, 2])],
)
def test_parse_split(split, ranks, layers, expected):
    assert _parse_split(split, ranks, layers) == expected


@pytest.mark.parametrize(
    "split,ranks,layers,message",
    [
        (None, 31, 30, "cannot split 30 layers over 31 ranks"),
        (None, 0, 30, "at least 1 rank"),
        ("10,10", 2, 30, "add up to 30"),
        ("a,b", 2, 30, "layer counts"),
        ("0,30", 2, 30, "positive"),
    ],
)
def test_parse_split_errors(split, ranks, layers, message):
    with pytest.raises(UserError, match=message):
        _parse_split(split, ranks, layers)


@pytest.mark.parametrize(
    "key,layer",
    [
        ("model.layers.3.self_attn.q_proj.weight", 3),
        ("model.layers.61.eh_proj.weight", 61),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
    ],
)
def test_layer_of(key, layer):
    assert layer_of(key) == layer


@pytest.mark.parametrize(
    "key,first,last,tied,needed",
    [
        ("model.layers.2.mlp.gate.weight", False, False, False, True),
        ("model.layers.4.mlp.gate.weight", True, True, False, False),  # outside 2..3
        ("model.layers.1.mlp.gate.weight", True, True, False, False),
        ("model.embed_tokens.weight", True, False, False, True),
        ("model.embed_tokens.weight", False, True, False, False),
        ("model.embed_tokens.weight", False, True, True, True),  # tied head
        ("model.norm.weight", False, True, False, True),
        ("lm_head.weight", True, False, False, False),
    ],
)
def test_needed_tensors(key, first, last, tied, needed):
    assert _needed(key, 2, 4, first, last, tied) == needed


def test_ring_hostfile_format():
    text = ring_hostfile([["127.0.0.1:5000"], ["169.254.1.2:5001"]])
    assert json.loads(text) == [["127.0.0.1:5000"], ["169.254.1.2:5001"]]
    with pytest.raises(ValueError):
        ring_hostfile([["127.0.0.1"]])
    with pytest.raises(ValueError):
        ring_hostfile([[]])


def test_free_ports_differ():
    ports = free_ports(4)
    assert len(set(ports)) == 4


@pytest.mark.parametrize(
    "step",
    [
        Step(7, NEW | SAMPLE, mx.bfloat16, 42, 0.6, 0.95),
        Step(1, SAMPLE, mx.float16),
        Step(3, NEW | LOGITS, mx.float32, -1, 0.0, 1.0),
        Step(0, 0, cmd=CMD_STOP),
    ],
)
def test_step_round_trip(step):
    back = Step.decode(step.encode())
    assert back.length == step.length and back.flags == step.flags and back.cmd == step.cmd
    assert back.dtype == step.dtype and back.seed == step.seed
    assert back.temp == pytest.approx(step.temp) and back.top_p == pytest.approx(step.top_p)


def test_agent_rank_argv_carries_max_context():
    from pathlib import Path

    from launcher.agent import StartRank
    from launcher.agent.ranks import rank_argv

    base = {"model": "m", "split": [2, 2], "rank": 1, "http_host": "10.0.0.1"}
    base |= {"http_port": 8080, "name": "m", "hostfile": [["10.0.0.1:1"], ["10.0.0.2:1"]]}
    argv = rank_argv("py", Path("/models/m"), StartRank(**base, max_context=4096))
    assert argv[-2:] == ["--max-context", "4096"]
    assert "--max-context" not in rank_argv("py", Path("/models/m"), StartRank(**base))
    with pytest.raises(ValueError):
        StartRank(**base, max_context=0)


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({}, ["--split", "2,2"]),
        ({"parallel": "expert"}, ["--parallel", "expert", "--ranks", "2"]),
        (
            {"parallel": "expert", "experts": [5, 3]},
            ["--parallel", "expert", "--ranks", "2", "--experts", "5,3"],
        ),
    ],
)
def test_agent_rank_argv_gives_the_mode(fields, expected):
    from pathlib import Path

    from launcher.agent import StartRank
    from launcher.agent.ranks import rank_argv

    base = {"model": "m", "split": [2, 2], "rank": 1, "http_host": "10.0.0.1"}
    base |= {"http_port": 8080, "name": "m", "hostfile": [["10.0.0.1:1"], ["10.0.0.2:1"]]}
    argv = rank_argv("py", Path("/models/m"), StartRank(**base, **fields))
    i = argv.index("--host")
    assert argv[5:i] == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"parallel": "sequence"},  # the agents start pipeline, expert and tensor ranks only
        {"experts": [4, 4]},  # counts without expert mode
        {"parallel": "tensor", "experts": [4, 4]},
        {"parallel": "expert", "experts": [8]},  # one count per rank
        {"parallel": "expert", "experts": [0, 8]},
        {"parallel": "expert", "experts": ["4", "4"]},  # strict: no strings
    ],
)
def test_agent_refuses_bad_mode_fields(fields):
    from launcher.agent import StartRank

    base = {"model": "m", "split": [2, 2], "rank": 1, "http_host": "10.0.0.1"}
    base |= {"http_port": 8080, "name": "m", "hostfile": [["10.0.0.1:1"], ["10.0.0.2:1"]]}
    with pytest.raises(ValueError):
        StartRank(**base, **fields)
