"""Each family's reasoning format and end tokens, as pure functions: real outputs split into
reasoning_content and content (whole, streamed in small pieces, and cut off anywhere as max_tokens
cuts them), the format chosen from the chat prompt the family's template writes, and the end tokens
read from config.json and generation_config.json.

The outputs in tests/data/reasoning/ are real ones, each with its public source; the split they
must give is read off the text by the formats' rules (expected_split), not copied from ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxdist.serving.harmony import HarmonySplitter, channel_of
from mlxdist.serving.reasoning import make_splitter, reasoning_start
from mlxdist.serving.stops import end_token_ids, read_end_token_ids

DATA = Path(__file__).parent / "data" / "reasoning"
RECORDED = [
    pytest.param(case, id=f"{path.stem}: {case['case']}")
    for path in sorted(DATA.glob("*.json"))
    for case in json.loads(path.read_text())
]
_HARMONY_MESSAGE = re.compile(
    r"<\|channel\|>(\w+)(.*?)<\|message\|>(.*?)(?:<\|end\|>|<\|return\|>|<\|call\|>|\Z)", re.S
)


def _harmony_call(header: str, body: str) -> bool:
    """A body addressed to a function that holds a JSON object is a tool call, not text."""
    try:
        return "to=functions." in header and isinstance(json.loads(body), dict)
    except ValueError:
        return False


def expected_split(start: str, output: str) -> tuple[str, str]:
    """(reasoning, content) by the formats' rules, read with plain string and regex operations.

    <think>: the reasoning is the text between the tags (the opening one in the prompt or at the
    head of the output), the content what follows </think> without its leading whitespace; an
    output that neither starts inside a block nor opens one is all content. Harmony: analysis
    bodies are the reasoning, every other channel's the content; a header without its body yet
    gives nothing; an output not starting with a marker is all content."""
    if start == "harmony":
        if not output.lstrip().startswith("<|"):
            return "", output
        messages = [
            (c, b) for c, h, b in _HARMONY_MESSAGE.findall(output) if not _harmony_call(h, b)
        ]
        reasoning = "".join(body for channel, body in messages if channel == "analysis")
        return reasoning, "".join(body for channel, body in messages if channel != "analysis")
    if start == "answer":
        if not output.lstrip().startswith("<think>"):
            return "", output
        output = output.lstrip().removeprefix("<think>")
    reasoning, _, after = output.partition("</think>")
    return reasoning, after.lstrip()


def _split(start: str, pieces: list[str]) -> tuple[str, str]:
    splitter = make_splitter(start)
    out = [splitter.feed(p) for p in pieces] + [splitter.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("case", RECORDED)
def test_recorded_output_splits_whole_and_streamed(case):
    start = reasoning_start(case["generation_prompt"])
    output = case["output"]
    expected = expected_split(start, output)
    assert expected != ("", "") or "to=functions." in output
    assert _split(start, [output]) == expected
    for size in range(1, 8):  # small pieces: every tag is cut somewhere
        assert _split(start, _chunks(output, size)) == expected, size
    for i in range(1, len(output)):
        assert _split(start, [output[:i], output[i:]]) == expected, i


@pytest.mark.parametrize("case", RECORDED)
def test_recorded_output_cut_off_anywhere_splits_by_the_same_rules(case):
    """max_tokens may end the output anywhere, inside the reasoning (no </think>, no <|end|>) or a
    tag; what was generated still goes where the rules say, streamed or whole."""
    start = reasoning_start(case["generation_prompt"])
    output = case["output"]
    for i in range(1, len(output)):
        cut = output[:i]
        assert _split(start, _chunks(cut, 3)) == expected_split(start, cut), i


def _reasons(case) -> bool:
    start = reasoning_start(case.values[0]["generation_prompt"])
    return bool(expected_split(start, case.values[0]["output"])[0].strip())


@pytest.mark.parametrize("case", [c for c in RECORDED if _reasons(c)])
def test_recorded_output_cut_before_the_reasoning_ends_is_all_reasoning(case):
    """The model never closed its reasoning within max_tokens: all of it is reasoning_content."""
    start = reasoning_start(case["generation_prompt"])
    output = case["output"]
    reasoning, _ = expected_split(start, output)
    cut = output[: output.index(reasoning) + len(reasoning) // 2]
    assert _split(start, _chunks(cut, 5)) == (reasoning[: len(reasoning) // 2], "")


# (recorded file, case, make-model family, template variables): the template make-model writes
# leaves the prompt where the real one left the recorded output.
TEMPLATES = [
    ("deepseek_r1", 0, "deepseek_v32", {}),
    ("qwen3", 0, "qwen3", {}),
    ("qwen3", 1, "qwen3", {"enable_thinking": False}),
    ("glm", 0, "glm4_moe", {}),
    ("kimi_k2", 0, "kimi_k2", {}),
    ("minimax", 0, "minimax", {}),
    ("gpt_oss", 0, "gpt_oss", {}),
]


@pytest.mark.parametrize("recorded,index,family,variables", TEMPLATES)
def test_make_model_templates_end_as_the_recorded_outputs_prompts(
    recorded, index, family, variables
):
    from mlxdist.testing.families import FAMILIES

    spec = FAMILIES[family]
    case = json.loads((DATA / f"{recorded}.json").read_text())[index]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    prompt = env.from_string(spec.chat_template).render(
        messages=[{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        bos_token=spec.bos or "",
        eos_token=spec.eos,
        **variables,
    )
    assert prompt.endswith(case["generation_prompt"])
    assert reasoning_start(prompt) == reasoning_start(case["generation_prompt"])


# Edge cases no recorded output shows: (name, the prompt's end, output, reasoning, content)
EDGES = [
    ("harmony without channels", "<|start|>assistant", "Paris.", "", "Paris."),
    ("harmony plain, leading space", "<|start|>assistant", " light3", "", " light3"),
    ("harmony whitespace only", "<|start|>assistant", "  ", "", "  "),
    ("harmony header cut off", "<|start|>assistant", "<|channel|>analy", "", ""),
    ("harmony a lone <", "<|start|>assistant", "<", "", "<"),
    ("harmony html", "<|start|>assistant", "<b>Paris</b>", "", "<b>Paris</b>"),
    # cut by max_tokens at the first "<" of the next message's marker: no answer text
    (
        "harmony cut at a marker's <",
        "<|start|>assistant",
        "<|channel|>final<|message|>Hi<|end|><",
        "",
        "Hi",
    ),
    ("think opened, nothing else", "<|im_start|>assistant\n", "<think>", "", ""),
    (
        "a later <think> is answer",
        "<|im_start|>assistant\n",
        "Hi <think>x</think>",
        "",
        "Hi <think>x</think>",
    ),
]


@pytest.mark.parametrize("name,prompt,output,reasoning,content", EDGES, ids=[e[0] for e in EDGES])
def test_edge_outputs_split_the_same_at_every_cut(name, prompt, output, reasoning, content):
    start = reasoning_start(prompt)
    assert _split(start, [output]) == (reasoning, content)
    for i in range(1, len(output)):
        assert _split(start, [output[:i], output[i:]]) == (reasoning, content), i


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
