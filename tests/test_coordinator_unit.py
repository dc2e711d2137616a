"""The coordinator and the scheduler against fake runners: no rank process, no MLX group.

"lockstep" takes whole steps one job after another; "pipeline" interleaves the answers of
concurrent jobs (three steps in flight). Both must give each job the answer it gets alone.
"""

from __future__ import annotations

import threading
from collections import deque

import pytest
from fakes import LOGITS_SIZE, FakeLockstep, FakeRunner, FakeTokenizer, answer, next_token

from launcher.rankspec import PREFILL_CHUNK
from mlxdist.runtime.step import LOGITS, NEW, SAMPLE
from mlxdist.serving.coordinator import MAX_SEQUENCES, Coordinator
from mlxdist.serving.events import Done, Failed, Logits, Stats, Token
from mlxdist.serving.job import Job
from mlxdist.serving.schedule import prefill_steps

PROMPT = [11, 12, 13]


def coordinator(kind: str, eos: set[int] | None = None, before_send=None) -> Coordinator:
    runner = FakeRunner(3, before_send) if kind == "pipeline" else FakeLockstep(2, before_send)
    return Coordinator(runner, FakeTokenizer(), eos or set())


def serve(co: Coordinator, *jobs: Job, stop: bool = True) -> None:
    """Submits jobs, then (unless a runner's hook does it later) the shutdown, and runs the loop
    until it ends."""
    for job in jobs:
        co.submit(job)
    if stop:
        co.shutdown()
    loop = threading.Thread(target=co.run, daemon=True)
    loop.start()
    loop.join(30)
    assert not loop.is_alive(), "the loop did not end"


def events(job: Job) -> list:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


def outcome(job: Job) -> tuple:
    """A job's events without the timings: what must not depend on what else runs."""
    evs = events(job)
    done = evs[-1]
    assert isinstance(done, Done), evs
    assert all(isinstance(e, Token) for e in evs[:-1]), evs
    counts = (done.prompt_tokens, done.completion_tokens, done.tokens, done.text)
    return tuple(evs[:-1]), done.finish_reason, counts


def tokens(ids: list[int]) -> tuple:
    return tuple(Token(t, f"<{t}>") for t in ids)


@pytest.fixture(params=["lockstep", "pipeline"])
def kind(request) -> str:
    return request.param


def test_the_coordinator_interleaves_only_a_pipeline_of_two_or_more():
    assert coordinator("pipeline").interleaves
    assert not coordinator("lockstep").interleaves
    assert coordinator("lockstep").scheduler is None


def test_a_job_alone_gets_the_models_tokens_and_a_done_with_its_counts(kind):
    co = coordinator(kind)
    job = Job(PROMPT, 6)
    serve(co, job)
    expected = answer(PROMPT, 6)
    evs = events(job)
    assert tuple(evs[:-1]) == tokens(expected)
    done = evs[-1]
    assert (done.finish_reason, done.tokens, done.text) == ("length", expected, "")
    assert (done.prompt_tokens, done.completion_tokens) == (3, 6)
    assert 0 <= done.queue_time <= done.time_to_first_token
    assert done.decode_tokens_per_second >= 0
    assert co.runner.stopped
    # the prompt but its last token, the last token sampled, then one decode step per token
    slot = 0 if kind == "lockstep" else 1
    sent = [(s.tokens, s.step.flags) for s in co.runner.steps_of(slot)]
    decode = [([t], SAMPLE) for t in expected[:-1]]
    assert sent == [([11, 12], NEW), ([13], SAMPLE), *decode]


SPECS = [
    {"prompt": PROMPT, "max_tokens": 6},
    {"prompt": [9] * 5, "max_tokens": 4, "temp": 1.0, "seed": 7},
    {"prompt": [4, 5], "max_tokens": 1},
    {"prompt": list(range(40)), "max_tokens": 9},
    {"prompt": [7], "max_tokens": 3},
    {"prompt": [3, 1, 4, 1, 5], "max_tokens": 0},
    {"prompt": [2, 7, 1, 8], "max_tokens": 12, "top_p": 0.5},
]


def solo(spec: dict) -> tuple:
    job = Job(**spec)
    serve(coordinator("pipeline"), job)
    return outcome(job)


def test_a_job_gets_the_same_answer_from_either_kind_of_runner():
    for spec in SPECS:
        job = Job(**spec)
        serve(coordinator("lockstep"), job)
        assert outcome(job) == solo(spec)


