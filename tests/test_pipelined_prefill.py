"""Pipelined prefill changes no number: on 2 and 3 real pipeline ranks (loopback, MLX's ring),
a ~300-token prompt cut into small chunks that overlap across the stages gives the same
last-position logits (within 1e-5) and greedy tokens as the same prompt in one 2048-token chunk.

The ranks run tests/pipelined_prefill_rank.py: mlxdist's own pipeline Runner, fed by rank 0 as
the server feeds it (each prefill chunk sent on without waiting for a reply)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from launcher.hostfile import free_ports, write_hostfile
from launcher.rankspec import PREFILL_CHUNK
from mlxdist.client.bench import prompt_ids

pytestmark = pytest.mark.cluster

PROMPT_TOKENS = 300
CHUNKS = [PREFILL_CHUNK, 48]  # one chunk (unpipelined), then 7 overlapping ones (the last short)
TOKENS = 5
RANKS = {2: [2, 2], 3: [2, 1, 1]}  # tiny-r1's 4 layers


def start_ranks(model, split: list[int], prompt: list[int], folder) -> list[subprocess.Popen]:
    hostfile = write_hostfile(
        folder / f"hosts{len(split)}.json", [[f"127.0.0.1:{p}"] for p in free_ports(len(split))]
    )
    worker = ROOT / "tests" / "pipelined_prefill_rank.py"
    args = [str(model), json.dumps(split), json.dumps(prompt), json.dumps(CHUNKS), str(TOKENS)]
    procs = []
    for rank in range(len(split)):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
        procs.append(
            subprocess.Popen([sys.executable, str(worker), *args], env=env, stdout=out, text=True)
        )
    return procs


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    try:
        stdout, _ = procs[0].communicate(timeout=240)
        codes = [procs[0].returncode] + [p.wait(timeout=30) for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * len(procs), codes
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def answers(tiny_r1, tmp_path_factory):
    """Both clusters started at once (most of their time is start-up), then each one's rows."""
    vocab = json.loads((tiny_r1 / "config.json").read_text())["vocab_size"]
    folder = tmp_path_factory.mktemp("pipelined-prefill")
    prompts = {n: prompt_ids(PROMPT_TOKENS, vocab, seed=n) for n in RANKS}
    running = {n: start_ranks(tiny_r1, split, prompts[n], folder) for n, split in RANKS.items()}
    return {n: collect(procs) for n, procs in running.items()}


@pytest.mark.parametrize("ranks", sorted(RANKS))
def test_small_chunks_give_the_one_chunk_logits_and_tokens(answers, ranks):
    rows = answers[ranks]
    assert [r["chunk"] for r in rows] == CHUNKS
    whole, *pieces = rows
    assert whole["steps"] == 2  # the prompt but its last token, then the last token
    reference = np.array(whole["logits"], np.float32)
    for row in pieces:
        assert row["steps"] == -(-(PROMPT_TOKENS - 1) // row["chunk"]) + 1
        diff = float(np.max(np.abs(np.array(row["logits"], np.float32) - reference)))
        print(f"{ranks} ranks, chunk {row['chunk']}: max |logit difference| {diff:.3g}")
        assert diff <= 1e-5
        assert row["tokens"] == whole["tokens"]
    assert len(set(whole["tokens"])) > 1, "a real answer, not one token repeated"
