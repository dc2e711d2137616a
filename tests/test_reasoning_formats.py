"""Each family's reasoning format and end tokens, as pure functions: the output split into
reasoning_content and content (whole and streamed at every cut), the format chosen from the
chat prompt the family's template writes, and the end tokens read from config.json and
generation_config.json. The outputs follow the publishers' formats: tests/data/reasoning/SOURCE.txt.
"""

from __future__ import annotations

import json

import pytest

from mlxdist.serving.harmony import HarmonySplitter, channel_of
from mlxdist.serving.reasoning import make_splitter, reasoning_start
from mlxdist.serving.stops import end_token_ids, read_end_token_ids

# (family, the prompt's end as the family's template writes it, output, reasoning, content)
OUTPUTS = [
    (
        "gpt-oss",
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant",
        '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide '
        "answer.<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>",
        'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
        "2 + 2 = 4.",
    ),
    (
        "gpt-oss tool call",
        "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant",
        "<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_current_weather "
        '<|constrain|>json<|message|>{"location":"San Francisco"}<|call|>',
        "Need to use function get_current_weather.",
        '{"location":"San Francisco"}',
    ),
    (
        "gpt-oss cut off while reasoning",
        "<|start|>assistant",
        "<|channel|>analysis<|message|>Let me count the letters: s, t, r",
        "Let me count the letters: s, t, r",
        "",
    ),
    (
        "gpt-oss without channels",
        "<|start|>assistant",
        "Paris.",
        "",
        "Paris.",
    ),
    ("gpt-oss plain, leading space", "<|start|>assistant", " light3", "", " light3"),
    ("gpt-oss whitespace only", "<|start|>assistant", "  ", "", "  "),
    ("gpt-oss header cut off", "<|start|>assistant", "<|channel|>analy", "", ""),
    ("gpt-oss a lone <", "<|start|>assistant", "<", "", "<"),
    ("gpt-oss html", "<|start|>assistant", "<b>Paris</b>", "", "<b>Paris</b>"),
    # cut by max_tokens at the first "<" of the next message's marker: no answer text
    (
        "gpt-oss cut at a marker's <",
        "<|start|>assistant",
        "<|channel|>final<|message|>Hi<|end|><",
        "",
        "Hi",
    ),
    (
        "DeepSeek-R1",
        "<｜User｜>Capital of France?<｜Assistant｜><think>\n",
        "Okay, the user asks for the capital of France. That is Paris.\n</think>\n\nParis.",
        "Okay, the user asks for the capital of France. That is Paris.\n",
        "Paris.",
    ),
    (
        "Qwen3 thinking",
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<think>\nThe capital of France is Paris.\n</think>\n\nThe capital of France is Paris.",
        "\nThe capital of France is Paris.\n",
        "The capital of France is Paris.",
    ),
    (
        "Qwen3 thinking off",
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "The capital of France is Paris.",
        "",
        "The capital of France is Paris.",
    ),
    (
        "GLM-4.5",
        "[gMASK]<sop><|user|>\nCapital of France?<|assistant|>",
        "\n<think>The user wants a capital city.</think>\nParis is the capital of France.",
        "The user wants a capital city.",
        "Paris is the capital of France.",
    ),
    (
        "GLM-4.5 thinking off",
        "[gMASK]<sop><|user|>\nCapital of France?<|assistant|>\n<think></think>",
        "\nParis is the capital of France.",
        "",
        "\nParis is the capital of France.",
    ),
    (
        "Kimi K2 Thinking",
        "<|im_user|>user<|im_middle|>Capital of France?<|im_end|><|im_assistant|>assistant"
        "<|im_middle|>",
        "<think>Simple geography question.</think>The capital of France is Paris.",
        "Simple geography question.",
        "The capital of France is Paris.",
    ),
    (
        "MiniMax-M2",
        "]~b]user\nCapital of France?[e~[\n]~b]ai\n<think>\n",
        "The user asks a simple question.\n</think>\n\nParis.",
        "The user asks a simple question.\n",
        "Paris.",
    ),
]
IDS = [o[0] for o in OUTPUTS]


