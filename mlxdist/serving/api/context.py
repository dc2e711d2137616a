"""What every API on the coordinator shares: render a chat, check a prompt, make a Job, run it.

An API's route turns its request into a prompt (render_chat or encode) and Params, makes a Job
(make_job), submits it (submit: refused with 503 once a node has failed) and reads its events
(events: Token... then Done; a failure raises APIError, a client gone raises ClientGone).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request

from mlxdist.runtime.processors import SamplingExtras
from mlxdist.serving.api.errors import APIError
from mlxdist.serving.api.logprobs import TokenBytes
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.dashboard.board import Board
from mlxdist.serving.events import Done, Event, Failed, Gone, Token
from mlxdist.serving.job import Job
from mlxdist.serving.tool_calls import tool_format

MAX_STOPS = 16
EXPLAIN_WAIT = 2.0  # how long a ring error waits for the heartbeat to name the node behind it


class ClientGone(Exception):
    """The client went away before its whole answer was ready."""


class Inflight:
    """The jobs the API has submitted and not yet answered; all failed at once when a node fails."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}  # by id(): a Job (a dataclass) has no hash
        self.failure: str | None = None
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            if self.failure is None:
                self.jobs[id(job)] = job
                return
        raise APIError(503, self.failure, code="node_failed", kind="server_error")

    def remove(self, job: Job) -> None:
        with self._lock:
            self.jobs.pop(id(job), None)

    def fail(self, message: str) -> None:
        """Ends every job in flight with an error naming the failed node (from any thread)."""
        with self._lock:
            self.failure = message
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancelled.set()
            job.emit(Failed(message))

    def wait_idle(self, timeout: float) -> bool:
        """True once every job in flight has been answered (its error sent), within timeout."""
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.jobs

    async def explain(self, message: str, wait: float) -> tuple[str, str | None]:
        """A ring error's message, or the failed node's once the heartbeat names it."""
        deadline = time.monotonic() + wait
        while self.failure is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.failure is not None:
            return self.failure, "node_failed"
        return message, None


@dataclass
class Params:
    """What a request asks of generation, whatever its API."""

    model: str | None = None
    max_tokens: int | None = None  # None: up to the context's end
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    speculative: str | None = None
    draft_tokens: int | None = None
    extras: SamplingExtras | None = None  # bias, penalties, grammar, log probabilities


