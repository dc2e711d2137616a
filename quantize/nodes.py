"""Per-node model folders: how layers are split, and whether a node folder fits a launch."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import CheckpointError, layer_of, read_config, sha256_file

NODE_FORMAT = "mlxdist-node"
PLACEMENT = "spread"  # expert node folders: each holds a few experts of every group


def even_split(num_layers: int, nodes: int) -> list[int]:
    """Layers per node, as even as possible; the first nodes take the remainder."""
    if nodes < 1:
        raise ValueError("at least one node is needed")
    if nodes > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {nodes} nodes")
    base, extra = divmod(num_layers, nodes)
    return [base + (1 if r < extra else 0) for r in range(nodes)]


# Where the families' config.json give their number of routed experts (DeepSeek and GLM,
# Qwen3-MoE, gpt-oss and MiniMax).
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def routed_experts(config: dict) -> int:
    """The model's routed experts per MoE layer, under whichever name its family uses; 0 if none."""
    return next((int(config[k]) for k in EXPERT_COUNT_KEYS if config.get(k)), 0)


# Where the families' config.json give the routed experts each token uses (gpt-oss's
# original config names it experts_per_token; its Hugging Face one gives both).
ACTIVE_EXPERT_KEYS = ("num_experts_per_tok", "experts_per_token")


def active_experts(config: dict) -> int:
    """The routed experts one token is sent to per MoE layer; 0 for a dense model."""
    if not routed_experts(config):
        return 0
    return next((int(config[key]) for key in ACTIVE_EXPERT_KEYS if config.get(key)), 0)


# Each mixture-of-experts family's routed-expert tensors: (families, as their checkpoints name
# them, as mlx-lm names them once stacked, experts along axis 0). Never the shared experts, the
# router or its bias. The rule for every family is any row's patterns.
ROUTED_EXPERT_NAMES = [
    (
        "deepseek_v3 deepseek_v32 glm4_moe qwen3_moe",
        r"\.mlp\.experts\.\d+\.",  # one by one: mlp.experts.17.gate_proj.weight
        r"\.mlp\.switch_mlp\.",
    ),
    (
        "minimax",
        r"\.block_sparse_moe\.experts\.\d+\.w[123]\.",  # w1 gate, w2 down, w3 up
        r"\.block_sparse_moe\.switch_mlp\.",
    ),
    (
        "gpt_oss",  # fused and stacked already: gate_up_proj_blocks (MXFP4), _scales, _bias
        r"\.mlp\.experts\.(gate_up_proj|down_proj)(_blocks|_scales|_bias)?$",
        r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.",
    ),
]
_ROUTED_EXPERT = re.compile("|".join(p for _, *both in ROUTED_EXPERT_NAMES for p in both))


def is_routed_expert_tensor(name: str) -> bool:
    """A routed expert's tensor, one expert's or stacked, in any family's checkpoint or mlx-lm
    names: the tensors expert parallelism shares out."""
    return _ROUTED_EXPERT.search(name) is not None


def even_experts(model: Path, ranks: int) -> list[int]:
    """The model's routed experts per rank, as even as possible (ValueError when it has none)."""
    return even_split(routed_experts(read_config(model)), ranks)