def _split(prompt: str, pieces: list[str]) -> tuple[str, str]:
    splitter = make_splitter(reasoning_start(prompt))
    out = [splitter.feed(p) for p in pieces] + [splitter.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


@pytest.mark.parametrize("family,prompt,output,reasoning,content", OUTPUTS, ids=IDS)
def test_whole_output_splits(family, prompt, output, reasoning, content):
    assert _split(prompt, [output]) == (reasoning, content)


@pytest.mark.parametrize("family,prompt,output,reasoning,content", OUTPUTS, ids=IDS)
def test_streamed_output_splits_the_same_at_every_cut(family, prompt, output, reasoning, content):
    for i in range(1, len(output)):
        assert _split(prompt, [output[:i], output[i:]]) == (reasoning, content), i
    assert _split(prompt, list(output)) == (reasoning, content)


START_OF = [
    ("<|start|>user<|message|>hi<|end|><|start|>assistant", "harmony"),
    ("<｜Assistant｜><think>\n", "think"),
    ("]~b]ai\n<think>\n", "think"),
    ("<|im_start|>assistant\n", "answer"),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "answer"),
    ("<|assistant|>", "answer"),
    ("<|assistant|>\n<think></think>", "answer"),
    ("<|start|>assistant<|channel|>final<|message|>ok<|end|>", "answer"),
]


@pytest.mark.parametrize("prompt,start", START_OF)
def test_reasoning_start_reads_the_generation_prompt(prompt, start):
    assert reasoning_start(prompt) == start


@pytest.mark.parametrize(
    "header,channel",
    [
        ("<|channel|>analysis", "analysis"),
        ("<|start|>assistant<|channel|>final", "final"),
        ("<|channel|>commentary to=functions.get_weather <|constrain|>json", "commentary"),
        ("<|start|>assistant", ""),
    ],
)
def test_harmony_channel_of_header(header, channel):
    assert channel_of(header) == channel


def test_harmony_thinking_only_inside_an_analysis_body():
    splitter = HarmonySplitter()
    assert splitter.feed("<|channel|>analysis<|mess") == ("", "")
    assert not splitter.thinking
    assert splitter.feed("age|>hmm<|e") == ("hmm", "")
    assert splitter.thinking
    assert splitter.feed("nd|><|start|>assistant<|channel|>final<|message|>ok") == ("", "ok")
    assert not splitter.thinking
    assert splitter.feed("<|return|>ignored") == ("", "")
    assert splitter.finish() == ("", "")


# (config.json's eos_token_id, generation_config.json's, the end tokens)
ENDS = [
    (200002, {"eos_token_id": [200002, 199999, 200012]}, [200002, 199999, 200012]),  # gpt-oss
    (151329, {"eos_token_id": [151329, 151336, 151338]}, [151329, 151336, 151338]),  # GLM-4.5
    (151645, {"eos_token_id": [151645, 151643]}, [151645, 151643]),  # Qwen3
    (1, {"eos_token_id": 1}, [1]),  # DeepSeek-R1
    (1, None, [1]),
    (None, {"eos_token_id": 7}, [7]),
    ([2, 3], {}, [2, 3]),
]


@pytest.mark.parametrize("config_eos,generation,ends", ENDS)
def test_end_tokens_join_config_and_generation_config(config_eos, generation, ends):
    assert end_token_ids({"eos_token_id": config_eos}, generation) == ends


def test_end_tokens_read_from_the_folder(tmp_path):
    assert read_end_token_ids(tmp_path, {"eos_token_id": 5}) == [5]  # no generation_config
    (tmp_path / "generation_config.json").write_text("{not json")
    assert read_end_token_ids(tmp_path, {"eos_token_id": 5}) == [5]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert read_end_token_ids(tmp_path, {"eos_token_id": 5}) == [5, 9]


@pytest.mark.parametrize(
    "family,start,ends",
    [
        ("gpt_oss", "harmony", ["<|return|>", "<|call|>", "<|endoftext|>"]),
        ("glm4_moe", "answer", ["<|endoftext|>", "<|user|>", "<|observation|>"]),
        ("qwen3", "answer", ["<|im_end|>", "<|endoftext|>"]),
        ("deepseek_v32", "think", ["<｜end▁of▁sentence｜>"]),
    ],
)
def test_make_model_writes_each_familys_format_and_end_tokens(tmp_path, family, start, ends):
    from mlx_lm.utils import load_tokenizer

    from mlxdist.testing.make_model import make_model

    path = make_model(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    ids = read_end_token_ids(path, config)
    tokenizer = load_tokenizer(path, eos_token_ids=ids)
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ends
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert reasoning_start(text) == start
