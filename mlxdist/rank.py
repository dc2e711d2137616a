"""One MLX rank: `python -m mlxdist.rank --model PATH --split a,b,...`
(or `--parallel expert|tensor --ranks N [--experts a,b,...]`).

Started with the environment mlx.launch gives a rank (MLX_RANK, MLX_HOSTFILE). Loads only its
layers (or experts, or tensor shard); rank 0 then serves the API and drives the others.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import threading
import time
from typing import NamedTuple

from launcher.rankspec import (
    API_KEY_ENV,
    HEARTBEAT_TOKEN_ENV,
    NODE_FAILED,
    PARENT_PID_ENV,
    STDIN_LIFELINE_ENV,
    RankSpec,
)

_HOST_BYTES = 64  # a rank's host name, as bytes gathered with its memory figures
PARENT_GONE = 3  # the exit code of a rank whose starter went away


def _watch_parent(starter: int | None) -> None:
    # A rank never outlives the process that started it, even one killed without cleanup: its
    # parent changes (it is re-parented), or the starter it was told of is gone (a starter that
    # died before this ran, or one that ran the rank through a wrapper that forks).
    parent = os.getppid()
    while os.getppid() == parent and (starter is None or _alive(starter)):
        time.sleep(0.5)
    _leave("the process that started it is gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _watch_stdin() -> None:
    # Started over ssh: the launcher holds this pipe open, so its end means the launcher is gone
    # (ssh passes the end on, while the remote parent, sshd, stays).
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    _leave("its stdin closed: the launcher is gone")


def _leave(why: str) -> None:
    _log(int(os.environ.get("MLX_RANK", "0")), f"leaving: {why}")
    os._exit(PARENT_GONE)


def _start_watches() -> None:
    """A rank leaves when its starter is gone: its parent changes (the starter's pid, when it
    gave one, in case it died before this runs), or its stdin closes when it is a lifeline."""
    starter = os.environ.get(PARENT_PID_ENV, "")
    starter_pid = int(starter) if starter.isdigit() and int(starter) > 1 else None
    threading.Thread(target=_watch_parent, args=(starter_pid,), daemon=True).start()
    if os.environ.get(STDIN_LIFELINE_ENV) == "1":
        threading.Thread(target=_watch_stdin, daemon=True).start()


def _log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def _load(spec: RankSpec, group):
    """This rank's stage and the runner that drives it."""
    if spec.parallel == "pipeline":
        from mlxdist.runtime.pipeline import Runner
        from mlxdist.runtime.stage import load_stage

        stage = load_stage(spec.model, list(spec.split), group.rank())
        stage.kv_bits = spec.kv_bits
        return _with_mtp(spec, Runner(stage, group), stage.is_last)
    from mlxdist.runtime.lockstep import LockstepRunner

    if spec.parallel == "expert":
        from mlxdist.runtime.expert import load_expert_stage

        rank, size = group.rank(), spec.ranks
        experts = list(spec.experts) if spec.experts else None
        stage = load_expert_stage(spec.model, experts, rank, size, group, attention=spec.attention)
    else:
        from mlxdist.runtime.stage import load_tensor_stage

        stage = load_tensor_stage(spec.model, group)
    stage.kv_bits = spec.kv_bits
    return _with_mtp(spec, LockstepRunner(stage, group, spec.parallel), group.rank() == 0)


def _with_mtp(spec: RankSpec, runner, drafts: bool):
    """With --speculative mtp: every rank knows the drafts a reply carries, and the rank that
    drafts (the head's: the pipeline's last, lock step's rank 0) loads the MTP layer."""
    if spec.speculative != "mtp":
        return runner
    runner.mtp_k = spec.draft_tokens
    if drafts:
        from mlxdist.runtime.mtp_drafter import MTPDrafter
        from mlxdist.runtime.stage import load_mtp_layer
        from quantize.checkpoint import CheckpointError, inspect_model, weight_map
        from quantize.mtp import mtp_problem

        info = inspect_model(spec.model)
        problem = mtp_problem(info.config, weight_map(info.path))
        if problem is not None:
            raise CheckpointError(f"{spec.model}: {problem}")
        try:
            layer = load_mtp_layer(spec.model)
        except (ValueError, KeyError) as e:  # tensors that do not fit the layer
            raise CheckpointError(f"{spec.model}: its MTP layer cannot be loaded: {e}") from None
        head = getattr(runner.stage.model, "lm_head", None)
        runner.mtp = MTPDrafter(layer, spec.draft_tokens, head, runner.stage.inner.norm)
    return runner


