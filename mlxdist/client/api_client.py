"""A small client for OpenAI-style APIs (mlxdist's own or any other), reading server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from httpx_sse import EventSource, SSEError

from quantize.errors import UserError

TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class ClientError(UserError):
    """The server could not be reached or answered with an error. lost: the server went away or
    said a node of its cluster failed (its launcher knows more); named: the message is the
    server's own word on which node failed."""

    def __init__(self, message: str, lost: bool = False, named: bool = False):
        super().__init__(message)
        self.lost = lost or named
        self.named = named


@dataclass(frozen=True)
class Reasoning:
    """A piece of the model's reasoning (DeepSeek's `reasoning_content`)."""

    text: str


@dataclass(frozen=True)
class Text:
    """A piece of the answer."""

    text: str


@dataclass(frozen=True)
class End:
    """The stream ended: why, and the server's token counts (None from one that does not count)."""

    finish_reason: str | None = None
    usage: dict | None = None


Piece = Reasoning | Text | End


def base_url(url: str) -> str:
    """The server's root: "http://h:p", "http://h:p/" and "http://h:p/v1" all mean the same."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[: -len("/v1")] if url.endswith("/v1") else url


def headers_for(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def list_models(url: str, headers: dict | None = None) -> list[str]:
    """The model ids the server offers."""
    endpoint = f"{base_url(url)}/v1/models"
    try:
        r = httpx.get(endpoint, headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as e:
        raise ClientError(f"cannot reach {base_url(url)}: {e}") from None
    if r.status_code != 200:
        raise ClientError(f"{endpoint} answered {r.status_code}: {_detail(r)}")
    try:
        return [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"{endpoint} did not answer with a list of models") from None


def stream_chat(
    url: str, messages: list[dict], headers: dict | None = None, **params
) -> Iterator[Piece]:
    """Yields Reasoning and Text pieces as the answer streams, then one End."""
    body = {"messages": messages, "stream": True, **params}
    body["stream_options"] = {"include_usage": True}
    yield from _stream(f"{base_url(url)}/v1/chat/completions", body, headers, chat=True)


def stream_completion(
    url: str, prompt: str, headers: dict | None = None, **params
) -> Iterator[Piece]:
    body = {"prompt": prompt, "stream": True, **params}
    body["stream_options"] = {"include_usage": True}
    yield from _stream(f"{base_url(url)}/v1/completions", body, headers, chat=False)


def _stream(url: str, body: dict, headers: dict | None, chat: bool) -> Iterator[Piece]:
    done: dict = {"finish_reason": None, "usage": None}
    headers = {**(headers or {}), "Accept": "text/event-stream"}
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.read()
                lost = r.status_code == 503
                raise ClientError(f"{url} answered {r.status_code}: {_detail(r)}", lost=lost)
            for data in event_data(r):
                if data.strip() == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    error = event["error"]
                    if not isinstance(error, dict):
                        raise ClientError(str(error))
                    named = error.get("code") == "node_failed"
                    raise ClientError(error.get("message", str(error)), named=named)
                if event.get("usage"):
                    done["usage"] = event["usage"]
                for choice in event.get("choices") or []:
                    yield from _pieces(choice, chat)
                    if choice.get("finish_reason"):
                        done["finish_reason"] = choice["finish_reason"]
    except SSEError as e:  # an httpx.HTTPError too, but the server is there: not lost
        raise ClientError(f"{url} did not answer with server-sent events ({e})") from None
    except httpx.HTTPError as e:
        raise ClientError(
            f"lost the connection to {url}: {e or type(e).__name__}", lost=True
        ) from None
    except json.JSONDecodeError:
        raise ClientError(f"{url} sent an event that is not JSON") from None
    yield End(**done)


def event_data(response: httpx.Response) -> Iterator[str]:
    """The data of each server-sent event in a streamed response, parsed as the SSE spec says
    (multi-line data joined by newlines, comments and other fields left out); events without
    data are skipped. Raises SSEError if the response is not an event stream."""
    for event in EventSource(response).iter_sse():
        if event.data:
            yield event.data


def _pieces(choice: dict, chat: bool) -> Iterator[Piece]:
    if not chat:
        if choice.get("text"):
            yield Text(choice["text"])
        return
    delta = choice.get("delta") or {}
    # DeepSeek's name first; some servers call it "reasoning"
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning:
        yield Reasoning(reasoning)
    if delta.get("content"):
        yield Text(delta["content"])


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]
