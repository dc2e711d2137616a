"""Expert and tensor parallelism change nothing: a local cluster's greedy tokens and logits equal
one mlx-lm process, and in expert mode each rank holds only its share of the routed experts.

Real rank processes over MLX's ring backend on loopback, on tiny-r1 (R1's format, 8 experts).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import cluster_logits, complete_ids, greedy_reference, local_cluster, run_cli
from mlx.utils import tree_flatten
from mlx_lm import load

from launcher.local import LaunchError, start_local, wait_ready
from mlxdist.runtime.expert import load_expert_stage
from mlxdist.runtime.stage import load_stage
from quantize.checkpoint import CheckpointError

MAX_TOKENS = 8
QUESTION = "What is the capital of France?"

# (mode, ranks, experts per rank or None for the even split, expert mode's attention or None
# for the default: cut over the ranks where heads divide, as tiny-r1's 4 do by 2 but not by 3)
CASES = [
    ("expert", 2, None, "replicated"),
    ("expert", 3, [2, 3, 3], None),
    ("expert", 2, None, None),
    ("tensor", 2, None, None),
]


@pytest.fixture(scope="module")
def reference(tiny_r1_no_mtp):
    """One mlx-lm process: prompt, greedy tokens, last logits, routed-expert and other bytes."""
    model, tokenizer = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
    prompt, tokens, logits = greedy_reference(model, tokenizer, QUESTION, MAX_TOKENS)
    params = tree_flatten(model.parameters())
    experts = sum(v.nbytes for k, v in params if ".switch_mlp." in k)
    others = sum(v.nbytes for k, v in params if ".switch_mlp." not in k)
    return prompt, tokens, logits, experts, others


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[3] or 'default'}")
def cluster(request, tiny_r1):
    mode, ranks, experts, attention = request.param
    options = {"parallel": mode, "experts": experts, "attention": attention}
    # What /health should report for expert mode's attention: cut where 4 heads divide.
    expected = attention or ("sharded" if 4 % ranks == 0 else "replicated")
    with local_cluster(tiny_r1, [1] * ranks, **options) as (url, health):
        yield mode, url, health | {"expected_attention": expected}


@pytest.mark.cluster
def test_greedy_tokens_equal_single_process(cluster, reference):
    mode, url, health = cluster
    prompt, expected, *_ = reference
    got = complete_ids(url, prompt, MAX_TOKENS)
    print(f"{mode} on {health['ranks']} ranks: {got}")
    assert health["parallel"] == mode
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert got == expected


@pytest.mark.cluster
def test_last_logits_agree(cluster, reference):
    mode, url, health = cluster
    prompt, _, expected, *_ = reference
    got = np.array(cluster_logits(url, prompt), dtype=np.float32)
    diff = float(np.max(np.abs(got - expected)))
    print(f"{mode} on {health['ranks']} ranks: max |logit difference| = {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= 1e-4


@pytest.mark.cluster
def test_each_rank_holds_only_its_share(cluster, reference):
    mode, _, health = cluster
    *_, experts, others = reference
    nodes = health["nodes"]
    if mode == "tensor":  # every rank holds the same cut of every layer, less than the whole
        print(f"tensor: {[n['weights'] for n in nodes]} bytes held, whole {experts + others}")
        assert len({n["weights"] for n in nodes}) == 1
        assert nodes[0]["weights"] < experts + others and "experts" not in nodes[0]
        return
    held = [n["experts"] for n in nodes]
    assert sorted(e for h in held for e in h) == list(range(8))  # each expert on one rank
    for n in nodes:
        rest = n["weights"] - n["expert_weights"]
        print(
            f"rank {n['rank']}: experts {n['experts']} {n['expert_weights']} bytes, other {rest} "
            f"bytes (attention {n['attention']}), whole model {experts + others}"
        )
        assert n["expert_weights"] * 8 == experts * len(n["experts"])
        assert rest == nodes[0]["weights"] - nodes[0]["expert_weights"]
        assert n["attention"] == health["expected_attention"]
        if n["attention"] == "replicated":
            assert rest == others
        else:  # attention heads and shared experts cut in half, the rest replicated
            assert rest < others


@pytest.mark.cluster
def test_tensor_mode_refuses_heads_that_do_not_divide(tiny_r1, tmp_path):
    cluster = start_local(tiny_r1, [1, 1, 1], run_dir=tmp_path, parallel="tensor")
    try:
        with pytest.raises(LaunchError, match="num_attention_heads=4 does not divide by 3"):
            wait_ready(cluster, timeout=120)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def mlx_format(tiny_r1, tmp_path_factory):
    """tiny-r1 as MLX stores a converted model: experts stacked in switch_mlp, float32."""
    out = tmp_path_factory.mktemp("models") / "tiny-r1-mlx"
    out.mkdir()
    stage = load_stage(tiny_r1, [4], 0)
    mx.save_safetensors(
        str(out / "model.safetensors"), dict(tree_flatten(stage.model.parameters()))
    )
    shutil.copy(tiny_r1 / "config.json", out / "config.json")
    return out, dict(tree_flatten(stage.model.parameters()))


def _node_folder(src, out, stage, held: list[int], placement: str = "spread"):
    """A per-node folder cut for experts held, as `mlxdist quantize` writes for expert mode."""
    out.mkdir()
    mx.save_safetensors(
        str(out / "model.safetensors"), dict(tree_flatten(stage.model.parameters()))
    )
    shutil.copy(src / "config.json", out / "config.json")
    manifest = {"format": "mlxdist-node", "parallel": "expert", "experts": held}
    manifest["placement"] = placement
    (out / "manifest.json").write_text(json.dumps(manifest | {"n_routed_experts": 8}))
    return out


def test_stacked_experts_are_read_by_rows_and_node_folders_checked(mlx_format, tmp_path):
    path, whole = mlx_format
    stage = load_expert_stage(path, [3, 5], 1, 2)
    mine = dict(tree_flatten(stage.model.parameters()))
    held = [2, 3, 5, 6, 7]  # tiny-r1's 2 groups of 4: rank 0 takes 0, 4, 1; rank 1 the rest
    assert stage.experts == tuple(held)
    for k, v in whole.items():
        expected = v[mx.array(held)] if ".switch_mlp." in k else v
        assert mine[k].shape == expected.shape and mx.array_equal(mine[k], expected), k

    # A folder already cut for these experts is read as it is; one cut for others is refused,
    # and so is one cut with whole groups per node (before experts were spread).
    folder = _node_folder(path, tmp_path / "node", stage, held)
    again = dict(tree_flatten(load_expert_stage(folder, [3, 5], 1, 2).model.parameters()))
    assert all(mx.array_equal(again[k], v) for k, v in mine.items())
    with pytest.raises(CheckpointError, match=r"holds experts 2-3,5-7 of 8.*needs experts 2-3,6-7"):
        load_expert_stage(folder, [4, 4], 1, 2)
    old = _node_folder(path, tmp_path / "old", stage, held, placement=None)
    with pytest.raises(CheckpointError, match="cut it again"):
        load_expert_stage(old, [3, 5], 1, 2)


@pytest.mark.cluster
def test_launch_cli_runs_expert_mode_and_refuses_bad_options(tiny_r1, tiny_r1_no_mtp, reference):
    from mlx_lm.utils import load_tokenizer

    _, tokens, *_ = reference
    args = ["--parallel", "expert", "--experts", "3,3,2", "--max-tokens", str(MAX_TOKENS)]
    done = run_cli("launch", str(tiny_r1), *args, "--prompt", QUESTION)
    assert done.returncode == 0, done.stderr
    assert "on 3 ranks (expert parallel; prompt cache " in done.stderr
    # tiny-r1 answers inside its think block: the CLI prints that reasoning on stderr.
    detok = load_tokenizer(tiny_r1_no_mtp).detokenizer
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    assert detok.text.strip() and done.stderr.rstrip("\n").endswith(detok.text)

    bad = run_cli("launch", str(tiny_r1), "--local", "3", "--parallel", "tensor", "--prompt", "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: num_attention_heads=4 does not divide by 3 ranks: launch tensor mode on a "
        "number of ranks that divides it, or use --parallel pipeline"
    ]
