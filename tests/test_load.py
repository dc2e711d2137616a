"""Load: 32 concurrent clients, 10 requests each, on a local 2-rank tiny-r1 cluster. Every
request is answered with exactly its prompt's solo answer, and each rank's resident memory,
sampled (through psutil) across the run, stays flat."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.cluster

CLIENTS, REQUESTS, MAX_TOKENS = 32, 10, 3
GROWTH = 0.10  # the most a rank's resident memory may grow after the warm-up


def vm_rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def prompt(client: int) -> str:
    return f"Client {client} asks: what comes after {client * 7}?"


async def ask(http: httpx.AsyncClient, url: str, text: str, stream: bool) -> str:
    body = {"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if not stream:
        r = await http.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    import json

    pieces = []
    async with http.stream("POST", url + "/v1/completions", json=body | {"stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                pieces += [c["text"] for c in event["choices"]]
    return "".join(pieces)


async def client(http, url: str, n: int, expected: str, answers: list) -> None:
    for i in range(REQUESTS):
        # Half the requests stream, half wait for the whole answer.
        answers.append((n, await ask(http, url, prompt(n), stream=(n + i) % 2 == 0), expected))


def test_32_clients_10_requests_each(shared_r1):
    url, _, ranks = shared_r1  # tiny-r1 on [2, 2], shared with other files (conftest)
    assert len(ranks) == 2

    async def solo() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as http:
            return [await ask(http, url, prompt(n), stream=False) for n in range(CLIENTS)]

    expected = asyncio.run(solo())  # each prompt alone; also the warm-up
    samples: list[list[int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append([vm_rss(p) for p in ranks])

    sampler = threading.Thread(target=sample)
    answers: list = []

    async def load() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.gather(
                *(client(http, url, n, expected[n], answers) for n in range(CLIENTS))
            )

    samples.append([vm_rss(p) for p in ranks])
    sampler.start()
    t0 = time.monotonic()
    try:
        asyncio.run(load())
    finally:
        done.set()
        sampler.join()
    took = time.monotonic() - t0
    samples.append([vm_rss(p) for p in ranks])

    wrong = [(n, got, want) for n, got, want in answers if got != want]
    print(f"\n{len(answers)} requests from {CLIENTS} clients in {took:.1f} s; {len(wrong)} wrong")
    for r in range(len(ranks)):
        series = [s[r] / 2**20 for s in samples]
        step = max(1, len(series) // 12)
        shown = " ".join(f"{x:.1f}" for x in series[::step] + series[-1:])
        growth = series[-1] / series[0] - 1
        print(f"rank {r} RSS MiB ({len(series)} samples): {shown}; growth {growth:+.1%}")
        assert max(series) <= series[0] * (1 + GROWTH), f"rank {r} grew more than {GROWTH:.0%}"
    assert len(answers) == CLIENTS * REQUESTS
    assert len(set(expected)) > 1, "the prompts should not all have the same answer"
    assert wrong == []