def test_concurrent_jobs_each_get_exactly_their_solo_answer():
    alone = [solo(spec) for spec in SPECS]
    jobs = [Job(**spec) for spec in SPECS]
    late = Job(prompt=[6, 6, 6], max_tokens=5)

    def join_late(runner, tokens, step):
        if len(runner.sent) == 8:  # the last job joins while the others are under way
            co.submit(late)
            co.shutdown()

    co = coordinator("pipeline", before_send=join_late)
    serve(co, *jobs, stop=False)
    assert [outcome(job) for job in jobs] == alone
    assert outcome(late) == solo({"prompt": [6, 6, 6], "max_tokens": 5})
    assert co.in_flight_peak == 3  # one step per stage: every stage had work
    assert co.runner.slots == {}  # every answer's slot was freed
    assert sorted(co.scheduler.free_slots) == list(range(1, MAX_SEQUENCES + 1))
    slots = [s.step.slot for s in co.runner.sent]
    assert any(a != b for a, b in zip(slots, slots[1:]) if a and b)  # steps interleaved


def test_max_tokens_zero_answers_at_once_without_a_step(kind):
    co = coordinator(kind)
    job = Job(PROMPT, 0)
    serve(co, job)
    assert outcome(job) == ((), "length", (3, 0, [], ""))
    assert co.runner.sent == []


def test_an_end_of_sequence_token_ends_the_answer_unless_ignored(kind):
    expected = answer(PROMPT, 6)
    eos = expected[3]
    assert eos not in expected[:3]
    job, ignoring = Job(PROMPT, 6), Job(PROMPT, 6, ignore_eos=True)
    serve(coordinator(kind, eos={eos}), job, ignoring)
    assert outcome(job) == (tokens(expected[:3]), "stop", (3, 3, expected[:3], ""))
    assert outcome(ignoring) == (tokens(expected), "length", (3, 6, expected, ""))


def test_a_stop_string_ends_the_answer_and_is_cut_off(kind):
    e = answer(PROMPT, 8)
    assert len(set(e[:3])) == 3
    # "<e1>" ends with the start of the stop string: held back, then cut with it
    job = Job(PROMPT, 8, stop=["never", f"{e[1]}><{e[2]}"])
    whole = Job(PROMPT, 8, stop=[f"<{e[2]}>"])
    serve(coordinator(kind), job, whole)
    evs, reason, counts = outcome(job)
    assert "".join(t.text for t in evs) == f"<{e[0]}><"
    assert [t.id for t in evs] == e[:3] and reason == "stop"
    assert counts == (3, 3, e[:3], "")
    evs, reason, _ = outcome(whole)
    assert "".join(t.text for t in evs) == f"<{e[0]}><{e[1]}>" and reason == "stop"


def test_a_cancelled_job_is_skipped_and_one_cancelled_midway_ends_there(kind):
    skipped, midway, after = Job(PROMPT, 6), Job(PROMPT, 20), Job([5, 4], 4)
    skipped.cancelled.set()

    slot = 0 if kind == "lockstep" else 1  # `midway`'s

    def cancel(runner, tokens, step):
        if step.slot == slot and len(runner.steps_of(slot)) == 3:  # its second decode step
            midway.cancelled.set()

    co = coordinator(kind, before_send=cancel)
    serve(co, skipped, midway, after)
    assert events(skipped) == []
    expected = answer(PROMPT, 3)
    assert outcome(midway) == (tokens(expected), "cancelled", (3, 3, expected, ""))
    assert outcome(after) == solo({"prompt": [5, 4], "max_tokens": 4})


def test_a_cancelled_answer_leaves_the_others_unchanged():
    jobs = [Job(**spec) for spec in SPECS]
    victim = Job(PROMPT, 30)

    def cancel(runner, tokens, step):
        if len(runner.sent) == 12:
            victim.cancelled.set()

    co = coordinator("pipeline", before_send=cancel)
    serve(co, victim, *jobs)
    assert [outcome(job) for job in jobs] == [solo(spec) for spec in SPECS]
    evs, reason, _ = outcome(victim)
    assert reason == "cancelled" and 0 < len(evs) < 30
    assert co.runner.slots == {}


def test_a_failing_step_fails_every_open_job_and_the_loop_goes_on(kind):
    first, second, later = Job(PROMPT, 6), Job([8, 9], 6), Job([5, 4], 4)

    broke = []

    def fail_once(runner, tokens, step):
        if len(runner.sent) == 2 and not broke:  # the third step
            broke.append(step)
            co.submit(later)  # comes after the failure
            co.shutdown()
            raise RuntimeError("the ring broke")

    co = coordinator(kind, before_send=fail_once)
    serve(co, first, second, stop=False)
    failed = Failed("RuntimeError: the ring broke")
    if kind == "pipeline":  # both were open: the first's reply due, the second's step failing
        assert broke[0].slot == 2
        assert events(first) == events(second) == [failed]
        assert co.runner.replies == deque()
        assert sorted(co.scheduler.free_slots) == list(range(1, MAX_SEQUENCES + 1))
        assert sorted(co.runner.freed[:2]) == [1, 2]
    else:  # one job at a time, failing at its first decode step; the next is untouched
        assert events(first) == [*tokens(answer(PROMPT, 1)), failed]
        assert outcome(second) == solo({"prompt": [8, 9], "max_tokens": 6})
    assert outcome(later) == solo({"prompt": [5, 4], "max_tokens": 4})
    assert co.runner.stopped


