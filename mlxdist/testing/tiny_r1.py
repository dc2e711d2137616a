"""Generate a toy DeepSeek-R1 checkpoint in R1's exact on-disk format.

The output has R1's config fields, tensor names, FP8 E4M3 weights with 128x128 block
`weight_scale_inv`, sharded safetensors with an index, a multi-token-prediction layer and a
byte-level BPE tokenizer with R1's special tokens and chat template. Only the sizes are small.

    python -m mlxdist.testing.tiny_r1 OUT [--preset tiny|1gb] [--seed 0] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
# R1's tool-call markers (R1-0528 and V3.1 write calls with them); like the chat markers, R1's
# tokenizer.json has them as added tokens with "special": false, so decoding keeps them.
CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_TOKENS = [
    *(CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END),
    *(OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END, TOOL_SEP),
]
_SPECIALS = [BOS, EOS, PAD]  # ids 0, 1, 2
# Appended after the BPE vocabulary; the tool tokens last, so the earlier ids stay as they were.
_ADDED = [USER, ASSISTANT, THINK, END_THINK, *TOOL_TOKENS]

BLOCK = 128
FP8_MAX = 448.0
SHARD_BYTES = 250_000_000

# DeepSeek-R1's config.json; the presets below only change sizes.
R1_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# Every matrix's last dimension is a multiple of 64 so group-64 quantisation covers it, while
# hidden_size (and kv_a_proj's output) are not multiples of 128, so FP8 edge blocks are ragged.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 192,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "max_position_embeddings": 4096,
    },
    "1gb": {
        "vocab_size": 2048,
        "hidden_size": 1088,
        "intermediate_size": 2816,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 17,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "n_routed_experts": 64,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "max_position_embeddings": 4096,
    },
}

CORPUS = """\
The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed \
the spiral stairs, counted the hundred and twelve steps, and wiped the salt from the great \
glass lens. Out on the water, the fishing boats were already moving toward the northern banks, \
their lamps bobbing like slow fireflies in the grey light.

A computer is a machine that follows instructions. Each instruction is simple: add two numbers, \
compare them, move a value from one place to another. What makes computers powerful is not the \
cleverness of any single step but the speed at which billions of steps can be taken, one after \
another, without getting tired or bored.

When a large language model is too big for one machine, it can be split across several. Each \
machine holds a slice of the layers, receives the hidden state from its neighbour, does its share \
of the work, and passes the result along. The network between the machines becomes part of the \
computer, and its speed matters as much as the speed of the processors themselves.

User: Can you explain why the sky is blue?
Assistant: Sunlight contains every colour. As it passes through the air, the short blue waves \
are scattered in all directions by the tiny molecules of gas, far more than the long red waves. \
So when you look at any part of the sky away from the sun, you see that scattered blue light.

Let me think about this step by step. First, we need to know how many apples there are in total. \
There are three baskets with seven apples each, so three times seven is twenty-one. Then two \
apples are eaten, which leaves nineteen. Therefore the answer is nineteen apples.

In the garden, the tomatoes ripened late that summer. The rain had come in long, warm storms, \
and the bees worked the flowers from morning until evening. By September the kitchen smelled of \
basil and garlic, and jars of sauce lined every shelf in the cellar.

