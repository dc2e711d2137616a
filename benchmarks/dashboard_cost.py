"""What an open dashboard costs the cluster: SmolLM2-135M on 3 pipeline ranks (`serve --local 3`),
the same answer decoded (`ignore_eos`, 96 tokens) with no page open, with one page's feed read by a
plain HTTP client (the server's own cost: ticks, counting, the feed), and with the page open in a
real headless Chromium on this same machine (the browser's drawing competes for these 2 cores
too; on a real cluster it runs on the user's laptop, not on a Mac of the cluster).

Each round answers once with each of the three, which goes first turning round; the figures
are the median ratios of the usage's decode tokens/s (with / without), and of rank 0's CPU
seconds per generated token. Also: the page's weight,
the bytes Chromium fetched to show it (files and the first state), and the files on disk.

    .venv/bin/python benchmarks/dashboard_cost.py [--rounds 5] [--tokens 96] [--idle 30]
            [--shots DIR]

Decode speed on this 2-core machine varies by about 10% from one answer to the next, more
than the page could cost; so it also measures rank 0's CPU while no request runs, for 30 s
with each of the three: what the dashboard itself costs, set against rank 0's CPU per second
while it decodes.

--shots DIR also writes the page as it is after the rounds (wide and narrow, whole length) to
DIR/dashboard-wide.png and DIR/dashboard-narrow.png: the pictures in docs/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from browser import chromium  # noqa: E402
from serve_local import serve, stop  # noqa: E402

from quantize.gguf import default_smollm2_gguf, import_gguf  # noqa: E402

ASSETS = ROOT / "mlxdist" / "serving" / "dashboard" / "assets"
QUESTION = [{"role": "user", "content": "Tell me about the history of Paris."}]


def decode(url: str, tokens: int, rank0: psutil.Process) -> tuple[float, float]:
    """(decode tokens/s, rank 0's CPU seconds per token) of one answer."""
    body = {"messages": QUESTION, "max_tokens": tokens, "ignore_eos": True, "temperature": 0.0}
    before = rank0.cpu_times()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    after = rank0.cpu_times()
    usage = r.json()["usage"]
    cpu = (after.user + after.system) - (before.user + before.system)
    return usage["decode_tokens_per_second"], cpu / usage["completion_tokens"]


class Feed:
    """One page's feed read by a plain client, as a page would hold it open."""

    def __init__(self, url: str) -> None:
        self.stop = threading.Event()
        self.messages = 0
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        with httpx.stream("GET", url + "/mlxdist/live", timeout=None) as r:
            for line in r.iter_lines():
                self.messages += line.startswith("event:")
                if self.stop.is_set():
                    return

    def close(self) -> None:
        self.stop.set()


def one(kind: str, url: str, tokens: int, rank0: psutil.Process, driver) -> tuple:
    """One answer's figures with no page, one page's feed read by a client, or the page open."""
    if kind == "none":
        return decode(url, tokens, rank0)
    if kind == "feed":
        feed = Feed(url)
        try:
            return decode(url, tokens, rank0)
        finally:
            feed.close()
    driver.get(url + "/")
    try:
        return decode(url, tokens, rank0)
    finally:
        driver.get("about:blank")


def idle_cpu(url: str, rank0: psutil.Process, driver, kind: str, seconds: float) -> float:
    """Rank 0's CPU seconds per second while no request runs: the dashboard's own cost alone
    (ticks, samples, the feed), with no page, a client reading the feed, or the page open."""
    feed = Feed(url) if kind == "feed" else None
    if kind == "chromium":
        driver.get(url + "/")
    time.sleep(2.0)  # the page has loaded, the feed runs
    before = rank0.cpu_times()
    time.sleep(seconds)
    after = rank0.cpu_times()
    if feed is not None:
        feed.close()
    if kind == "chromium":
        driver.get("about:blank")
    return ((after.user + after.system) - (before.user + before.system)) / seconds


def page_weight(driver, url: str) -> tuple[int, int]:
    """(bytes over the wire to show the page, requests), from Chromium's network log."""
    driver.get_log("performance")  # what came before
    driver.get(url + "/")
    driver.execute_script("return new Promise(r => setTimeout(r, 3000))")
    mine, sizes = set(), {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            if params.get("documentURL", "").startswith(url + "/"):  # not the browser's own
                mine.add(params["requestId"])
        if message["method"] == "Network.loadingFinished":
            sizes[params["requestId"]] = params["encodedDataLength"]
    count = len(mine)
    sizes = {k: v for k, v in sizes.items() if k in mine}
    return sum(sizes.values()), count


def screenshots(driver, url: str, folder: Path) -> None:
    """The whole page, 1280 and 390 px wide, after a question asked in its own chat."""
    driver.set_window_size(1280, 900)
    driver.get(url + "/")
    driver.execute_script("return new Promise(r => setTimeout(r, 2000))")
    box = driver.find_element("id", "chat-input")
    box.send_keys("What is the capital of France?\n")
    figures = "return document.querySelector('.answer .answer-figures')?.textContent"
    deadline = time.monotonic() + 120
    while not driver.execute_script(figures) and time.monotonic() < deadline:
        time.sleep(0.5)
    folder.mkdir(parents=True, exist_ok=True)
    for name, width in (("wide", 1280), ("narrow", 390)):
        driver.set_window_size(width, 900)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, height + 120)  # the window's frame is not the page's
        driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        driver.execute_script("return new Promise(r => setTimeout(r, 1500))")
        driver.save_screenshot(str(folder / f"dashboard-{name}.png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--shots", type=Path, default=None, help="write the page's pictures here")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of each idle measure")
    args = p.parse_args()
    files = sorted(ASSETS.iterdir())
    on_disk = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory() as tmp:
        model = import_gguf(default_smollm2_gguf(), Path(tmp) / "smollm2")
        proc, url = serve(model, 3, ["--split", "10,10,10"], Path(tmp) / "serve.log")
        try:
            ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)]
            rank0 = next(c for c in ranks if c.environ().get("MLX_RANK") == "0")
            decode(url, 16, rank0)  # warm
            figures = {"none": [], "feed": [], "chromium": []}
            with chromium() as driver:
                # First, before any page has looked (no tick has run yet): the whole cost.
                kinds = ["none", "feed", "chromium"]
                idle = {kind: idle_cpu(url, rank0, driver, kind, args.idle) for kind in kinds}
                weight, requests = page_weight(driver, url)
                driver.get("about:blank")
                for r in range(args.rounds):
                    for kind in kinds[r % 3 :] + kinds[: r % 3]:  # each goes first in turn
                        figures[kind].append(one(kind, url, args.tokens, rank0, driver))
                if args.shots is not None:
                    screenshots(driver, url, args.shots)
        finally:
            stop(proc)
    base_tps = [tps for tps, _ in figures["none"]]
    base_cpu = [cpu for _, cpu in figures["none"]]
    print(f"page files: {len(files)}, {on_disk} bytes on disk; over the wire: {weight} bytes")
    print(f"in {requests} requests (the page, its files, the state; the live feed stays open)")
    print(f"decode tok/s with no page: median {statistics.median(base_tps):.2f}")
    busy = statistics.median(c * t for c, t in zip(base_cpu, base_tps))  # CPU s per s, decoding
    print(f"rank 0 while decoding: {busy:.3f} CPU s/s")
    for kind in ("none", "feed", "chromium"):
        extra = idle[kind] - idle["none"]
        print(
            f"idle {kind:8s}: rank 0 {idle[kind] * 1000:.2f} ms CPU/s; the page's own "
            f"{extra * 1000:+.2f} ms/s = {extra / busy:+.3%} of rank 0's decoding CPU"
        )
    for kind in ("feed", "chromium"):
        tps = [t / b for (t, _), b in zip(figures[kind], base_tps)]
        cpu = [c / b for (_, c), b in zip(figures[kind], base_cpu)]
        print(
            f"{kind:8s}: decode speed {statistics.median(tps):.3f} of none "
            f"(min {min(tps):.3f}, max {max(tps):.3f}); rank 0 CPU per token "
            f"{statistics.median(cpu):.3f} of none"
        )


if __name__ == "__main__":
    main()
