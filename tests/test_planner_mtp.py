"""The planner and R1's MTP layer: counted only for a launch that drafts with it
(--speculative mtp), on the rank that drafts (the last pipeline rank, rank 0 in expert and
tensor modes), never as the embeddings or the head; the checkpoint's own layer as its loader
dequantises it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from conftest import ROOT, run_cli
from mlx_lm.utils import _get_classes

from launcher.planner import (
    GIB,
    NodeSpec,
    model_spec_as_stored,
    model_spec_from_config,
    model_spec_from_folder,
    plan,
    plan_experts,
    tensor_held_bytes,
    tensor_prompt_cache_bytes,
)
from launcher.promptbudget import planned_budget
from quantize.checkpoint import read_config, safetensors_header, weight_map
from quantize.estimate import estimate

NODES = [NodeSpec("a", 8 * GIB), NodeSpec("b", 8 * GIB)]


@pytest.fixture(scope="module")
def converted(tiny_r1, tmp_path_factory) -> SimpleNamespace:
    """tiny-r1 at 4 bits without its MTP layer, and with it (--keep-mtp, cut for [2, 2])."""
    out = tmp_path_factory.mktemp("mtp-plan")
    plain, kept = out / "q4", out / "q4-mtp"
    for folder, extra in ((plain, ()), (kept, ("--keep-mtp", "--split", "2,2"))):
        result = run_cli("quantize", str(tiny_r1), str(folder), "--bits", "4", *extra)
        assert result.returncode == 0, result.stderr
    return SimpleNamespace(plain=plain, kept=kept)


def stored_mtp_bytes(folder: Path) -> int:
    """The bytes of the folder's mtp.* tensors, from their files' headers."""
    total = 0
    for file in sorted(set(weight_map(folder).values())):
        for key, entry in safetensors_header(folder / file).items():
            if key.startswith("mtp."):
                start, end = entry["data_offsets"]
                total += end - start
    return total


def test_kept_layer_is_its_own_part_and_counted_only_when_drafting(converted):
    """Without --speculative mtp the --keep-mtp folder plans as the folder without the layer
    (no mtp.embed_tokens in the embeddings, nothing in the head); with it, mtp_bytes is the
    mtp.* tensors' bytes and nothing else changes."""
    plain = model_spec_from_folder(converted.plain)
    mtp = stored_mtp_bytes(converted.kept)
    assert mtp > 0
    for speculative in ("none", "ngram", "mtp"):
        spec = model_spec_from_folder(converted.kept, speculative=speculative)
        assert spec.mtp_bytes == (mtp if speculative == "mtp" else 0), speculative
        assert (spec.layer_bytes, spec.expert_bytes) == (plain.layer_bytes, plain.expert_bytes)
        assert (spec.embed_bytes, spec.tail_bytes, spec.total_bytes) == (
            plain.embed_bytes,
            plain.tail_bytes,
            plain.total_bytes,
        )
    assert model_spec_from_folder(converted.plain, speculative="mtp").mtp_bytes == 0


@pytest.mark.parametrize("mode,drafter", [("pipeline", 1), ("expert", 0), ("tensor", 0)])
def test_the_drafting_rank_alone_holds_the_layer(converted, mode, drafter):
    """Per rank: the plan with --speculative mtp holds what the plan without it holds, plus the
    MTP layer on the rank that drafts; the prompt cache's default budget shrinks accordingly."""
    without = model_spec_from_folder(converted.kept)
    with_mtp = model_spec_from_folder(converted.kept, speculative="mtp")
    mtp = with_mtp.mtp_bytes
    if mode == "pipeline":
        a, b = (plan(NODES, s, context=64, split=[2, 2]) for s in (without, with_mtp))
        held = [[r.weights_bytes for r in p.nodes] for p in (a, b)]
        budgets = a.prompt_cache_bytes, b.prompt_cache_bytes
        assert (a.mtp_bytes, b.mtp_bytes) == (0, mtp)
    elif mode == "expert":
        a, b = (plan_experts(NODES, s, context=64, counts=[4, 4]) for s in (without, with_mtp))
        held = [[r.weights_bytes for r in p.nodes] for p in (a, b)]
        budgets = a.prompt_cache_bytes, b.prompt_cache_bytes
    else:
        held = [tensor_held_bytes(s, 64, 2) for s in (without, with_mtp)]
        budgets = tuple(tensor_prompt_cache_bytes(NODES, s, 64) for s in (without, with_mtp))
    extra = [b - a for a, b in zip(*held)]
    assert extra == [mtp if r == drafter else 0 for r in range(2)]
    assert budgets[1] < budgets[0]
    # A launch's budget (launcher/promptbudget.py) counts it the same way.
    experts = [4, 4] if mode == "expert" else None
    launch = [
        planned_budget(converted.kept, NODES, [2, 2], mode, experts, 64, None, s)
        for s in ("none", "mtp")
    ]
    assert launch == list(budgets)


