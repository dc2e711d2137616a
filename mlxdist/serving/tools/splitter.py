"""Splits a model's answer, piece by piece as it streams, into content and tool calls.

Text outside a format's call markers is content; a call is handed on once its closing marker has
come (the end of the output for a format without one). A marker cut across pieces is held back
until it is whole or cannot be one. A call that does not parse, or that the output leaves
unfinished, comes back as content, markers and all: the client sees what the model wrote.
"""

from __future__ import annotations

from mlxdist.serving.tools.call import ToolCall, make_call
from mlxdist.serving.tools.formats import Spec, spec_for
from mlxdist.serving.tools.llama import LLAMA3_JSON, LeadingJsonSplitter

_TEXT, _UNIT, _SECTION, _CALL = "text", "unit", "section", "call"


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that could be the start of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallSplitter:
    """feed(text) -> (content, calls completed by this piece); finish() -> the same for what
    was held back. A format with no Spec (harmony, whose calls serving/harmony.py takes, or
    none at all) passes the text through as content."""

    def __init__(self, fmt: str | None, tools: list[dict] | None = None) -> None:
        self.spec: Spec | None = spec_for(fmt) if fmt else None
        self.lead = LeadingJsonSplitter() if fmt == LLAMA3_JSON else None  # no markers
        self.tools = tools
        self.state = _TEXT
        self.held = ""  # text not yet judged: a marker may be starting
        self.raw = ""  # what a unit has consumed so far, returned as content if it fails
        self.after_call = False  # the last thing read was a call
        self.broken = False  # the open section's start went out as text (so will its end)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.lead is not None:
            return self.lead.feed(text)
        if self.spec is None:
            return text, []
        buf, self.held = self.held + text, ""
        content: list[str] = []
        calls: list[ToolCall] = []
        while buf:
            buf = self._step(buf, content, calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.lead is not None:
            return self.lead.finish()
        if self.spec is None:
            return "", []
        held, self.held = self.held, ""
        if self.state == _TEXT:
            return ("" if self.after_call and not held.strip() else held), []
        if self.state == _UNIT and self.spec.end is None:  # the unit ends with the output
            content: list[str] = []
            calls: list[ToolCall] = []
            self._parse(held, self.raw + held, content, calls)
            self.raw, self.state = "", _TEXT
            return "".join(content), calls
        raw, self.raw, self.state = self.raw + held, "", _TEXT  # cut off inside a call
        return raw, []

    # ---------------------------------------------------------------- the states

    def _step(self, buf: str, content: list[str], calls: list[ToolCall]) -> str:
        """Consume what it can of buf; returns the rest (empty when it must wait)."""
        spec = self.spec
        assert spec is not None
        if self.state == _TEXT:
            if self.after_call:  # whitespace between calls, or after the last, is not content
                lead = buf.lstrip()
                if not lead or spec.start.startswith(lead):
                    self.held = buf  # more calls may follow
                    return ""
                if lead.startswith(spec.start):
                    buf = lead
                else:
                    self.after_call = False
            i = buf.find(spec.start)
            if i < 0:
                keep = _held_suffix(buf, spec.start)
                content.append(buf[: len(buf) - keep])
                self.held = buf[len(buf) - keep :]
                return ""
            content.append(buf[:i])
            self.raw = spec.start
            self.broken = False
            self.state = _SECTION if spec.call_start else _UNIT
            return buf[i + len(spec.start) :]
        if self.state == _SECTION:
            return self._section(buf, content)
        end = spec.end if self.state == _UNIT else spec.call_end
        if end is None:  # to the end of the output: finish() parses it
            self.held = buf
            return ""
        i = buf.find(end)
        if i < 0:
            self.held = buf
            return ""
        body = buf[:i]
        self._parse(body, self.raw + body + end, content, calls)
        self.raw = ""
        self.state = _TEXT if self.state == _UNIT else _SECTION
        return buf[i + len(end) :]

    def _section(self, buf: str, content: list[str]) -> str:
        """Between a section's calls: whitespace, the next call's start or the section's end."""
        spec = self.spec
        assert spec is not None and spec.call_start is not None and spec.end is not None
        lead = buf.lstrip()
        for tag, state in ((spec.call_start, _CALL), (spec.end, _TEXT)):
            if lead.startswith(tag):
                if state == _TEXT and self.broken:  # its calls went out as text: its end too
                    content.append(buf[: len(buf) - len(lead)] + tag)
                # a section that closes leaves no content; a call's raw text starts here
                self.raw = "" if state == _TEXT else self.raw + buf[: len(buf) - len(lead)] + tag
                self.state = state
                return lead[len(tag) :]
        if not lead or spec.call_start.startswith(lead) or spec.end.startswith(lead):
            self.held = buf  # whitespace, or a marker not yet whole
            return ""
        # Something else inside the section: not a call; the section's text is content.
        content.append(self.raw)
        self.raw, self.state = "", _TEXT
        return buf

    def _parse(self, body: str, raw: str, content: list[str], calls: list[ToolCall]) -> None:
        spec = self.spec
        assert spec is not None
        try:
            parsed = spec.parse(body, self.tools)
            made = [make_call(c.get("name"), c.get("arguments"), c.get("id")) for c in parsed]
        except Exception:  # whatever a parser raises, a call it cannot read is content
            content.append(raw)
            self.after_call = False
            self.broken = self.broken or raw.startswith(spec.start)  # the section's start went too
            return
        if not made:
            content.append(raw)
        calls.extend(made)
        self.after_call = bool(made)
