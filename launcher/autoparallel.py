"""`--parallel auto`: the parallel mode the performance model predicts fastest for these nodes,
their memory and their links, and one line saying why.

Each mode (pipeline, expert, tensor) is planned on the nodes (launcher/planner.py: memory less
headroom, under each GPU limit) and, if it can run, predicted (launcher/perfmodel.py); the fastest
that fits wins, ties to the earlier of PARALLEL's order. When none fits, the pipeline is chosen:
its plan then says which node is short and by how much.

The link follows the backend (launcher/backend.py) and where the ring runs: RDMA for jaccl; a
ring over TCP on the cables' own /30s is Thunderbolt (TB5, or TB4 when a chip has only
Thunderbolt 4: perfmodel.usable_link); a ring over the hosts' own addresses (no cables reported,
ssh hosts, a plan made again after a failure) is the LAN. Ranks on
one machine (--local) share its memory bandwidth: the pipeline's stages read one after another
at the whole bandwidth, while tensor and expert ranks read at once and each gets 1/N of it,
over LOOPBACK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from quantize.errors import UserError

from .chips import ChipSpec
from .perfmodel import GB, ActiveBytes, LinkSpec, held_per_node, node_chip, predict_decode
from .planner import DEFAULT_HEADROOM, ModelSpec, NodeSpec, plan, plan_experts
from .rankspec import PARALLEL

CHOICES = ("auto", *PARALLEL)  # what --parallel takes

# An assumption, not a measured figure: TCP over the loopback interface, tens of microseconds
# per message. On one machine the choice hardly hangs on it: its ranks share one memory.
LOOPBACK = LinkSpec("loopback", 10 * GB, 20e-6, 0)


class ParallelError(UserError):
    """A --parallel that no launch runs."""


def check_parallel(parallel: str) -> str:
    """--parallel checked: auto, pipeline, expert or tensor."""
    if parallel not in CHOICES:
        raise ParallelError(f"--parallel must be {', '.join(CHOICES)}, not {parallel!r}")
    return parallel


@dataclass(frozen=True)
class ModeOutcome:
    mode: str
    tokens_per_s: float | None  # predicted decode at batch 1; None when the mode cannot run
    fits: bool
    why_not: str = ""  # when it cannot run or does not fit, in a few words
    link: str = ""

    @property
    def runs(self) -> bool:
        return self.fits and self.tokens_per_s is not None


@dataclass(frozen=True)
class Choice:
    mode: str
    outcomes: list[ModeOutcome]  # in PARALLEL's order; a mode that needs 2 nodes is left out
    line: str  # "auto: tensor parallel over rdma, 31.2 tok/s predicted (pipeline 18.4, ...)"


def choose_parallel(
    nodes: Sequence[NodeSpec],
    spec: ModelSpec,
    active: ActiveBytes,
    link: str | LinkSpec = "tb5",
    context: int = 4096,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    tensor_refusal: str | None = None,
    shared_bandwidth: bool = False,
    not_ready: Mapping[str, str] | None = None,
) -> Choice:
    """The fastest mode that fits. tensor_refusal: why the model cannot be sharded over these
    nodes (heads that do not divide, a family without shard()), None when it can.
    shared_bandwidth: the nodes are ranks on one machine (--local).
    not_ready: modes the model folder was not cut for, each with why (still predicted)."""
    nodes = list(nodes)
    outcomes = [
        mode_outcome(
            mode,
            nodes,
            spec,
            active,
            link,
            context,
            batch,
            headroom,
            tensor_refusal,
            shared_bandwidth,
        )
        for mode in PARALLEL
        if mode == "pipeline" or len(nodes) > 1
    ]
    for i, o in enumerate(outcomes):
        if o.runs and o.mode in (not_ready or {}):
            outcomes[i] = replace(o, fits=False, why_not=not_ready[o.mode])
    running = [o for o in outcomes if o.runs]
    best = max(running, key=lambda o: o.tokens_per_s) if running else None
    return Choice(best.mode if best else "pipeline", outcomes, _line(best, outcomes, len(nodes)))


def mode_outcome(
    mode: str,
    nodes: Sequence[NodeSpec],
    spec: ModelSpec,
    active: ActiveBytes,
    link: str | LinkSpec,
    context: int,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    refusal: str | None = None,
    shared: bool = False,
) -> ModeOutcome:
    """One mode planned on the nodes and, if it can run, predicted."""
    if mode == "expert" and not spec.num_experts:
        return ModeOutcome(mode, None, False, "no routed experts")
    if mode == "expert" and len(nodes) > spec.num_experts:
        return ModeOutcome(mode, None, False, f"more nodes than {spec.num_experts} experts")
    if mode == "tensor" and refusal:
        return ModeOutcome(mode, None, False, refusal)
    split = None
    if mode == "pipeline":
        planned = plan(nodes, spec, context=context, batch=batch, headroom=headroom)
        fits, split = planned.fits, planned.split
    elif mode == "expert":
        fits = plan_experts(nodes, spec, context=context, batch=batch, headroom=headroom).fits
    else:
        fits = tensor_fits(nodes, spec, active, context, batch, headroom)
    who: list = list(nodes)
    if shared and mode != "pipeline":  # ranks reading at once share the machine's bandwidth
        who = [_share(node_chip(n), len(nodes)) for n in nodes]
    pred = predict_decode(who, active, split, mode, link, context=context)
    return ModeOutcome(mode, pred.tokens_per_s, fits, "" if fits else "does not fit", pred.link)


def _share(chip: ChipSpec, ranks: int) -> ChipSpec:
    return replace(chip, bandwidth=chip.bandwidth / ranks)


def tensor_fits(
    nodes: Sequence[NodeSpec],
    spec: ModelSpec,
    active: ActiveBytes,
    context: int,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
) -> bool:
    """Each node's cut of the weights (what shard() replicates whole) and of the KV cache (cut
    by heads, unless MLA's compressed cache) within its usable memory."""
    n = len(nodes)
    held = held_per_node(spec, active, n, "tensor")
    kv = spec.kv_bytes_per_token_per_layer * context * batch * spec.num_layers
    if active.kv_split_by_heads:
        kv //= n
    return all(held + kv <= node.usable_bytes(headroom) for node in nodes)


