"""The chat at a terminal: streams answers as they come, keeps the conversation, says how fast.

Works against mlxdist's own API or any OpenAI-compatible server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from mlxdist.client.api_client import (
    ClientError,
    End,
    Reasoning,
    Text,
    stream_chat,
    stream_completion,
)

HELP = '''commands:
  /help             this list
  /reset            forget the conversation (the system prompt stays)
  /system TEXT      set the system prompt; /system alone removes it
  /think on|off     show or hide the model's reasoning
  /set NAME VALUE   max_tokens, temperature, top_p or seed, for the answers to come
  /save FILE        write the conversation as JSON
  /load FILE        read a conversation written by /save
  /stats            this session's totals
  /quit             leave (or Ctrl-D)
A line ending with \\ goes on on the next line; """ starts a block that """ ends.
Ctrl-C stops an answer and keeps the conversation; at the prompt it leaves.'''

GREETING = "type a message; /help lists the commands (Ctrl-C stops an answer, Ctrl-D leaves)"
SETTINGS = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int}


@dataclass
class Answer:
    """One answer as it streamed, with what the user is told about its speed."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    pieces: int = 0
    usage: dict | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)

    def completion_tokens(self) -> int:
        return (self.usage or {}).get("completion_tokens", self.pieces)

    def prompt_tokens(self) -> int | None:
        return (self.usage or {}).get("prompt_tokens")

    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.started

    def decode_time(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first

    def rate(self) -> float | None:
        """Tokens per second after the first, measured here as they arrived."""
        n, t = self.completion_tokens(), self.decode_time()
        return (n - 1) / t if n > 1 and t > 0 else None

    def summary(self) -> str:
        ttft, rate, prompt = self.ttft(), self.rate(), self.prompt_tokens()
        parts = [
            "no tokens" if ttft is None else f"{ttft:.2f} s to first token",
            "- tok/s" if rate is None else f"{rate:.1f} tok/s",
        ]
        tokens = f"{self.completion_tokens()} completion tokens"
        reasoning = ((self.usage or {}).get("completion_tokens_details") or {}).get(
            "reasoning_tokens"
        )
        if reasoning:
            tokens += f" ({reasoning} reasoning)"
        if prompt is not None:
            cached = ((self.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            prompt = f"{prompt} prompt ({cached} cached)" if cached else f"{prompt} prompt"
        parts.append(tokens if prompt is None else f"{prompt} + {tokens}")
        spec = (self.usage or {}).get("speculative")
        if spec and spec.get("passes"):
            rate = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
            per_pass = (spec["accepted"] + spec["passes"]) / spec["passes"]
            parts.append(f"{per_pass:.1f} tokens a pass ({rate:.0%} of drafts accepted)")
        return ", ".join(parts)


@dataclass
class Session:
    url: str
    params: dict
    headers: dict = field(default_factory=dict)
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    show_think: bool = True
    answers: list[Answer] = field(default_factory=list)
    # Given by `mlxdist launch`: what failed in its cluster (None while it runs), and a new
    # cluster's URL after a failure (None: no --replan; raises ClientError when it cannot).
    watch: Callable[[], str | None] | None = None
    relaunch: Callable[[str], str] | None = None
    lost: str | None = None  # what the watcher found while an answer streamed

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def stats(self) -> str:
        if not self.answers:
            return "no answers yet"
        done = [a for a in self.answers if a.first is not None]
        prompt = sum(a.prompt_tokens() or 0 for a in self.answers)
        completion = sum(a.completion_tokens() for a in self.answers)
        decode = sum(a.decode_time() for a in done)
        steps = sum(max(a.completion_tokens() - 1, 0) for a in done)
        line = f"{len(self.answers)} answers: {prompt} prompt + {completion} completion tokens"
        if done:
            ttft = sum(a.ttft() or 0.0 for a in done) / len(done)
            line += f"; mean {ttft:.2f} s to first token"
        if decode > 0:
            line += f", {steps / decode:.1f} tok/s"
        return line + f"; {len(self.messages)} messages in the conversation"


def show_answer(out: Console, events, answer: Answer, show_think: bool) -> None:
    """Prints the answer as it streams: reasoning dimmed (or one marker when hidden)."""
    shown = None  # the kind of piece printed last: Reasoning or Text
    try:
        for piece in events:
            if isinstance(piece, End):
                answer.usage, answer.finish_reason = piece.usage, piece.finish_reason
                break
            answer.last = time.perf_counter()
            answer.first = answer.first or answer.last
            answer.pieces += 1
            if isinstance(piece, Reasoning):
                answer.reasoning.append(piece.text)
                if show_think:
                    out.out(piece.text, style="dim", end="")
                elif shown is None:
                    out.out("(thinking...)", style="dim", end="")
            else:
                if shown is Reasoning:
                    out.out("\n\n" if show_think else "\n", end="")
                answer.content.append(piece.text)
                out.out(piece.text, end="")
            shown = type(piece)
    finally:
        events.close()  # Ctrl-C: closing the connection cancels the generation on every rank
        if shown is not None:
            out.out("")


def answer(url: str, prompt: str, chat: bool, params: dict, headers: dict | None = None) -> str:
    """Prints the completion of one prompt as it streams: the answer on stdout, the reasoning
    (dimmed) on stderr."""
    if chat:
        events = stream_chat(url, [{"role": "user", "content": prompt}], headers, **params)
    else:
        events = stream_completion(url, prompt, headers, **params)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    text = []
    try:
        for piece in events:
            if isinstance(piece, Reasoning):
                err.out(piece.text, style="dim", end="")
            elif isinstance(piece, Text):
                text.append(piece.text)
                sys.stdout.write(piece.text)
                sys.stdout.flush()
    finally:
        events.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def read_message(read=input) -> str:
    """One message: a line, lines joined by a trailing backslash, or a \"\"\" block."""
    line = read(">>> ")
    if line.lstrip().startswith('"""'):
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        lines = [first] if first else []
        while not (line := read("... ")).rstrip().endswith('"""'):
            lines.append(line)
        lines.append(line.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def _history() -> Path | None:
    """Line editing and a history kept across sessions, where readline exists."""
    try:
        import readline
    except ImportError:
        return None
    from launcher.secret import config_dir

    path = config_dir() / "history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


def load_conversation(path: Path) -> tuple[str | None, list[dict]]:
    """The system prompt and messages of a file written by /save (or a bare list of messages)."""
    data = json.loads(path.read_text())
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise ValueError("it holds no list of messages")
    system, kept = None, []
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        if not ok or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is not a {{role, content}} pair")
        if m["role"] == "system":
            system = m["content"]
        else:
            kept.append({"role": m["role"], "content": m["content"]})
    return system, kept


def command(s: Session, line: str, out: Console, err: Console) -> bool:
    """Runs one /command; False when the user leaves."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/bye"):
        return False
    if name == "/help":
        out.print(HELP, markup=False)
    elif name == "/reset":
        s.messages.clear()
        err.print("(conversation forgotten)")
    elif name == "/system":
        s.system = arg or None
        err.print("(system prompt set)" if arg else "(system prompt removed)")
    elif name == "/think" and arg in ("on", "off"):
        s.show_think = arg == "on"
        err.print(f"(reasoning {'shown' if s.show_think else 'hidden'})")
    elif name == "/set" and arg.partition(" ")[0] in SETTINGS:
        key, _, value = arg.partition(" ")
        try:
            s.params[key] = SETTINGS[key](value.strip())
        except ValueError:
            err.print(f"error: {key} takes a number, not {value.strip()!r}", markup=False)
        else:
            err.print(f"({key} = {s.params[key]})")
    elif name == "/save" and arg:
        path = Path(arg).expanduser()
        try:
            path.write_text(json.dumps({"messages": s.conversation()}, indent=2) + "\n")
        except OSError as e:
            err.print(f"error: cannot write {path}: {e.strerror or e}", markup=False)
        else:
            err.print(f"(saved {len(s.messages)} messages to {path})", markup=False)
    elif name == "/load" and arg:
        path = Path(arg).expanduser()
        try:
            system, messages = load_conversation(path)
        except OSError as e:
            err.print(f"error: cannot read {path}: {e.strerror or e}", markup=False)
        except ValueError as e:
            err.print(f"error: {path} is not a saved conversation: {e}", markup=False)
        else:
            s.system, s.messages = system, messages
            err.print(f"(loaded {len(messages)} messages from {path})", markup=False)
    elif name == "/stats":
        out.print(s.stats(), markup=False)
    else:
        err.print(f"error: {line!r} is not a command: /help lists them", markup=False)
    return True


def converse(s: Session, text: str, out: Console, err: Console) -> None:
    """One turn: the message, the streamed answer, the line of figures."""
    s.messages.append({"role": "user", "content": text})
    _answer_last(s, out, err)


def _answer_last(s: Session, out: Console, err: Console) -> None:
    reply = Answer()
    try:
        with _watching(s):
            events = stream_chat(s.url, s.conversation(), s.headers, **s.params)
            show_answer(out, events, reply, s.show_think)
    except KeyboardInterrupt:
        if s.lost is not None:
            return _node_failed(s, s.lost, out, err)
        err.print("(stopped)")
        if reply.first is not None:
            s.answers.append(reply)
        if reply.text:  # as a chat app does: the part of the answer that came stays
            s.messages.append({"role": "assistant", "content": reply.text})
        else:
            s.messages.pop()
        return
    except ClientError as e:
        failure = cluster_failure(s.watch) if e.lost and s.watch else None
        if failure is not None:
            # The server's own word names the node best; the launcher's stands in when it is gone.
            return _node_failed(s, str(e) if e.named else failure, out, err)
        err.print(f"error: {e}", markup=False, style="red")
        s.messages.pop()
        return
    s.messages.append({"role": "assistant", "content": reply.text})
    s.answers.append(reply)
    out.print(reply.summary(), style="dim", markup=False, highlight=False)


def cluster_failure(watch: Callable[[], str | None], wait: float = 10.0) -> str | None:
    # The server's word comes first; its ranks take a moment to be seen gone.
    deadline = time.monotonic() + wait
    while (failure := watch()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return failure and _settled(watch, failure)


def _settled(watch: Callable[[], str | None], failure: str) -> str:
    # Rank 0 names the failed node as it exits, a moment after the failed rank is seen gone.
    time.sleep(1.0)
    return watch() or failure


@contextlib.contextmanager
def _watching(s: Session):
    """While an answer streams, a cluster failure the stream cannot see (rank 0 itself hung)
    interrupts it, as Ctrl-C would."""
    if s.watch is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    s.lost, done, main = None, threading.Event(), threading.main_thread().ident

    def watch() -> None:
        while not done.wait(1.0):
            if (failure := s.watch()) is not None:
                s.lost = _settled(s.watch, failure)
                signal.pthread_kill(main, signal.SIGINT)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _node_failed(s: Session, failure: str, out: Console, err: Console) -> None:
    """Says what failed; with a relaunch, goes on from the unanswered message."""
    s.lost = None
    err.print(f"error: the cluster failed: {failure}", markup=False, style="red")
    if s.relaunch is None:
        s.messages.pop()
        err.print(
            f"(every rank has stopped; the conversation is kept ({len(s.messages)} messages): "
            "/save FILE writes it; launch with --replan to go on after a failure)",
            markup=False,
        )
        return
    try:
        s.url = s.relaunch(failure)
    except ClientError as e:
        s.messages.pop()
        err.print(f"error: cannot go on: {e}", markup=False, style="red")
        return
    err.print(f"(relaunched; replaying the conversation, {len(s.messages)} messages)", markup=False)
    _answer_last(s, out, err)


def repl(
    url: str,
    params: dict,
    headers: dict | None = None,
    watch: Callable[[], str | None] | None = None,
    relaunch: Callable[[str], str] | None = None,
) -> None:
    """The chat loop. Ctrl-C at the prompt propagates (the caller stops the cluster)."""
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    s = Session(url, dict(params), headers or {}, watch=watch, relaunch=relaunch)
    history = _history()
    err.print(GREETING, markup=False)
    try:
        while True:
            try:
                text = read_message()
            except EOFError:
                out.out("")
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if not command(s, text.strip(), out, err):
                    return
                continue
            converse(s, text, out, err)
    finally:
        _save_history(history)
