"""--kv-bits: every rank's KV cache quantised as mlx-lm's (QuantizedKVCache, groups of 64,
from the first step on), so a cluster's greedy answers equal one mlx-lm process run with
generate_step(kv_bits=..., kv_group_size=64, quantized_kv_start=0); the planner's KV bytes at
4 and 8 bits are what mlx's quantised caches hold; models whose caches mlx-lm cannot quantise
are refused in one line before any rank starts."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import complete_ids, family_model, local_cluster, run_cli
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache
from typer.testing import CliRunner

from launcher.kvbits import kv_bits_refusal
from launcher.planner import activation_bytes, kv_bytes_per_token_per_layer
from mlxdist.cli.app import app

MAX_TOKENS = 8  # the second question's 4-bit answer leaves the 8-bit one at its 5th token
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]


def _prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def quantised_reference(model, tokenizer, question: str, kv_bits: int | None):
    """mlx-lm's chat prompt for question and its greedy tokens with the KV cache quantised from
    the first step (kv_bits None: not quantised)."""
    prompt = _prompt(tokenizer, question)
    quant = {"kv_bits": kv_bits, "kv_group_size": 64, "quantized_kv_start": 0}
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS, **quant):
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return prompt, tokens


# --- real ranks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(smollm2):
    """mlx-lm's tokenizer on SmolLM2, and its answers with 8-bit caches to both questions and
    with 4-bit caches to the second: {(question, bits): (prompt, tokens)}."""
    model, tokenizer = load(str(smollm2))
    answers = {(q, 8): quantised_reference(model, tokenizer, q, 8) for q in QUESTIONS}
    answers[(QUESTIONS[1], 4)] = quantised_reference(model, tokenizer, QUESTIONS[1], 4)
    return tokenizer, answers


@pytest.fixture(scope="module")
def smollm2_8bit(smollm2, references):
    """SmolLM2 on 2 pipeline ranks with 8-bit KV caches. The prefix cache is off: a prompt
    started from a kept (quantised) prefix attends to it quantised, where one mlx-lm call
    attends to its own chunk before quantising it, so only cold prompts equal mlx-lm's."""
    with local_cluster(smollm2, [15, 15], kv_bits=8, prompt_cache_bytes=0) as (url, _):
        yield url


@pytest.mark.cluster
@pytest.mark.parametrize("question", QUESTIONS)
def test_8bit_pipeline_answers_equal_mlx_lm_quantised(smollm2_8bit, references, question):
    prompt, expected = references[1][(question, 8)]
    got = complete_ids(smollm2_8bit, prompt, MAX_TOKENS)
    print(f"kv 8-bit, 2 ranks: {got}")
    assert len(expected) >= 4
    assert got == expected


@pytest.mark.cluster
def test_launch_kv_bits_4_answers_as_mlx_lm_quantised(smollm2, references):
    """`mlxdist launch --kv-bits 4` end to end: its loading line names the KV cache and the
    prompt cache's budget from the plan, and its answer is mlx-lm's with a 4-bit cache, which
    for this question is not the 8-bit one (the bits reach the ranks)."""
    tokenizer, answers = references
    question = QUESTIONS[1]
    expected = answers[(question, 4)][1]
    assert expected != answers[(question, 8)][1]
    flags = ["--local", "2", "--split", "15,15", "--kv-bits", "4", "--temp", "0"]
    flags += ["--max-tokens", str(MAX_TOKENS), "--prompt", question]
    result = run_cli("launch", str(smollm2), *flags)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0
    assert tokenizer.decode(expected).strip() in result.stdout
    loading = next(x for x in result.stderr.splitlines() if x.startswith("loading "))
    assert "KV cache 4-bit, prompt cache " in loading and " GB" in loading