def main(argv: list[str] | None = None) -> int:
    # First of all: no process this rank starts inherits the API key (rank 0's only) or the
    # heartbeat token.
    key = os.environ.pop(API_KEY_ENV, None)
    if (token := os.environ.pop(HEARTBEAT_TOKEN_ENV, None)) is not None:
        from mlxdist.runtime.heartbeat import keep_token

        keep_token(token)
    spec = RankSpec.from_argv(argv)
    _start_watches()
    rank = int(os.environ.get("MLX_RANK", "0"))
    import mlx.core as mx

    try:
        beats, api = _start_heartbeat(spec, rank, spec.ranks)
    except (OSError, ValueError) as e:
        _log(rank, f"cannot start the heartbeat: {e}")
        return 2
    size = spec.ranks
    # Joined before the imports of seconds, so that every rank arrives at about the same time:
    # MLX's ring set-up retries a refused connection only after 1 s, then 2 s, 4 s, so a rank
    # that arrives late (it imported more first) costs the others whole seconds.
    group = mx.distributed.init(strict=size > 1, backend=spec.backend if size > 1 else "any")
    rank = group.rank()
    if group.size() != size:
        _log(rank, f"the launch has {size} ranks but the group has {group.size()}")
        return 2

    from mlxdist.runtime.lockstep import cut_sums
    from mlxdist.runtime.wired import set_recommended_wired_limit
    from quantize.checkpoint import CheckpointError
    from quantize.memory import peak_rss

    early = None  # rank 0's server while the ranks load
    if rank == 0:
        # Held from the start, so a port already in use fails the launch before any loading.
        try:
            listener = socket.create_server((spec.host, spec.port))
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            _log(rank, f"cannot listen on {spec.host}:{spec.port}: {reason}")
            return 2
        early = _serve_loading(spec, listener, key, api, beats)
    _report_loading(rank, beats, early.own if early else None)
    base = peak_rss()
    t0 = time.perf_counter()
    set_recommended_wired_limit()  # as mlx-lm: weights stay wired, not paged (no-op without Metal)
    try:
        runner = _load(spec, group)
    except CheckpointError as e:
        _log(rank, f"error: {e}")
        return 2
    stage = runner.stage
    runner.tokenizer = functools.cache(lambda: _tokenizer(spec, stage))  # a grammar's, when asked
    if rank == 0:  # built once, here: the grammar thread below and the API share it
        runner.tokenizer()
    if rank == 0 or (spec.parallel == "pipeline" and stage.is_last):  # checks or samples
        threading.Thread(target=_warm_grammar, args=(runner.tokenizer, rank), daemon=True).start()
    mx.clear_cache()
    held = stage.nbytes()
    peak = peak_rss()
    what = f"layers {stage.start}-{stage.end - 1}"
    if stage.experts:
        from quantize.nodes import spans

        what += f", routed experts {spans(list(stage.experts))}"
    _log(
        rank,
        f"loaded {what} ({spec.parallel}) from {spec.model} "
        f"({held / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
        f"peak rss {peak / 2**20:.1f} MiB (before weights {base / 2**20:.1f} MiB)",
    )
    # Every rank has loaded once this returns; rank 0 also learns the others' memory.
    name = (spec.node or socket.gethostname()).encode()
    host = list(name[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0"))
    cut = int(cut_sums(stage.model) > 0)  # attention heads cut over the ranks
    mine = [rank, base, peak, held, stage.expert_nbytes(), stage.start, stage.end, cut]
    mask = _expert_mask(stage)
    figures = mx.array([mine + mask + host], dtype=mx.int64)
    if size > 1:
        if rank != 0:  # asleep until rank 0 has loaded too, not spinning in MLX's receive
            from mlxdist.runtime.ringwait import RingWaiter

            RingWaiter().wait()
        figures = mx.distributed.all_gather(figures, group=group)
    mx.eval(figures)
    if rank != 0:
        runner.serve()
        if beats:
            beats.bye()  # a leave on purpose, not a failure
        return 0
    return _serve_api(spec, runner, figures.tolist(), early, key, api, beats)


def _tokenizer(spec: RankSpec, stage):
    """The model's tokenizer with its end tokens (generation_config.json's too)."""
    from mlxdist.runtime.tiktoken_tokenizer import load_tokenizer  # tiktoken.model too (Kimi)
    from mlxdist.serving.stops import read_end_token_ids

    ends = read_end_token_ids(spec.model, stage.config)
    return load_tokenizer(spec.model, eos_token_ids=ends)


def _warm_grammar(tokenizer, rank: int) -> None:
    """llguidance's view of the tokenizer, built while the rank starts (1.5 s for R1's) rather
    than inside the first structured answer's step, which every other answer waits for."""
    try:
        from mlxdist.runtime.grammar import ll_tokenizer

        ll_tokenizer(tokenizer())
    except Exception as e:  # the first grammar builds it then, or says why it cannot
        _log(rank, f"grammar tokenizer not built ahead: {type(e).__name__}: {e}")


def _expert_mask(stage) -> list[int]:
    """The routed experts a rank holds as bits in 63-bit words (one word more than the model's
    experts need, all zero, when it holds none; every rank's row has the same length)."""
    from quantize.nodes import routed_experts

    words = [0] * (-(-routed_experts(stage.config) // 63) + 1)
    for e in stage.experts or ():
        words[e // 63] |= 1 << e % 63
    words[-1] = 1 if stage.experts else 0  # set when the rank is an expert-parallel one
    return words


def _held(words: list[int]) -> list[int] | None:
    if not words[-1]:
        return None
    return [w * 63 + b for w, word in enumerate(words[:-1]) for b in range(63) if word >> b & 1]


def _start_heartbeat(spec: RankSpec, rank: int, size: int):
    """(its side of the heartbeat, and on rank 0 a list that will hold the API's jobs in flight,
    all failed when another rank fails)."""
    if not spec.heartbeat or size < 2:
        return None, None
    from mlxdist.runtime.heartbeat import Follower, Monitor, parse_address, rank_hosts

    address = parse_address(spec.heartbeat)
    node = spec.node or socket.gethostname()
    if rank != 0:
        return Follower(address, rank, node), None
    api = []  # the dashboard and the API's jobs in flight, once imported (none before then)

    def on_failure(message: str) -> None:
        # Runs on the heartbeat thread: the main thread may be stuck in a collective for good.
        _log(0, f"node failure: {message}")
        monitor.release()  # every other rank leaves
        for inflight in api:
            inflight.fail(message)
            inflight.wait_idle(3.0)
        time.sleep(0.2)  # the server writes the streams' last bytes
        os._exit(NODE_FAILED)

    monitor = Monitor(address, size, node, on_failure, known=rank_hosts())
    monitor.start()  # the other ranks wait for this listener before they go on
    return monitor, api


def _prefix_cache(spec: RankSpec, stage, figures: list):
    """Rank 0's index of the prefix cache, or None when it is off or the model's caches cannot
    be copied. Its budget bounds the entries' bytes on the rank that holds the most of them."""
    from mlxdist.runtime.prefix_store import can_cut, grows, reusable
    from mlxdist.serving.prefix_cache import PrefixCache, can_cut_all, layer_scale

    budget = spec.prompt_cache_bytes
    if budget is None:  # no plan gave one: a quarter of what this machine has left
        from quantize.memory import peak_rss

        budget = max(0, _total_memory() - peak_rss()) // 4
    if budget == 0:
        return None
    if not all(reusable(t) for t in stage.templates):
        _log(0, "prefix cache off: this model's caches cannot be copied")
        return None
    ranges = [(start, end) for _, _, _, _, _, start, end, *_ in figures]
    kinds = [grows(t) for t in stage.templates]
    scale = layer_scale(kinds, ranges) if spec.parallel == "pipeline" else 1.0
    _log(0, f"prefix cache: up to {budget / 2**20:.0f} MiB of KV cache per rank")
    return PrefixCache(budget, can_cut_all(stage.templates, can_cut), scale)


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _nodes(figures: list) -> list[dict]:
    """Each rank's host, layers, routed experts held and memory, for /health."""
    nodes = []
    for r, _, p, w, ew, start, end, cut, *rest in figures:
        host, words = rest[-_HOST_BYTES:], rest[:-_HOST_BYTES]
        name = bytes(int(c) for c in host).rstrip(b"\0").decode(errors="replace")
        node = {"rank": r, "host": name, "layers": [start, end - 1], "weights": w}
        held = _held(words)
        if held is not None:
            attention = "sharded" if cut else "replicated"
            node |= {"experts": held, "expert_weights": ew, "attention": attention}
        nodes.append(node | {"peak_rss": p})
    return nodes


def _view(spec: RankSpec) -> dict | None:
    """The launcher's view of the cluster, for the dashboard (None when there is none, or it
    does not read as a JSON object: the page shows the ranks' own figures then)."""
    if spec.view is None:
        return None
    from mlxdist.serving.dashboard.cluster import clean_view

    try:
        view = clean_view(json.loads(spec.view))
    except (ValueError, RecursionError):
        view = None
    if view is None:
        _log(0, "the launcher's cluster view is not one: the dashboard goes without")
    return view


def _model_name(spec: RankSpec) -> str:
    return spec.name or os.path.basename(os.path.normpath(spec.model))


class _Loading(NamedTuple):
    """Rank 0's server while the ranks load, which the API takes over once they have."""

    board: object  # the dashboard's Board, kept by the API
    switch: object  # the ASGI app the server serves: the loading one, then the API
    server: object  # uvicorn's
    own: dict  # rank 0's own load, as the heartbeat keeps the others'
    view: dict | None  # the launcher's view, read once


def _serve_loading(spec: RankSpec, listener: socket.socket, key, api, monitor) -> _Loading:
    """Rank 0's HTTP server from before loading on: the dashboard shows each rank's load, every
    other route is a 503 until the API takes over."""
    import uvicorn

    from mlxdist.serving.api.loading import Switch, loading_app
    from mlxdist.serving.dashboard import Board
    from mlxdist.serving.dashboard.cluster import LoadingSample, loading_static
    from mlxdist.serving.guard import Policy

    view = _view(spec)
    ring = (view or {}).get("ring") or []
    # The ranks' names as they will say them: the launcher's ring, else this host's for all.
    hosts = ring if len(ring) == spec.ranks else [spec.node or socket.gethostname()] * spec.ranks
    split = list(spec.split) if spec.split else None
    info = {"parallel": spec.parallel, "backend": spec.backend, "split": split}
    static = loading_static(_model_name(spec), info, view, hosts)
    board = Board("cluster", static)
    own: dict[int, tuple] = {}
    loads = (lambda: monitor.loads() | own) if monitor else (lambda: dict(own))
    board.sample = LoadingSample([n["name"] for n in static["nodes"]], loads)
    if api is not None:  # a node failed while loading: named on the pages too
        api.insert(0, board)
    switch = Switch(loading_app(board, Policy.from_spec(spec, key)))
    config = uvicorn.Config(switch, host=spec.host, port=spec.port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    return _Loading(board, switch, server, own, view)


def _report_loading(rank: int, beats, own: dict | None) -> None:
    """Each layer read is told: rank 0 keeps its own, the others tell it by their heartbeat."""
    import mlxdist.runtime.stage as stage

    def told(done: int, total: int) -> None:
        if own is not None:  # its loading began with its first count, as the others' does
            now = time.monotonic()
            own[0] = (done, total, own.get(0, (0, 0, now))[2], now)
        elif beats is not None:
            beats.loading(done, total)

    stage.on_load = told


def _serve_api(
    spec: RankSpec,
    runner,
    figures: list,
    early: _Loading,
    key: str | None,
    api: list | None = None,
    monitor=None,
) -> int:
    from launcher.prefillmodel import rank_prefill_chunk
    from mlxdist.serving.api import Inflight, create_app
    from mlxdist.serving.coordinator import Coordinator
    from mlxdist.serving.guard import Policy

    stage = runner.stage
    tokenizer = runner.tokenizer()
    prefix = _prefix_cache(spec, stage, figures)
    coordinator = Coordinator(runner, tokenizer, set(tokenizer.eos_token_ids), prefix=prefix)
    coordinator.speculate(spec.speculative, spec.draft_tokens)
    # Pipeline prefill in chunks small enough for every stage to work on one at once.
    coordinator.prefill_chunk = rank_prefill_chunk(stage.config, spec.split, spec.backend)
    context = stage.config.get("max_position_embeddings")
    split = list(spec.split) if spec.split else None
    if spec.max_context:
        context = min(context, spec.max_context) if context else spec.max_context
    nodes = _nodes(figures)
    info = {
        "ranks": spec.ranks,
        "parallel": spec.parallel,
        "backend": spec.backend,
        "split": split,
        "plan": {"split": split, "layers": [n["layers"] for n in nodes]},
        "nodes": nodes,
        "context": context,
        "vocab_size": stage.vocab_size,
        "model_type": stage.config["model_type"],
        "memory": [
            {"rank": r, "before_weights": b, "peak_rss": p, "weights": w}
            for r, b, p, w, *_ in figures
        ],
    }
    inflight = None
    if api is not None:  # with a heartbeat: a node failure fails these jobs
        inflight = Inflight()
        api.append(inflight)
    board, switch, server = early.board, early.switch, early.server
    # Every rank has loaded (the figures' gather waited for all): each node's load is whole,
    # whether or not its last count came before this.
    loads = board.sample()["nodes"]
    for figures in loads.values():
        figures["load"] |= {"done": figures["load"]["total"], "eta": 0.0}
    board.update_nodes(loads)
    policy = Policy.from_spec(spec, key)
    ages = monitor.ages if monitor else None
    app = create_app(
        coordinator, _model_name(spec), info, inflight, policy, early.view, ages, board
    )
    if monitor:
        monitor.ready()  # from here on, a few seconds of silence is a failure
    switch.app = app  # the API answers from now on, on the same socket, to the same pages
    _log(0, f"serving on http://{spec.host}:{spec.port}")
    try:
        coordinator.run()
    finally:
        server.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
