"""A real agent under attack from another host, with the production limits: stand-in Macs in
network namespaces (root, Linux), two agents running a 2-rank tiny-r1 cluster started through
them, an attacker on a third host and the launcher on a fourth.

    sudo .venv/bin/python benchmarks/agent_under_attack.py [--seconds 8]

Attacks, each on both agents at once and from 24 source addresses (so the agents' limit on
unverified connections in all is reached and room made, not only the one per address): 64 idle
connections (no byte sent), 64 connections that dribble their request headers a byte at a time,
and 8 forged but well-formed uploads of 60 MiB.
Every closed connection is opened again for as long as the attack lasts. Meanwhile the launcher
sends signed requests to both agents and asks the cluster, as `mlxdist serve` does, whether it
failed. Prints the table in docs/security.md ("Capacity under attack").

The same file plays each part (--role agent | launcher | attack) inside its namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

AGENT_PORT = 52417
MiB = 2**20
UPLOAD = 60 * MiB


# --- the parts, each in its own namespace -----------------------------------------------------


def run_agent(root: Path, ip: str) -> None:
    from launcher.agent import create_agent_app, serve_agent
    from launcher.secret import load_secret

    facts = {"hostname": ip, "node_id": f"mac-{ip.rsplit('.', 1)[1]}"}
    app = create_agent_app(load_secret(root / "secret"), root / "models", lambda: facts)
    serve_agent(app, [ip], AGENT_PORT, log_level="warning")  # the production limits


def run_launcher(secret_file: Path, ips: list[str]) -> None:
    """Commands on stdin, one JSON answer a line on stdout: start, probe, stop."""
    from launcher.agent_client import AgentClient
    from launcher.local import wait_ready
    from launcher.remote import Node, start_remote
    from launcher.secret import load_secret
    from quantize.checkpoint import inspect_model
    from quantize.nodes import even_split

    secret = load_secret(secret_file)
    nodes = [
        Node(f"mac{i}", ip, AgentClient(f"http://{ip}:{AGENT_PORT}", secret, timeout=10))
        for i, ip in enumerate(ips)
    ]
    cluster = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "start":
            split = even_split(inspect_model(Path(cmd[1])).num_layers, len(nodes))
            cluster = start_remote(nodes, ["tiny"] * len(nodes), split, name="tiny-r1")
            wait_ready(cluster, timeout=300)
            answer = {"url": cluster.url}
        elif cmd[0] == "probe":  # signed requests to every agent, and the launcher's verdict
            slowest, errors = 0.0, []
            for node in nodes:
                t0 = time.monotonic()
                try:
                    node.client.health()
                except Exception as e:  # noqa: BLE001 - counted and shown, never hidden
                    errors.append(f"{node.name}: {e}")
                slowest = max(slowest, time.monotonic() - t0)
            t0 = time.monotonic()
            failure = cluster.failure() if cluster else None
            answer = {
                "slowest": slowest,
                "errors": errors,
                "failure": failure,
                "failure_check": time.monotonic() - t0,
                "serving": bool(cluster and cluster.serving()),
            }
        else:
            if cluster:
                cluster.stop()
            answer = {"stopped": True}
        print(json.dumps(answer), flush=True)
        if cmd[0] == "stop":
            return


async def _hold(kind: str, ip: str, source: str, stats: dict, until: float) -> None:
    """One attacker's slot: a connection held as long as the agent allows, then another."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(ip, AGENT_PORT, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(0.2)
            continue
        stats["tried"] += 1
        opened = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: " + ip.encode() + b"\r\nX-Pad: " + b"a" * 4000
        try:
            for byte in head if kind == "slow" else []:
                writer.write(bytes([byte]))
                await writer.drain()
                got = await _read_for(reader, 0.5)
                if got is not None:
                    break
            else:
                got = await _read_for(reader, until - time.monotonic())
        except OSError:
            got = b""
        held = time.monotonic() - opened
        if got:  # the agent answered something: an accepted request if it is a 2xx
            stats["answered"] += 1
            stats["accepted"] += got.startswith(b"HTTP/1.1 2")
        if time.monotonic() < until:
            stats["longest"] = max(stats["longest"], held)
        writer.close()
        await asyncio.sleep(0.2)


async def _read_for(reader, seconds: float) -> bytes | None:
    """What the agent sent within seconds (b"" when it closed), or None when it kept silent."""
    try:
        return await asyncio.wait_for(reader.read(64), max(seconds, 0.0))
    except asyncio.TimeoutError:
        return None


