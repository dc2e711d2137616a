"""A lock-step runner in-process on a group of one (no rank process, no collective): driven step
by step as rank 0 drives a group, and through the coordinator, its greedy tokens are a single
mlx-lm process's; batched decode steps, and the lock-step scheduler, give each sequence its solo
answer. Also: which runner protocol each real runner declares."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_tokenizer

from mlxdist.runtime.expert import load_expert_stage
from mlxdist.runtime.lockstep import LockstepRunner
from mlxdist.runtime.pipeline import Runner
from mlxdist.runtime.runner import InterleavingRunner, StepRunner
from mlxdist.runtime.speculative import replied
from mlxdist.runtime.stage import cache_offset, load_stage
from mlxdist.runtime.step import SAMPLE, VERIFY, Step
from mlxdist.serving.batcher import Batcher
from mlxdist.serving.coordinator import Coordinator
from mlxdist.serving.events import Done, Logits, Token
from mlxdist.serving.job import Job
from mlxdist.serving.schedule import prefill_steps

PROMPT = "Once upon a time"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference(tiny_r1_no_mtp):
    """One mlx-lm process: the prompt's ids, its greedy tokens, the last position's logits."""
    model, tokenizer = load(str(tiny_r1_no_mtp))
    model.set_dtype(mx.float32)  # CPU expert matmul runs only in float32
    prompt = tokenizer.encode(PROMPT)
    tokens = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS)]
    logits = np.array(model(mx.array([prompt]))[0, -1].astype(mx.float32))
    return prompt, tokens, logits


@pytest.fixture(scope="module")
def group():
    group = mx.distributed.init(backend="any")
    assert group.size() == 1
    return group


@pytest.fixture(scope="module")
def runner(tiny_r1, group):
    stage = load_expert_stage(tiny_r1, None, 0, 1, group)
    return LockstepRunner(stage, group, "expert")


def test_lockstep_steps_give_mlx_lms_greedy_tokens(runner, reference):
    prompt, expected, _ = reference
    for tokens, flags in prefill_steps(prompt):
        out = runner.step(tokens, Step(0, flags))
    got = []
    for _ in range(MAX_TOKENS):
        got.append(out.item())
        out = runner.step(got[-1:], Step(0, SAMPLE))
    assert len(expected) == MAX_TOKENS
    assert got == expected


def test_verify_steps_and_trims_keep_mlx_lms_greedy_tokens(runner, reference):
    """VERIFY steps on one rank: drafts that are the greedy tokens are accepted whole, a wrong
    first draft is rejected, and the next step's trim drops its positions: still mlx-lm's."""
    prompt, expected, _ = reference
    assert runner.verifies
    slot = 5
    for tokens, flags in prefill_steps(prompt):
        out = runner.step(tokens, Step(0, flags, slot=slot))
    assert out.item() == expected[0]
    out = runner.step(expected[0:4], Step(0, SAMPLE | VERIFY, slot=slot))
    assert replied(out) == expected[1:5]  # 3 drafts accepted, and the token after them
    wrong = (expected[5] + 1) % runner.stage.vocab_size
    out = runner.step([expected[4], wrong, expected[6]], Step(0, SAMPLE | VERIFY, slot=slot))
    assert replied(out) == [expected[5]]  # rejected at the first draft
    out = runner.step([expected[5]], Step(0, SAMPLE, slot=slot, trim=2))
    assert out.item() == expected[6]
    assert cache_offset(runner.slot_cache(slot)) == len(prompt) + 6  # no rejected draft left
    runner.free(slot)


def test_lockstep_through_the_coordinator_equals_mlx_lm(runner, reference, tiny_r1):
    prompt, expected, logits = reference
    co = Coordinator(runner, load_tokenizer(tiny_r1), set())
    assert not co.interleaves
    answer, values = Job(prompt, MAX_TOKENS), Job(prompt, 0, logits=True)
    for job in (answer, values):
        co.submit(job)
    co.shutdown()
    co.run()
    events = [answer.events.get_nowait() for _ in range(MAX_TOKENS + 1)]
    assert [e.id for e in events[:-1] if isinstance(e, Token)] == expected
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == MAX_TOKENS
    got = values.events.get_nowait()
    assert isinstance(got, Logits)
    assert float(np.max(np.abs(np.array(got.values, np.float32) - logits))) <= 1e-4


def test_each_runner_declares_its_protocol(runner, tiny_r1, group):
    assert isinstance(runner, StepRunner)
    assert not isinstance(runner, InterleavingRunner)  # lock step: one step at a time
    pipeline = Runner(load_stage(tiny_r1, [4], 0), group)
    assert isinstance(pipeline, InterleavingRunner)
    assert InterleavingRunner in type(pipeline).__mro__ and StepRunner in type(runner).__mro__
    # a lone rank has no ring to share
    assert not Coordinator(pipeline, None, set()).interleaves


def _solo(runner, prompt: list[int], n: int, slot: int) -> list[int]:
    for tokens, flags in prefill_steps(prompt):
        out = runner.step(tokens, Step(0, flags, slot=slot))
    got = [out.item()]
    while len(got) < n:
        got.append(runner.step(got[-1:], Step(0, SAMPLE, slot=slot)).item())
    runner.free(slot)
    return got


def test_batched_decode_steps_equal_each_sequence_alone(runner):
    """Sequences join the batch one at a time, one takes a step of its own in between (it leaves
    the batch with its row and comes back), and they leave as they finish: each gets its solo
    greedy tokens, and every cache is freed at the end."""
    prompts = {1: [1, 2, 3, 4, 5], 2: list(range(10, 50)), 3: [7], 4: list(range(100, 300, 7))}
    n = 10
    alone = {s: _solo(runner, p, n, s) for s, p in prompts.items()}
    got: dict[int, list[int]] = {}

    def decode() -> None:
        slots = sorted(s for s in got if len(got[s]) < n)
        for s, t in zip(slots, runner.decode(slots, [got[s][-1] for s in slots]).tolist()):
            got[s].append(t)
            if len(got[s]) == n:
                runner.free(s)

    for slot, prompt in prompts.items():
        for tokens, flags in prefill_steps(prompt):
            out = runner.step(tokens, Step(0, flags, slot=slot))
        got[slot] = [out.item()]
        decode()
    assert len(runner.batch) == 4
    got[2].append(runner.step(got[2][-1:], Step(0, SAMPLE, slot=2)).item())  # alone
    assert runner.batch.slots == [1, 3, 4]
    while any(len(t) < n for t in got.values()):
        decode()
    assert got == alone
    assert len(runner.batch) == 0 and set(runner.caches) == {0}


def test_the_batcher_answers_concurrent_jobs_as_alone(runner, tiny_r1):
    """The lock-step scheduler, in process: jobs of different lengths (one seeded, one
    cancelled before it starts, a logits job run alone between steps) each get what they get
    one after another through the coordinator."""
    specs = [
        {"prompt": [3, 1, 4, 1, 5], "max_tokens": 7},
        {"prompt": list(range(20, 60)), "max_tokens": 4, "temp": 1.0, "seed": 3},
        {"prompt": [9], "max_tokens": 1},
        {"prompt": [2, 7, 1, 8, 2, 8], "max_tokens": 9},
        {"prompt": [6, 6], "max_tokens": 0},
    ]
    co = Coordinator(runner, load_tokenizer(tiny_r1), set())
    alone = [Job(**spec) for spec in specs]
    for job in alone:
        co.submit(job)
    co.shutdown()
    co.run()

    jobs = [Job(**spec) for spec in specs]
    cancelled, values = Job([1, 2, 3], 5), Job([1, 2, 3], 0, logits=True)
    cancelled.cancelled.set()
    queue = co.jobs
    for job in [*jobs[:2], cancelled, values, *jobs[2:], None]:
        queue.put(job)
    batcher = Batcher(runner, queue, co.sequence, co.run_alone, 16)
    batcher.run()
    for a, b in zip(alone, jobs):
        assert _events(b) == _events(a)
    assert isinstance(values.events.get_nowait(), Logits)
    assert cancelled.events.empty()
    assert batcher.in_flight_peak == 3
    assert len(runner.batch) == 0 and set(runner.caches) == {0}


def _events(job: Job) -> list:
    """A job's token ids and finish reason (its Done's timings left out)."""
    out = []
    while not job.events.empty():
        e = job.events.get_nowait()
        out.append(e.id if isinstance(e, Token) else (type(e).__name__, e.finish_reason))
    return out
