"""`mlxdist quantize`: a checkpoint to an MLX model folder, streamed unit by unit, and cut
into per-node folders. Resumable: finished files are recorded with their sha256 as they close."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import _get_classes

from .checkpoint import (
    CheckpointError,
    code_family,
    human_bytes,
    inspect_model,
    safetensors_layout,
    sha256_file,
    weight_map,
)
from .errors import UserError
from .memory import peak_rss, rss_now
from .mtp import DECODER_LAYERS, is_mtp_source, supports_mtp
from .mtp_layer import MTPLayer
from .nodes import PLACEMENT, expert_sets, model_expert_sets, routed_experts, row_runs
from .recipes import default_spec, make_predicate, parse_override
from .safetensors_out import PieceFile, TensorSlot, layout, to_bytes
from .units import SOURCE_DTYPES, Source, Unit, is_routed_expert, make_units, plan_slots

FORMAT_VERSION = 1
MAX_FILE_BYTES = 5 * 10**9
PROGRESS = ".mlxdist-progress.json"
WORKERS = max(1, min(4, os.cpu_count() or 1))
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tiktoken.model",  # Kimi K2's vocabulary
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


class QuantizeError(UserError):
    """The conversion cannot go on; the message says why and what to do."""


@dataclass
class Settings:
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    split: list[int] | None = None  # layers per node; None writes no node folders
    max_file_bytes: int = MAX_FILE_BYTES
    experts: list[int] | None = None  # routed experts per node, for expert-parallel folders
    keep_mtp: bool = False  # keep the checkpoint's multi-token-prediction layer as mtp.*


@dataclass
class OutFile:
    name: str  # relative to OUT
    segment: str  # "embed", "tail", "node<r>", "mtp"; "shared" or "experts": never spanned
    slots: list[TensorSlot]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


@dataclass
class Plan:
    config: dict
    units: list[Unit]
    files: list[OutFile]
    file_of: dict[str, str]  # tensor name -> file name
    quantization: dict
    fingerprint: str
    source_bytes: int
    largest_layer_bytes: int  # of the source: the unit of the memory bound
    split: list[int] | None  # layers per node, when node folders are cut
    experts: list[int] | None = None  # routed experts per node, when expert folders are cut
    cuts: list[OutFile] = field(default_factory=list)  # nodes/<r>/model-experts-*: slices
    mtp: dict | None = None  # the kept MTP layer: {"layer": its source index, "own_head": bool}

    @property
    def output_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def slot(self, name: str) -> TensorSlot:
        return self._slots[name]

    def __post_init__(self):
        self._slots = {s.name: s for f in self.files for s in f.slots}


def check_source(path: Path, wm: dict[str, str]) -> None:
    """Every file the index names exists, holds what the index says, and is not cut short."""
    headers = {}
    for f in sorted(set(wm.values())):
        file = path / f
        if not file.is_file():
            raise CheckpointError(f"the index names {f}, which is missing from {path}")
        data_start, header = safetensors_layout(file)
        size = file.stat().st_size
        for name, entry in header.items():
            if entry["dtype"] not in SOURCE_DTYPES:
                raise CheckpointError(
                    f"{f}: tensor {name} has dtype {entry['dtype']}, which mlxdist does not read"
                )
            if data_start + entry["data_offsets"][1] > size:
                raise CheckpointError(
                    f"{f} is truncated ({size} bytes, {name} ends past it): download it again"
                )
        headers[f] = header
    for name, f in wm.items():
        if name not in headers[f]:
            raise CheckpointError(f"the index puts {name} in {f}, which does not hold it")


def _segment(unit: Unit, slot: TensorSlot, settings: Settings) -> str:
    split = settings.split
    if unit.mtp:
        # Files of their own, mtp*.safetensors, which mlx_lm.load (model*.safetensors) passes
        # over; the head's node (pipeline) or node 0 (expert) holds them whole.
        return "mtp"
    if settings.experts is not None:
        # Every node holds the "shared" files whole; "experts" files are cut per node.
        return "experts" if is_routed_expert(slot.name) else "shared"
    if split is None:
        return "all"
    if unit.layer is None:
        return unit.kind
    edge = 0
    for r, n in enumerate(split):
        edge += n
        if unit.layer < edge:
            return f"node{r}"
    raise QuantizeError(f"layer {unit.layer} is past the split {split}")


def _assign_files(units: list[Unit], settings: Settings) -> list[OutFile]:
    chunks: list[tuple[str, list[TensorSlot]]] = []
    open_chunk: dict[str, tuple[int, int]] = {}  # segment -> (its last chunk, bytes in it)
    for u in units:
        for s in u.slots or []:
            seg = _segment(u, s, settings)
            i, size = open_chunk.get(seg, (-1, 0))
            if i < 0 or (size and size + s.nbytes > settings.max_file_bytes):
                chunks.append((seg, []))
                i, size = len(chunks) - 1, 0
            chunks[i][1].append(s)
            open_chunk[seg] = (i, size + s.nbytes)
    files = []
    for stem, mine in (("model", lambda s: s != "mtp"), ("mtp", lambda s: s == "mtp")):
        own = [(s, c) for s, c in chunks if mine(s)]
        n = len(own)
        for i, (s, c) in enumerate(own):
            name = f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            files.append(OutFile(name, s, c))
    return files


def make_plan(src: Path, settings: Settings) -> Plan:
    info = inspect_model(src)
    config = info.config
    wm = weight_map(src)
    check_source(src, wm)
    if settings.experts is not None:
        _check_experts(settings, config)
    if settings.split is not None:
        if sum(settings.split) != info.num_layers or any(n < 1 for n in settings.split):
            raise QuantizeError(
                f"the split {settings.split} must be positive "
                f"and add up to {info.num_layers} layers"
            )
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy: no parameter is ever evaluated
    source = Source(src, wm)
    mtp = _mtp_layer(source, config) if settings.keep_mtp else None
    default = default_spec(settings.bits, settings.group_size, settings.mode)
    overrides = tuple(
        parse_override(o, default["group_size"], default["mode"]) for o in settings.overrides
    )
    predicate = make_predicate(model, default, settings.recipe, overrides)
    specs: dict[str, dict] = {}

    def recording(path, module):
        spec = predicate(path, module)
        if spec is not None:
            specs[path] = spec
        return spec

    dtype = _DTYPES.get(config.get("torch_dtype", ""), None)
    units = make_units(source, model, config, recording, dtype, mtp)
    for u in units:
        plan_slots(u)
    files = _assign_files(units, settings)
    cuts = _expert_cuts(files, settings, config) if settings.experts is not None else []
    file_of = {s.name: f.name for f in files for s in f.slots}
    quantization = dict(default)
    quantization.update({p: s for p, s in specs.items() if s != default})
    layer_bytes: dict[int, int] = {}
    for u in units:
        if u.layer is not None:
            layer_bytes[u.layer] = layer_bytes.get(u.layer, 0) + u.source_bytes
    fp = hashlib.sha256(
        json.dumps(
            {
                "v": FORMAT_VERSION,
                "settings": asdict(settings),
                "source": {f: (src / f).stat().st_size for f in sorted(set(wm.values()))},
                "files": [(f.name, [(s.name, s.shape) for s in f.slots]) for f in files + cuts],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    return Plan(
        config=config,
        units=units,
        files=files,
        file_of=file_of,
        quantization=quantization,
        fingerprint=fp,
        source_bytes=sum(u.source_bytes for u in units),
        largest_layer_bytes=max(layer_bytes.values(), default=0),
        split=settings.split,
        experts=settings.experts,
        cuts=cuts,
        mtp=None
        if mtp is None
        else {"layer": config["num_hidden_layers"], "own_head": "head" in mtp.shared_head},
    )


def check_keep_mtp(config: dict) -> None:
    """Refuses --keep-mtp for a model whose config declares no MTP layer mlxdist can keep."""
    if code_family(config) not in DECODER_LAYERS:
        raise QuantizeError(
            f"--keep-mtp: mlxdist keeps the multi-token-prediction layer of DeepSeek-V3/R1 "
            f"models only, not of {config.get('model_type')}: leave out --keep-mtp"
        )
    if not supports_mtp(config):
        raise QuantizeError(
            "--keep-mtp: this checkpoint has no multi-token-prediction layer "
            "(num_nextn_predict_layers is 0): leave out --keep-mtp"
        )


def _mtp_layer(source: Source, config: dict) -> MTPLayer:
    """The MTP layer's module, lazy, with its own head only when the checkpoint's copy differs
    from lm_head (R1's official copy is equal: the runtime then uses lm_head)."""
    check_keep_mtp(config)
    n = config["num_hidden_layers"]
    if not any(is_mtp_source(k, config) for k in source.weight_map):
        raise QuantizeError(
            f"--keep-mtp: the config declares a multi-token-prediction layer but the "
            f"checkpoint holds no tensor of layer {n}: leave out --keep-mtp"
        )
    head, main = f"model.layers.{n}.shared_head.head.weight", "lm_head.weight"
    shared = head not in source.weight_map or (
        main in source.weight_map and source.same(head, main)
    )
    return MTPLayer(config, own_head=not shared)


def _check_experts(settings: Settings, config: dict) -> None:
    num = routed_experts(config)
    counts = settings.experts
    if settings.split is not None:
        raise QuantizeError("a pipeline --split and expert parallelism exclude each other")
    if not num:
        raise QuantizeError(
            f"{config.get('model_type')} has no routed experts to share out: "
            "cut pipeline folders instead (--nodes or --split without --parallel expert)"
        )
    if len(counts) < 2:
        raise QuantizeError("expert parallelism needs at least 2 nodes")
    try:
        expert_sets(num, counts)
    except ValueError as e:
        raise QuantizeError(str(e)) from None


def _expert_cuts(files: list[OutFile], settings: Settings, config: dict) -> list[OutFile]:
    """Each node's files of expert slices, nodes/<r>/model-experts-*: every stacked
    expert tensor, the node's rows (see expert_sets), under its own name; at most
    max_file_bytes a file."""
    num = routed_experts(config)
    stacked = [s for f in files if f.segment == "experts" for s in f.slots]
    for s in stacked:
        if not s.shape or s.shape[0] != num:
            raise QuantizeError(f"{s.name} has shape {s.shape}: not {num} stacked experts")
    cuts = []
    for rank, held in enumerate(model_expert_sets(config, settings.experts)):
        chunks: list[list[TensorSlot]] = []
        size = 0
        for s in stacked:
            part = TensorSlot(s.name, (len(held), *s.shape[1:]), s.dtype)
            if not chunks or (size and size + part.nbytes > settings.max_file_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(part)
            size += part.nbytes
        n = len(chunks)
        for i, c in enumerate(chunks):
            cuts.append(
                OutFile(
                    # "model*": the name mlx-lm looks for when a folder has no index
                    f"nodes/{rank}/model-experts-{i + 1:05d}-of-{n:05d}.safetensors",
                    f"node{rank}",
                    c,
                )
            )
    return cuts


@dataclass
class Result:
    out: Path
    plan: Plan
    written: list[str]  # files written in this run
    skipped: list[str]  # files kept from an earlier, interrupted run
    peak_rss: int
    start_rss: int


def _prepare_out(out: Path, plan: Plan, force: bool) -> dict[str, dict]:
    """Makes out ready; returns the files an interrupted run of the same plan finished."""
    progress = out / PROGRESS
    if out.exists() and not out.is_dir():
        raise QuantizeError(f"{out} is a file: give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()):
        state = None
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except json.JSONDecodeError:
                state = None
        if state and state.get("fingerprint") == plan.fingerprint and not force:
            return state.get("done", {})
        if not force:
            raise QuantizeError(
                f"{out} is not empty: remove it, choose another folder, or pass --force"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return {}


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise QuantizeError(
            f"the output needs {human_bytes(need)} but {out} has {human_bytes(free)} free: "
            "free some space or write elsewhere"
        )


def run(
    src: Path,
    out: Path,
    plan: Plan,
    *,
    force: bool = False,
    on_progress: Callable[[int, int, int, int], None] | None = None,
    on_cut: Callable[[int, int], None] | None = None,
) -> Result:
    """Writes the planned files, then the index, config, tokenizer, manifest and node folders.
    on_progress(source bytes done, of, tensors done, of); on_cut(expert bytes cut, of)."""
    done = _prepare_out(out, plan, force)
    kept = {}
    for name, record in done.items():
        f = out / name
        if (
            f.is_file()
            and f.stat().st_size == record["size"]
            and sha256_file(f) == record["sha256"]
        ):
            kept[name] = record
    _check_disk(out, sum(f.nbytes for f in plan.files + plan.cuts if f.name not in kept))
    for p in [*out.glob("*.partial"), *out.glob("nodes/*/*.partial")]:
        p.unlink()
    start_rss = rss_now()
    records = dict(kept)
    remaining = {f.name: len(f.slots) for f in plan.files if f.name not in kept}
    slots_of = {f.name: f.slots for f in plan.files}
    open_files: dict[str, PieceFile] = {}
    work = []
    for unit in plan.units:
        todo = [s.name for s in unit.slots or [] if plan.file_of[s.name] in remaining]
        work += [(unit, i, todo) for i in range(unit.pieces if todo else 0)]
    done_bytes = plan.source_bytes - sum(u.source_bytes for u, i, _ in work if i == 0)
    all_tensors = sum(len(u.slots or []) for u in plan.units)
    done_tensors = all_tensors - sum(len(u.slots or []) for u, i, _ in work if i == 0)

    def save_progress():
        state = {"fingerprint": plan.fingerprint, "done": records}
        tmp = out / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, out / PROGRESS)

    def flush(unit: Unit, i: int, todo: list[str], arrays: dict[str, mx.array]) -> None:
        nonlocal done_bytes, done_tensors
        for n in todo:
            fname = plan.file_of[n]
            if fname not in open_files:
                open_files[fname] = PieceFile(out / fname, slots_of[fname])
            offset = i * unit.chunk * (plan.slot(n).nbytes // unit.rows)
            open_files[fname].write_at(n, offset, to_bytes(arrays[n]))
        if i + 1 < unit.pieces:
            return
        for n in todo:  # the unit's tensors are complete: close the files they completed
            fname = plan.file_of[n]
            remaining[fname] -= 1
            if remaining[fname] == 0:
                pf = open_files.pop(fname)
                records[fname] = {"size": pf.size, "sha256": pf.finish()}
                del remaining[fname]
                save_progress()
        mx.clear_cache()
        done_bytes += unit.source_bytes
        done_tensors += len(unit.slots or [])
        if on_progress:
            on_progress(done_bytes, plan.source_bytes, done_tensors, all_tensors)

    save_progress()
    try:
        # Pieces go round WORKERS CPU streams, each its own thread in MLX, and this thread
        # writes a piece once computed: the cores compute while the disk is written.
        streams = [mx.new_stream(mx.cpu) for _ in range(WORKERS)]
        ahead: list[tuple] = []
        for k, (unit, i, todo) in enumerate(work):
            with mx.stream(streams[k % WORKERS]):
                arrays = unit.make(i)
                mx.async_eval([arrays[n] for n in todo])
            ahead.append((unit, i, todo, arrays))
            del arrays
            if len(ahead) > WORKERS - 1:
                flush(*ahead.pop(0))
        while ahead:
            flush(*ahead.pop(0))
    finally:
        for pf in open_files.values():
            pf.abandon()
    todo_cuts = [c for c in plan.cuts if c.name not in kept]
    _cut_experts(out, plan, todo_cuts, records, save_progress, on_cut)

    _write_metadata(src, out, plan, records)
    (out / PROGRESS).unlink(missing_ok=True)
    written = [f.name for f in plan.files + plan.cuts if f.name not in kept]
    return Result(out, plan, written, sorted(kept), peak_rss(), start_rss)


def _cut_experts(
    out: Path,
    plan: Plan,
    cuts: list[OutFile],
    records: dict,
    save_progress: Callable[[], None],
    on_cut: Callable[[int, int], None] | None,
) -> None:
    """Copies each node's rows of every stacked expert tensor out of the whole files: a stacked
    tensor's rows are contiguous, so each run of the node's rows is one byte range, copied as
    it is."""
    if not plan.cuts:
        return
    whole = {f.name: f for f in plan.files}
    offsets = {name: layout(f.slots)[1] for name, f in whole.items() if f.segment == "experts"}
    total = sum(c.nbytes for c in plan.cuts)
    done = total - sum(c.nbytes for c in cuts)
    sets = model_expert_sets(plan.config, plan.experts)
    for cut in cuts:
        runs = row_runs(sets[int(cut.segment.removeprefix("node"))])
        (out / cut.name).parent.mkdir(parents=True, exist_ok=True)
        pf = PieceFile(out / cut.name, cut.slots)
        try:
            for part in cut.slots:
                fname = plan.file_of[part.name]
                row = plan.slot(part.name).nbytes // plan.slot(part.name).shape[0]
                at = 0  # where in the node's tensor this run goes
                for first, count in runs:
                    start = offsets[fname][part.name] + first * row
                    pieces = _copy_range(out / fname, start, count * row, pf, part.name, at)
                    for n in pieces:
                        done += n
                        if on_cut:
                            on_cut(done, total)
                    at += count * row
            records[cut.name] = {"size": pf.size, "sha256": pf.finish()}
        except BaseException:
            pf.abandon()
            raise
        save_progress()


def _copy_range(src: Path, start: int, length: int, pf: PieceFile, name: str, at: int = 0):
    """Copies length bytes of src from start into tensor name of pf at byte at, 64 MiB at a
    time (memory stays flat however large the tensor); yields the bytes of each piece."""
    with open(src, "rb") as f:
        copied = 0
        while copied < length:
            data = os.pread(f.fileno(), min(64 << 20, length - copied), start + copied)
            if not data:
                raise QuantizeError(f"{src} ends early: quantize again with --force")
            pf.write_at(name, at + copied, memoryview(data))
            copied += len(data)
            yield len(data)


def _index(plan: Plan, files: list[OutFile]) -> dict:
    weight_map = {s.name: f.name for f in files for s in f.slots}
    return {
        "metadata": {"total_size": sum(f.nbytes for f in files)},
        "weight_map": dict(sorted(weight_map.items())),
    }


def output_config(plan: Plan) -> dict:
    config = dict(plan.config)
    config.pop("quantization_config", None)  # R1's fp8 block no longer describes the weights
    config["quantization"] = plan.quantization
    config["quantization_config"] = plan.quantization
    return config


def _write_folder_metadata(src: Path, folder: Path, plan: Plan, files: list[OutFile]) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(_index(plan, files), indent=2))
    # config.json last: without it the folder does not load, so it never looks complete early.
    (folder / "config.json").write_text(json.dumps(output_config(plan), indent=2, sort_keys=True))


def node_files(plan: Plan, rank: int, size: int) -> list[OutFile]:
    """The files node rank holds: its layers, the embeddings (first node, or last when tied),
    and the final norm, head and kept MTP layer (last node)."""
    tied = bool(plan.config.get("tie_word_embeddings", False))
    wanted = {f"node{rank}"}
    if rank == 0 or (tied and rank == size - 1):
        wanted.add("embed")
    if rank == size - 1:
        wanted |= {"tail", "mtp"}  # the MTP layer drafts where the head samples
    return [f for f in plan.files if f.segment in wanted]


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # same disk: the node folder costs no space
    except OSError:
        shutil.copy2(src, dst)


def _write_expert_nodes(src: Path, out: Path, plan: Plan, records: dict) -> list[dict]:
    """Each node folder: the shared files hardlinked, its expert slices, a manifest."""
    num = routed_experts(plan.config)
    num_layers = plan.config["num_hidden_layers"]
    nodes = []
    for rank, held in enumerate(model_expert_sets(plan.config, plan.experts)):
        folder = out / "nodes" / str(rank)
        folder.mkdir(parents=True, exist_ok=True)
        # Rank 0 samples, so it alone drafts with the MTP layer: all its experts, unsplit.
        segments = {"shared", "mtp"} if rank == 0 else {"shared"}
        shared = [f for f in plan.files if f.segment in segments]
        for f in shared:
            _link(out / f.name, folder / f.name)
        own = [c for c in plan.cuts if c.segment == f"node{rank}"]
        here = shared + [OutFile(Path(c.name).name, c.segment, c.slots) for c in own]
        manifest = {
            "format": "mlxdist-node",
            "version": FORMAT_VERSION,
            "parallel": "expert",
            "plan": {
                "split": [num_layers],  # every node runs every layer
                "experts": list(plan.experts),
                "rank": rank,
                "fingerprint": plan.fingerprint,
            },
            "layers": [0, num_layers],
            "experts": held,
            "placement": PLACEMENT,
            "n_routed_experts": num,
            "embeddings": True,
            "head": True,
            "files": [{"name": f.name, **records[f.name]} for f in shared]
            + [{"name": Path(c.name).name, **records[c.name]} for c in own],
        }
        if plan.mtp is not None:
            manifest["mtp"] = plan.mtp if rank == 0 else None
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _write_folder_metadata(src, folder, plan, here)
        nodes.append(
            {
                "rank": rank,
                "layers": manifest["layers"],
                "experts": held,
                "files": [f.name for f in shared] + [c.name for c in own],
            }
        )
    return nodes


def _write_metadata(src: Path, out: Path, plan: Plan, records: dict) -> None:
    nodes = []
    if plan.experts:
        nodes = _write_expert_nodes(src, out, plan, records)
    if plan.split:
        sizes = plan.split
        for rank in range(len(sizes)):
            folder = out / "nodes" / str(rank)
            folder.mkdir(parents=True, exist_ok=True)
            files = node_files(plan, rank, len(sizes))
            for f in files:
                _link(out / f.name, folder / f.name)
            start = sum(sizes[:rank])
            manifest = {
                "format": "mlxdist-node",
                "version": FORMAT_VERSION,
                "parallel": "pipeline",
                "plan": {"split": sizes, "rank": rank, "fingerprint": plan.fingerprint},
                "layers": [start, start + sizes[rank]],
                "experts": None,  # every expert of its layers
                "embeddings": any(f.segment == "embed" for f in files),
                "head": rank == len(sizes) - 1,
                "files": [{"name": f.name, **records[f.name]} for f in files],
            }
            if plan.mtp is not None:
                manifest["mtp"] = plan.mtp if rank == len(sizes) - 1 else None
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
            _write_folder_metadata(src, folder, plan, files)
            nodes.append(
                {"rank": rank, "layers": manifest["layers"], "files": [f.name for f in files]}
            )
    manifest = {
        "format": "mlxdist-model",
        "version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        # the expert slices too (nodes/<r>/...): a damaged one is found before a launch
        "files": [{"name": f.name, **records[f.name]} for f in plan.files + plan.cuts],
        "nodes": nodes,
    }
    if plan.experts:
        manifest["parallel"] = "expert"
        manifest["plan"] = {"experts": list(plan.experts)}
    if plan.mtp is not None:
        manifest["mtp"] = plan.mtp
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _write_folder_metadata(src, out, plan, plan.files)
