"""Fit the multi-token-prediction layer of a toy R1 checkpoint to the model's own continuations.

tiny-r1's MTP layer is random, so the acceptance of its drafts says nothing. This trains it the
way DeepSeek trains the layer (the V3 report, section 2.2): from the main model's last hidden
state at position i (after its final norm) and the token at i+1, predict the token at i+2. The
target is the main model's own greedy token at i+2, which is what a greedy draft must guess.
The data are the model's continuations of random prompts (greedy, and sampled at temperature 1
for variety), so the fit is tuned for no test prompt. The fitted layer goes back into the
checkpoint in R1's own format; only the MTP layer's tensors change.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from mlxdist.runtime.stage import Stage, load_stage, read_tensors
from mlxdist.testing.tiny_r1 import quantize_fp8, to_bf16
from quantize.checkpoint import CheckpointError, read_config, safetensors_layout, weight_map
from quantize.errors import UserError
from quantize.mtp import PREFIX, is_mtp_source, mlx_name, supports_mtp
from quantize.mtp_layer import MTPLayer
from quantize.units import renumber

BATCH = 16  # sequences generated together
# About 1.5 minutes on a 2-core CPU for the "tiny" preset, 19% held-out acceptance
# (mlxdist/cli/testing.py repeats them).
DEFAULTS = {"steps": 200, "sequences": 96, "tokens": 48, "prompt_tokens": 4, "lr": 3e-3}
TRAIN_BATCH = 4  # sequences per training step: on MLX's CPU, steps cost about their tokens


@dataclass
class Data:
    """Continuations of random prompts, batched: the model's inputs and what it made of them."""

    tokens: mx.array  # (sequences, length)
    hidden: mx.array  # (sequences, length, hidden): last hidden state, after the final norm
    greedy: mx.array  # (sequences, length): the model's greedy token after each position
    start: int  # the first generated position (the prompt's length)

    def __len__(self) -> int:
        return self.tokens.shape[0]


ARRAYS = ("tokens", "hidden", "greedy")


@dataclass
class Score:
    acceptance: float  # how often the layer's argmax is the model's greedy token at i+2
    loss: float  # mean cross-entropy against it


@dataclass
class Result:
    before: Score
    fitted: Score  # the trained float32 layer
    written: Score  # the layer as stored (FP8 and BF16), read back from the files
    train: int  # training positions
    held_out: int  # held-out positions scored
    files: list[str]  # shard files rewritten
    head_copied: bool  # the layer's head copy was set equal to the model's lm_head


def check_model(path: Path) -> dict:
    """config.json of an R1-format checkpoint with an MTP layer, or one clear refusal."""
    config = read_config(path)
    quant = config.get("quantization_config") or {}
    r1_format = config.get("model_type") == "deepseek_v3" and quant.get("quant_method") == "fp8"
    if not r1_format:
        raise CheckpointError(
            f"{path} is not an R1-format checkpoint (deepseek_v3 with FP8 weights): "
            "fit-mtp fits models made by `mlxdist testing make-r1`"
        )
    n = config.get("num_hidden_layers")
    if not supports_mtp(config) or not any(is_mtp_source(k, config) for k in weight_map(path)):
        raise CheckpointError(
            f"{path} has no multi-token-prediction layer (model.layers.{n}.*) to fit"
        )
    return config


# ---------------------------------------------------------------- the layer


def load_layer(path: Path, stage: Stage) -> MTPLayer:
    """The checkpoint's MTP layer in float32 (Adam's updates would vanish in bfloat16), without
    its head copy."""
    config = stage.config
    n = config["num_hidden_layers"]
    source = read_tensors(path, lambda k: is_mtp_source(k, config))
    # sanitize knows layers 0..n-1 only: numbered 0, it dequantises FP8, stacks the experts and
    # splits kv_b_proj as for any decoder layer.
    sanitized = stage.model.sanitize(renumber(source, -n))
    weights = {mlx_name(k)[len(PREFIX) :]: v for k, v in sanitized.items()}
    weights.pop("shared_head.head.weight", None)  # the model's lm_head stands in for it
    layer = MTPLayer(config, own_head=False)
    layer.load_weights(list(weights.items()), strict=True)
    layer.set_dtype(mx.float32)
    layer.eval()
    mx.eval(layer.parameters())
    return layer


