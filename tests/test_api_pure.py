"""The API's text handling and the REPL's input, as pure functions: no cluster, no network."""

from __future__ import annotations

import json

import pytest

from mlxdist.client.api_client import base_url
from mlxdist.client.chat import load_conversation, read_message
from mlxdist.serving.api.errors import validation_error
from mlxdist.serving.api.openai_schema import ChatRequest
from mlxdist.serving.reasoning import ReasoningSplitter, prompt_opens_think
from mlxdist.serving.stops import StopMatcher

# (output, prompt ended with <think>, reasoning, content)
SPLITS = [
    ("plain answer", False, "", "plain answer"),
    ("  leading space kept", False, "", "  leading space kept"),
    ("<think>mull it over</think>\n\nThe answer.", False, "mull it over", "The answer."),
    ("\n<think>\nsteps\n</think>The answer.", False, "\nsteps\n", "The answer."),
    ("steps, then</think>\n\nParis.", True, "steps, then", "Paris."),
    ("still thinking when the tokens ran out", True, "still thinking when the tokens ran out", ""),
    ("</think>straight to it", True, "", "straight to it"),
    ("a <think> later is content", False, "", "a <think> later is content"),
    ("r</think>c</think>d", True, "r", "c</think>d"),
    ("<thinker> is no tag", False, "", "<thinker> is no tag"),
    ("a < b, </th isn't closed", True, "a < b, </th isn't closed", ""),
    ("", True, "", ""),
    ("   ", False, "", "   "),
    ("<thi", False, "", "<thi"),
]


def split_whole(text: str, in_think: bool) -> tuple[str, str]:
    """The whole output fed at once, then finished: as the server splits a one-piece answer."""
    splitter = ReasoningSplitter(in_think)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2


@pytest.mark.parametrize("text,in_think,reasoning,content", SPLITS)
def test_reasoning_split_whole(text, in_think, reasoning, content):
    assert split_whole(text, in_think) == (reasoning, content)


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text,in_think,reasoning,content", SPLITS)
def test_reasoning_split_streamed_at_every_boundary(text, in_think, reasoning, content):
    # Every place a stream could cut the text in two, and one character at a time.
    cuttings = [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]
    for cuts in cuttings:
        splitter = ReasoningSplitter(in_think)
        got_r, got_c = [], []
        for piece in _pieces(text, cuts):
            r, c = splitter.feed(piece)
            got_r.append(r)
            got_c.append(c)
        r, c = splitter.finish()
        assert ("".join(got_r) + r, "".join(got_c) + c) == (reasoning, content), cuts


def test_reasoning_tag_cut_across_tokens_is_held_back():
    splitter = ReasoningSplitter(in_think=True)
    assert splitter.feed("so Paris</thi") == ("so Paris", "")
    assert splitter.thinking
    assert splitter.feed("nk>\n\nPar") == ("", "Par")
    assert not splitter.thinking
    assert splitter.feed("is.") == ("", "is.")
    assert splitter.finish() == ("", "")


def test_prompt_opens_think():
    assert prompt_opens_think("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "pieces,stops,out,stopped",
    [
        (["Hello", " world"], [], "Hello world", False),
        (["Hello", " world"], ["xyz"], "Hello world", False),
        (["one two", " three"], ["two"], "one ", True),
        (["one tw", "o three"], ["two"], "one ", True),
        (["a", "b", "c", "d"], ["bc", "cd"], "a", True),
        (["ab", "X"], ["abc"], "abX", False),
        (["User:", " hi"], ["\nUser:", "User:"], "", True),
        (["x\n\n", "y"], ["\n\n"], "x", True),
    ],
)
def test_stop_matcher(pieces, stops, out, stopped):
    m = StopMatcher(stops)
    text = "".join(m.feed(p) for p in pieces if not m.stopped) + m.finish()
    assert (text, m.stopped) == (out, stopped)


@pytest.mark.parametrize(
    "body,fragment,param",
    [
        ({"messages": "hi"}, "messages: Input should be a valid list", "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "greater",
            "max_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            "integer",
            "max_tokens",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "messages[0].role"),
        ({"messages": []}, "at least 1", "messages"),
    ],
)
def test_validation_messages(body, fragment, param):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body)
    errors = [e | {"loc": ("body", *e["loc"])} for e in info.value.errors()]
    e = validation_error(errors)
    assert e.status == 400 and fragment in e.message and e.param == param


def test_request_accepts_openai_shapes():
    req = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "hi"},
            ],
            "stop": "\n",
            "max_completion_tokens": 5,
            "stream_options": {"include_usage": True},
            "frequency_penalty": 0.0,  # accepted and ignored
        }
    )
    assert req.messages[0].text() == "be brief"
    assert req.stops() == ["\n"] and req.limit() == 5 and req.include_usage()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8080/",
        "http://127.0.0.1:8080/v1",
        "127.0.0.1:8080",
    ],
)
def test_base_url(url):
    assert base_url(url) == "http://127.0.0.1:8080"


def _reader(lines: list[str]):
    it = iter(lines)
    return lambda prompt: next(it)


@pytest.mark.parametrize(
    "lines,message",
    [
        (["one line"], "one line"),
        (["first \\", "second \\", "third"], "first \nsecond \nthird"),
        (['"""', "a", "", "b", '"""'], "a\n\nb"),
        (['"""start', 'end"""'], "start\nend"),
        (['"""all on one line"""'], "all on one line"),
    ],
)
def test_multi_line_input(lines, message):
    assert read_message(_reader(lines)) == message


def test_load_conversation(tmp_path):
    saved = tmp_path / "c.json"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    saved.write_text(json.dumps({"messages": messages}))
    assert load_conversation(saved) == ("be brief", messages[1:])
    saved.write_text(json.dumps([{"role": "user"}]))
    with pytest.raises(ValueError, match="message 0"):
        load_conversation(saved)