class Context:
    """One server's coordinator, model and limits, and the jobs it has in flight."""

    def __init__(
        self,
        coordinator: Coordinator,
        model_name: str,
        info: dict,
        inflight: Inflight | None = None,
        board: Board | None = None,
    ):
        self.coordinator = coordinator
        self.board = board or Board("cluster")  # the dashboard's counts
        self.tokenizer = coordinator.tokenizer
        self.model_name = model_name
        self.vocab: int = info["vocab_size"]
        self.context: int | None = info.get("context")
        # Without heartbeats (one rank), an error has no node failure to wait for.
        self.inflight, self.wait = (inflight, EXPLAIN_WAIT) if inflight else (Inflight(), 0.0)

    @functools.cached_property
    def vocab_map(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    @functools.cached_property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @functools.cached_property
    def tool_format(self) -> str | None:
        """The model's tool-call format; None when its chat template renders no tools."""
        if self.chat_template is None or "tools" not in self.chat_template:
            return None
        return tool_format(self.chat_template, self.vocab_map)

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        return TokenBytes(self.tokenizer)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        # MLX does not bounds-check embedding lookups: an id past the vocabulary crashes a rank.
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})", param
            )
        if not ids:
            raise APIError(400, "the prompt has no tokens", param)
        if self.context is not None and len(ids) >= self.context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens but the model's context is {self.context} "
                "tokens (prompt and answer together)",
                param,
                "context_length_exceeded",
            )
        return ids

    def encode(self, text: str, param: str = "prompt", special: bool = True) -> list[int]:
        """special: add the tokenizer's own leading tokens (not for a rendered chat)."""
        return self.tokenizer.encode(utf8(text, param), add_special_tokens=special)

    def render_chat(self, messages: list[dict], param: str = "messages", **kwargs) -> str:
        """The prompt text of a chat through the model's template (kwargs: tools=..., ...)."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except Exception as e:  # the template's own checks (role order, a missing template)
            raise APIError(400, f"the chat template refused the messages: {e}", param) from e

    def make_job(self, params: Params, prompt: list[int], param: str = "prompt") -> Job:
        if params.model not in (None, "", self.model_name):
            raise APIError(
                404,
                f"the model {params.model!r} does not exist: this server serves "
                f"{self.model_name!r}",
                "model",
                "model_not_found",
            )
        if len(params.stop) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} sequences", "stop")
        prompt = self.check_ids(prompt, param)
        room = self.context - len(prompt) if self.context is not None else None
        limit = params.max_tokens
        if limit is None:
            limit = room if room is not None else 4096
        elif room is not None:
            limit = min(limit, room)  # the answer ends at the context's end ("length")
        if params.speculative == "mtp" and not self.coordinator.has_mtp():
            why = "this server drafts with no MTP layer: start it with --speculative mtp"
            raise APIError(400, f"speculative: {why}", "speculative")
        extras = params.extras
        if extras is not None:
            # ids past the model's logits (a tokenizer larger than them) would write past them
            bias = {i: b for i, b in extras.logit_bias.items() if 0 <= i < self.vocab}
            extras = replace(extras, logit_bias=bias)
        if extras is not None and extras.grammar is not None:
            if params.ignore_eos:  # a complete answer allows only its end, which it would pass
                why = "cannot go on past the end of an answer whose form is enforced"
                raise APIError(400, f"ignore_eos: {why}", "ignore_eos")
            self.check_grammar(extras.grammar)
        return Job(
            prompt=prompt,
            max_tokens=limit,
            temp=params.temperature,
            top_p=params.top_p,
            seed=-1 if params.seed is None else params.seed,
            stop=params.stop,
            ignore_eos=params.ignore_eos,
            speculative=params.speculative,
            draft_tokens=params.draft_tokens,
            extras=extras,
            loop=asyncio.get_running_loop(),
        )

    def check_grammar(self, grammar: str) -> None:
        """A 400 for a grammar that llguidance refuses over this model's own tokenizer (one that
        names a token the model lacks passes the check without it), before any rank sees it."""
        from llguidance import LLMatcher, LLParserLimits  # only once a grammar is asked for

        from mlxdist.runtime.grammar import ll_tokenizer

        quiet = LLParserLimits(verbose_errors=False)  # no dump of the client's own schema
        matcher = LLMatcher(ll_tokenizer(self.tokenizer), grammar, log_level=0, limits=quiet)
        if matcher.is_error():
            why = matcher.get_error().strip().split("\n")[0]
            raise APIError(400, f"the output's form cannot be enforced for this model: {why}")

    def submit(self, job: Job) -> None:
        """Queues the job (503 once a node has failed); read its answer with events()."""
        self.inflight.add(job)
        self.coordinator.submit(job)

    async def failed(self, event: Failed) -> APIError:
        message, code = await self.inflight.explain(event.message, self.wait)
        return APIError(503 if code else 500, message, code=code, kind="server_error")

    async def events(self, job: Job, request: Request | None = None) -> AsyncIterator[Token | Done]:
        """A submitted job's Token events then its Done. request: a whole answer's, so that a
        client going away cancels it even in the queue (a stream's notices it at its next write).
        Read it inside contextlib.aclosing: the job is cancelled and forgotten once it closes."""
        watcher = asyncio.create_task(_watch_disconnect(request, job)) if request else None
        try:
            while True:
                match await job.events.get():
                    case Gone():
                        raise ClientGone()
                    case Failed() as failure:
                        raise await self.failed(failure)
                    case Token() as token:
                        self.board.token()
                        yield token
                    case Done() as done:
                        self.board.answer(
                            done.time_to_first_token,
                            done.decode_tokens_per_second,
                            done.completion_tokens,
                        )
                        yield done
                        return
        finally:
            if watcher is not None:
                watcher.cancel()
            job.cancelled.set()  # done already, or the client is gone
            self.inflight.remove(job)

    async def one_event(self, job: Job) -> Event:
        """The single event of a job that does not generate (logits, stats)."""
        self.submit(job)
        try:
            event = await job.events.get()
            if isinstance(event, Failed):
                raise await self.failed(event)
            return event
        finally:
            self.inflight.remove(job)


def utf8(text: str, param: str) -> str:
    # JSON's "\ud800" escapes decode to lone surrogates, which the tokenizer cannot encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: the text holds a lone surrogate", param) from None
    return text


async def _watch_disconnect(request: Request, job: Job) -> None:
    """A client that goes away while its whole answer is made cancels it, even in the queue."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
    job.events.put_nowait(Gone())