def make_trainable(layer: MTPLayer) -> list[str]:
    """Unfreezes what is fitted and gives its names: everything but the embedding and the MoE.
    The MoE (router, experts, shared expert) stays as it is: trained too, it learnt the training
    continuations by heart (tiny-r1: 8-10% held-out acceptance, against 24% with it frozen)."""
    layer.unfreeze()
    layer.embed_tokens.freeze()
    layer.block.mlp.freeze()
    return [k for k, _ in tree_flatten(layer.trainable_parameters())]


def predict(layer: MTPLayer, head: nn.Module, data: Data) -> mx.array:
    """The layer's logits for the token after next at every position but the last."""
    hidden, tokens = data.hidden[:, :-1], data.tokens[:, 1:]
    mask = create_attention_mask(hidden, None, return_array=True)
    return layer.logits(layer(hidden, tokens, mask, None), head)


def targets(data: Data) -> mx.array:
    """The model's greedy token at i+2: its greedy choice after position i+1."""
    return data.greedy[:, 1:]


def score(layer: MTPLayer, head: nn.Module, data: Data) -> Score:
    """Acceptance and loss over the positions whose token i+1 the model generated."""
    logits = predict(layer, head, data)[:, data.start - 1 :]
    want = targets(data)[:, data.start - 1 :]
    loss = nn.losses.cross_entropy(logits, want, reduction="mean")
    hits = (mx.argmax(logits, axis=-1) == want).astype(mx.float32).mean()
    mx.eval(loss, hits)
    return Score(acceptance=hits.item(), loss=loss.item())


# ---------------------------------------------------------------- data


def continuations(
    stage: Stage, count: int, prompt: int, length: int, seed: list[int], sampled: bool
) -> Data:
    """count continuations of `length` tokens after random prompts of `prompt` ids: greedy, or
    sampled at temperature 1; the same seed gives the same ones."""
    rng = np.random.default_rng([*seed, int(sampled)])
    key = mx.random.key(int(rng.integers(2**31)))
    parts = []
    for first in range(0, count, BATCH):
        rows = min(BATCH, count - first)
        ids = mx.array(rng.integers(3, stage.vocab_size, (rows, prompt)))
        cache = stage.make_cache()
        tokens, hidden = [ids], [stage.forward(stage.embed(ids), cache)]
        for _ in range(length):
            logits = stage.logits(hidden[-1][:, -1:])
            if sampled:
                key, sub = mx.random.split(key)
                token = mx.random.categorical(logits, key=sub)
            else:
                token = mx.argmax(logits, axis=-1)
            tokens.append(token)
            hidden.append(stage.forward(stage.embed(token), cache))
            mx.eval(hidden[-1])
        h = mx.concatenate(hidden, axis=1)
        greedy = mx.argmax(stage.logits(h), axis=-1)
        normed = stage.inner.norm(h).astype(mx.float32)  # what the layer reads
        parts.append((mx.concatenate(tokens, axis=1), normed, greedy))
    return Data(*(mx.concatenate([p[i] for p in parts]) for i in range(3)), start=prompt)


def join(parts: list[Data]) -> Data:
    arrays = [mx.concatenate([getattr(p, f) for p in parts]) for f in ARRAYS]
    return Data(*arrays, start=parts[0].start)


# ---------------------------------------------------------------- training


def loss_fn(layer: MTPLayer, head: nn.Module, data: Data) -> mx.array:
    return nn.losses.cross_entropy(predict(layer, head, data), targets(data), reduction="mean")


