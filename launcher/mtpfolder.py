"""Whether a model folder can draft with R1's MTP layer (`--speculative mtp`), found before any
rank starts: the layer's tensors in the folder (quantize --keep-mtp writes them in the whole
folder, and in the node folder of the rank that drafts: the last pipeline node, expert node 0)
or the checkpoint's own layer."""

from __future__ import annotations

from pathlib import Path

from quantize.checkpoint import read_config, weight_map
from quantize.mtp import mtp_problem
from quantize.nodes import node_manifest, parallel_of


def drafting_node_folder(path: Path) -> Path | None:
    """The node folder whose rank drafts (the head's): nodes/<last> of a pipeline cut, nodes/0
    of an expert cut; None when the folder has no node folders."""
    first = node_manifest(path / "nodes" / "0")
    if first is None:
        return None
    if parallel_of(first) == "expert":
        return path / "nodes" / "0"
    return path / "nodes" / str(len(first["plan"]["split"]) - 1)


def tensor_names(path: Path) -> set[str]:
    """The tensors of the folder and of its drafting node folder (those holding weights)."""
    names: set[str] = set()
    for folder in (path, drafting_node_folder(path)):
        if folder is None or not folder.is_dir():
            continue
        if (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors")):
            names |= set(weight_map(folder))
    return names


def mtp_folder_problem(path: Path) -> str | None:
    """Why this model folder cannot draft with an MTP layer, in one line that says what to do
    (quantize.mtp.mtp_problem); None when it can, or when it is not a folder (a .gguf: its
    rank says)."""
    if not path.is_dir():
        return None
    return mtp_problem(read_config(path), tensor_names(path))
