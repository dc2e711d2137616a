"""The toy DeepSeek-R1 generator writes R1's exact on-disk format, and mlx-lm can use it."""

import hashlib
import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxdist.testing.tiny_r1 import (
    ASSISTANT,
    BLOCK,
    BOS,
    END_THINK,
    EOS,
    PAD,
    THINK,
    USER,
    TensorSpec,
    build_config,
    encode_e4m3,
    make_r1,
    parse_set,
    tensor_specs,
    to_bf16,
    true_values,
)

# Fields the toy keeps exactly as DeepSeek-R1's own config.json (kept in tests/data) has them.
R1_CONFIG = json.loads((Path(__file__).parent / "data" / "deepseek-r1-config.json").read_text())
R1_FIXED = {
    k: R1_CONFIG[k]
    for k in (
        "architectures",
        "model_type",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "hidden_act",
        "norm_topk_prob",
        "num_nextn_predict_layers",
        "quantization_config",
        "rope_scaling",
        "rope_theta",
        "routed_scaling_factor",
        "scoring_func",
        "seq_aux",
        "tie_word_embeddings",
        "topk_method",
        "torch_dtype",
        "use_cache",
    )
}
R1_SIZED = [
    "auto_map", "attention_dropout", "aux_loss_alpha", "ep_size", "first_k_dense_replace",
    "hidden_size", "initializer_range", "intermediate_size", "kv_lora_rank",
    "max_position_embeddings", "moe_intermediate_size", "moe_layer_freq", "n_group",
    "n_routed_experts", "n_shared_experts", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_key_value_heads", "q_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "rms_norm_eps", "topk_group", "transformers_version", "v_head_dim",
    "vocab_size",
]  # fmt: skip
ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_r1(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="module")
def tiny_no_mtp(tmp_path_factory) -> Path:
    return make_r1(
        tmp_path_factory.mktemp("tiny_no_mtp"), overrides={"num_nextn_predict_layers": 0}
    )


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def all_headers(root: Path) -> dict[str, dict]:
    """Every tensor's header entry, read from the shards the index names."""
    index = json.loads((root / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        header = read_header(root / shard)
        header.pop("__metadata__")
        out.update(header)
    return out


def config_of(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_same_seed_gives_identical_files(tiny, tmp_path):
    again = make_r1(tmp_path / "again", "tiny", seed=0)
    assert digests(again) == digests(tiny)
    other = make_r1(tmp_path / "other", "tiny", seed=1)
    shards = [n for n in digests(tiny) if n.endswith(".safetensors")]
    assert all(digests(other)[n] != digests(tiny)[n] for n in shards)


def test_config_has_r1_fields_and_values(tiny):
    config = config_of(tiny)
    for key, value in R1_FIXED.items():
        assert config[key] == value, key
    assert set(R1_SIZED) <= set(config)
    assert config["first_k_dense_replace"] == 1 and config["max_position_embeddings"] == 4096
    assert config == build_config("tiny")


def test_index_lists_every_tensor_and_sizes_match(tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards == [
        f"model-{i:05d}-of-{len(shards):06d}.safetensors" for i in range(1, 1 + len(shards))
    ]
    assert sorted(p.name for p in tiny.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        path = tiny / shard
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        assert header_len % 8 == 0
        header = read_header(path)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(header)
        spans = sorted(tuple(h["data_offsets"]) for h in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for h in header.values():
            start, end = h["data_offsets"]
            assert end - start == math.prod(h["shape"]) * ITEMSIZE[h["dtype"]]
        assert path.stat().st_size == 8 + header_len + spans[-1][1]
        total += spans[-1][1]
    assert index["metadata"]["total_size"] == total
    expected = {e.name for g in tensor_specs(config_of(tiny)) for e in g}
    assert expected <= set(index["weight_map"])


def test_dtypes_and_block_scales(tiny):
    headers = all_headers(tiny)
    fp8 = {k: v for k, v in headers.items() if v["dtype"] == "F8_E4M3"}
    assert fp8 and all(k.endswith(".weight") and ".layers." in k for k in fp8)
    for name, h in fp8.items():
        scale = headers[name + "_scale_inv"]
        assert scale["dtype"] == "F32"
        assert scale["shape"] == [-(-d // 128) for d in h["shape"]]
    assert any(d % 128 for h in fp8.values() for d in h["shape"])
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]:
        assert headers[name]["dtype"] == "BF16"
    assert headers["model.layers.1.mlp.gate.weight"]["dtype"] == "BF16"
    assert headers["model.layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    assert headers["model.layers.0.mlp.gate_proj.weight"]["dtype"] == "F8_E4M3"
    assert headers["model.layers.1.mlp.experts.7.down_proj.weight"]["dtype"] == "F8_E4M3"
    assert headers["model.layers.1.mlp.shared_experts.up_proj.weight"]["dtype"] == "F8_E4M3"
    assert headers["model.layers.2.self_attn.kv_a_layernorm.weight"]["dtype"] == "BF16"


def test_mtp_layer_follows_the_last_decoder_layer(tiny, tiny_no_mtp):
    headers, n = all_headers(tiny), config_of(tiny)["num_hidden_layers"]
    mtp = f"model.layers.{n}"
    for part in ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"]:
        assert f"{mtp}.{part}.weight" in headers
    assert f"{mtp}.self_attn.kv_b_proj.weight_scale_inv" in headers
    assert f"{mtp}.mlp.experts.0.gate_proj.weight" in headers
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in headers)
    assert not any(k.startswith(f"{mtp}.") for k in all_headers(tiny_no_mtp))


def test_mtp_copies_of_embedding_and_head_equal_the_main_ones(tiny):
    # As in R1's official checkpoint: the MTP layer's copies coincide with the main tensors.
    n = config_of(tiny)["num_hidden_layers"]
    weights = {}
    for f in tiny.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    for copy, main in [("embed_tokens", "model.embed_tokens"), ("shared_head.head", "lm_head")]:
        assert mx.array_equal(weights[f"model.layers.{n}.{copy}.weight"], weights[f"{main}.weight"])
    assert not mx.array_equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])


def test_parse_set_types():
    items = ["num_hidden_layers=5", "rope_theta=1e4", "x=true", "y=null", "z=[1, 2]", "w=hi"]
    got = parse_set(items + ["rope_scaling.factor=8"])
    assert got == {
        "num_hidden_layers": 5,
        "rope_theta": 10000.0,
        "x": True,
        "y": None,
        "z": [1, 2],
        "w": "hi",
        "rope_scaling": {"factor": 8},
    }
    assert type(got["num_hidden_layers"]) is int and type(got["rope_theta"]) is float
    with pytest.raises(ValueError):
        parse_set(["no_equals_sign"])


def test_overrides_keep_shapes_consistent(tmp_path):
    overrides = parse_set(["num_hidden_layers=3", "n_routed_experts=12", "rope_scaling.factor=8"])
    root = make_r1(tmp_path, "tiny", overrides)
    config, headers = config_of(root), all_headers(root)
    assert config["num_hidden_layers"] == 3 and config["n_routed_experts"] == 12
    assert config["rope_scaling"]["factor"] == 8 and config["rope_scaling"]["type"] == "yarn"
    h = config["hidden_size"]
    for layer in [1, 2, 3]:  # 3 is the MTP layer
        assert headers[f"model.layers.{layer}.mlp.gate.weight"]["shape"] == [12, h]
        assert f"model.layers.{layer}.mlp.experts.11.up_proj.weight" in headers
        assert f"model.layers.{layer}.mlp.experts.12.up_proj.weight" not in headers
    assert "model.layers.3.eh_proj.weight" in headers
    assert not any(k.startswith("model.layers.4.") for k in headers)


def test_tokenizer_specials_and_chat_template(tiny):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) <= config_of(tiny)["vocab_size"]
    assert raw.token_to_id(BOS) == 0 and raw.token_to_id(EOS) == 1
    for special in [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK]:
        assert len(raw.encode(special, add_special_tokens=False).ids) == 1, special
    assert raw.decode(raw.encode("Hello, world!").ids) == "Hello, world!"

    tok = AutoTokenizer.from_pretrained(str(tiny))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": f"{THINK}\nhmm\n{END_THINK}\n\nHello"},
        {"role": "user", "content": "Why?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}\n\nHello{EOS}{USER}Why?{ASSISTANT}{THINK}\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 0 and ids[1] == raw.token_to_id(USER)
    assert ids[-3:-1] == [raw.token_to_id(ASSISTANT), raw.token_to_id(THINK)]


def test_fp8_encoder_matches_mlx():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)  # no NaNs
    values = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32))
    assert np.array_equal(encode_e4m3(values), codes)
    positive = np.sort(values[values > 0])
    midpoints = (positive[:-1] + positive[1:]) / 2
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 60, 100_000).clip(-448, 448), midpoints, -midpoints])
    x = x.astype(np.float32)
    assert np.array_equal(encode_e4m3(x), np.array(mx.to_fp8(mx.array(x))))
    assert np.array_equal(to_bf16(x), np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16)))