def train(
    layer: MTPLayer,
    head: nn.Module,
    data: Data,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Adam on minibatches of TRAIN_BATCH sequences drawn (seeded) from data; the learning rate
    falls to zero along a cosine."""
    layer.train()
    optimizer = optim.Adam(learning_rate=optim.cosine_decay(lr, max(1, steps)))
    step = nn.value_and_grad(layer, lambda m, d: loss_fn(m, head, d))
    rng = np.random.default_rng([seed, 2])
    for i in range(steps):
        rows = mx.array(rng.choice(len(data), min(TRAIN_BATCH, len(data)), replace=False))
        batch = Data(*(getattr(data, f)[rows] for f in ARRAYS), start=data.start)
        loss, grads = step(layer, batch)
        optimizer.update(layer, grads)
        mx.eval(layer.parameters(), optimizer.state, loss)
        if on_step is not None:
            on_step(i + 1, loss.item())
    layer.freeze()
    layer.eval()


# ---------------------------------------------------------------- writing back


def checkpoint_arrays(layer: MTPLayer, names: list[str], config: dict) -> dict[str, np.ndarray]:
    """The named (trained) tensors under their checkpoint names (model.layers.<n>.*), in
    float32: experts one tensor each again, kv_b_proj joined back from sanitize's two halves."""
    n, heads = config["num_hidden_layers"], config["num_attention_heads"]
    nope = config["qk_nope_head_dim"]
    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(layer.parameters())}
    params = {k: params[k] for k in names}
    out: dict[str, np.ndarray] = {}
    attn = "block.self_attn."
    if f"{attn}embed_q.weight" in params:
        # sanitize made embed_q from kv_b_proj's first nope rows of every head (transposed)
        # and unembed_out from the rest: put them back side by side.
        wk = params.pop(f"{attn}embed_q.weight")  # (heads, kv_lora, nope)
        wv = params.pop(f"{attn}unembed_out.weight")  # (heads, v_dim, kv_lora)
        kv_b = np.concatenate([wk.swapaxes(-1, -2), wv], axis=1)
        out["self_attn.kv_b_proj.weight"] = kv_b.reshape(heads * (nope + wv.shape[1]), -1)
    for name, value in params.items():
        name = name.removeprefix("block.")
        stacked = name.split(".")
        if stacked[:2] == ["mlp", "switch_mlp"]:
            for e, w in enumerate(value):
                out[f"mlp.experts.{e}.{stacked[2]}.weight"] = w
        else:
            out[name] = value
    return {f"model.layers.{n}.{k}": v for k, v in out.items()}


def encode(name: str, value: np.ndarray, entries: dict) -> dict[str, bytes]:
    """A tensor's bytes in the dtype the checkpoint stores it in: FP8 E4M3 with its 128x128
    block scales where it has a `_scale_inv`, else BF16 or F32."""
    entry = entries[name]
    if list(value.shape) != entry["shape"]:
        raise ValueError(f"{name}: fitted shape {value.shape} is not the stored {entry['shape']}")
    scale_name = f"{name}_scale_inv"
    if scale_name in entries:
        fp8, scale = quantize_fp8(np.ascontiguousarray(value, dtype=np.float32))
        return {name: fp8.tobytes(), scale_name: scale.tobytes()}
    if entry["dtype"] == "BF16":
        return {name: to_bf16(value).tobytes()}
    if entry["dtype"] == "F32":
        return {name: np.ascontiguousarray(value, dtype=np.float32).tobytes()}
    raise ValueError(f"{name} is stored as {entry['dtype']}, which fit-mtp does not write")