def expert_sets(num_experts: int, counts: list[int], groups: int = 1) -> list[list[int]]:
    """The routed experts each rank holds in expert parallelism (ascending), from experts per
    rank. R1's router first picks a few groups of experts for a token, so a rank holding whole
    groups would get all of a token's experts or none, and the all_sum waits for the busiest:
    ranks take a few experts of every group instead (on 8 ranks, R1's busiest rank computes
    2.5 of a token's 8 experts on average instead of 3.5, simulated)."""
    if sum(counts) != num_experts or any(c < 1 for c in counts):
        raise ValueError(f"expert counts {counts} must be positive and add up to {num_experts}")
    order = list(range(num_experts))
    if groups > 1 and num_experts % groups == 0:
        size = num_experts // groups
        order.sort(key=lambda e: (e % size, e // size))  # group by group, a few at a time
    sets, lo = [], 0
    for c in counts:
        sets.append(sorted(order[lo : lo + c]))
        lo += c
    return sets


def model_expert_sets(config: dict, counts: list[int]) -> list[list[int]]:
    """expert_sets for a model's config."""
    return expert_sets(routed_experts(config), counts, int(config.get("n_group") or 1))


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Ascending rows as runs of consecutive ones: (first row, count)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def spans(ids: list[int]) -> str:
    """Ascending expert ids as text: "0-3,32-35"."""
    return ",".join(f"{a}-{a + n - 1}" if n > 1 else str(a) for a, n in row_runs(ids))


def parse_experts(text: str, num_experts: int) -> list[int]:
    """Experts per node from "3,3,2": positive, adding up to the model's routed experts."""
    return _parse_counts(text, num_experts, "--experts", "expert", "3,3,2")


def parse_split(text: str, num_layers: int) -> list[int]:
    """Layers per node from "10,20": positive, adding up to the model's layers."""
    return _parse_counts(text, num_layers, "split", "layer", "10,20")


def _parse_counts(text: str, total: int, name: str, unit: str, example: str) -> list[int]:
    try:
        parts = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} {text!r} must be {unit} counts such as {example}") from None
    if any(p < 1 for p in parts) or sum(parts) != total:
        raise ValueError(f"{name} {text} must be positive and add up to {total} {unit}s")
    return parts


def _read_plan(path: Path, key: str) -> tuple[dict, list[int]]:
    try:
        plan = json.loads(Path(path).read_text())
        parts = [int(n) for n in plan[key]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a plan file with {key} ({e})") from None
    return plan, parts


def read_plan_file(path: Path) -> list[int]:
    """The split from a plan file (`mlxdist plan --json`): {"split": [layers per node, ...]}."""
    plan, split = _read_plan(path, "split")
    if plan.get("parallel", "pipeline") != "pipeline":
        raise ValueError(f"{path} plans {plan['parallel']} parallelism: add --parallel expert")
    return split


def read_expert_plan_file(path: Path) -> list[int]:
    """The expert counts from `mlxdist plan --parallel expert --json`: {"experts": [...]}."""
    plan, counts = _read_plan(path, "experts")
    if plan.get("parallel") != "expert":
        raise ValueError(f"{path} is not an expert-parallel plan: plan with --parallel expert")
    return counts


def node_manifest(folder: Path) -> dict | None:
    """The manifest of a node folder, or None for a whole model folder."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    return manifest if manifest.get("format") == NODE_FORMAT else None


def parallel_of(manifest: dict) -> str:
    """The mode a node folder was cut for: "pipeline" (so are folders from before expert mode)
    or "expert"."""
    return manifest.get("parallel", "pipeline")


def check_node(folder: Path, split: list[int], rank: int) -> None:
    """Refuses a node folder cut for another split or another rank, or for expert parallelism."""
    manifest = node_manifest(folder)
    if manifest is None:
        return
    plan = manifest["plan"]
    if parallel_of(manifest) == "expert":
        raise CheckpointError(
            f"{folder} was cut for expert parallelism (rank {plan['rank']} of experts "
            f"{plan['experts']}), not for a pipeline: launch with --parallel expert, or cut "
            "again with mlxdist quantize --split"
        )
    if plan["split"] != list(split) or plan["rank"] != rank:
        raise CheckpointError(
            f"{folder} was cut for rank {plan['rank']} of split {plan['split']}, but this launch "
            f"needs rank {rank} of split {list(split)}: launch with --split "
            f"{','.join(map(str, plan['split']))}, or cut again with mlxdist quantize --split"
        )


def check_expert_node(folder: Path, counts: list[int], rank: int) -> None:
    """Refuses a node folder cut for other expert counts, another rank, or a pipeline."""
    manifest = node_manifest(folder)
    if manifest is None:
        return  # a whole model folder holds every expert
    plan = manifest["plan"]
    if parallel_of(manifest) != "expert":
        raise CheckpointError(
            f"{folder} was cut for rank {plan['rank']} of pipeline split {plan['split']}, not "
            "for expert parallelism: launch without --parallel expert, or cut again with "
            "mlxdist quantize --parallel expert"
        )
    check_placement(folder, manifest)
    if plan["experts"] != list(counts) or plan["rank"] != rank:
        raise CheckpointError(
            f"{folder} was cut for rank {plan['rank']} of experts {plan['experts']}, but this "
            f"launch needs rank {rank} of experts {list(counts)}: launch with --experts "
            f"{','.join(map(str, plan['experts']))}, or cut again with mlxdist quantize "
            "--parallel expert --experts"
        )


def check_placement(folder: Path, manifest: dict) -> None:
    """Refuses an expert node folder whose experts were chosen another way (before they were
    spread over the groups): its rows would be read as the wrong experts."""
    if manifest.get("placement") != PLACEMENT:
        raise CheckpointError(
            f"{folder} was cut by an older mlxdist, with another choice of experts per node: "
            f"cut it again with mlxdist quantize --parallel expert"
        )


def node_folder(model: Path, split: list[int], rank: int) -> Path:
    """Rank's folder: OUT/nodes/<rank> when the model was cut for this split, else the model."""
    folder = Path(model) / "nodes" / str(rank)
    manifest = node_manifest(folder)
    if (
        manifest is not None
        and parallel_of(manifest) == "pipeline"
        and manifest["plan"]["split"] == list(split)
    ):
        return folder
    return Path(model)


def expert_node_folder(model: Path, counts: list[int], rank: int) -> Path:
    """Rank's folder in expert parallelism: OUT/nodes/<rank> when the model was cut for these
    expert counts, else the model (whose every expert the rank then reads only its own of)."""
    folder = Path(model) / "nodes" / str(rank)
    manifest = node_manifest(folder)
    if (
        manifest is not None
        and parallel_of(manifest) == "expert"
        and manifest["plan"]["experts"] == list(counts)
    ):
        return folder
    return Path(model)


def damaged_files(folder: Path) -> list[str]:
    """Files a model folder's manifest.json lists whose size or sha256 differ (or that are
    missing); [] for a folder without a manifest (nothing to check against)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid manifest ({e})") from None
    bad = []
    for entry in files:
        f = Path(folder) / entry["name"]
        if not f.is_file() or f.stat().st_size != entry["size"]:
            bad.append(entry["name"])
        elif sha256_file(f) != entry["sha256"]:
            bad.append(entry["name"])
    return bad


def stage_needs(key: str, start: int, end: int, first: bool, last: bool, tied: bool) -> bool:
    """Whether a pipeline stage holding layers [start, end) reads tensor key: never the MTP
    layer's (mtp.*, quantize.mtp.PREFIX), which the runtime loads apart from the model."""
    if key.startswith("mtp."):
        return False
    layer = layer_of(key)
    if layer is not None:
        return start <= layer < end
    if "embed_tokens" in key:
        return first or (last and tied)
    return last  # final norm and head
