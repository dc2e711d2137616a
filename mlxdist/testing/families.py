"""The model families `mlxdist testing make-model` writes: each one's config.json fields (as the
Hub's checkpoints spell them, only the sizes small), its special tokens and chat template, and
how mlx-lm's parameter names map back to the names its checkpoints store (the inverse of the
family's sanitize())."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlxdist.testing.tiny_r1 import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    PRESETS,
    R1_CONFIG,
    THINK,
    USER,
)

# Shared tiny sizes: every matrix dimension a multiple of 64, so group-64 quantisation covers it.
_DENSE = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class Family:
    name: str  # what a user types: make-model FAMILY
    config: dict[str, Any]  # config.json, tiny
    bos: str | None
    eos: str
    added: tuple[str, ...]  # chat markers, after the BPE vocabulary
    chat_template: str
    # End tokens besides eos that generation_config.json names (each one also in added).
    ends: tuple[str, ...] = ()
    moe: bool = False  # routed experts: stored in float32 (MLX's CPU expert matmul)
    # Tensors in mlx-lm's names -> tensors in the checkpoint's names.
    to_hub: Callable[[dict, dict], dict] = field(default=lambda w, c: w)
    # Which tensors (name, value) the checkpoint stores in FP8 with a weight_scale_inv.
    fp8: Callable[[str, np.ndarray], bool] = field(default=lambda k, v: False)


# ---------------------------------------------------------------- the inverse of sanitize()


def _unstack(
    weights: dict, marker: str, names: dict[str, str], expert_dir: str = "experts"
) -> dict:
    """Stacked `{prefix}.{marker}.{proj}.weight` (experts first) -> one tensor per expert,
    `{prefix}.{expert_dir}.{e}.{names[proj]}.weight`."""
    out = {}
    for key, value in weights.items():
        head, sep, tail = key.partition(f".{marker}.")
        proj = tail.split(".")[0]
        if not sep or proj not in names:
            out[key] = value
            continue
        rest = tail[len(proj) :]
        for e in range(value.shape[0]):
            out[f"{head}.{expert_dir}.{e}.{names[proj]}{rest}"] = value[e]
    return out


_SAME = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def _experts_split(weights: dict, config: dict) -> dict:
    return _unstack(weights, "switch_mlp", _SAME)


def _minimax(weights: dict, config: dict) -> dict:
    return _unstack(weights, "switch_mlp", {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"})


def _deepseek(weights: dict, config: dict) -> dict:
    """Experts one by one, and embed_q / unembed_out joined back into kv_b_proj."""
    out = _experts_split(weights, config)
    heads, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    for key in [k for k in out if k.endswith(".self_attn.embed_q.weight")]:
        prefix = key.removesuffix(".embed_q.weight")
        wk = out.pop(key)  # (heads, kv_lora_rank, nope)
        wv = out.pop(f"{prefix}.unembed_out.weight")  # (heads, v_head_dim, kv_lora_rank)
        kv_b = np.concatenate([np.swapaxes(wk, -1, -2), wv], axis=1)
        out[f"{prefix}.kv_b_proj.weight"] = kv_b.reshape(heads * (nope + wv.shape[1]), -1)
    return out


# The linear layers' weights that DeepSeek's and MiniMax's FP8 checkpoints store in FP8; the
# embedding, the head, norms and routers stay in bfloat16.
_FP8_LINEARS = {
    *("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa"),
    *("kv_b_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "wq_b", "wk"),
}


def _fp8_linear(key: str, value: np.ndarray) -> bool:
    parts = key.split(".")
    return value.ndim == 2 and parts[-1] == "weight" and parts[-2] in _FP8_LINEARS


def _mxfp4(w: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """w quantised to MXFP4 as OpenAI's checkpoints store it: `{name}_blocks` (16 bytes of 32
    4-bit codes per group) and `{name}_scales` (one E8M0 byte per group)."""
    import mlx.core as mx

    packed, scales = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
    blocks = np.array(packed).view(np.uint8).reshape(*w.shape[:-1], w.shape[-1] // 32, 16)
    return {f"{name}_blocks": blocks, f"{name}_scales": np.array(scales)}


def _gpt_oss(weights: dict, config: dict) -> dict:
    """Each layer's gate and up projections interleaved row by row into gate_up_proj, the
    experts in MXFP4, their biases beside them as `{name}_bias`."""
    out = {}
    for key, value in weights.items():
        head, sep, tail = key.partition(".mlp.experts.")
        if not sep:
            out[key] = value
        elif tail == "gate_proj.weight":
            up = weights[f"{head}.mlp.experts.up_proj.weight"]
            gate_up = np.stack([value, up], axis=-2).reshape(value.shape[0], -1, value.shape[-1])
            out.update(_mxfp4(gate_up, f"{head}.mlp.experts.gate_up_proj"))
        elif tail == "gate_proj.bias":
            up = weights[f"{head}.mlp.experts.up_proj.bias"]
            gate_up = np.stack([value, up], axis=-1).reshape(value.shape[0], -1)
            out[f"{head}.mlp.experts.gate_up_proj_bias"] = gate_up
        elif tail == "down_proj.weight":
            out.update(_mxfp4(value, f"{head}.mlp.experts.down_proj"))
        elif tail == "down_proj.bias":
            out[f"{head}.mlp.experts.down_proj_bias"] = value
    return out


# ---------------------------------------------------------------- chat templates

_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

# The reasoning format depends on the generation prompt, so those ends follow the real templates:
# Qwen3 and GLM-4.5 leave the model to open <think> itself and write an empty block when thinking
# is off; MiniMax-M2 and R1 open the block in the prompt; gpt-oss stops at `<|start|>assistant`,
# the head of a harmony message, after its system message naming the channels.

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)

_GLM_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '\\n<think></think>' }}{% endif %}{% endif %}"
)

_HARMONY_TEMPLATE = (
    "{{ '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Knowledge cutoff: 2024-06\\n\\nReasoning: ' + (reasoning_effort | default('medium')) + '"
    "\\n\\n# Valid channels: analysis, commentary, final. "
    "Channel must be included for every message.<|end|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}"
    "{{ '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message.get('thinking') %}"
    "{{ '<|start|>assistant<|channel|>analysis<|message|>' + message['thinking'] + '<|end|>' }}"
    "{% endif %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

_MINIMAX_TEMPLATE = (
    "{% for message in messages %}"
    "{{ ']~b]' + message['role'] + '\\n' + message['content'] + '[e~[\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ ']~b]ai\\n<think>\\n' }}{% endif %}"
)

_R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# Kimi K2's markers: a role marker, the role's name, <|im_middle|>, the content, <|im_end|>;
# a system message of its own when the chat has none. K2 Thinking writes its reasoning in
# <think>...</think> after the generation prompt; an earlier answer's reasoning is kept so.
_KIMI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
    "<|im_end|>' }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|im_user|>user<|im_middle|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|im_assistant|>assistant<|im_middle|>' }}"
    "{% if message.get('reasoning_content') %}"
    "{{ '<think>' + message['reasoning_content'] + '</think>' }}{% endif %}"
    "{% else %}{{ '<|im_system|>' + message['role'] + '<|im_middle|>' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{% endif %}"
)


# ---------------------------------------------------------------- the families

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_DENSE,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 1024,
                "rope_type": "llama3",
            },
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        added=("<|start_header_id|>", "<|end_header_id|>"),
        chat_template=_LLAMA3_TEMPLATE,
    ),
    "mistral": Family(
        "mistral",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **_DENSE,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        bos="<s>",
        eos="</s>",
        added=("[INST]", "[/INST]"),
        chat_template=_MISTRAL_TEMPLATE,
    ),
    "qwen3": Family(
        "qwen3",
        {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            **_DENSE,
            "attention_bias": False,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000,
            "rope_scaling": None,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        },
        bos=None,
        eos="<|im_end|>",
        added=("<|im_start|>", "<think>", "</think>", "<|endoftext|>"),
        chat_template=_CHATML_TEMPLATE,
        ends=("<|endoftext|>",),
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **_DENSE,
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "hidden_act": "silu",
            "mlp_only_layers": [],
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        bos=None,
        eos="<|im_end|>",
        added=("<|im_start|>", "<think>", "</think>", "<|endoftext|>"),
        chat_template=_CHATML_TEMPLATE,
        ends=("<|endoftext|>",),
        moe=True,
        to_hub=_experts_split,
    ),
    "glm4_moe": Family(
        "glm4_moe",
        {
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            **_DENSE,
            "attention_bias": True,
            "first_k_dense_replace": 1,
            "hidden_act": "silu",
            "moe_intermediate_size": 64,
            "n_group": 1,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "num_experts_per_tok": 2,
            "num_nextn_predict_layers": 1,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "routed_scaling_factor": 2.5,
            "tie_word_embeddings": False,
            "topk_group": 1,
            "torch_dtype": "bfloat16",
            "use_qk_norm": True,
        },
        bos=None,
        eos="<|endoftext|>",
        added=(
            *("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
            *("<think>", "</think>"),
        ),
        chat_template=_GLM_TEMPLATE,
        ends=("<|user|>", "<|observation|>"),
        moe=True,
        to_hub=_experts_split,
    ),
    "minimax": Family(
        "minimax",
        {
            "architectures": ["MiniMaxM2ForCausalLM"],
            "model_type": "minimax_m2",
            **_DENSE,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "qk_norm_type": "per_layer",
            "quantization_config": {
                "activation_scheme": "dynamic",
                "fmt": "float8_e4m3fn",
                "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
            },
            "rms_norm_eps": 1e-06,
            "rope_theta": 5000000,
            "rotary_dim": 32,
            "scoring_func": "sigmoid",
            "shared_intermediate_size": 0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_qk_norm": True,
            "use_routing_bias": True,
        },
        bos="]~!b[",
        eos="[e~[",
        added=("]~b]", "<think>", "</think>"),
        chat_template=_MINIMAX_TEMPLATE,
        to_hub=_minimax,
        fp8=_fp8_linear,
    ),
    "deepseek_v32": Family(
        "deepseek_v32",
        {
            **{k: v for k, v in R1_CONFIG.items() if k != "auto_map"},
            **PRESETS["tiny"],
            "architectures": ["DeepseekV32ForCausalLM"],
            "model_type": "deepseek_v32",
            "index_head_dim": 64,
            "index_n_heads": 2,
            "index_topk": 8,  # below the test prompt's length, so the sparse path runs
        },
        bos=BOS,
        eos=EOS,
        added=(USER, ASSISTANT, THINK, END_THINK),
        chat_template=_R1_TEMPLATE,
        to_hub=_deepseek,
        fp8=_fp8_linear,
    ),
    # Kimi K2 (moonshotai/Kimi-K2-Instruct, -Thinking): DeepSeek-V3's layout and FP8 blocks,
    # run by mlx-lm's deepseek_v3 code; one expert group, no multi-token-prediction layer.
    # Left out: auto_map (the repo's own configuration_deepseek.py, which we do not ship) and
    # the yarn rope_scaling, which transformers cannot read for a model type it does not know
    # without that code, so the tokenizer would not load.
    "kimi_k2": Family(
        "kimi_k2",
        {
            **{k: v for k, v in R1_CONFIG.items() if k not in ("auto_map", "rope_scaling")},
            **PRESETS["tiny"],
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "kimi_k2",
            "n_group": 1,
            "topk_group": 1,
            "num_nextn_predict_layers": 0,
            "routed_scaling_factor": 2.827,
            "rope_theta": 50000.0,
        },
        bos="[BOS]",
        eos="[EOS]",
        added=(
            *("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"),
            *("<think>", "</think>"),
        ),
        chat_template=_KIMI_TEMPLATE,
        ends=("<|im_end|>",),
        to_hub=_deepseek,
        fp8=_fp8_linear,
    ),
    "gpt_oss": Family(
        "gpt_oss",
        {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            **_DENSE,
            "intermediate_size": 128,
            "attention_bias": True,
            "experts_per_token": 2,
            "hidden_act": "silu",
            "initial_context_length": 4096,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_experts_per_tok": 2,
            "num_local_experts": 8,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": 150000,
            "sliding_window": 8,  # below the test prompt's length, so the window rotates
            "swiglu_limit": 7.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        bos="<|startoftext|>",
        eos="<|return|>",
        added=(
            *("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|constrain|>", "<|call|>"),
            "<|endoftext|>",
        ),
        chat_template=_HARMONY_TEMPLATE,
        ends=("<|call|>", "<|endoftext|>"),
        to_hub=_gpt_oss,
    ),
}


def family_names() -> list[str]:
    return sorted(FAMILIES)