def _line(best: ModeOutcome | None, outcomes: list[ModeOutcome], nodes: int) -> str:
    if nodes == 1:
        return "auto: pipeline (one node)"
    others = []
    for o in outcomes:
        if o is best:
            continue
        if o.runs:
            others.append(f"{o.mode} {o.tokens_per_s:.1f}")
        elif o.tokens_per_s is not None:
            others.append(f"{o.mode} {o.tokens_per_s:.1f} but {o.why_not}")
        else:
            others.append(f"{o.mode}: {o.why_not}")
    rest = f" ({', '.join(others)})" if others else ""
    if best is None:
        return f"auto: pipeline, as no mode fits these nodes{rest}"
    speed = f"{best.tokens_per_s:.1f} tok/s predicted"
    return f"auto: {best.mode} parallel over {best.link}, {speed}{rest}"


# --- the inputs, from a model folder and the nodes' facts ---------------------------------------


def link_for(backend: str, over_cables: bool) -> str:
    """The link a backend sends over: RDMA for jaccl (any of its forms); the ring's TCP over the
    cables' own /30s is Thunderbolt (tb5; perfmodel takes TB4 where a chip has only
    Thunderbolt 4), over the hosts' own addresses the LAN."""
    if backend.startswith("jaccl"):
        return "rdma"
    return "tb5" if over_cables else "lan"