@pytest.mark.cluster
def test_4bit_expert_mode_equals_mlx_lm_quantised(tmp_path):
    """A tiny MoE (qwen3_moe) in expert mode over 2 ranks, 4-bit KV caches."""
    path, model, tokenizer = family_model("qwen3_moe", tmp_path / "qwen3_moe")
    prompt, expected = quantised_reference(model, tokenizer, QUESTIONS[1], 4)
    quant = {"kv_bits": 4, "prompt_cache_bytes": 0}
    with local_cluster(path, [1, 1], parallel="expert", experts=[3, 5], **quant) as (url, _):
        got = complete_ids(url, prompt, MAX_TOKENS)
    print(f"qwen3_moe kv 4-bit, experts 3+5: {got}")
    assert len(expected) >= 4
    assert got == expected


# --- before any rank starts ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", [4, 8])
def test_planner_kv_bytes_equal_mlx_quantised_cache(bits, dtype):
    """The planner's bytes per token and layer at 4 and 8 bits are what mlx-lm's quantised
    cache holds for a llama-family layer's K and V: packed values, a scale and a bias per 64."""
    from mlxdist.testing.make_model import family_config

    config = family_config("llama") | {"torch_dtype": dtype}
    kv_heads, head_dim, tokens = config["num_key_value_heads"], config["head_dim"], 10
    k = mx.zeros((1, kv_heads, tokens, head_dim), getattr(mx, dtype))
    cache = KVCache()
    cache.update_and_fetch(k, k)
    quantised = cache.to_quantized(group_size=64, bits=bits)
    held = sum(x.nbytes for part in (quantised.keys, quantised.values) for x in part)
    positions = quantised.keys[0].shape[-2]  # the cache's room, in steps of 256
    assert kv_bytes_per_token_per_layer(config, bits) * positions == held
    plain = kv_bytes_per_token_per_layer(config)
    print(f"{dtype}: {plain} bytes per token and layer, {held // positions} at {bits} bits")
    assert plain == 2 * kv_heads * head_dim * activation_bytes(config)


@pytest.mark.parametrize(
    "family,why",
    [
        ("gpt_oss", "sliding-window layers"),
        ("kimi_k2", "MLA"),
        ("qwen3_moe", None),
        ("llama", None),
    ],
)
def test_which_families_take_a_quantised_cache(tmp_path, family, why):
    """Refused where mlx-lm's own generate_step fails with kv_bits (gpt-oss: RotatingKVCache
    cannot be quantised; DeepSeek's MLA multiplies by its cached keys directly)."""
    from mlxdist.testing.make_model import family_config

    said = kv_bits_refusal(family_config(family))
    assert (said is None) if why is None else (why in said), said


def test_launch_refuses_kv_bits_for_a_sliding_window_model(tmp_path):
    from mlxdist.testing.make_model import make_model

    path = make_model("gpt_oss", tmp_path / "gpt_oss")
    result = CliRunner().invoke(app, ["launch", str(path), "--local", "2", "--kv-bits", "8"])
    print(result.output)
    assert result.exit_code != 0
    assert "--kv-bits 8: gpt_oss has sliding-window layers" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--kv-bits", "6"], "--kv-bits takes 4 or 8, not 6"),
        (["--prompt-cache-bytes", "lots"], "--prompt-cache-bytes: 'lots' is not a size"),
    ],
)
def test_launch_refuses_bad_kv_options(flags, said):
    result = CliRunner().invoke(app, ["launch", "--local", "2", *flags])
    assert result.exit_code != 0
    assert said in result.output


def test_plan_refuses_kv_bits_for_r1():
    from conftest import ROOT

    from mlxdist.cli.plan import plan_command

    r1 = str(ROOT / "tests" / "data" / "deepseek-r1-config.json")
    with pytest.raises(
        ValueError, match=r"--kv-bits 8: deepseek_v3's attention \(DeepSeek's MLA\)"
    ):
        plan_command(r1, None, "6x192GB", 4096, 1, 4, True, kv_bits=8)
