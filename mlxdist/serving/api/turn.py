"""One assistant turn for the APIs that answer in blocks or items (Anthropic Messages, OpenAI
Responses): a conversation already in chat-template messages rendered with its tools, the
grammar that forces a call or a format, and, once done, why the answer stopped.

tool_choice as OpenAI chat treats it (api/openai_chat.py): "auto" parses the model's calls,
"required" (or a named tool) forces calls by a grammar of the model's own format, "none" renders
the tools but bans the token that opens a call and parses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from mlxdist.serving.answer import Answer
from mlxdist.serving.api.chat_render import arguments_as_dict
from mlxdist.serving.api.context import Context
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.sampling import refused
from mlxdist.serving.events import Done
from mlxdist.serving.grammar import GrammarError
from mlxdist.serving.reasoning import CLOSE, Start, prompt_opens_think, reasoning_start
from mlxdist.serving.tool_calls import call_grammar
from mlxdist.serving.tools.formats import spec_for

BANNED = -1e9  # a logit bias no token comes back from


@dataclass
class Turn:
    """What a request's conversation becomes: the prompt, how the output begins, the tool
    format to parse calls in (None: none parsed), and the sampling constraints."""

    prompt: list[int]
    think: Start
    fmt: str | None
    tools: list[dict] | None
    grammar: str | None
    ban: dict[int, float]
    single_call: bool = False  # parallel tool calls off: the answer keeps its first call only

    def answer(self) -> Answer:
        return Answer(self.think, self.fmt, self.tools, self.single_call)


def function_tool(name: str, description: str | None, parameters: dict | None) -> dict:
    """A tool as chat templates take it (OpenAI chat's shape)."""
    function: dict = {"name": name}
    if description is not None:
        function["description"] = description
    function["parameters"] = parameters if parameters is not None else {"type": "object"}
    return {"type": "function", "function": function}


def call_message(calls: list[tuple[str, str, dict]], as_dict: bool) -> list[dict]:
    """An assistant's earlier calls (id, name, arguments) as a template's `tool_calls`."""
    return [
        {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": args if as_dict else json.dumps(args)},
        }
        for call_id, name, args in calls
    ]


def template_takes_dicts(ctx: Context) -> bool:
    return arguments_as_dict(ctx.chat_template)


def prepare(
    ctx: Context,
    messages: list[dict],
    tools: list[dict] | None,
    choice: str,
    name: str | None,
    format_grammar: Callable[[int | None, bool], str | None] | None,
    param: str,
    think_off: bool = False,
    prefill: str | None = None,
    **template: object,
) -> Turn:
    """choice: "auto", "none" or "required" (name: the one tool a call must name);
    format_grammar(think_end, harmony): the output format's grammar, reasoning first up to the
    token think_end when the prompt leaves the model inside a think block (None: from the first
    token), or after gpt-oss's analysis message (harmony); think_off:
    the request turned reasoning off, so a prompt that still leaves the model inside a think
    block (R1's always does) closes it empty; prefill: the start of the answer (a last assistant
    message's text), which the model goes on from; template: the chat template's own switches
    (thinking=..., reasoning_effort=...)."""
    fmt = None
    if tools:
        fmt = ctx.tool_format
        if fmt is None:
            why = "this model's chat template has no tool calls, so tools cannot be offered"
            raise APIError(400, f"tools: {why}", "tools")
        template["tools"] = tools
    elif choice == "required":
        raise APIError(400, "tool_choice: a tool call is asked for but no tools are given")
    text = ctx.render_chat(messages, param, **template)
    if (think_off or prefill) and prompt_opens_think(text):
        text += "\n" + CLOSE + "\n\n"  # an empty block, as R1 writes one: the answer follows
    if prefill:  # the answer goes on from the text its last (assistant) message began
        text += prefill
    prompt = ctx.encode(text, param, special=False)
    think = reasoning_start(text)
    end = ctx.vocab_map.get(CLOSE) if think == "think" else None
    harmony = think == "harmony"
    format_grammar = format_grammar(end, harmony) if format_grammar is not None else None
    if format_grammar is not None and think == "think" and end is None:
        think = "answer"  # no </think> token: the JSON holds from the first token
    forced = None
    if choice == "required":
        try:  # inside a think block, the reasoning runs free up to its end, then the calls
            forced = call_grammar(fmt, tools or [], name, ctx.vocab_map, think == "think")
        except GrammarError as e:
            raise refused(e, "tool_choice") from None
    if forced is not None and format_grammar is not None:
        why = "a required tool call and an output format cannot both be enforced"
        raise APIError(400, f"tool_choice: {why}", "tool_choice")
    grammar = forced or format_grammar
    ban: dict[int, float] = {}
    if choice == "none" and fmt is not None:
        spec = spec_for(fmt)
        token = ctx.vocab_map.get(spec.start) if spec is not None else None
        ban = {} if token is None else {token: BANNED}
    return Turn(prompt, think, None if choice == "none" else fmt, tools, grammar, ban)


def stop_sequence(ctx: Context, done: Done, stops: list[str]) -> str | None:
    """The stop sequence that ended the answer, if one did (Done says only "stop", as it does
    for an end-of-sequence token, which is never among its tokens)."""
    if done.finish_reason != "stop" or not stops or not done.tokens:
        return None
    text = ctx.tokenizer.decode(done.tokens)
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None
