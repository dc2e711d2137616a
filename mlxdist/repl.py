"""The first chat at a terminal: streams answers as they come, keeps the conversation."""

from __future__ import annotations

import sys

from .client import ClientError, stream_chat, stream_completion

HELP = "type a message; /reset forgets the conversation, /quit leaves (Ctrl-C stops an answer)"


def _print_stream(events) -> str:
    text = []
    for kind, data in events:
        if kind == "text":
            text.append(data["text"])
            sys.stdout.write(data["text"])
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def answer(url: str, prompt: str, chat: bool, params: dict) -> str:
    """Prints the completion of one prompt as it streams."""
    if chat:
        events = stream_chat(url, [{"role": "user", "content": prompt}], **params)
    else:
        events = stream_completion(url, prompt, **params)
    return _print_stream(events)


def repl(url: str, params: dict) -> None:
    print(HELP, file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _print_stream(stream_chat(url, messages, **params))
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            messages.pop()
            continue
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
