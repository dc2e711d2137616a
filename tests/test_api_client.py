"""The client's reading of server-sent events, against canned answers (httpx.MockTransport)."""

import io
from contextlib import contextmanager

import httpx
import pytest
from rich.console import Console

from mlxdist.client import api_client
from mlxdist.client.api_client import (
    ClientError,
    End,
    Reasoning,
    Text,
    stream_chat,
    stream_completion,
)
from mlxdist.client.chat import Answer, show_answer

URL = "http://server:8000"


@pytest.fixture
def answer(monkeypatch):
    """Makes every streamed request answer with the given body (text/event-stream by default)."""

    def serve(body: str, content_type: str = "text/event-stream; charset=utf-8") -> list:
        requests = []

        def handler(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            headers = {"content-type": content_type}
            return httpx.Response(200, headers=headers, content=body.encode())

        @contextmanager
        def stream(method, url, **kwargs):
            kwargs.pop("timeout", None)
            with httpx.Client(transport=httpx.MockTransport(handler)) as client:
                with client.stream(method, url, **kwargs) as response:
                    yield response

        monkeypatch.setattr(api_client.httpx, "stream", stream)
        return requests

    return serve


def test_multi_line_data_comments_and_fields_parse_as_the_spec_says(answer):
    requests = answer(
        ": a comment the server sends to keep the connection open\n"
        "event: message\n"
        "id: 1\n"
        'data: {"choices": [{"delta":\n'
        'data: {"content": "Hel"}}]}\n'
        "\n"
        ": another comment\r\n"
        'data: {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}\r\n'
        "\r\n"
        'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n'
        "data: [DONE]\n\n"
    )
    events = list(stream_chat(URL, [{"role": "user", "content": "hi"}]))
    assert events == [
        Text("Hel"),
        Text("lo"),
        End("stop", {"completion_tokens": 2}),
    ]
    assert requests[0].headers["accept"] == "text/event-stream"


def test_completion_text_and_reasoning_come_apart(answer):
    answer(
        'data: {"choices": [{"delta": {"reasoning_content": "think"}}]}\n\n'
        'data: {"choices": [{"delta": {"content": "say"}}]}\n\n'
        "data: [DONE]\n\n"
    )
    assert list(stream_chat(URL, []))[:2] == [
        Reasoning("think"),
        Text("say"),
    ]
    answer('data: {"choices": [{"text": "once", "finish_reason": "length"}]}\n\n')
    assert list(stream_completion(URL, "a")) == [
        Text("once"),
        End("length", None),
    ]


def test_an_error_event_naming_a_node_is_a_lost_cluster(answer):
    answer(
        'data: {"error": {"message": "node 1 (mac2) failed",\ndata:  "code": "node_failed"}}\n\n'
    )
    with pytest.raises(ClientError, match=r"^node 1 \(mac2\) failed$") as caught:
        list(stream_chat(URL, []))
    assert caught.value.lost and caught.value.named


def test_an_event_that_is_not_json_is_one_error(answer):
    answer("data: {not json\n\n")
    with pytest.raises(ClientError, match="sent an event that is not JSON") as caught:
        list(stream_chat(URL, []))
    assert not caught.value.lost


def test_an_answer_that_is_not_an_event_stream_is_an_error_not_a_lost_server(answer):
    answer('{"choices": []}', content_type="application/json")
    with pytest.raises(ClientError, match="did not answer with server-sent events") as caught:
        list(stream_chat(URL, []))
    assert not caught.value.lost


@pytest.mark.parametrize(
    ("show_think", "printed"),
    [(True, "weigh it\n\nParis\n"), (False, "(thinking...)\nParis\n")],
)
def test_the_chat_prints_the_pieces_and_keeps_the_end(show_think, printed):
    def pieces():
        yield Reasoning("weigh ")
        yield Reasoning("it")
        yield Text("Par")
        yield Text("is")
        yield End("stop", {"completion_tokens": 4, "prompt_tokens": 9})
        raise AssertionError("nothing is read after the end")

    out = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    kept = Answer()
    show_answer(out, pieces(), kept, show_think)
    assert out.file.getvalue() == printed
    assert (kept.text, "".join(kept.reasoning), kept.pieces) == ("Paris", "weigh it", 4)
    assert (kept.finish_reason, kept.completion_tokens(), kept.prompt_tokens()) == (
        "stop",
        4,
        9,
    )
