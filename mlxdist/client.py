"""A small client for the coordinator's OpenAI-style API, reading server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx


class ClientError(Exception):
    """The server could not be reached or answered with an error."""


def stream_chat(
    url: str, messages: list[dict], timeout: float = 600.0, **params
) -> Iterator[tuple[str, dict]]:
    """Yields ("text", {"text"}) for each piece of the answer, then ("done", {"usage", ...})."""
    body = {"messages": messages, "stream": True, **params}
    yield from _stream(f"{url}/v1/chat/completions", body, timeout, chat=True)


def stream_completion(
    url: str, prompt: str, timeout: float = 600.0, **params
) -> Iterator[tuple[str, dict]]:
    body = {"prompt": prompt, "stream": True, **params}
    yield from _stream(f"{url}/v1/completions", body, timeout, chat=False)


def _stream(url: str, body: dict, timeout: float, chat: bool) -> Iterator[tuple[str, dict]]:
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                raise ClientError(f"{url} answered {r.status_code}: {_detail(r)}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ClientError(event["error"].get("message", "unknown error"))
                choice = event["choices"][0]
                text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                if text:
                    yield "text", {"text": text}
                if choice.get("finish_reason"):
                    yield "done", {"finish_reason": choice["finish_reason"], **event}
    except httpx.HTTPError as e:
        raise ClientError(f"lost the connection to {url}: {e}") from None


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        return r.text[:200]
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]
