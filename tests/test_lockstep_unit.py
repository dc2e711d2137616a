"""A lock-step runner in-process on a group of one (no rank process, no collective): driven step
by step as rank 0 drives a group, and through the coordinator, its greedy tokens are a single
mlx-lm process's. Also: which runner protocol each real runner declares."""

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
from mlxdist.runtime.stage import load_stage
from mlxdist.runtime.step import SAMPLE, Step
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