def model_inputs(
    model: Path, nodes: int, bits: int | None = None
) -> tuple[ModelSpec, ActiveBytes, str | None]:
    """The model's sizes, the bytes a token reads and why tensor parallelism cannot run over
    `nodes` ranks (None when it can). A quantised model is taken as stored; an unquantised one
    at `bits` when given (a plan for a model to be quantised), else as stored (a launch)."""
    from quantize.checkpoint import read_config

    from .perfmodel import bytes_per_token
    from .planner import model_spec_from_folder

    config = read_config(model)
    if bits is None or "quantization" in config:
        active = bytes_per_token(config, quantize="quantization" in config)
        spec = model_spec_from_folder(model)
    else:
        active = bytes_per_token(config, bits=bits)
        spec = model_spec_from_folder(model, bits=bits)
    return spec, active, tensor_refusal(config, nodes)


def tensor_refusal(config: Mapping, nodes: int) -> str | None:
    """Why mlx-lm cannot shard this model over `nodes` ranks, in a few words; None when it can."""
    from quantize.checkpoint import CheckpointError

    from .modes import check_tensor_split

    if nodes < 2:
        return None
    try:
        check_tensor_split(dict(config), nodes)
    except CheckpointError as e:
        return str(e).split(":")[0]
    return None


def holds_whole_model(model: Path) -> bool:
    """Whether the folder holds the whole model's weights (beside any node folders)."""
    return any(Path(model).glob("*.safetensors"))


def folder_readiness(model: Path, nodes: int) -> dict[str, str]:
    """The modes the model folder cannot run across `nodes` hosts as it is, each with why. A
    pipeline needs node folders cut for that many nodes; tensor mode the whole model; expert
    mode either expert node folders for that many nodes or the whole model, from which each
    rank reads only its own experts (every node then holds every file)."""
    from quantize.nodes import node_manifest, parallel_of

    first = node_manifest(Path(model) / "nodes" / "0")
    cut = parallel_of(first) if first else None
    counts = (first or {}).get("plan", {}).get("experts" if cut == "expert" else "split") or []
    whole = holds_whole_model(model)
    why = {}
    if cut != "pipeline" or len(counts) != nodes:
        why["pipeline"] = f"not cut for {nodes} nodes"
    if (cut != "expert" or len(counts) != nodes) and not whole:
        why["expert"] = f"not cut for {nodes} nodes, and no whole model in the folder"
    if not whole:
        why["tensor"] = "no whole model in the folder"
    return why


def choose_for_nodes(
    model: Path,
    nodes: Sequence[NodeSpec],
    link: str,
    context: int,
    bits: int | None = None,
    batch: int = 1,
) -> Choice:
    """--parallel auto across hosts: the nodes in rank order, over the backend's link. When
    MODEL is a folder, only the modes it is cut for compete; if it is cut for none (or MODEL is
    a bare config.json), the fastest is named (its launch then says how to cut the folder for
    it). bits: see model_inputs."""
    spec, active, refusal = model_inputs(model, len(nodes), bits)
    why = folder_readiness(model, len(nodes)) if Path(model).is_dir() else {}
    not_ready = why if len(why) < len(PARALLEL) else {}
    return choose_parallel(
        nodes, spec, active, link, context, batch, tensor_refusal=refusal, not_ready=not_ready
    )


def local_nodes(machine: NodeSpec, ranks: int) -> list[NodeSpec]:
    """N ranks on one machine: each with 1/N of its memory and of its GPU limit."""

    def part(x: int | None) -> int | None:
        return None if x is None else x // ranks

    return [
        replace(
            machine,
            name=f"rank{r}",
            memory_total=machine.memory_total // ranks,
            memory_available=part(machine.memory_available),
            gpu_limit=part(machine.gpu_limit),
        )
        for r in range(ranks)
    ]


def choose_local(model: Path, machine: NodeSpec, ranks: int, context: int) -> Choice:
    """--parallel auto for --local N: N ranks sharing this machine."""
    spec, active, refusal = model_inputs(model, ranks)
    nodes = local_nodes(machine, ranks)
    return choose_parallel(
        nodes, spec, active, LOOPBACK, context, tensor_refusal=refusal, shared_bandwidth=True
    )