def test_checkpoints_own_layer_counted_dequantised(tiny_r1):
    """R1's own format (the layer after the decoder layers, FP8 with block scales): counted when
    drafting at the bytes its loader's sanitize gives (bfloat16, scales dropped, experts
    stacked); not counted otherwise."""
    config = read_config(tiny_r1)
    n = config["num_hidden_layers"]
    raw = {}
    for f in sorted(set(weight_map(tiny_r1).values())):
        raw |= {k: v for k, v in mx.load(str(tiny_r1 / f)).items() if f".layers.{n}." in k}
    model_class, args_class = _get_classes(config)
    owner = SimpleNamespace(args=args_class.from_dict(config))
    renamed = {k.replace(f".layers.{n}.", ".layers.0."): v for k, v in raw.items()}
    loaded = sum(v.nbytes for v in model_class.sanitize(owner, renamed).values())
    assert model_spec_as_stored(tiny_r1).mtp_bytes == 0
    spec = model_spec_as_stored(tiny_r1, speculative="mtp")
    assert spec.mtp_bytes == loaded > sum(v.nbytes for v in raw.values())


def test_r1_config_estimate():
    """From config.json alone (a model still to be quantised): the layer as quantize --keep-mtp
    writes it, about 7 GB at 4 bits, on the last of six 192 GB Macs."""
    config = json.loads((ROOT / "tests" / "data" / "deepseek-r1-config.json").read_text())
    plain = model_spec_from_config(config, bits=4)
    spec = model_spec_from_config(config, bits=4, speculative="mtp")
    assert plain.mtp_bytes == 0 and spec.total_bytes == plain.total_bytes
    assert spec.mtp_bytes == estimate(config, bits=4, mtp=True).mtp_bytes
    assert 6e9 < spec.mtp_bytes < 8e9
    nodes = [NodeSpec(f"n{i}", 192 * GIB) for i in range(6)]
    a, b = (plan(nodes, s, split=[12, 10, 10, 10, 10, 9]) for s in (plain, spec))
    extra = [y.weights_bytes - x.weights_bytes for x, y in zip(a.nodes, b.nodes)]
    assert extra == [0] * 5 + [spec.mtp_bytes]
    print(
        f"R1 4-bit MTP layer {spec.mtp_bytes / 1e9:.2f} GB; prompt cache per node "
        f"{a.prompt_cache_bytes / 1e9:.2f} -> {b.prompt_cache_bytes / 1e9:.2f} GB"
    )


def test_plan_command_counts_and_notes(converted, capsys):
    """`mlxdist plan --speculative mtp`: the layer in the drafting rank's weights and in the
    JSON; a folder without the layer gets a note that a launch would stop."""
    from mlxdist.cli.plan import plan_command

    args = (None, "2x8GB", 64, 1, 4, True)
    held = {}
    for speculative in ("none", "mtp"):
        plan_command(str(converted.kept), *args, parallel="pipeline", speculative=speculative)
        out = json.loads(capsys.readouterr().out)
        held[speculative] = sum(r["weights_bytes"] for r in out["nodes"])
    spec = model_spec_from_folder(converted.kept)
    mtp = stored_mtp_bytes(converted.kept)
    assert out["mtp_bytes"] == mtp and held["mtp"] - held["none"] == mtp
    last = out["nodes"][-1]
    layers = spec.layer_bytes[last["first_layer"] :]
    assert last["weights_bytes"] == sum(layers) + spec.tail_bytes + mtp
    plan_command(str(converted.plain), *args, parallel="pipeline", speculative="mtp")
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("--keep-mtp" in n and "a launch of it stops" in n for n in notes), notes
    with pytest.raises(ValueError, match="--speculative takes"):
        plan_command(str(converted.kept), *args, speculative="medusa")


def test_folder_problem_looks_where_the_drafting_rank_loads(converted, tiny_r1, tmp_path):
    """launch's preflight (launcher/mtpfolder.py): a --keep-mtp folder and R1's own format can
    draft, a conversion without the layer cannot; a folder whose own index lacks the layer can
    when its last pipeline node folder holds it."""
    from launcher.mtpfolder import drafting_node_folder, mtp_folder_problem

    assert mtp_folder_problem(converted.kept) is None
    assert mtp_folder_problem(tiny_r1) is None
    assert "--keep-mtp" in mtp_folder_problem(converted.plain)
    assert drafting_node_folder(converted.kept) == converted.kept / "nodes" / "1"
    index = json.loads((converted.kept / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if "mtp" not in k}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_bytes((converted.kept / "config.json").read_bytes())
    assert "--keep-mtp" in mtp_folder_problem(tmp_path)
    (tmp_path / "nodes").symlink_to(converted.kept / "nodes")
    assert mtp_folder_problem(tmp_path) is None


def test_tensor_launch_check_counts_the_layer_on_node_0(converted):
    """choose_tensor with --speculative mtp: node 0 must also hold the MTP layer."""
    from launcher.cluster import choose_tensor
    from launcher.local import LaunchError
    from launcher.remote import Node

    spec = model_spec_from_folder(converted.kept)
    need = tensor_held_bytes(spec, 64, 2)[0]
    total = 10 * need
    facts = {"memory_total": total, "memory_available": need + total // 10}
    roomy = Node("a", "10.0.0.1", None, facts)  # exactly enough, without the layer
    assert choose_tensor(converted.kept, [roomy, roomy], 64) == [spec.num_layers] * 2
    with pytest.raises(LaunchError, match=r"GB on a \(.*and the MTP layer\) but a has"):
        choose_tensor(converted.kept, [roomy, roomy], 64, speculative="mtp")
