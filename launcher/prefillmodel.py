"""How long a pipeline takes to read a prompt (prefill), and the chunk size that makes it shortest.
Pure functions beside perfmodel.py's decode model, with its constants and links.

Prefill is bound by compute rather than memory: a chunk of c tokens multiplies c rows by every
weight it reads. One stage's time for one chunk is the longer of
- its arithmetic: 2 flops per active parameter of its layers per token, plus attention's
  2 x heads x (query-key dim + value dim) per token per key it attends to, at the chip's
  compute rate x COMPUTE_EFFICIENCY;
- reading what the chunk touches (as decode reads, at bandwidth x EFFICIENCY): its layers'
  attention and dense weights, the distinct routed experts its c tokens pick (uniform routing:
  E x (1 - (1 - k/E)^c) of E), and the KV cache written so far;
then it hands the chunk's hidden states to the next stage: one message (MESSAGE_OVERHEAD, the
link's latency, c x hidden bytes over its bandwidth), the sender busy until it is sent (MLX's
send is evaluated before the rank goes on).

Pipelined (mlxdist's runner sends a prefill chunk on without waiting for a reply): stage s starts
chunk j once it has passed chunk j-1 on and stage s-1 has passed it chunk j, a flow shop: about
(chunks + N - 1) chunk-times. Unpipelined (mlx-lm's pipeline, a chunk crosses every stage before
the next one starts): chunks x N chunk-times. Either way the prompt's last token then goes round
alone (its own SAMPLE step, as generate_step) and the first token comes back.

Small chunks fill the pipeline sooner; each chunk pays the messages and reads the stage's weights
again, so past a point they cost more than they save. `prefill_chunk` picks the power of two
between 32 and 2048 with the shortest predicted prefill.

Compute rate (an assumption from public figures, nothing fitted here): an 80-core M3 Ultra GPU at
28.6 TFLOPS FP16. hmc-tech.com's spec pages give the M3 GPU 128 FP32 lanes per core at 1398 MHz,
FP16 at the FP32 rate (10-core M3: 3.58 TFLOPS; 60-core M3 Ultra: 21.47 TFLOPS); 80 cores x 128 x
2 flops x 1.398 GHz = 28.6 TFLOPS. Other chips: the M3 Ultra's flops per byte/s of memory
bandwidth (Apple scales GPU cores and memory channels together; an assumption). COMPUTE_EFFICIENCY
0.5: an assumption, not a fit (large matmuls in MLX on Apple GPUs are commonly reported at about
half of peak). A check only, not a fit: a quoted llama.cpp pp512 of 169 tokens/s for R1 Q4_K_M on
one M3 Ultra (tests/data/published_figures.json, no publication found) is 37 G active parameters
x 2 x 169 = 12.5 TFLOPS, 0.44 of the peak above.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .chips import DEFAULT_CHIP, ChipSpec
from .perfmodel import (
    _DTYPE_BYTES,
    EFFICIENCY,
    GB,
    MESSAGE_OVERHEAD,
    LinkSpec,
    bytes_per_token,
    even_split,
    link,
    message_seconds,
    node_chip,
    usable_link,
)
from .planner import NodeSpec
from .rankspec import PREFILL_CHUNK

M3_ULTRA_FP16_FLOPS = 80 * 128 * 2 * 1.398e9  # 28.6 TFLOPS, see above
M3_ULTRA_BANDWIDTH = 819 * GB  # Apple's figure, as chips.py
COMPUTE_EFFICIENCY = 0.5  # fraction of peak FP16 flops prefill reaches (an assumption, see above)
CHUNKS = tuple(2**i for i in range(5, 12))  # 32 .. 2048: the sizes prefill_chunk chooses from
# The prompt a cluster's one chunk size is chosen for: one mlx-lm chunk, the longest prompt that
# mlx-lm's pipeline reads with no overlap at all (longer ones are many chunks at any size).
TYPICAL_PROMPT = PREFILL_CHUNK
# Set in a rank's environment, the chunk size itself (benchmarks compare sizes with it).
PREFILL_CHUNK_ENV = "MLXDIST_PREFILL_CHUNK"


def compute_rate(c: ChipSpec) -> float:
    """FP16 flops/s a chip's GPU reaches in prefill."""
    return c.bandwidth * (M3_ULTRA_FP16_FLOPS / M3_ULTRA_BANDWIDTH) * COMPUTE_EFFICIENCY