def dequant_fp8(weight_u8: mx.array, scale_inv: mx.array) -> mx.array:
    """Dequantise an R1 FP8 weight (uint8 E4M3 bytes) with its 128x128 block scale_inv."""
    m, n = weight_u8.shape
    w = mx.from_fp8(weight_u8, dtype=mx.float32)
    scale = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), BLOCK, axis=0), BLOCK, axis=1)
    return w * scale[:m, :n]


def test_dequantised_weights_match_true_weights(tiny):
    config, headers = config_of(tiny), all_headers(tiny)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]
    specs = [s for g in tensor_specs(config) for s in g if s.dtype == "F8_E4M3"]
    checked = [s for s in specs if any(d % 128 for d in s.shape)][:3] + specs[-1:]
    for spec in checked:
        assert headers[spec.name]["shape"] == list(spec.shape)
        shard = mx.load(str(tiny / index[spec.name]))
        weight, scale = shard[spec.name], shard[spec.name + "_scale_inv"]
        assert weight.dtype == mx.uint8
        got = np.array(dequant_fp8(weight, scale))
        want = true_values(spec, seed=0)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1, spec.name
    norm = TensorSpec("model.norm.weight", (config["hidden_size"],), "BF16", mean=1.0)
    stored = mx.load(str(tiny / index[norm.name]))[norm.name].astype(mx.float32)
    assert np.allclose(np.array(stored), true_values(norm), rtol=1e-2)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(token) for token, _ in steps]


def test_mlx_lm_loads_and_generates(tiny_no_mtp):
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny_no_mtp))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm (unquantised experts) is float32 only
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True
    )
    logits = model(mx.array([prompt]))
    assert logits.shape == (1, len(prompt), config_of(tiny_no_mtp)["vocab_size"])
    assert mx.isfinite(logits).all().item()
    tokens = greedy(model, prompt, 8)
    assert len(tokens) == 8 and len(set(tokens)) > 1


def test_mlx_lm_convert_quantises_every_matrix(tiny_no_mtp, tmp_path):
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm import convert

    out = tmp_path / "q4"
    convert(hf_path=str(tiny_no_mtp), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)
    model, tok = mlx_lm.load(str(out))
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    unquantised = [
        name
        for name, m in leaves
        if "weight" in m
        and "scales" not in m
        and m.weight.ndim >= 2
        and not name.endswith("mlp.gate")
    ]
    assert unquantised == []
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True
    )
    tokens = greedy(model, prompt, 8)
    assert len(tokens) == 8
    assert isinstance(mlx_lm.generate(model, tok, prompt, max_tokens=4), str)
