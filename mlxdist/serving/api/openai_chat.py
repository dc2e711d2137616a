"""POST /v1/chat/completions: OpenAI's chat, whole or streamed, with tools.

tool_choice: "auto" (the default with tools) parses the model's calls from its answer;
"required" and a named function force the answer to be calls (a grammar of the model's own call
format, serving/tool_calls.py); "none" still renders the tools (the model keeps the
conversation's context, and the prompt its cached prefix) but bans the token that opens a call
where the format has one, and parses nothing.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from mlxdist.serving.answer import Answer
from mlxdist.serving.api.chat_render import (
    arguments_as_dict,
    effort_switches,
    template_messages,
    template_tools,
)
from mlxdist.serving.api.context import Context, Params
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.openai_output import Output
from mlxdist.serving.api.openai_schema import ChatRequest, NamedChoice, Sampling
from mlxdist.serving.api.openai_stream import respond
from mlxdist.serving.api.sampling import logit_bias, make_extras, refused
from mlxdist.serving.grammar import GrammarError, chat_format_grammar
from mlxdist.serving.reasoning import CLOSE, reasoning_start
from mlxdist.serving.tool_calls import call_grammar
from mlxdist.serving.tools.formats import spec_for

BANNED = -1e9  # a logit bias no token comes back from


def params(
    ctx: Context,
    req: Sampling,
    top_logprobs: int | None,
    grammar: str | None,
    ban: dict[int, float] | None = None,
) -> Params:
    """The generation an OpenAI chat or completion request asks for (ban: biases that win over
    the request's own)."""
    return Params(
        model=req.model,
        max_tokens=req.limit(),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stops(),
        ignore_eos=req.ignore_eos,
        speculative=req.speculative,
        draft_tokens=req.draft_tokens,
        extras=make_extras(
            logit_bias(req.logit_bias, ctx.vocab) | (ban or {}),
            req.presence_penalty,
            req.frequency_penalty,
            req.repetition_penalty,
            top_logprobs,
            grammar,
        ),
    )


# The template's own arguments, which a request's chat_template_kwargs may not set.
RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "conversation"}
RESERVED |= {"chat_template", "continue_final_message", "return_dict", "return_tensors"}


def template_switches(req: ChatRequest) -> dict:
    """The chat template's switches a request sets (reasoning_effort, chat_template_kwargs)."""
    own = req.chat_template_kwargs or {}
    bad = sorted(k for k in own if k in RESERVED or not k.isidentifier())
    if bad:
        raise APIError(
            400, f"chat_template_kwargs: {bad[0]!r} cannot be set", "chat_template_kwargs"
        )
    return effort_switches(req.reasoning_effort) | own


def format_grammar(
    req: Sampling, think_end: int | None = None, harmony: bool = False
) -> str | None:
    """response_format's grammar (think_end: reasoning first, up to that token; harmony: after
    gpt-oss's analysis message, in its final channel)."""
    try:
        return chat_format_grammar(req.response_format, think_end, harmony)
    except GrammarError as e:
        raise refused(e, "response_format") from None


def _tools_grammar(ctx: Context, req: ChatRequest, fmt: str | None, think: bool) -> str | None:
    """The grammar forcing calls, for tool_choice "required" or a named function (think: the
    output begins inside a think block, which runs free up to its end)."""
    choice = req.tool_choice
    name = choice.function.name if isinstance(choice, NamedChoice) else None
    if choice != "required" and name is None:
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    try:
        return call_grammar(fmt, tools, name, ctx.vocab_map, think)
    except GrammarError as e:
        raise refused(e, "tool_choice") from None


def _ban_calls(ctx: Context, fmt: str | None) -> dict[int, float]:
    """tool_choice "none": the bias that bans the token opening a call (if it is one token)."""
    spec = spec_for(fmt) if fmt else None
    token = ctx.vocab_map.get(spec.start) if spec is not None else None
    return {} if token is None else {token: BANNED}


def add_routes(app: FastAPI, ctx: Context) -> None:
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        choice = req.tool_choice or ("auto" if req.tools else "none")
        if choice != "none" and choice != "auto" and not req.tools:
            raise APIError(400, "tool_choice: a tool call is asked for but no tools are given")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs true", "top_logprobs")
        fmt, kwargs = None, {}
        if req.tools:
            fmt = ctx.tool_format
            if fmt is None:
                why = "this model's chat template has no tool calls, so tools cannot be offered"
                raise APIError(400, f"tools: {why}", "tools")
            kwargs["tools"] = template_tools(req.tools)
        kwargs |= template_switches(req)
        messages = template_messages(req.messages, arguments_as_dict(ctx.chat_template))
        text = ctx.render_chat(messages, **kwargs)
        prompt = ctx.encode(text, "messages", special=False)
        # None: no splitting; else how the output begins (answer, think block, harmony header)
        think = reasoning_start(text) if req.reasoning_format == "deepseek" else None
        end = ctx.vocab_map.get(CLOSE) if think == "think" else None
        grammar = format_grammar(req, end, think == "harmony")  # R1, gpt-oss: reasoning, then JSON
        if grammar is not None and think == "think" and end is None:
            think = "answer"  # no </think> token: the JSON holds from the first token
        forced = _tools_grammar(ctx, req, fmt, think == "think")
        if forced is not None and grammar is not None:
            why = "a required tool call and a response_format cannot both be enforced"
            raise APIError(400, f"tool_choice: {why}", "tool_choice")
        grammar = grammar or forced
        top = (req.top_logprobs or 0) if req.logprobs else None
        ban = _ban_calls(ctx, fmt) if choice == "none" else None
        job = ctx.make_job(params(ctx, req, top, grammar, ban), prompt, "messages")
        calls = None if choice == "none" else fmt
        answer = Answer(think, calls, kwargs.get("tools"), not req.parallel_tool_calls)
        token_bytes = ctx.token_bytes if req.logprobs else None
        out = Output(req, ctx.model_name, True, answer, token_bytes)
        return await respond(ctx, job, out, request)
