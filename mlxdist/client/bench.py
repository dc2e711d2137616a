"""`mlxdist bench`: what a running cluster does, measured from a client through its API.

Prompt tokens/s and time to first token from one streamed request with a prompt of random
token ids, timed at the client; decode tokens/s of that request as rank 0 timed it (its usage);
the aggregate decode tokens/s of several concurrent streams, from the tokens' arrival times;
and from `/mlxdist/stats`, each rank's peak memory and the bytes it sent per decoded token (two
requests that differ only in their answer's length, so the prompt's traffic cancels out).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

from mlxdist.client.api_client import event_data


@dataclass
class Run:
    start: float  # time.perf_counter() when the request was sent
    arrivals: list[float]  # each answer token's time.perf_counter() as it arrived
    server_tps: float = 0.0  # decode tokens/s as rank 0 timed it (usage)

    @property
    def tokens(self) -> int:
        return len(self.arrivals)

    @property
    def first(self) -> float:
        """Seconds from sending to the first token."""
        return self.arrivals[0] - self.start

    @property
    def last(self) -> float:
        """Seconds from sending to the last token."""
        return self.arrivals[-1] - self.start

    @property
    def decode_tps(self) -> float:
        """The server's figure: the arrival times of a short answer's last few events can
        bunch up at the client, which would inflate a client-side rate."""
        if self.server_tps:
            return self.server_tps
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else 0.0


@dataclass
class BenchResult:
    model: str
    ranks: int
    parallel: str
    prompt_tokens: int
    decode_tokens: int
    time_to_first_token: float
    prompt_tps: float
    decode_tps: float
    streams: int
    aggregate_tps: float
    per_rank: list[dict] = field(default_factory=list)  # rank, host, peak_rss, bytes_per_token

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """n token ids drawn from the vocabulary, avoiding the low ids where specials usually sit."""
    rng = random.Random(seed)
    low = min(16, vocab // 2)
    return [rng.randrange(low, vocab) for _ in range(n)]


def stream_once(
    url: str, prompt: list[int], max_tokens: int, timeout: float = 600, headers: dict | None = None
) -> Run:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    server_tps, arrivals = 0.0, []
    post = {"json": body, "timeout": timeout, "headers": headers or {}}
    with httpx.stream("POST", url + "/v1/completions", **post) as r:
        r.raise_for_status()
        for text in event_data(r):
            if text == "[DONE]":
                continue
            data = json.loads(text)
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data.get("usage"):
                server_tps = data["usage"].get("decode_tokens_per_second", 0.0)
            ids = data["choices"][0].get("token_ids") if data["choices"] else None
            if ids:
                arrivals += [time.perf_counter()] * len(ids)
    if not arrivals:
        raise RuntimeError("the server answered no tokens")
    return Run(start, arrivals, server_tps)


def aggregate_tps(
    url: str,
    vocab: int,
    streams: int,
    prompt_tokens: int,
    tokens: int,
    headers: dict | None = None,
) -> float:
    """Decode tokens/s of concurrent streams together while all of them are decoding: the
    tokens that arrive between the last stream's first token and the first stream's last, over
    that time. Prefill is left out (the later streams' prompts are read while the first ones
    decode). Each stream has a prompt of its own; they start together."""
    runs: list[Run] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        prompt = prompt_ids(prompt_tokens, vocab, seed=100 + i)
        r = stream_once(url, prompt, tokens, headers=headers)
        with lock:
            runs.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(runs) < streams:
        raise RuntimeError(f"{streams - len(runs)} of {streams} streams failed")
    begin = max(r.arrivals[0] for r in runs)
    end = min(r.arrivals[-1] for r in runs)
    if end <= begin:  # they never all decoded at once: first token of any to last of all
        begin = min(r.arrivals[0] for r in runs)
        end = max(r.arrivals[-1] for r in runs)
    inside = sum(1 for r in runs for t in r.arrivals if begin < t <= end)
    return inside / (end - begin) if end > begin else 0.0


def _stats(url: str, headers: dict | None = None) -> dict:
    r = httpx.get(url + "/mlxdist/stats", timeout=120, headers=headers or {})
    r.raise_for_status()
    return r.json()


def _sent(stats: dict) -> list[int]:
    return [r["data_bytes"] + r["control_bytes"] for r in stats["ranks"]]


def bench(
    url: str,
    *,
    prompt_tokens: int = 128,
    decode_tokens: int = 64,
    streams: int = 4,
    parallel: str = "pipeline",
    headers: dict | None = None,
) -> BenchResult:
    """headers: the API key's Authorization header, when the server has a key."""
    health = httpx.get(url + "/health", timeout=30, headers=headers or {}).json()
    vocab = health["vocab_size"]
    prompt = prompt_ids(prompt_tokens, vocab)
    stream_once(
        url, prompt_ids(8, vocab, seed=1), 4, headers=headers
    )  # warm up: first-call costs not counted

    before = _sent(_stats(url, headers))
    stream_once(url, prompt, 1, headers=headers)
    middle = _sent(_stats(url, headers))
    run = stream_once(url, prompt, decode_tokens, headers=headers)
    after = _stats(url, headers)
    prefill = [m - b for b, m in zip(before, middle)]
    decode = [a - m - p for m, a, p in zip(middle, _sent(after), prefill)]
    per_token = [d / max(1, run.tokens - 1) for d in decode]

    aggregate = aggregate_tps(url, vocab, streams, prompt_tokens, decode_tokens, headers)
    nodes = {n["rank"]: n.get("host", "") for n in health.get("nodes", [])}
    per_rank = [
        {
            "rank": r["rank"],
            "host": nodes.get(r["rank"], ""),
            "peak_rss": r["peak_rss"],
            "bytes_per_token": round(b),
        }
        for r, b in zip(after["ranks"], per_token)
    ]
    return BenchResult(
        model=health["model"],
        ranks=health["ranks"],
        parallel=parallel,
        prompt_tokens=prompt_tokens,
        decode_tokens=run.tokens,
        time_to_first_token=run.first,
        prompt_tps=prompt_tokens / run.first,
        decode_tps=run.decode_tps,
        streams=streams,
        aggregate_tps=aggregate,
        per_rank=per_rank,
    )


def render(result: BenchResult, console) -> None:
    from rich.table import Table

    top = Table(title=f"{result.model}: {result.ranks} ranks, {result.parallel}")
    for col in ("prompt tok/s", "time to first token", "decode tok/s", "aggregate tok/s"):
        top.add_column(col, justify="right")
    top.add_row(
        f"{result.prompt_tps:.1f} ({result.prompt_tokens} tokens)",
        f"{result.time_to_first_token:.2f} s",
        f"{result.decode_tps:.2f}",
        f"{result.aggregate_tps:.2f} ({result.streams} streams)",
    )
    console.print(top)
    ranks = Table(title="per rank")
    for col in ("rank", "host", "peak memory", "bytes sent per token"):
        ranks.add_column(col, justify="right" if col != "host" else "left")
    for r in result.per_rank:
        memory = f"{r['peak_rss'] / 2**20:.0f} MiB"
        ranks.add_row(str(r["rank"]), r["host"], memory, f"{r['bytes_per_token']:,}")
    console.print(ranks)
