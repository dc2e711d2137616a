"""How a launch cuts the model (--parallel, --experts, --local), checked before anything starts.

Reads only config.json's fields: the CLI validates flags without loading MLX's model code
(tensor mode alone asks mlx-lm for the model family's class, to see whether it can shard)."""

from __future__ import annotations

from launcher.rankspec import PARALLEL
from quantize.checkpoint import CheckpointError
from quantize.nodes import expert_sets, routed_experts

# The families tensor mode runs and tests (tests/test_families_tensor.py), as config.json
# names them; kimi_k2 runs deepseek_v3's code (quantize.checkpoint.code_family).
TENSOR_FAMILIES = (
    *("llama", "mistral", "qwen3", "qwen3_moe", "glm4_moe", "minimax_m2"),
    *("deepseek_v3", "kimi_k2", "deepseek_v32", "gpt_oss"),
)
# The families expert mode runs and tests (tests/test_families_expert.py, test_expert.py): any
# family whose experts are mlx-lm's SwitchGLU or SwitchMLP runs the same way.
EXPERT_FAMILIES = (
    *("deepseek_v3", "kimi_k2", "deepseek_v32", "glm4_moe", "qwen3_moe", "gpt_oss"),
    "minimax_m2",
)
# The widths mlx-lm's shard() cuts besides the heads: each must divide by the ranks.
_TENSOR_WIDTHS = ("intermediate_size", "moe_intermediate_size")


def check_tensor_split(config: dict, size: int) -> None:
    """Refuses a model that mlx-lm cannot shard over size ranks."""
    from quantize.light_mlx_lm import get_classes  # mlx-lm's lookup, without transformers

    model_type = config["model_type"]
    try:
        model_class, _ = get_classes(config)
    except ValueError:
        raise CheckpointError(f"mlx-lm has no {model_type} model") from None
    if not hasattr(model_class, "shard"):
        raise CheckpointError(
            f"mlx-lm's {model_type} model has no shard(), so tensor mode cannot cut it "
            f"(it runs {', '.join(TENSOR_FAMILIES)}): use --parallel pipeline or expert"
        )
    for field in ("num_attention_heads", "num_key_value_heads", *_TENSOR_WIDTHS):
        width = config.get(field)
        if width and width % size:
            raise CheckpointError(
                f"{field}={width} does not divide by {size} ranks: launch tensor mode on a "
                f"number of ranks that divides it, or use --parallel pipeline"
            )


def parallel_options(config: dict, parallel: str, experts: str | None, ranks: int | None) -> dict:
    """start_local's options for a launch's --parallel, --experts and --local, checked before
    anything starts; raises ValueError with the line to show. {} for pipeline mode."""
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel {parallel}: choose pipeline, expert or tensor")
    if experts and parallel != "expert":
        raise ValueError("--experts is for --parallel expert")
    if parallel == "pipeline":
        return {}
    num_experts = routed_experts(config)
    counts = None
    if experts:
        try:
            counts = [int(c) for c in experts.split(",")]
            expert_sets(num_experts, counts)
        except ValueError as e:
            raise ValueError(f"--experts {experts}: {e}") from None
        if ranks and ranks != len(counts):
            raise ValueError(f"--experts gives {len(counts)} ranks but --local {ranks}")
    ranks = ranks or (len(counts) if counts else 2)
    if parallel == "expert" and not num_experts:
        raise ValueError("this model has no routed experts: use --parallel pipeline or tensor")
    if parallel == "expert" and ranks > num_experts:
        raise ValueError(f"{ranks} ranks are more than the model's {num_experts} routed experts")
    if parallel == "tensor":
        try:
            check_tensor_split(config, ranks)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
    return {"parallel": parallel, "experts": counts, "ranks": ranks}
