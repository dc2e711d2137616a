"""gpt-oss's tool calls: a harmony message addressed to `functions.NAME` is a call, its body the
arguments, neither reasoning nor answer. Checked on the recorded gpt-oss outputs (sources in
tests/data/reasoning/SOURCE.txt), whole, in small pieces and cut in two at every point, with and
without the closing <|call|> (an end token: the output usually stops before it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxdist.serving.harmony import HarmonySplitter, function_of

RECORDED = {
    c["case"]: c["output"]
    for c in json.loads((Path(__file__).parent / "data/reasoning/gpt_oss.json").read_text())
}
WEB = RECORDED["a tool call on commentary, the function's name with a space"]
WEATHER = RECORDED["analysis then a tool call on commentary, ends at <|call|>"]

# (output, reasoning, content, calls)
CASES = {
    "web search, cut before <|call|>": (
        WEB,
        "",
        "",
        [
            (
                "Web Search",
                {"query": '"Fractal Design North XL"', "pageSize": 10, "safeSearch": "moderate"},
            )
        ],
    ),
    "analysis then a call ending at <|call|>": (
        WEATHER,
        "Need to use function get_current_weather.",
        "",
        [("get_current_weather", {"location": "San Francisco"})],
    ),
    "the same without <|call|>": (
        WEATHER.removesuffix("<|call|>"),
        "Need to use function get_current_weather.",
        "",
        [("get_current_weather", {"location": "San Francisco"})],
    ),
    "a call whose body is no JSON object is answer text": (
        WEATHER.replace('{"location":"San Francisco"}', "San Francisco"),
        "Need to use function get_current_weather.",
        "San Francisco",
        [],
    ),
}


def _run(pieces: list[str]) -> tuple[str, str, list]:
    splitter = HarmonySplitter()
    reasoning, content, calls = [], [], []
    for piece in [*pieces, None]:
        r, c = splitter.feed(piece) if piece is not None else splitter.finish()
        reasoning.append(r)
        content.append(c)
        calls += splitter.take_calls()
    found = [(c.name, json.loads(c.arguments)) for c in calls]
    return "".join(reasoning), "".join(content), found


@pytest.mark.parametrize("output,reasoning,content,calls", CASES.values(), ids=CASES.keys())
def test_harmony_calls_whole_and_streamed(output, reasoning, content, calls):
    expected = (reasoning, content, calls)
    assert _run([output]) == expected
    for size in range(1, 8):
        assert _run([output[i : i + size] for i in range(0, len(output), size)]) == expected
    for i in range(1, len(output)):
        assert _run([output[:i], output[i:]]) == expected, i


def test_the_recipient_may_come_before_the_channel():
    # OpenAI's harmony guide: "<|start|>assistant to=functions.get_weather<|channel|>commentary
    # json<|message|>..." is the same call as the recipient after the channel.
    header = "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
    assert function_of(header) == "get_weather"
    assert function_of("<|channel|>commentary to=functions.lookup <|constrain|>json") == "lookup"
    assert function_of("<|channel|>final") is None