@dataclass(frozen=True)
class PrefillLayer:
    flops: float  # per token, the layer's weights (2 per active parameter)
    attention_flops: float  # per token, per key attended to
    fixed_bytes: int  # read once per chunk: attention, dense MLP or shared experts, router
    expert_bytes: int  # one routed expert's weights (0 for a dense layer)
    experts: int  # routed experts the layer holds (0 for a dense layer)
    kv_bytes: int  # the KV cache one token adds to the layer


@dataclass(frozen=True)
class PrefillModel:
    layers: list[PrefillLayer]
    experts_per_token: int
    hidden_bytes: int  # one token's hidden state between stages
    head_bytes: int  # the last token's head on the last stage
    head_flops: float


def prefill_model(config: dict, bits: int = 4, **quant) -> PrefillModel:
    """A model's prefill costs from its config.json: flops from its parameters as stored unquantised
    (every weight multiplies in 16 bits on the GPU), bytes read at `bits` (as bytes_per_token)."""
    plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    read = bytes_per_token(config, bits=bits, **quant)
    whole = bytes_per_token(plain, quantize=False)
    size = _DTYPE_BYTES.get(plain.get("torch_dtype", ""), 2)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    qk = config.get("qk_nope_head_dim", 0) + config.get("qk_rope_head_dim", 0) or head_dim
    v = config.get("v_head_dim") or head_dim
    k = read.experts_per_token
    layers = [
        PrefillLayer(
            flops=2 * w.read / size,
            attention_flops=2 * heads * (qk + v),
            fixed_bytes=r.attention + r.mlp,
            expert_bytes=r.routed // k if r.experts else 0,
            experts=r.experts,
            kv_bytes=read.kv_bytes_per_token_per_layer,
        )
        for r, w in zip(read.layers, whole.layers)
    ]
    return PrefillModel(layers, k, read.hidden_bytes, read.head, 2 * whole.head / size)