@functools.cache
def _body() -> bytes:
    return bytes(UPLOAD)  # one body for every forged upload of the attacker


def _forged_upload(ip: str, source: str, stats: dict, lock: threading.Lock) -> None:
    """A well-formed request signed with the wrong secret, with a 60 MiB body sent at once."""
    import socket

    from launcher.auth import sign

    body = _body()
    target = "/files/chunk?path=evil/x&offset=0"
    headers = sign(secrets.token_bytes(32), "PUT", target, body)  # not the cluster's secret
    head = [f"PUT {target} HTTP/1.1", f"Host: {ip}", f"Content-Length: {UPLOAD}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sent, status = 0, b""
    with socket.create_connection((ip, AGENT_PORT), 60, (source, 0)) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        view = memoryview(body)
        try:
            while sent < UPLOAD:
                sent += s.send(view[sent : sent + MiB])
        except OSError:
            pass
        with contextlib.suppress(OSError):
            status = s.recv(64)
    with lock:
        stats["tried"] += 1
        stats["answered"] += bool(status)
        stats["accepted"] += status.startswith(b"HTTP/1.1 2")
        line = status.split(b"\r\n")[0].decode(errors="replace")
        stats["statuses"] = sorted(set(stats["statuses"]) | {line})
        stats["body_sent"] = max(stats.get("body_sent", 0), sent)


def run_attack(kind: str, ips: list[str], count: int, seconds: float, sources: list[str]) -> None:
    """count connections to each of ips, the j-th from sources[j % len(sources)]."""
    stats = {"tried": 0, "answered": 0, "accepted": 0, "longest": 0.0, "statuses": []}
    stats["sources"] = len(sources)
    slots = [(ip, sources[j % len(sources)]) for ip in ips for j in range(count)]
    if kind == "upload":
        lock = threading.Lock()
        until = time.monotonic() + seconds

        def again(ip: str, source: str) -> None:
            while time.monotonic() < until:
                _forged_upload(ip, source, stats, lock)

        threads = [threading.Thread(target=again, args=slot) for slot in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:

        async def attack() -> None:
            until = time.monotonic() + seconds
            await asyncio.gather(*(_hold(kind, ip, src, stats, until) for ip, src in slots))

        asyncio.run(attack())
    print(json.dumps(stats), flush=True)


# --- the conductor, in the machine's own namespace -------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Scenario:
    """The hosts, their agents, the launcher and its cluster; every process stopped on exit."""

    def __init__(self, hosts, model: Path, work: Path):
        from launcher.secret import create_secret

        self.hosts = hosts
        self.agents_at = [h.ip for h in hosts[:2]]
        secret = create_secret(work / "secret")
        self.agents = []
        for h in hosts[:2]:
            root = work / h.name
            shutil.copytree(model, root / "models" / "tiny")
            shutil.copy(secret, root / "secret")
            log = open(work / f"{h.name}.log", "wb")
            cmd = h.cmd(sys.executable, __file__, "--role", "agent", str(root), h.ip)
            self.agents.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log))
        self._wait_listening()
        self.sources = attacker_addresses(hosts[3])
        cmd = hosts[2].cmd(sys.executable, __file__, "--role", "launcher", str(secret))
        self.launcher = subprocess.Popen(
            [*cmd, *self.agents_at],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(work / "launcher.log", "wb"),
            text=True,
        )
        self.ask(f"start {model}")

    def _wait_listening(self) -> None:
        probe = f"import socket,sys; socket.create_connection((sys.argv[1], {AGENT_PORT}), 1)"
        deadline = time.monotonic() + 60
        for h in self.hosts[:2]:
            run = h.cmd(sys.executable, "-c", probe, h.ip)
            while subprocess.run(run, capture_output=True).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent on {h.ip} did not start")
                time.sleep(0.3)

    def ask(self, command: str) -> dict:
        self.launcher.stdin.write(command + "\n")
        self.launcher.stdin.flush()
        line = self.launcher.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher stopped while asked {command!r}")
        return json.loads(line)

    def attack(self, kind: str, count: int, seconds: float) -> dict:
        """The attack from the fourth host, probed from the launcher every half second; the
        agents' resident memory sampled all along."""
        pids = [a.pid for a in self.agents]  # `ip netns exec` execs: the agent's own pid
        before = [rss_kib(p) for p in pids]
        cmd = self.hosts[3].cmd(sys.executable, __file__, "--role", "attack", kind)
        cmd += ["--sources", ",".join(self.sources), str(count), str(seconds), *self.agents_at]
        attacker = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        peak, probes = list(before), []

        def sample() -> None:  # every 20 ms: a body held for a moment is not missed
            while attacker.poll() is None:
                peak[:] = [max(m, rss_kib(p)) for m, p in zip(peak, pids)]
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(1.0)  # the attack's connections are open before the first probe
        while attacker.poll() is None:
            probes.append(self.ask("probe"))
            time.sleep(0.5)
        sampler.join()
        stats = json.loads(attacker.stdout.read() or "{}")
        probes.append(self.ask("probe"))
        return {
            "kind": kind,
            "count": count,
            "stats": stats,
            "rss_before_mib": max(before) / 1024,
            "rss_growth_mib": max(m - b for m, b in zip(peak, before)) / 1024,
            "slowest_s": max(p["slowest"] for p in probes),
            "errors": [e for p in probes for e in p["errors"]],
            "failures": [p["failure"] for p in probes if p["failure"]],
            "serving": all(p["serving"] for p in probes),
            "probes": len(probes),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        for p in [self.launcher, *self.agents]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


ATTACKS = [("idle", 64), ("slow", 64), ("upload", 8)]
SOURCES = 24  # the attacker's addresses: more than UNVERIFIED, so room is made all along


def attacker_addresses(host) -> list[str]:
    """host's own address and SOURCES - 1 aliases on its interface (same /16)."""
    prefix = host.ip.rsplit(".", 1)[0]
    aliases = [f"{prefix}.{200 + i}" for i in range(SOURCES - 1)]
    for ip in aliases:
        run = ["ip", "-n", host.name, "addr", "add", f"{ip}/16", "dev", "eth0"]
        subprocess.run(run, check=True, capture_output=True)
    return [host.ip, *aliases]


def measure(model: Path, seconds: float = 8.0, subnet: str = "169.254.102") -> list[dict]:
    """Every attack in ATTACKS against one running cluster, in order."""
    from netns import bridged_hosts

    work = Path(tempfile.mkdtemp(prefix="mlxdist-attack-"))
    try:
        with bridged_hosts(4, subnet=subnet) as hosts:
            scenario = Scenario(hosts, model, work)
            try:
                return [scenario.attack(k, n, seconds) for k, n in ATTACKS]
            finally:
                scenario.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


WHAT = {
    "idle": "{n} idle connections (no byte) per agent",
    "slow": "{n} connections dribbling headers, a byte each 0.5 s, per agent",
    "upload": "{n} forged, well-formed 60 MiB uploads per agent at once, again as each is refused",
}


def table(rows: list[dict], command: str) -> str:
    lines = [
        "| attack | connections tried | accepted | agent RSS (growth) | signed request, slowest |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["stats"]
        tried = f"{s['tried']}"
        if r["kind"] != "upload":
            tried += f" (longest held {s['longest']:.1f} s)"
        else:
            tried += f" ({s['body_sent'] / MiB:.0f} MiB of a body sent at most)"
        rss = f"{r['rss_before_mib']:.0f} MiB (+{r['rss_growth_mib']:.1f} MiB)"
        lines.append(
            f"| {WHAT[r['kind']].format(n=r['count'])} | {tried} | {s['accepted']} | {rss} "
            f"| {r['slowest_s'] * 1000:.0f} ms over {r['probes']} probes |"
        )
    up = all(r["serving"] and not r["failures"] and not r["errors"] for r in rows)
    lines.append("")
    lines.append(f"The 2-rank cluster stayed up throughout: {'yes' if up else 'NO'}. ({command})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["agent", "launcher", "attack"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model", type=Path, help="a tiny-r1 folder (made when not given)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    parser.add_argument("--sources", default="", help=argparse.SUPPRESS)  # the attacker's
    args, rest = parser.parse_known_args()
    if args.role == "agent":
        return run_agent(Path(rest[0]), rest[1])
    if args.role == "launcher":
        return run_launcher(Path(rest[0]), rest[1:])
    if args.role == "attack":
        return run_attack(rest[0], rest[3:], int(rest[1]), float(rest[2]), args.sources.split(","))
    from netns import available

    if (why := available()) is not None:
        sys.exit(f"error: {why}")
    model = args.model
    if model is None:
        from mlxdist.testing.tiny_r1 import make_r1

        model = make_r1(Path(tempfile.mkdtemp(prefix="tiny-r1-")) / "tiny-r1", preset="tiny")
    rows = measure(model, args.seconds)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows, "sudo .venv/bin/python benchmarks/agent_under_attack.py"))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