def write_back(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """Overwrites the given tensors in their shard files, in place of the same bytes: dtypes
    and shapes are unchanged, so headers, offsets and the index stay as they are and every other
    tensor keeps its bytes. Each file is written whole to a temporary file, then renamed."""
    index = weight_map(path)
    by_file: dict[str, list[str]] = {}
    for name in arrays:
        by_file.setdefault(index[name], []).append(name)
    for file, names in sorted(by_file.items()):
        target = path / file
        start, entries = safetensors_layout(target)
        data = bytearray(target.read_bytes())
        for name in names:
            for stored, raw in encode(name, arrays[name], entries).items():
                a, b = entries[stored]["data_offsets"]
                if b - a != len(raw):
                    raise ValueError(f"{stored}: {len(raw)} bytes for a slot of {b - a}")
                data[start + a : start + b] = raw
        tmp = target.with_name(f".{file}.fit-mtp.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return sorted(by_file)


def head_copy(path: Path, config: dict) -> dict[str, np.ndarray]:
    """The model's lm_head as the MTP layer's head copy, when the two differ: the layer is
    fitted through lm_head, and a runtime uses the copy when there is one."""
    n = config["num_hidden_layers"]
    name = f"model.layers.{n}.shared_head.head.weight"
    index = weight_map(path)
    if name not in index:
        return {}
    pair = read_tensors(path, lambda k: k in (name, "lm_head.weight"))
    if mx.array_equal(pair[name], pair["lm_head.weight"]).item():
        return {}
    return {name: np.array(pair["lm_head.weight"].astype(mx.float32))}


# ---------------------------------------------------------------- the whole fit


def fit(
    path: str | Path,
    steps: int = DEFAULTS["steps"],
    sequences: int = DEFAULTS["sequences"],
    tokens: int = DEFAULTS["tokens"],
    prompt_tokens: int = DEFAULTS["prompt_tokens"],
    seed: int = 0,
    lr: float = DEFAULTS["lr"],
    on_step: Callable[[int, float], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Result:
    """Fits the MTP layer of the checkpoint at path and writes it back."""
    path = Path(path)
    config = check_model(path)
    say = on_stage or (lambda _: None)
    mx.random.seed(seed)
    stage = load_stage(path, [config["num_hidden_layers"]], 0)
    head = stage.model.lm_head
    layer = load_layer(path, stage)

    held_count = held_out_count(sequences)
    say(f"continuing {sequences} + {held_count} prompts of {prompt_tokens} by {tokens} tokens")
    greedy = sequences - sequences // 2
    data = join(
        [
            continuations(stage, greedy, prompt_tokens, tokens, [seed, 0], sampled=False),
            continuations(
                stage, sequences - greedy, prompt_tokens, tokens, [seed, 0], sampled=True
            ),
        ]
    )
    held = continuations(stage, held_count, prompt_tokens, tokens, [seed, 1], sampled=False)
    before = score(layer, head, held)
    names = make_trainable(layer)
    train(layer, head, data, steps, lr, seed, on_step)
    fitted = score(layer, head, held)

    arrays = checkpoint_arrays(layer, names, config)
    copy = head_copy(path, config)
    files = write_back(path, {**arrays, **copy})
    written = score(load_layer(path, stage), head, held)
    return Result(
        before=before,
        fitted=fitted,
        written=written,
        train=len(data) * (tokens + prompt_tokens - 1),
        held_out=len(held) * tokens,
        files=files,
        head_copied=bool(copy),
    )


def held_out_count(sequences: int) -> int:
    """Held-out greedy continuations scored before and after: a quarter as many, at least 4."""
    return max(4, sequences // 4)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """`mlxdist testing fit-mtp` runs this in a process of its own (the CLI imports no MLX
    runtime): a progress bar and a table, or one error line and exit 1."""
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--sequences", type=int, default=DEFAULTS["sequences"])
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    args = parser.parse_args(argv)
    err = Console(stderr=True)
    try:
        check_model(args.model)
        result = _fit_with_progress(args, err)
    except UserError as e:
        err.print(f"[red]error: {e}[/red]", highlight=False, soft_wrap=True)
        sys.exit(1)
    _report(result)


def _fit_with_progress(args: argparse.Namespace, console) -> Result:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("fitting", total=args.steps, loss="-")

        def on_step(done: int, loss: float) -> None:
            bar.update(task, completed=done, loss=f"{loss:.3f}")

        return fit(
            args.model,
            steps=args.steps,
            sequences=args.sequences,
            tokens=args.tokens,
            prompt_tokens=args.prompt_tokens,
            seed=args.seed,
            lr=args.lr,
            on_step=on_step,
            on_stage=console.print,
        )


def _report(result: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"MTP layer: {result.train} training positions, {result.held_out} held out"
    table = Table(title=title)
    table.add_column("layer")
    table.add_column("acceptance", justify="right")
    table.add_column("loss", justify="right")
    rows = (("before", result.before), ("fitted", result.fitted), ("written", result.written))
    for name, s in rows:
        table.add_row(name, f"{s.acceptance:.1%}", f"{s.loss:.3f}")
    Console().print(table)
    copied = "; its head copy set to lm_head's values" if result.head_copied else ""
    print(
        f"held-out acceptance {result.before.acceptance:.4f} -> {result.written.acceptance:.4f} "
        f"(fitted {result.fitted.acceptance:.4f}), loss {result.before.loss:.4f} -> "
        f"{result.written.loss:.4f}; rewrote {', '.join(result.files)}{copied}"
    )


if __name__ == "__main__":
    main()
