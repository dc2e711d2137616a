"""Expert mode refuses, in one line naming the families it runs, a model that says it has routed
experts but whose mlx-lm model has no SwitchGLU / SwitchMLP to hold them (a tiny llama whose
config.json claims 8 experts), and swaps exactly one LocalExperts per MoE layer otherwise."""

from __future__ import annotations

import json

import pytest

from launcher.modes import EXPERT_FAMILIES
from mlxdist.runtime.expert import LocalExperts, load_expert_stage, shards
from mlxdist.testing.make_model import make_model
from quantize.checkpoint import CheckpointError


def test_a_family_without_switch_experts_is_refused(tmp_path):
    path = make_model("llama", tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_experts": 8}))
    with pytest.raises(CheckpointError) as e:
        load_expert_stage(path, [3, 5], 0, 2)
    line = str(e.value)
    print(line)
    assert "\n" not in line
    assert "expert mode cannot split llama" in line
    assert all(family in line for family in EXPERT_FAMILIES)


def test_one_local_experts_per_moe_layer(tmp_path):
    path = make_model("qwen3_moe", tmp_path / "qwen3_moe")
    config = json.loads((path / "config.json").read_text())
    stage = load_expert_stage(path, [3, 5], 1, 2)
    held = shards(stage.model)
    assert len(held) == config["num_hidden_layers"]
    assert all(isinstance(m, LocalExperts) for m in held)
    assert stage.experts == (3, 4, 5, 6, 7)
    assert {m.gate_proj.weight.shape[0] for m in held} == {5}