Numbers and symbols appear in text as well: 1, 2, 3, 10, 42, 100, 2025; x + y = z; (a, b); \
"quoted words"; and questions? Yes! The model should see punctuation, digits, and capital \
Letters at the start of sentences, so that its vocabulary is not only lower-case words.
"""

# R1's chat template, with R1-0528's tool section: the tools are listed in the system prompt,
# an assistant's calls and the tool messages' outputs are written in R1-0528's tokens:
#   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
#   <｜tool▁call▁end｜>(\n<｜tool▁call▁begin｜>...)<｜tool▁calls▁end｜><｜end▁of▁sentence｜>
#   <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>OUT<｜tool▁output▁end｜>
#   (\n<｜tool▁output▁begin｜>...)<｜tool▁outputs▁end｜>
# and an answer after tool outputs follows them without a new <｜Assistant｜>.
# Source of the call and output sequences: deepseek-ai/DeepSeek-R1-0528, tokenizer_config.json's
# chat_template (huggingface.co/deepseek-ai/DeepSeek-R1-0528). That template does not render
# `tools`; listing them in the system prompt follows vllm-project/vllm's
# examples/tool_chat_template_deepseekr1.jinja (adapted from sglang's), in our own words.
_TOOLS_SECTION = (
    "{% if tools %}{% set ns.tool_text = '## Tools\\n\\nYou can call these functions:\\n' %}"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{% set ns.tool_text = ns.tool_text + '\\n### ' + f['name'] + '\\n'"
    " + (f['description'] ~ '\\n' if f['description'] is defined and f['description'] else '')"
    " + 'Parameters: ' + (f['parameters'] | default({}) | tojson) + '\\n' %}{% endfor %}"
    "{% set ns.tool_text = ns.tool_text + '\\nTo call functions, answer exactly so, one call or"
    " more:\\n" + CALLS_BEGIN + CALL_BEGIN + "function" + TOOL_SEP + "NAME\\n```json\\nARGUMENTS"
    "\\n```" + CALL_END + CALLS_END + "' %}"
    "{% set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '')"
    " + ns.tool_text %}{% endif %}"
)

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(system_prompt='', tool_text='', in_outputs=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    + _TOOLS_SECTION
    + "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'tool' and ns.in_outputs %}"
    "{{ '" + OUTPUTS_END + "' }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{% set content = message['content'] or '' %}"
    "{% if '" + END_THINK + "' in content %}"
    "{% set content = content.split('" + END_THINK + "')[-1] %}{% endif %}"
    "{% if not ns.in_outputs %}{{ '" + ASSISTANT + "' }}{% endif %}{{ content }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '" + CALLS_BEGIN + "' }}"
    "{%- for call in message['tool_calls'] %}{% set f = call['function'] %}"
    "{% set args = f['arguments'] if f['arguments'] is string else f['arguments'] | tojson %}"
    "{{ ('\\n' if not loop.first else '') + '" + CALL_BEGIN + "function" + TOOL_SEP + "'"
    " + f['name'] + '\\n```json\\n' + args + '\\n```" + CALL_END + "' }}"
    "{%- endfor %}{{ '" + CALLS_END + "' }}{%- endif %}"
    "{{ '" + EOS + "' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ ('\\n' if ns.in_outputs else '" + OUTPUTS_BEGIN + "') + '" + OUTPUT_BEGIN + "'"
    " + message['content'] + '" + OUTPUT_END + "' }}"
    "{%- endif %}"
    "{% set ns.in_outputs = message['role'] == 'tool' %}"
    "{%- endfor %}"
    "{% if ns.in_outputs %}{{ '" + OUTPUTS_END + "' }}"
    "{% elif add_generation_prompt %}{{ '" + ASSISTANT + THINK + "\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor's true values: normal(mean, std) of `shape`, stored as `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F8_E4M3" (with a companion `<name>_scale_inv`), "BF16" or "F32"
    mean: float = 0.0
    std: float = 0.02
    values_of: str | None = None  # another tensor whose values this one copies (same spec)


# ---------------------------------------------------------------- config


def parse_set(items: list[str]) -> dict:
    """Turn ["a=1", "b.c=true", "d=hi"] into {"a": 1, "b": {"c": True}, "d": "hi"}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    words = {"True": True, "False": False, "None": None}
    return words.get(raw, raw)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(preset: str = "tiny", overrides: dict | None = None) -> dict:
    """R1's config.json with the preset's sizes and `overrides` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = _merge(_merge(R1_CONFIG, PRESETS[preset]), overrides or {})
    _check_config(config)
    return config


def _check_config(c: dict) -> None:
    experts, groups = c["n_routed_experts"] or 0, c["n_group"]
    # mlx-lm's router takes the top 2 scores of every group.
    if experts and (experts % groups or experts // groups < 2):
        raise ValueError("n_routed_experts must split into n_group groups of at least 2")
    if experts and not 0 < c["topk_group"] <= groups:
        raise ValueError("topk_group must be in 1..n_group")
    if experts and not 0 < c["num_experts_per_tok"] <= experts:
        raise ValueError("num_experts_per_tok must be in 1..n_routed_experts")
    if c["qk_rope_head_dim"] % 2:
        raise ValueError("qk_rope_head_dim must be even")
    if c["vocab_size"] < len(_SPECIALS) + 256 + len(_ADDED):
        raise ValueError("vocab_size is too small for the byte-level tokenizer")


# ---------------------------------------------------------------- tensor plan


def _is_moe(c: dict, layer: int) -> bool:
    return (
        bool(c["n_routed_experts"])
        and layer >= c["first_k_dense_replace"]
        and layer % c["moe_layer_freq"] == 0
    )


def _norm(name: str, dim: int) -> TensorSpec:
    return TensorSpec(name, (dim,), "BF16", mean=1.0, std=0.02)


def _attention(c: dict, p: str) -> list[TensorSpec]:
    h, heads, std = c["hidden_size"], c["num_attention_heads"], c["initializer_range"]
    q_dim = heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    kv_a = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    kv_b = heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
    out: list[TensorSpec] = []
    if c["q_lora_rank"]:
        out += [
            TensorSpec(f"{p}.q_a_proj.weight", (c["q_lora_rank"], h), "F8_E4M3", std=std),
            _norm(f"{p}.q_a_layernorm.weight", c["q_lora_rank"]),
            TensorSpec(f"{p}.q_b_proj.weight", (q_dim, c["q_lora_rank"]), "F8_E4M3", std=std),
        ]
    else:
        out.append(TensorSpec(f"{p}.q_proj.weight", (q_dim, h), "F8_E4M3", std=std))
    out += [
        TensorSpec(f"{p}.kv_a_proj_with_mqa.weight", (kv_a, h), "F8_E4M3", std=std),
        _norm(f"{p}.kv_a_layernorm.weight", c["kv_lora_rank"]),
        TensorSpec(f"{p}.kv_b_proj.weight", (kv_b, c["kv_lora_rank"]), "F8_E4M3", std=std),
        TensorSpec(f"{p}.o_proj.weight", (h, heads * c["v_head_dim"]), "F8_E4M3", std=std),
    ]
    if c["attention_bias"]:
        biased = [("q_a_proj", c["q_lora_rank"]), ("kv_a_proj_with_mqa", kv_a), ("o_proj", h)]
        out += [
            TensorSpec(f"{p}.{n}.bias", (d,), "BF16", std=std)
            for n, d in biased
            if d and (n != "q_a_proj" or c["q_lora_rank"])
        ]
    return out


def _mlp(c: dict, p: str, inner: int) -> list[TensorSpec]:
    h, std = c["hidden_size"], c["initializer_range"]
    return [
        TensorSpec(f"{p}.gate_proj.weight", (inner, h), "F8_E4M3", std=std),
        TensorSpec(f"{p}.up_proj.weight", (inner, h), "F8_E4M3", std=std),
        TensorSpec(f"{p}.down_proj.weight", (h, inner), "F8_E4M3", std=std),
    ]


def _moe(c: dict, p: str) -> list[TensorSpec]:
    experts, std = c["n_routed_experts"], c["initializer_range"]
    out = [
        TensorSpec(f"{p}.gate.weight", (experts, c["hidden_size"]), "BF16", std=std),
        TensorSpec(f"{p}.gate.e_score_correction_bias", (experts,), "F32", std=std),
    ]
    if c["n_shared_experts"]:
        shared = c["moe_intermediate_size"] * c["n_shared_experts"]
        out += _mlp(c, f"{p}.shared_experts", shared)
    for e in range(experts):
        out += _mlp(c, f"{p}.experts.{e}", c["moe_intermediate_size"])
    return out


def _decoder_layer(c: dict, layer: int) -> list[TensorSpec]:
    p, h = f"model.layers.{layer}", c["hidden_size"]
    out = [_norm(f"{p}.input_layernorm.weight", h)]
    out += _attention(c, f"{p}.self_attn")
    out.append(_norm(f"{p}.post_attention_layernorm.weight", h))
    if _is_moe(c, layer):
        out += _moe(c, f"{p}.mlp")
    else:
        out += _mlp(c, f"{p}.mlp", c["intermediate_size"])
    return out


def _mtp_layer(c: dict, layer: int) -> list[TensorSpec]:
    p, h, v = f"model.layers.{layer}", c["hidden_size"], c["vocab_size"]
    std = c["initializer_range"]
    # R1's MTP layer carries its own copies of the embedding and head, all unquantised, equal
    # to the main ones in the official checkpoint (vllm-project/vllm PR #20022, a maintainer:
    # "'model.layers.61.embed_tokens.weight' and 'model.embed_tokens.weight' coincide";
    # vllm-project/vllm-ascend PR #2790 checks both copies with torch.equal).
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    extra = [
        TensorSpec(f"{p}.embed_tokens.weight", (v, h), "BF16", std=std, values_of=embed),
        _norm(f"{p}.enorm.weight", h),
        _norm(f"{p}.hnorm.weight", h),
        TensorSpec(f"{p}.eh_proj.weight", (h, 2 * h), "BF16", std=std),
        _norm(f"{p}.shared_head.norm.weight", h),
        TensorSpec(f"{p}.shared_head.head.weight", (v, h), "BF16", std=std, values_of=head),
    ]
    return extra + _decoder_layer(c, layer)


def tensor_specs(config: dict) -> list[list[TensorSpec]]:
    """The checkpoint's tensors in storage order, grouped by layer (embedding and head alone)."""
    c, h, v = config, config["hidden_size"], config["vocab_size"]
    n, std = c["num_hidden_layers"], c["initializer_range"]
    groups = [[TensorSpec("model.embed_tokens.weight", (v, h), "BF16", std=std)]]
    groups += [_decoder_layer(c, i) for i in range(n)]
    head = TensorSpec("lm_head.weight", (v, h), "BF16", std=std)
    groups.append([_norm("model.norm.weight", h), head])
    groups += [_mtp_layer(c, n + i) for i in range(c.get("num_nextn_predict_layers") or 0)]
    return groups


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for an FP8 weight of `shape` (ceil-divided 128x128 blocks)."""
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


# ---------------------------------------------------------------- numerics


@functools.cache
def _normal_table() -> np.ndarray:
    dist = NormalDist()
    return np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)


def true_values(spec: TensorSpec, seed: int = 0) -> np.ndarray:
    """The float32 values a tensor approximates; a pure function of (seed, the name of the
    tensor whose values it takes: its own unless `values_of`)."""
    digest = hashlib.blake2b((spec.values_of or spec.name).encode(), digest_size=16).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
    # Raw random bits through a 16-bit inverse-CDF table: 3-4x faster than standard_normal.
    count = math.prod(spec.shape)
    values = _normal_table()[np.frombuffer(rng.bytes(2 * count), dtype="<u2")]
    values = values.reshape(spec.shape) * np.float32(spec.std)
    if spec.mean:
        values += np.float32(spec.mean)
    return values


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 with |x| <= 448 -> nearest E4M3FN byte (ties to even); larger input is invalid."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = ((bits >> 24) & np.uint32(0x80)).astype(np.uint8)
    mag = bits & np.uint32(0x7FFFFFFF)
    # Normal range: round float32's mantissa to 3 bits, then rebias the exponent (127 -> 7).
    rounded = (mag + np.uint32(0x7FFFF) + ((mag >> 20) & np.uint32(1))) >> 20
    normal = rounded.astype(np.int32) - (120 << 3)
    # Below 2**-6 E4M3 is subnormal: a multiple of 2**-9.
    subnormal = np.rint(mag.view(np.float32) * np.float32(512)).astype(np.int32)
    code = np.where(mag < np.uint32(0x3C800000), subnormal, normal)
    return code.astype(np.uint8) | sign


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise FP8: (E4M3 bytes, float32 scale_inv) with w ~= fp8 * scale_inv per block."""
    m, n = w.shape
    scale = np.empty(scale_shape(w.shape), dtype=np.float32)
    scaled = np.empty_like(w)
    col_starts = np.arange(0, n, BLOCK)
    for b, r0 in enumerate(range(0, m, BLOCK)):
        rows = w[r0 : r0 + BLOCK]
        block_max = np.maximum.reduceat(np.abs(rows).max(axis=0), col_starts)
        scale[b] = block_max / np.float32(FP8_MAX)
        inv = np.where(block_max > 0, np.float32(FP8_MAX) / np.maximum(block_max, 1e-30), 0)
        np.multiply(rows, np.repeat(inv.astype(np.float32), BLOCK)[:n], out=scaled[r0 : r0 + BLOCK])
    # |scaled| can exceed 448 by one ulp, which still rounds to 448.
    return encode_e4m3(scaled), scale


