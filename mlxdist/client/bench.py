"""`mlxdist bench`: what a running cluster does, measured from a client through its API.

Prompt tokens/s and time to first token from one streamed request with a prompt of random
token ids, timed at the client; decode tokens/s of a second request as rank 0 timed it (its
usage); the aggregate decode tokens/s of several concurrent streams and of one, from the tokens'
arrival times; and from `/mlxdist/stats`, each rank's peak memory and the bytes it sent per
decoded token (two requests whose prompts have the same length and whose answers differ in
length, so the prompt's traffic cancels out).

A conversation's follow-up turn: a first turn of about 400 tokens, then the same tokens, its
answer and a short new user turn; the follow-up's time to first token against the first's (a
server that keeps the KV cache of known prefixes reads only the new tokens). And a long prompt's
prefill tokens/s (its tokens over its time to first token). Every prompt is new to the server
but the follow-up, so no figure but the follow-up's comes from its prefix cache.
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
    ids: list[int] = field(default_factory=list)  # the answer's token ids
    cached_tokens: int = 0  # prompt tokens the server read from its prefix cache (usage)

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
    single_stream_tps: float = 0.0  # aggregate_tps's measure with one stream
    conversation_tokens: int = 0  # the first turn's prompt
    followup_tokens: int = 0  # the follow-up's prompt: first turn, its answer, a new user turn
    first_turn_ttft: float = 0.0
    followup_ttft: float = 0.0
    followup_cached_tokens: int = 0  # as the server's usage reports them, when it does
    long_prompt_tokens: int = 0
    long_prompt_tps: float = 0.0  # prefill: tokens over time to first token
    per_rank: list[dict] = field(default_factory=list)  # rank, host, peak_rss, bytes_per_token
    # the server's speculative decoding over the whole bench (/mlxdist/stats), when it drafts
    speculative: dict | None = None

    @property
    def followup_ratio(self) -> float:
        """Follow-up TTFT over the first turn's: below 1 when the server reuses the prefix."""
        return self.followup_ttft / self.first_turn_ttft if self.first_turn_ttft else 0.0

    @property
    def streams_ratio(self) -> float:
        """Aggregate decode of `streams` streams over one stream's."""
        return self.aggregate_tps / self.single_stream_tps if self.single_stream_tps else 0.0

    def to_json(self) -> str:
        ratios = {"followup_ratio": self.followup_ratio, "streams_ratio": self.streams_ratio}
        return json.dumps(asdict(self) | ratios, indent=2)


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
    server_tps, arrivals, ids, cached = 0.0, [], [], 0
    post = {"json": body, "timeout": timeout, "headers": headers or {}}
    with httpx.stream("POST", url + "/v1/completions", **post) as r:
        r.raise_for_status()
        for text in event_data(r):
            if text == "[DONE]":
                continue
            data = json.loads(text)
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if usage := data.get("usage"):
                server_tps = usage.get("decode_tokens_per_second", 0.0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            new = data["choices"][0].get("token_ids") if data["choices"] else None
            if new:
                arrivals += [time.perf_counter()] * len(new)
                ids += new
    if not arrivals:
        raise RuntimeError("the server answered no tokens")
    return Run(start, arrivals, server_tps, ids, cached)


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


def follow_up(
    url: str, vocab: int, tokens: int, headers: dict | None = None
) -> tuple[Run, Run, int]:
    """A conversation of two turns: a first prompt of `tokens` new token ids answered with a few
    tokens, then the same ids, that answer and a new user turn of tokens // 16 (at least 4).
    Returns both runs and the follow-up's prompt length."""
    first_prompt = prompt_ids(tokens, vocab, seed=2)
    first = stream_once(url, first_prompt, 8, headers=headers)
    second_prompt = first_prompt + first.ids + prompt_ids(max(4, tokens // 16), vocab, seed=3)
    second = stream_once(url, second_prompt, 1, headers=headers)
    return first, second, len(second_prompt)


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
    conversation_tokens: int = 0,
    long_prompt_tokens: int = 0,
) -> BenchResult:
    """headers: the API key's Authorization header, when the server has a key.
    conversation_tokens: the follow-up figure's first turn (0: not measured); long_prompt_tokens:
    the long prompt's (0: not measured)."""
    health = httpx.get(url + "/health", timeout=30, headers=headers or {}).json()
    vocab = health["vocab_size"]
    stream_once(
        url, prompt_ids(8, vocab, seed=1), 4, headers=headers
    )  # warm up: first-call costs not counted

    # Two prompts of the same length, each new to the server (no prefix cache hit in either).
    before = _sent(_stats(url, headers))
    cold = stream_once(url, prompt_ids(prompt_tokens, vocab, seed=0), 1, headers=headers)
    middle = _sent(_stats(url, headers))
    run = stream_once(url, prompt_ids(prompt_tokens, vocab, seed=4), decode_tokens, headers=headers)
    after = _stats(url, headers)
    prefill = [m - b for b, m in zip(before, middle)]
    decode = [a - m - p for m, a, p in zip(middle, _sent(after), prefill)]
    per_token = [d / max(1, run.tokens - 1) for d in decode]

    aggregate = aggregate_tps(url, vocab, streams, prompt_tokens, decode_tokens, headers)
    single = aggregate_tps(url, vocab, 1, prompt_tokens, decode_tokens, headers)
    turns = {}
    if conversation_tokens:
        first, second, length = follow_up(url, vocab, conversation_tokens, headers)
        turns = {
            "conversation_tokens": conversation_tokens,
            "followup_tokens": length,
            "first_turn_ttft": first.first,
            "followup_ttft": second.first,
            "followup_cached_tokens": second.cached_tokens,
        }
    if long_prompt_tokens:
        long = stream_once(url, prompt_ids(long_prompt_tokens, vocab, seed=5), 1, headers=headers)
        turns |= {"long_prompt_tokens": long_prompt_tokens}
        turns |= {"long_prompt_tps": long_prompt_tokens / long.first}
    spec = _stats(url, headers).get("speculative")
    if spec and spec.get("mode", "none") != "none":
        turns |= {"speculative": spec}
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
        time_to_first_token=cold.first,
        prompt_tps=prompt_tokens / cold.first,
        decode_tps=run.decode_tps,
        streams=streams,
        aggregate_tps=aggregate,
        single_stream_tps=single,
        per_rank=per_rank,
        **turns,
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
    more = Table(title="conversations, long prompts, concurrency")
    for col in ("first turn TTFT", "follow-up TTFT", "long prompt tok/s", "aggregate N / 1"):
        more.add_column(col, justify="right")
    followup = f"{result.followup_ttft:.2f} s ({result.followup_ratio:.2f}x"
    if result.followup_cached_tokens:
        followup += f", {result.followup_cached_tokens} cached"
    more.add_row(
        f"{result.first_turn_ttft:.2f} s ({result.conversation_tokens} tokens)"
        if result.conversation_tokens
        else "-",
        followup + ")" if result.conversation_tokens else "-",
        f"{result.long_prompt_tps:.1f} ({result.long_prompt_tokens} tokens)"
        if result.long_prompt_tokens
        else "-",
        f"{result.aggregate_tps:.2f} / {result.single_stream_tps:.2f} = "
        f"{result.streams_ratio:.2f}x ({result.streams} streams)",
    )
    console.print(more)
    ranks = Table(title="per rank")
    for col in ("rank", "host", "peak memory", "bytes sent per token"):
        ranks.add_column(col, justify="right" if col != "host" else "left")
    for r in result.per_rank:
        memory = f"{r['peak_rss'] / 2**20:.0f} MiB"
        ranks.add_row(str(r["rank"]), r["host"], memory, f"{r['bytes_per_token']:,}")
    console.print(ranks)
    spec = result.speculative
    if spec:
        title = f"speculative decoding ({spec['mode']}, up to {spec['draft_tokens']} drafts a pass)"
        table = Table(title=title)
        for col in ("passes", "drafted", "accepted", "acceptance", "tokens per pass"):
            table.add_column(col, justify="right")
        table.add_row(
            str(spec["passes"]),
            str(spec["drafted"]),
            str(spec["accepted"]),
            f"{spec['acceptance_rate']:.0%}",
            f"{spec['tokens_per_pass']:.2f}",
        )
        console.print(table)
