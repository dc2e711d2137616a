"""What each host is sent for a split that has no node folders (remote.push_for_split): the
model's small files and the weight files that hold its layers. No agent: the nodes' clients
record what they are pushed."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.remote import Node, push_for_split
from quantize.checkpoint import safetensors_header
from quantize.nodes import stage_needs as _needed

F1, F2, F3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
SMALL = ["config.json", "model.safetensors.index.json", "tokenizer.json"]
# Layer 0 alone in the first file, layer 1 in the second, the rest in the third.
INDEX = {
    "metadata": {"total_size": 0},
    "weight_map": {
        "model.layers.0.self_attn.q_proj.weight": F1,
        "model.layers.0.mlp.up_proj.weight": F1,
        "model.layers.1.mlp.gate_proj.weight": F2,
        "model.embed_tokens.weight": F3,
        "model.norm.weight": F3,
        "lm_head.weight": F3,
    },
}


class Recorder:
    """Stands in for a host's AgentClient: remembers the files pushed to it."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}

    def push_file(self, local: Path, rel: str, progress=None) -> None:
        self.files[rel] = local


def _nodes(n: int) -> list[Node]:
    return [Node(f"node{i}", f"10.0.0.{i + 1}", Recorder()) for i in range(n)]


def _sent(node: Node) -> list[str]:
    return sorted(Path(rel).name for rel in node.client.files)


def _folder(tmp_path: Path) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    for name in [*SMALL, "manifest.json", *set(INDEX["weight_map"].values())]:
        (model / name).write_bytes(b"x")
    (model / "model.safetensors.index.json").write_text(json.dumps(INDEX))
    (model / "config.json").write_text("{}")
    return model


def test_each_host_gets_the_small_files_and_the_files_of_its_layers(tmp_path):
    model = _folder(tmp_path)
    nodes = _nodes(2)
    folders = push_for_split(model, nodes, [1, 1])
    assert folders == ["m/split-1-1/0", "m/split-1-1/1"]
    # Embeddings (rank 0), norm and head (the last rank) are in the third file: both get it.
    assert _sent(nodes[0]) == sorted([*SMALL, F1, F3])
    assert _sent(nodes[1]) == sorted([*SMALL, F2, F3])
    for node, folder in zip(nodes, folders):
        assert all(rel.startswith(f"{folder}/") for rel in node.client.files)

    # One host with both layers is sent every weight file; the manifest is never sent.
    [whole] = _nodes(1)
    push_for_split(model, [whole], [2])
    assert _sent(whole) == sorted([*SMALL, *set(INDEX["weight_map"].values())])


def test_the_files_sent_hold_every_tensor_of_the_hosts_layers(tiny_r1):
    nodes = _nodes(2)
    split = [2, 2]
    push_for_split(tiny_r1, nodes, split)
    index = json.loads((tiny_r1 / "model.safetensors.index.json").read_text())["weight_map"]
    start = 0
    for rank, (node, layers) in enumerate(zip(nodes, split)):
        held = set()
        for local in node.client.files.values():
            if local.suffix == ".safetensors":
                held |= set(safetensors_header(local))
        first, last = rank == 0, rank == len(split) - 1
        needed = {k for k in index if _needed(k, start, start + layers, first, last, False)}
        assert needed <= held, sorted(needed - held)[:3]
        start += layers