@dataclass(frozen=True)
class PrefillPrediction:
    seconds: float  # from the request's first step to the first token back on rank 0
    chunk: int
    chunks: int  # steps the prompt but its last token takes
    pipelined: bool

    def tokens_per_s(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.seconds


def _stage_seconds(model, layers, c: ChipSpec, done: int, tokens: int) -> float:
    """One stage's arithmetic or reading, whichever is longer, for `tokens` new tokens after
    `done` already in the cache."""
    k, flops, read = model.experts_per_token, 0.0, 0.0
    keys = tokens * done + tokens * (tokens + 1) / 2  # causal: token i attends to done + i keys
    for layer in layers:
        flops += tokens * layer.flops + keys * layer.attention_flops
        read += layer.fixed_bytes + layer.kv_bytes * (done + tokens)
        if layer.experts:
            read += layer.experts * (1 - (1 - k / layer.experts) ** tokens) * layer.expert_bytes
    return max(flops / compute_rate(c), read / (c.bandwidth * EFFICIENCY))


def predict_prefill(
    nodes: list[str | ChipSpec | NodeSpec],
    model: PrefillModel,
    prompt_tokens: int,
    link_name: str | LinkSpec = "tb5",
    chunk: int = PREFILL_CHUNK,
    pipelined: bool = True,
    split: list[int] | None = None,
    overhead: float = MESSAGE_OVERHEAD,
) -> PrefillPrediction:
    """Time to first token of a prompt of `prompt_tokens`, prefilled in chunks of `chunk` over the
    pipeline's stages (one per node, `split` layers each, even when None)."""
    if prompt_tokens < 1 or chunk < 1:
        raise ValueError("a prompt and a chunk have at least one token")
    chips = [node_chip(n) for n in nodes]
    lk, _ = usable_link(link(link_name), chips)
    split = list(split) if split is not None else even_split(len(model.layers), len(chips))
    stages, start = [], 0
    for count in split:
        stages.append(model.layers[start : start + count])
        start += count
    n = len(stages)

    def hop(tokens: int) -> float:
        return message_seconds(lk, tokens * model.hidden_bytes, overhead) if n > 1 else 0.0

    head = prompt_tokens - 1
    pieces = [(i, min(chunk, head - i)) for i in range(0, head, chunk)]
    ready = [0.0] * n  # when each stage is free for its next chunk
    end = 0.0  # unpipelined: when the previous chunk left the last stage
    for done, tokens in pieces:
        arrive = 0.0 if pipelined else end
        for s, (layers, c) in enumerate(zip(stages, chips)):
            finish = max(ready[s], arrive) + _stage_seconds(model, layers, c, done, tokens)
            send = hop(tokens) if s < n - 1 else 0.0
            ready[s] = arrive = finish + send
        end = arrive
    # The last token goes round alone: every stage, the head on the last, its token id back.
    t = max(ready)
    for layers, c in zip(stages, chips):
        t += _stage_seconds(model, layers, c, head, 1) + hop(1)
    t += model.head_bytes / (chips[-1].bandwidth * EFFICIENCY)
    return PrefillPrediction(t, chunk, len(pieces), pipelined)


def prefill_chunk(
    model: PrefillModel,
    nodes: list[str | ChipSpec | NodeSpec],
    link_name: str | LinkSpec = "tb5",
    prompt_tokens: int = TYPICAL_PROMPT,
    split: list[int] | None = None,
) -> int:
    """The chunk size (a power of two, 32 to 2048) with the shortest predicted pipelined prefill of
    a prompt of `prompt_tokens`; PREFILL_CHUNK, mlx-lm's own, on one rank (nothing to overlap).
    Of sizes within 1% of the best, the largest: fewer steps for the same time."""
    if len(nodes) < 2:
        return PREFILL_CHUNK
    times = {
        c: predict_prefill(nodes, model, prompt_tokens, link_name, c, True, split).seconds
        for c in CHUNKS
    }
    best = min(times.values())
    return max(c for c, t in times.items() if t <= best * 1.01)


def backend_link(backend: str) -> str:
    """The link a rank's MLX backend implies: RDMA for JACCL; the ring's TCP over Thunderbolt 4
    otherwise (the slowest Thunderbolt the ring runs on; only the bandwidth differs)."""
    return "rdma" if backend == "jaccl" else "tb4"


def rank_prefill_chunk(config: dict, split: list[int] | None, backend: str) -> int:
    """A pipeline rank 0's chunk size for its model, split and backend, its nodes taken as the
    default chip (a rank is not told its peers' chips). Tensor and expert modes (no split) keep
    PREFILL_CHUNK: their ranks work in lock step, with no stages to overlap. PREFILL_CHUNK_ENV,
    when set to a whole number, is taken instead."""
    if (forced := os.environ.get(PREFILL_CHUNK_ENV, "")).isdigit() and int(forced) > 0:
        return int(forced)
    if not split or len(split) < 2:
        return PREFILL_CHUNK
    try:
        model = prefill_model(config)
    except Exception:  # a config the estimate cannot build: a launch never fails over this
        return PREFILL_CHUNK
    return prefill_chunk(model, [DEFAULT_CHIP] * len(split), backend_link(backend), split=split)


def pipelined_against_not(
    model: PrefillModel,
    nodes: list[str | ChipSpec | NodeSpec],
    prompt_tokens: int,
    link_name: str | LinkSpec = "tb5",
) -> tuple[PrefillPrediction, PrefillPrediction]:
    """Time to first token of one prompt two ways: pipelined prefill in prefill_chunk's chunks
    (chosen for this prompt), and unpipelined in mlx-lm's PREFILL_CHUNK, each chunk crossing every
    stage before the next one starts."""
    chunk = prefill_chunk(model, nodes, link_name, prompt_tokens)
    fast = predict_prefill(nodes, model, prompt_tokens, link_name, chunk, pipelined=True)
    slow = predict_prefill(nodes, model, prompt_tokens, link_name, PREFILL_CHUNK, pipelined=False)
    return fast, slow