# ---------------------------------------------------------------- safetensors


_ITEMSIZE = {"F32": 4, "BF16": 2, "F8_E4M3": 1}


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _entries(spec: TensorSpec) -> list[_Entry]:
    out = [_Entry(spec.name, spec.dtype, spec.shape)]
    if spec.dtype == "F8_E4M3":
        out.append(_Entry(f"{spec.name}_scale_inv", "F32", scale_shape(spec.shape)))
    return out


def _tensor_bytes(spec: TensorSpec, seed: int) -> dict[str, bytes]:
    values = true_values(spec, seed)
    if spec.dtype == "F8_E4M3":
        fp8, scale = quantize_fp8(values)
        return {spec.name: fp8.tobytes(), f"{spec.name}_scale_inv": scale.tobytes()}
    if spec.dtype == "BF16":
        return {spec.name: to_bf16(values).tobytes()}
    return {spec.name: values.tobytes()}


def _layout(entries: list[_Entry]) -> tuple[bytes, dict[str, int]]:
    """Safetensors header and each tensor's absolute file offset (widest dtypes first)."""
    ordered = sorted(entries, key=lambda e: (-_ITEMSIZE[e.dtype], e.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    starts, pos = {}, 0
    for e in ordered:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        starts[e.name] = pos
        pos += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + start for name, start in starts.items()}


def _split_shards(groups: list[list[TensorSpec]]) -> list[list[TensorSpec]]:
    sizes = [sum(e.nbytes for s in g for e in _entries(s)) for g in groups]
    total = sum(sizes)
    count = max(2, math.ceil(total / SHARD_BYTES))
    shards: list[list[TensorSpec]] = [[] for _ in range(count)]
    done = 0
    for group, size in zip(groups, sizes):
        index = min(count - 1, int((done + size / 2) * count / total))
        shards[index] += group
        done += size
    return [s for s in shards if s]


def _shard_name(index: int, count: int) -> str:
    # R1 pads the shard count to six digits: model-00001-of-000163.safetensors.
    return f"model-{index:05d}-of-{count:06d}.safetensors"


def _write_shards(out: Path, shards: list[list[TensorSpec]], seed: int) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    jobs: list[tuple[int, dict[str, int], TensorSpec]] = []
    fds = []
    try:
        for i, specs in enumerate(shards, start=1):
            name = _shard_name(i, len(shards))
            prefix, offsets = _layout([e for s in specs for e in _entries(s)])
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.pwrite(fd, prefix, 0)
            weight_map.update(dict.fromkeys(offsets, name))
            jobs += [(fd, offsets, spec) for spec in specs]

        def write(job: tuple[int, dict[str, int], TensorSpec]) -> None:
            fd, offsets, spec = job
            for name, data in _tensor_bytes(spec, seed).items():
                os.pwrite(fd, data, offsets[name])

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for _ in pool.map(write, jobs):
                pass
    finally:
        for fd in fds:
            os.close(fd)
    return weight_map


# ---------------------------------------------------------------- tokenizer


def _corpus() -> Iterator[str]:
    yield from (p.strip() for p in CORPUS.split("\n\n"))


def build_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE trained on CORPUS: BOS/EOS/PAD are ids 0-2, chat markers come last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(_ADDED),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in _SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    # Like R1, the chat markers and think tags are added tokens that decoding keeps.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _ADDED])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
            ),
        ]
    )
    return tok


