"""`mlxdist quantize --parallel expert` for every mixture-of-experts family: each family's tiny
checkpoint (`mlxdist testing make-model`), its routed-expert tensors told apart by the one rule
(quantize.nodes.ROUTED_EXPERT_NAMES) in the checkpoint's names and in mlx-lm's, and its node
folders each holding only their experts' rows; one gpt-oss cluster run from those folders
answers as one mlx-lm process on the uncut model does."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_same_answer, assert_same_logits, greedy_reference
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import _get_classes

from launcher.local import start_local, wait_ready
from mlxdist.testing.families import FAMILIES, family_names
from mlxdist.testing.make_model import family_config, make_model
from quantize.checkpoint import layer_of
from quantize.convert import Settings, make_plan, run
from quantize.nodes import is_routed_expert_tensor, model_expert_sets, routed_experts

COUNTS = [3, 5]  # of the tiny models' 8 routed experts: uneven on purpose
MOE = [f for f in family_names() if routed_experts(family_config(f))]


def switch_paths(config: dict) -> set[str]:
    """The module paths of mlx-lm's stacked routed experts for this config: the oracle."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(dict(config)))
    kinds = (SwitchGLU, SwitchMLP)
    switches = [p for p, m in model.named_modules() if isinstance(m, kinds)]
    return {p for p, _ in model.named_modules() if any(p.startswith(s + ".") for s in switches)}


def routed_by_oracle(name: str, paths: set[str]) -> bool:
    return name.rpartition(".")[0] in paths


@pytest.fixture(scope="module", params=MOE)
def cut(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """The family's checkpoint and its expert-parallel quantisation into 2 node folders."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    src = make_model(name, root / "src")
    out = root / "cut"
    run(src, out, make_plan(src, Settings(experts=COUNTS)))
    return name, src, out


def test_checkpoint_names_follow_the_rule(cut):
    """In the checkpoint's own names: a tensor is a routed expert's exactly when make-model
    wrote it from mlx-lm's stacked experts (the family's to_hub, applied to those alone)."""
    name, src, _ = cut
    config = json.loads((src / "config.json").read_text())
    paths = switch_paths(config)
    model_class, args_class = _get_classes(config)
    params = tree_flatten(model_class(args_class.from_dict(dict(config))).parameters())
    routed = {k: np.zeros(v.shape, np.float32) for k, v in params if routed_by_oracle(k, paths)}
    hub_routed = set(FAMILIES[name].to_hub(routed, config))
    stored = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    # multi-token-prediction layers, past the last: mlx-lm has no module for them to ask
    stored = [k for k in stored if (layer_of(k) or 0) < config["num_hidden_layers"]]
    expected = {k for k in stored if k.removesuffix("_scale_inv") in hub_routed}
    assert expected and expected != set(stored)
    assert {k for k in stored if is_routed_expert_tensor(k)} == expected


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_node_folders_hold_only_their_experts(cut):
    """Every node folder has the whole model's tensor names; the routed experts' (found by
    mlx-lm's own modules, not by the rule) hold only the node's rows, the rest are whole."""
    name, _, out = cut
    config = json.loads((out / "config.json").read_text())
    paths = switch_paths(config)
    whole = tensors(out)
    experts = [k for k in whole if routed_by_oracle(k, paths)]
    assert experts and all(whole[k].shape[0] == 8 for k in experts)
    for rank, held in enumerate(model_expert_sets(config, COUNTS)):
        node = tensors(out / "nodes" / str(rank))
        assert sorted(node) == sorted(whole)
        for k, expected in whole.items():
            if k in experts:
                expected = expected[mx.array(held)]
                assert node[k].shape[0] == COUNTS[rank], (name, k)
            assert node[k].dtype == expected.dtype and node[k].shape == expected.shape, k
            assert mx.array_equal(node[k], expected).item(), (name, rank, k)
    print(f"{name}: {len(experts)} expert tensors cut {COUNTS}")


@pytest.mark.cluster
def test_gpt_oss_cluster_from_its_node_folders(tmp_path):
    """gpt-oss's fused experts, cut at quantize time: 2 expert ranks each load their own node
    folder and answer with one mlx-lm process's greedy tokens and logits on the uncut model."""
    from mlx_lm import load

    from mlxdist.runtime.stage import run_dtype

    src = make_model("gpt_oss", tmp_path / "src")
    out = tmp_path / "cut"
    run(src, out, make_plan(src, Settings(experts=COUNTS)))
    model, tokenizer = load(str(out))  # the whole folder: every expert
    if (dtype := run_dtype(json.loads((out / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)
    reference = greedy_reference(model, tokenizer, "What is the capital of France?", 8)
    cluster = start_local(out, [1, 1], parallel="expert", experts=COUNTS)
    try:
        health = wait_ready(cluster, timeout=300)
        assert [len(n["experts"]) for n in health["nodes"]] == COUNTS
        for rank, log in enumerate(cluster.logs):
            assert f"from {out / 'nodes' / str(rank)} " in log.read_text(), rank
        assert_same_answer(cluster.url, reference, 8, "gpt_oss from node folders")
        assert_same_logits(cluster.url, reference, "gpt_oss from node folders")
    finally:
        cluster.stop()
