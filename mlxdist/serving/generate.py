"""Token generation on rank 0, driving the pipeline one step at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.drafting import PromptLookup, ReplyDrafts
from mlxdist.runtime.runner import StepRunner
from mlxdist.runtime.speculative import read_reply
from mlxdist.runtime.step import DRAFT, EXTRAS, LOGITS, NEW, SAMPLE, VERIFY, Step
from mlxdist.serving.schedule import prefill_steps


def generate_tokens(
    runner: StepRunner,
    prompt: list[int],
    max_tokens: int,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = -1,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    chunk: int = PREFILL_CHUNK,
    src: int = 0,
    keep: int = 0,
    draft_tokens: int = 0,
    fed: list[int] | None = None,
    count: Callable[[int, int], None] | None = None,
    drafter: PromptLookup | ReplyDrafts | None = None,
    extras: bytes = b"",
    read: Callable[[mx.array], None] | None = None,
) -> Iterator[int]:
    """Yields sampled token ids until an end-of-sequence token or max_tokens. With src, the
    caches start as the prefix cache's entry src cut to the prompt's first `keep` positions,
    and only the rest of the prompt is computed. draft_tokens: up to this many tokens drafted
    by `drafter` (prompt lookup when none is given; ReplyDrafts: the MTP layer's, which come
    with each reply) are checked in each step (speculative decoding). fed, when given, gets
    the tokens the caches hold as they change (for the prefix cache); count(drafted, accepted)
    is told each speculative step's figures. extras: the sequence's SamplingExtras (bias,
    penalties, grammar, log probabilities) as they travel to the sampling rank; read(reply) is
    given each token's reply before the token is yielded (its log probabilities)."""
    fed = [] if fed is None else fed
    steps = prefill_steps(prompt[keep:], chunk=chunk)
    if max_tokens <= 0:
        return
    sampling = {"seed": seed, "temp": temp, "top_p": top_p}
    if draft_tokens > 0 and drafter is None:
        drafter = PromptLookup(prompt)
    extra = DRAFT if draft_tokens > 0 and drafter.remote else 0
    for tokens, flags in steps:
        cached = {"src": src, "keep": keep} if flags & NEW else {}
        if flags & NEW and extras:
            flags, cached = flags | EXTRAS, cached | {"extras": extras}
        token = runner.step(tokens, Step(0, flags | extra, **sampling, **cached))
    fed.extend(prompt)
    if draft_tokens > 0:
        first, drafts = read_reply(token, SAMPLE | extra, 1)
        if extra:
            drafter.offer(drafts)
        yield from _decode_speculative(
            runner, first, max_tokens, eos_ids, draft_tokens, drafter, fed, count
        )
        return
    if runner.size == 1 and not extras:
        yield from _decode_overlapped(runner, token, max_tokens, eos_ids, fed)
        return
    for n in range(max_tokens):
        t = token.reshape(-1)[0].item()
        if read is not None:
            read(token)
        yield t
        if t in eos_ids or n + 1 == max_tokens:
            return
        fed.append(t)
        token = runner.step([t], Step(0, SAMPLE))


def _decode_speculative(
    runner: StepRunner,
    first: list[int],
    max_tokens: int,
    eos_ids: set[int] | frozenset[int],
    draft_tokens: int,
    drafter: PromptLookup | ReplyDrafts,
    fed: list[int],
    count: Callable[[int, int], None] | None,
) -> Iterator[int]:
    """Each step feeds the last token and what the drafter drafts after it; the reply is the
    drafts the model accepted and the token after them (and, with the MTP layer, the next
    step's drafts). The next step drops the rejected drafts' positions from every rank's
    caches."""
    extra = DRAFT if drafter.remote else 0
    pending, emitted, trim = first, 0, 0
    while True:
        for t in pending:
            yield t
            emitted += 1
            if t in eos_ids or emitted == max_tokens:
                return
            drafter.extend([t])
        last = pending[-1]
        drafts = drafter.draft(min(draft_tokens, max_tokens - emitted - 1))
        flags = SAMPLE | (VERIFY if drafts else 0) | extra
        out = runner.step([last, *drafts], Step(0, flags, trim=trim))
        pending, following = read_reply(out, flags, 1 + len(drafts))
        if extra:
            drafter.offer(following)
        trim = len(drafts) - (len(pending) - 1)
        if drafts and count is not None:
            count(len(drafts), len(pending) - 1)
        fed.extend([last, *drafts[: len(pending) - 1]])


def _decode_overlapped(
    runner: StepRunner,
    token: mx.array,
    max_tokens: int,
    eos_ids: set[int] | frozenset[int],
    fed: list[int],
) -> Iterator[int]:
    """One rank, no ring: as mlx-lm's generate_step, the next step is built and queued while
    the current one computes, so Python's share of a step overlaps MLX's. The same operations
    as pipeline.Runner.step on the last rank, so the same tokens."""
    stage = runner.stage

    def step(y: mx.array) -> mx.array:
        h = stage.forward(stage.embed(y[None]), runner.cache)
        logits = stage.logits(h[:, -1, :])
        return runner.sampler(logits - mx.logsumexp(logits, keepdims=True)).astype(mx.int32)

    for n in range(max_tokens):
        last = n + 1 == max_tokens
        if not last:
            following = step(token)
            mx.async_eval(following)
        t = token.item()
        if not last:
            fed.append(t)  # the step ahead has fed it, whether or not it is the end
        yield t
        if t in eos_ids or last:
            return
        token = following


def last_logits(runner: StepRunner, prompt: list[int]) -> mx.array:
    """The logits at the last position of prompt, from one pass over the whole prompt."""
    return runner.step(prompt, Step(0, NEW | LOGITS))