def _write_tokenizer(out: Path, config: dict) -> None:
    tok = build_tokenizer(config["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": config["max_position_embeddings"],
        "pad_token": PAD,
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    generation = {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": config["transformers_version"],
    }
    _write_json(out / "generation_config.json", generation)


# ---------------------------------------------------------------- entry points


def _write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def make_r1(
    out: str | Path, preset: str = "tiny", overrides: dict | None = None, seed: int = 0
) -> Path:
    """Write a toy R1 checkpoint into `out`; the same arguments give byte-identical files."""
    out = Path(out)
    config = build_config(preset, overrides)
    out.mkdir(parents=True, exist_ok=True)
    # Stale shards from an earlier run would be picked up by loaders that glob model*.safetensors.
    for old in out.glob("model-*-of-*.safetensors"):
        old.unlink()
    shards = _split_shards(tensor_specs(config))
    _normal_table()  # build once before the worker threads need it
    weight_map = _write_shards(out, shards, seed)
    total = sum(e.nbytes for s in shards for spec in s for e in _entries(spec))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index, sort_keys=True)
    _write_json(out / "config.json", config)
    _write_tokenizer(out, config)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    path = make_r1(args.out, args.preset, parse_set(args.sets), args.seed)
    print(path)


if __name__ == "__main__":
    main()
