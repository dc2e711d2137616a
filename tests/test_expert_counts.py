"""Where each mixture-of-experts family's config.json gives its routed experts, and what the
launcher and planner make of it: expert mode's options for every family, and the routed-expert
tensors the planner counts as each family stores them."""

from __future__ import annotations

import pytest

from launcher.modes import parallel_options
from quantize.nodes import is_routed_expert_tensor, model_expert_sets, routed_experts

HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}

# (config.json's fields, routed experts per MoE layer), as the families' checkpoints spell them
COUNTS = [
    ({"model_type": "deepseek_v3", "n_routed_experts": 256}, 256),
    ({"model_type": "deepseek_v32", "n_routed_experts": 256}, 256),
    ({"model_type": "glm4_moe", "n_routed_experts": 160, "n_shared_experts": 1}, 160),
    ({"model_type": "qwen3_moe", "num_experts": 128}, 128),
    ({"model_type": "gpt_oss", "num_local_experts": 32}, 32),
    ({"model_type": "minimax_m2", "num_local_experts": 256}, 256),
    ({"model_type": "llama"}, 0),
    ({"model_type": "qwen3", "num_experts": None}, 0),
]


@pytest.mark.parametrize(("config", "count"), COUNTS)
def test_routed_experts(config, count):
    assert routed_experts(config) == count


@pytest.mark.parametrize(("config", "count"), [c for c in COUNTS if c[1]])
def test_expert_mode_options_for_every_family(config, count):
    config = config | HEADS
    assert parallel_options(config, "expert", None, 3)["ranks"] == 3
    uneven = f"1,{count - 3},2"
    assert parallel_options(config, "expert", uneven, None)["experts"] == [1, count - 3, 2]
    with pytest.raises(ValueError, match=f"more than the model's {count} routed experts"):
        parallel_options(config, "expert", None, count + 1)


def test_a_dense_model_is_refused_for_expert_mode():
    with pytest.raises(ValueError, match="this model has no routed experts"):
        parallel_options({"model_type": "qwen3", **HEADS}, "expert", None, 2)


# (expert counts, n_group, the sets): uneven counts take experts in order; grouped routers
# (R1's 8 groups) take a few of every group
SETS = [
    ({"num_experts": 8}, [3, 5], [[0, 1, 2], [3, 4, 5, 6, 7]]),
    ({"num_local_experts": 8}, [2, 3, 3], [[0, 1], [2, 3, 4], [5, 6, 7]]),
    ({"n_routed_experts": 8, "n_group": 2}, [2, 3, 3], [[0, 4], [1, 2, 5], [3, 6, 7]]),
]


@pytest.mark.parametrize(("config", "counts", "sets"), SETS)
def test_model_expert_sets(config, counts, sets):
    assert model_expert_sets(config, counts) == sets


# (tensor name, a routed expert's)
TENSORS = [
    ("model.layers.3.mlp.switch_mlp.gate_proj.weight", True),  # mlx-lm's, stacked
    ("model.layers.3.mlp.experts.17.gate_proj.weight", True),  # DeepSeek, GLM, Qwen3-MoE
    ("model.layers.3.block_sparse_moe.experts.5.w1.weight", True),  # MiniMax
    ("model.layers.3.block_sparse_moe.switch_mlp.up_proj.weight", True),
    ("model.layers.3.mlp.experts.gate_up_proj_blocks", True),  # gpt-oss, MXFP4
    ("model.layers.3.mlp.experts.down_proj_bias", True),
    ("model.layers.3.mlp.experts.gate_up_proj_scales", True),
    ("model.layers.3.mlp.experts.down_proj", True),  # gpt-oss, bfloat16 copies
    ("model.layers.3.mlp.experts.gate_proj.weight", True),  # gpt-oss, in mlx-lm's names
    ("model.layers.3.mlp.experts.up_proj.scales", True),
    ("model.layers.3.mlp.experts.down_proj.bias", True),
    ("model.layers.3.block_sparse_moe.experts.7.w2.weight_scale_inv", True),  # MiniMax FP8
    ("model.layers.3.block_sparse_moe.gate.weight", False),
    ("model.layers.3.mlp.router.bias", False),
    ("model.layers.3.mlp.shared_expert.up_proj.weight", False),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", False),
    ("model.layers.3.mlp.gate.weight", False),
    ("model.layers.3.mlp.router.weight", False),
    ("model.layers.3.block_sparse_moe.e_score_correction_bias", False),
    ("model.layers.3.self_attn.q_proj.weight", False),
]


@pytest.mark.parametrize(("name", "routed"), TENSORS)
def test_planner_counts_routed_expert_tensors(name, routed):
    assert is_routed_expert_tensor(name) is routed