def test_a_long_prompt_goes_in_the_one_schedules_chunks(kind):
    prompt = [(7 * i) % 900 for i in range(2 * PREFILL_CHUNK + 10)]
    job = Job(prompt, 3, temp=0.5, top_p=0.9, seed=3)
    co = coordinator(kind)
    serve(co, job)
    expected = answer(prompt, 3, seed=3)
    assert [t.id for t in outcome(job)[0]] == expected
    sent = co.runner.steps_of(0 if kind == "lockstep" else 1)
    chunks = [(len(s.tokens), s.step.flags) for s in sent]
    assert chunks == [
        (PREFILL_CHUNK, NEW),
        (PREFILL_CHUNK, 0),
        (9, 0),
        (1, SAMPLE),
        (1, SAMPLE),
        (1, SAMPLE),
    ]
    assert [t for s in sent[:4] for t in s.tokens] == prompt
    # the prompt's steps carry the sampling settings; decode steps are bare
    assert {(s.step.seed, s.step.temp, s.step.top_p) for s in sent[:4]} == {(3, 0.5, 0.9)}
    assert {(s.step.seed, s.step.temp, s.step.top_p) for s in sent[4:]} == {(-1, 0.0, 1.0)}


def test_prefill_steps():
    assert prefill_steps([5]) == [([5], NEW | SAMPLE)]
    assert prefill_steps([5, 6, 7]) == [([5, 6], NEW), ([7], SAMPLE)]
    prompt = list(range(PREFILL_CHUNK + 1))
    assert prefill_steps(prompt) == [(prompt[:-1], NEW), ([PREFILL_CHUNK], SAMPLE)]
    steps = prefill_steps(list(range(PREFILL_CHUNK + 2)))
    assert [(len(t), f) for t, f in steps] == [(PREFILL_CHUNK, NEW), (1, 0), (1, SAMPLE)]
    with pytest.raises(ValueError, match="no tokens"):
        prefill_steps([])
    # a smaller chunk: the same tokens in the same order, the last one still alone
    steps = prefill_steps(list(range(70)), chunk=32)
    assert [(len(t), f) for t, f in steps] == [(32, NEW), (32, 0), (5, 0), (1, SAMPLE)]
    assert [t for piece, _ in steps for t in piece] == list(range(70))
    assert prefill_steps([5, 6], chunk=1) == [([5], NEW), ([6], SAMPLE)]
    with pytest.raises(ValueError, match="at least one token"):
        prefill_steps([5, 6], chunk=0)


def test_logits_and_stats_run_alone_between_steps_and_change_no_answer(kind):
    answering = Job(PROMPT, 20)
    logits = Job([4, 5, 6], 0, logits=True)
    stats = Job([], 0, stats=True)

    def ask(runner, tokens, step):
        if len(runner.sent) == 5:
            co.submit(logits)
            co.submit(stats)
            co.shutdown()

    co = coordinator(kind, before_send=ask)
    serve(co, answering, stop=False)
    assert outcome(answering) == solo({"prompt": PROMPT, "max_tokens": 20})
    [values] = events(logits)
    h = next_token([4, 5, 6])
    assert values == Logits([float((h * (i + 1)) % 13) for i in range(LOGITS_SIZE)])
    [counters] = events(stats)
    assert isinstance(counters, Stats) and len(counters.ranks) == co.runner.size
    assert counters.in_flight_peak == (1 if kind == "pipeline" else 0)
    logits_steps = [s for s in co.runner.sent if s.step.flags & LOGITS]
    assert [(s.tokens, s.step.slot, s.step.flags) for s in logits_steps] == [
        ([4, 5, 6], 0, NEW | LOGITS)
    ]


def test_a_ring_failing_while_a_job_waits_to_run_alone_fails_that_job_too():
    answering = [Job(PROMPT, 20), Job([8, 9], 20), Job([5, 4], 20)]  # steps in flight
    stats = Job([], 0, stats=True)
    asked = []

    def ask(runner, tokens, step):
        if len(runner.sent) == 6:
            co.submit(stats)  # taken at the next admission, which drains the ring first
            co.shutdown()
            asked.append(step)

    co = coordinator("pipeline", before_send=ask)
    receive = co.runner.receive

    def broken_receive():
        if asked and co.jobs.qsize() == 1:  # the stats job taken, the shutdown still queued
            raise RuntimeError("the ring broke")
        return receive()

    co.runner.receive = broken_receive
    serve(co, *answering, stop=False)
    failed = Failed("RuntimeError: the ring broke")
    assert events(stats) == [failed]
    assert [events(job)[-1] for job in answering] == [failed] * 3
