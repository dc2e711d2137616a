"""The agent over real HTTP: signed requests only, confined uploads, ranks started and stopped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT
from starlette.testclient import TestClient

from launcher.agent import StartRank, create_agent_app
from launcher.agent.ranks import NO_PDEATHSIG_ENV, rank_argv
from launcher.agent_client import AgentClient, AgentError
from launcher.auth import sign, sign_declared
from launcher.hostfile import free_ports
from launcher.secret import SecretError, create_secret, default_secret_path, load_secret
from mlxdist.testing.tiny_r1 import make_r1

MAX_BODY = 2**20
CHUNK = 64 * 1024
FACTS = {"hostname": "test-mac", "memory_gb": 64}

# argv: root, port, max_body, body_timeout, facts as JSON
AGENT = """
import json, sys
from pathlib import Path
from launcher.agent import create_agent_app, serve_agent
from launcher.secret import load_secret

root = Path(sys.argv[1])
facts = json.loads(sys.argv[5])
app = create_agent_app(
    load_secret(root / "secret"), root / "models", lambda: facts,
    runs_dir=root / "runs", max_body=int(sys.argv[3]), body_timeout=float(sys.argv[4]),
)
serve_agent(app, ["127.0.0.1"], int(sys.argv[2]), log_level="warning")
"""


@dataclass
class Agent:
    root: Path
    port: int
    secret: bytes
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def client(self, secret: bytes | None = None) -> AgentClient:
        return AgentClient(self.url, secret or self.secret, timeout=10)

    def ids(self) -> dict[str, str]:
        """node and boot: whom a request to this agent is signed for, from its signed hello."""
        with self.client() as c:
            answer = c.hello()
        return {"node": answer["node_id"], "boot": answer["boot_id"]}


@contextlib.contextmanager
def running_agent(
    root: Path,
    max_body: int = MAX_BODY,
    body_timeout: float = 2.0,
    facts: dict = FACTS,
    port: int | None = None,
):
    """A real agent process serving root/models on a loopback port (by default a free one)."""
    root.mkdir(parents=True, exist_ok=True)
    kept = root / "secret"  # a restart in the same root keeps its secret
    secret = load_secret(kept if kept.exists() else create_secret(kept))
    (root / "models").mkdir(exist_ok=True)
    port = port or free_ports(1)[0]
    log = open(root / "agent.log", "wb")
    cmd = [sys.executable, "-c", AGENT, str(root), str(port), str(max_body), str(body_timeout)]
    cmd.append(json.dumps(facts))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    agent = Agent(root, port, secret, proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                agent.client().health()
                break
            except AgentError:
                assert proc.poll() is None, (root / "agent.log").read_text()
                assert time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.1)
        yield agent
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        print((root / "agent.log").read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    base = tmp_path_factory.mktemp("agent")
    make_r1(base / "agent" / "models" / "tiny", preset="tiny")
    (base / "outside").mkdir()
    with running_agent(base / "agent") as a:
        yield a


def snapshot(top: Path) -> dict[str, tuple]:
    """Every path under top with its kind, size and content hash."""
    out = {}
    for p in sorted(top.rglob("*")):
        rel = str(p.relative_to(top))
        if p.name == "agent.log":
            continue
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir",)
    return out


def raw_request(
    agent: Agent,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    secret: bytes | None = None,
    signed_target: str | None = None,
    signed_body: bytes | None = None,
    **sign_kw,
) -> httpx.Response:
    """One request signed by hand, so that any part of it can be forged."""
    req = httpx.Request(method, agent.url + target, content=body)
    wire = req.url.raw_path.decode()
    headers = sign(
        secret or agent.secret,
        method,
        signed_target or wire,
        body if signed_body is None else signed_body,
        **(agent.ids() | sign_kw),
    )
    req.headers.update(headers)
    with httpx.Client() as c:
        return c.send(req)


def raw_socket(agent: Agent, data: bytes, then: bytes = b"", wait: float = 0.0) -> str:
    """Writes data, waits, writes then; returns what the agent answers before it closes."""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=15) as s:
        s.sendall(data)
        time.sleep(wait)
        with contextlib.suppress(OSError):
            s.sendall(then)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                received += chunk
    return received.decode(errors="replace")


def signed_head(agent: Agent, method: str, target: str, length: int) -> bytes:
    """Signed headers declaring a body of length bytes (of a digest no body will match)."""
    headers = sign_declared(agent.secret, method, target, "0" * 64, length, **agent.ids())
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_of(call) -> AgentError:
    with pytest.raises(AgentError) as info:
        call()
    return info.value


# --- signing and the secret ------------------------------------------------------------------


def test_secret_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXDIST_CONFIG", str(tmp_path / "conf"))
    path = create_secret(default_secret_path())
    assert path == tmp_path / "conf" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    secret = load_secret(path)
    assert len(secret) == 32 and path.read_text().strip() == secret.hex()
    with pytest.raises(SecretError, match="already exists"):
        create_secret(path)
    assert load_secret(path) == secret
    create_secret(path, force=True)
    assert load_secret(path) != secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(SecretError, match=f"chmod 600 {path}"):
        load_secret(path)
    with pytest.raises(SecretError, match="run mlxdist init"):
        load_secret(tmp_path / "nowhere" / "secret")


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.cluster
def test_facts_health_and_models(agent):
    node = agent.models / "cut" / "nodes" / "0"
    node.mkdir(parents=True)
    (node / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (node / "a.safetensors").write_bytes(b"abc")
    plan = {"split": [2, 2], "rank": 0, "fingerprint": "f"}
    files = [{"name": "a.safetensors", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}]
    manifest = {"format": "mlxdist-node", "plan": plan, "layers": [0, 2], "files": files}
    (node / "manifest.json").write_text(json.dumps(manifest))
    with agent.client() as c:
        facts = c.facts()
        assert {k: facts[k] for k in FACTS} == FACTS  # plus the free disk, read when asked
        assert 0 < facts["disk_free"] <= shutil.disk_usage(agent.models).total
        assert c.health()["ok"] is True
        models = {m["path"]: m for m in c.models()}
    assert models["tiny"]["config"]["model_type"] == "deepseek_v3"
    assert models["tiny"]["nodes"] == []
    with agent.client() as c:
        e = error_of(lambda: c.request("GET", "/no/such/path"))
        assert (e.status, str(e)) == (404, "Not Found")
        assert error_of(lambda: c.request("DELETE", "/models")).status == 405
        for params in ({"path": "x", "offset": "abc"}, {"offset": 0}, {"path": "x", "offset": -1}):
            e = error_of(lambda p=params: c.request("PUT", "/files/chunk", params=p, content=b"x"))
            assert e.status == 400, params
        for rel in ("caf\u00e9.bin", "x y", "a/\u0000"):
            assert error_of(lambda r=rel: c.file_status(r)).status == 400, rel
    [cut] = models["cut"]["nodes"]
    assert cut == {"path": "cut/nodes/0", "plan": plan, "layers": [0, 2], "complete": True}


class Interrupted(Exception):
    pass


@pytest.mark.cluster
def test_push_file_resumes_after_interruption(agent, tmp_path):
    local = tmp_path / "shard.safetensors"
    local.write_bytes(os.urandom(6 * CHUNK + 1234))
    rel = "pushed/nodes/1/shard.safetensors"
    target = agent.models / rel

    def stop_after_three(done: int, total: int) -> None:
        if done >= 3 * CHUNK:
            raise Interrupted

    with agent.client() as c:
        with pytest.raises(Interrupted):
            c.push_file(local, rel, chunk=CHUNK, progress=stop_after_three)
        assert c.file_status(rel) == {"size": 3 * CHUNK, "complete": False}
        assert not target.exists()
        seen: list[int] = []
        done = c.push_file(local, rel, chunk=CHUNK, progress=lambda d, t: seen.append(d))
        assert seen[0] == 4 * CHUNK and seen[-1] == local.stat().st_size  # resumed
        assert done["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
        assert target.read_bytes() == local.read_bytes()
        assert not target.with_name(target.name + ".partial").exists()
        assert c.file_status(rel) == {"size": local.stat().st_size, "complete": True}
        # Already there and verified: nothing is sent again.
        seen.clear()
        assert c.push_file(local, rel, chunk=CHUNK, progress=lambda d, t: seen.append(d))["already"]
        assert seen == []
        # Another file of the same size under that name is sent again.
        local.write_bytes(os.urandom(local.stat().st_size))
        c.push_file(local, rel, chunk=CHUNK)
        assert target.read_bytes() == local.read_bytes()
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        c.push_file(empty, "pushed/empty")
        assert (agent.models / "pushed" / "empty").read_bytes() == b""


@pytest.mark.cluster
def test_push_file_resumed_from_other_bytes_starts_again(agent, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(os.urandom(4 * CHUNK))
    new.write_bytes(os.urandom(4 * CHUNK))
    rel = "changed/file.bin"

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2 * CHUNK:
            raise Interrupted

    with agent.client() as c:
        with pytest.raises(Interrupted):
            c.push_file(old, rel, chunk=CHUNK, progress=stop_after_two)
        c.push_file(new, rel, chunk=CHUNK)
    assert (agent.models / rel).read_bytes() == new.read_bytes()


@pytest.mark.cluster
def test_upload_offsets_and_mismatches(agent):
    rel = "checks/file.bin"
    partial = agent.models / "checks" / "file.bin.partial"
    data = b"x" * 1000
    with agent.client() as c:

        def chunk(offset: int, body: bytes):
            return c.request(
                "PUT", "/files/chunk", params={"path": rel, "offset": offset}, content=body
            )

        def complete(size: int, sha: str):
            return c.request(
                "POST", "/files/complete", body={"path": rel, "size": size, "sha256": sha}
            )

        assert chunk(0, data[:600]) == {"size": 600}
        e = error_of(lambda: chunk(100, data[600:]))
        assert e.status == 409 and "600" in str(e)
        assert chunk(600, data[600:]) == {"size": 1000}
        sha = hashlib.sha256(data).hexdigest()
        # A size mismatch keeps the partial, so the upload can go on.
        assert error_of(lambda: complete(2000, sha)).status == 400
        assert partial.stat().st_size == 1000
        # A sha256 mismatch discards it: those bytes are wrong.
        e = error_of(lambda: complete(1000, "0" * 64))
        assert e.status == 400 and "sha256" in str(e)
        assert not partial.exists() and not (agent.models / rel).exists()
        assert error_of(lambda: complete(1000, sha)).status == 404
        assert chunk(0, data) == {"size": 1000}
        assert complete(1000, sha.upper())["already"] is False
        assert (agent.models / rel).read_bytes() == data
        assert error_of(lambda: complete(1000, "1" * 64)).status == 400
        assert (agent.models / rel).read_bytes() == data  # a finished file is never discarded


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.cluster
def test_unsigned_or_forged_requests_change_nothing(agent):
    before = snapshot(agent.root.parent)
    ranks_before = agent.client().ranks()  # in any order: a rank another test ran may be listed
    put = "/files/chunk?path=forged.bin&offset=0"
    assert httpx.get(agent.url + "/facts").status_code == 401
    r = httpx.get(agent.url + "/no/such/path")
    assert r.status_code == 401 and r.json() == {"error": "missing signature headers"}
    assert httpx.put(agent.url + put, content=b"data").status_code == 401
    assert httpx.post(agent.url + "/ranks/stop-all").status_code == 401
    r = raw_request(agent, "PUT", put, b"data", secret=b"w" * 32)
    assert r.status_code == 401 and r.json()["error"] == "bad signature"
    # Its refusal is signed with the secret the client does not hold: no proof either way.
    assert "did not prove it knows the cluster secret" in str(
        error_of(agent.client(b"w" * 32).facts)
    )
    r = raw_request(agent, "PUT", put, b"data", now=time.time() - 100)
    assert r.status_code == 401 and r.json()["error"] == "stale"
    assert raw_request(agent, "PUT", put, b"data", now=time.time() + 100).status_code == 401
    r = raw_request(agent, "PUT", put, b"tampered", signed_body=b"data")
    assert r.status_code == 401 and r.json()["error"] == "bad signature"  # the length differs
    r = raw_request(agent, "PUT", put, b"DATA", signed_body=b"data")
    assert r.status_code == 400 and "not the one the signature declares" in r.json()["error"]
    other = "/files/chunk?path=other.bin&offset=0"
    assert raw_request(agent, "PUT", other, b"data", signed_target=put).status_code == 401
    bad = {"X-Mlxdist-Timestamp": "soon", "X-Mlxdist-Nonce": "n", "X-Mlxdist-Signature": "s"}
    assert httpx.put(agent.url + put, content=b"x", headers=bad).status_code == 401
    assert snapshot(agent.root.parent) == before
    assert agent.client().ranks() == ranks_before


@pytest.mark.cluster
def test_replayed_request_is_refused(agent):
    put = "/files/chunk?path=replay.bin&offset=0"
    req = httpx.Request("PUT", agent.url + put, content=b"first")
    req.headers.update(sign(agent.secret, "PUT", put, b"first", **agent.ids()))
    with httpx.Client() as c:
        assert c.send(req).status_code == 200
        partial = agent.models / "replay.bin.partial"
        assert partial.read_bytes() == b"first"
        agent.client().request(
            "PUT", "/files/chunk", params={"path": "replay.bin", "offset": 0}, content=b"second"
        )
        r = c.send(req)  # the very same signed request again
        assert r.status_code == 401 and r.json()["error"] == "replayed"
    assert partial.read_bytes() == b"second"


BAD_PATHS = [
    "../x",
    "../outside/x",
    "a/../../x",
    "a/../b",
    "./x",
    "a//b",
    "a\\..\\x",
    "x\x00y",
    ".hidden",
    "-flag",
    "x.partial",
    "link/x",
    "evil.bin",
    "sneaky.bin",
]


@pytest.mark.cluster
def test_upload_paths_are_confined(agent):
    outside = agent.root.parent / "outside"
    models = agent.models
    (models / "link").symlink_to(outside, target_is_directory=True)
    (models / "evil.bin").symlink_to(outside / "evil.bin")
    (models / "sneaky.bin.partial").symlink_to(outside / "sneaky.bin.partial")
    absolute = [str(outside / "abs.bin"), "/etc/passwd"]
    before = snapshot(agent.root.parent)
    with agent.client() as c:
        for rel in BAD_PATHS + absolute:
            params = {"path": rel, "offset": 0}
            status = error_of(
                lambda p=params: c.request("PUT", "/files/chunk", params=p, content=b"x")
            )
            assert status.status == 400, rel
            if rel != "sneaky.bin":  # its partial is refused only when written through
                assert error_of(lambda r=rel: c.file_status(r)).status == 400, rel
            body = {"path": rel, "size": 1, "sha256": "0" * 64}
            e = error_of(lambda b=body: c.request("POST", "/files/complete", body=b))
            assert e.status == 400, rel
        e = error_of(lambda: c.request("GET", "/files/status", params={"path": "a" * 2000}))
        assert e.status == 400
    assert snapshot(agent.root.parent) == before
    assert list(outside.iterdir()) == []
    for link in ("link", "evil.bin", "sneaky.bin.partial"):
        (models / link).unlink()


@pytest.mark.cluster
def test_oversize_body_is_refused(agent):
    before = snapshot(agent.root.parent)
    with agent.client() as c:
        e = error_of(
            lambda: c.request(
                "PUT",
                "/files/chunk",
                params={"path": "big.bin", "offset": 0},
                content=b"x" * (MAX_BODY + 1),
            )
        )
        assert e.status == 413
    # Refused on its declared length, before a byte of the body is read.
    target = "/files/chunk?path=big.bin&offset=0"
    answer = raw_socket(agent, signed_head(agent, "PUT", target, 10**12))
    assert answer.startswith("HTTP/1.1 413"), answer
    # A stranger is refused before that.
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode()
    assert raw_socket(agent, head).startswith("HTTP/1.1 401")
    assert snapshot(agent.root.parent) == before


@pytest.mark.cluster
def test_slow_body_is_cut_off(agent):
    target = "/files/chunk?path=slow.bin&offset=0"
    t0 = time.monotonic()
    answer = raw_socket(agent, signed_head(agent, "PUT", target, 100) + b"x" * 10, wait=0.0)
    assert answer.startswith("HTTP/1.1 408"), answer
    assert time.monotonic() - t0 < 10
    assert not (agent.models / "slow.bin.partial").exists()


def rank_request(**changes) -> dict:
    body = {
        "model": "tiny",
        "split": [4],
        "rank": 0,
        "hostfile": [],
        "http_host": "127.0.0.1",
        "http_port": 18080,
        "name": "tiny",
        "backend": "ring",
    }
    return {k: v for k, v in (body | changes).items() if v is not ...}


BAD_RANKS = [
    {"model": "missing"},
    {"model": "../../bin"},
    {"model": "/bin"},
    {"model": "tiny/../../x"},
    {"model": "tiny/config.json"},
    {"model": "--help"},
    {"model": ...},
    {"name": "--evil"},
    {"name": "a b"},
    {"name": "x;rm -rf /"},
    {"name": "x" * 65},
    {"split": ["1;rm"]},
    {"split": "4"},
    {"split": [0]},
    {"split": []},
    {"split": [4.5]},
    {"split": [1] * 65},
    {"split": [1001]},
    {"rank": 1},
    {"rank": -1},
    {"rank": "0"},
    {"rank": True},
    {"cmd": "touch /tmp/pwned"},
    {"env": {"LD_PRELOAD": "x"}},
    {"http_host": "localhost"},
    {"http_host": "127.0.0.1 --evil"},
    {"http_host": "--evil"},
    {"http_port": 80},
    {"http_port": "8080"},
    {"http_port": 70000},
    {"backend": "mpi"},
    {"backend": "--x"},
    {"split": [2, 2]},
    {"split": [2, 2], "hostfile": [["127.0.0.1:5000"], ["evil;rm:5001"]]},
    {"split": [2, 2], "hostfile": [["127.0.0.1:5000"], ["--x:5001"]]},
    {"split": [2, 2], "hostfile": [["127.0.0.1:5000"], ["127.0.0.1:-1"]]},
    {"split": [2, 2], "hostfile": [["127.0.0.1:5000"], []]},
    {"hostfile": [["127.0.0.1:5000"], ["127.0.0.1:5001"]]},
]


@pytest.mark.cluster
def test_start_rank_refuses_bad_requests(agent):
    """Starts nothing; holds in any order (the module's agent may hold a rank already stopped)."""
    before = snapshot(agent.root.parent)
    runs_before = sorted(agent.runs.iterdir())
    with agent.client() as c:
        ranks_before = c.ranks()
        assert not any(r["alive"] for r in ranks_before)
        for change in BAD_RANKS:
            e = error_of(lambda ch=change: c.start_rank(**rank_request(**ch)))
            assert e.status == 400, (change, str(e))
        e = error_of(lambda: c.start_rank(**rank_request(model="missing")))
        assert "not a model folder" in str(e)
        assert c.ranks() == ranks_before
        assert error_of(lambda: c.log("0123456789ab")).status == 404
        assert error_of(lambda: c.stop("0123456789ab")).status == 404
        assert c.stop_all() == ranks_before
        assert error_of(lambda: c.request("POST", "/ranks", content=b"{not json")).status == 400
        assert error_of(lambda: c.request("POST", "/ranks", body=[1])).status == 400
        assert (
            error_of(lambda: c.request("GET", "/ranks/x/log", params={"tail": "x"})).status == 400
        )
    assert snapshot(agent.root.parent) == before
    assert sorted(agent.runs.iterdir()) == runs_before


def test_rank_request_and_argv():
    ok = rank_request(split=[2, 2], rank=1, hostfile=[["10.0.0.1:5000"], ["10.0.0.2:5000"]])
    req = StartRank.model_validate(ok)
    argv = rank_argv("/py", Path("/m/tiny"), req)
    assert argv == [
        "/py",
        "-m",
        "mlxdist.rank",
        "--model",
        "/m/tiny",
        "--split",
        "2,2",
        "--host",
        "127.0.0.1",
        "--port",
        "18080",
        "--name",
        "tiny",
        "--backend",
        "ring",
    ]


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_health(port: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no rank answered on port {port}")


@pytest.mark.cluster
def test_rank_starts_serves_and_stops(agent):
    http_port = free_ports(1)[0]
    with agent.client() as c:
        started = c.start_rank(**rank_request(http_port=http_port, name="tiny-agent"))
        pid = started["pid"]
        try:
            assert wait_health(http_port)["model"] == "tiny-agent"
            assert psutil.Process(pid).cmdline()[1:] == [
                "-m",
                "mlxdist.rank",
                "--model",
                str((agent.models / "tiny").resolve()),
                "--split",
                "4",
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--name",
                "tiny-agent",
                "--backend",
                "ring",
            ]
            env = psutil.Process(pid).environ()
            assert env["MLX_RANK"] == "0"
            assert "MLX_WORLD_SIZE" not in env  # mlx.launch sets no such variable
            assert "MLX_HOSTFILE" not in env
            [run] = c.ranks()
            assert run == {
                "id": started["id"],
                "rank": 0,
                "pid": pid,
                "alive": True,
                "returncode": None,
                "model": "tiny",
            }
            # Busy agent, then idle for longer than its worker threads live: the rank must
            # not die with the thread that happened to start it.
            threads = [threading.Thread(target=agent.client().health) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(11)
            for _ in range(3):
                c.health()
            time.sleep(0.5)
            assert pid_alive(pid) and c.ranks()[0]["alive"]
            assert "serving on" in c.log(started["id"], tail=50)
        finally:
            stopped = c.stop(started["id"])
        assert stopped["alive"] is False and stopped["returncode"] is not None
        assert not pid_alive(pid)
        assert c.ranks()[0]["alive"] is False


@pytest.mark.parametrize(
    "how, pdeathsig",
    [
        (signal.SIGTERM, True),
        pytest.param(
            signal.SIGKILL,
            True,
            marks=pytest.mark.skipif(
                sys.platform != "linux",
                reason="a SIGKILLed agent's ranks die by prctl's parent-death signal, Linux only",
            ),
        ),
        # macOS has no parent-death signal: the rank's own watch of its parent is all.
        (signal.SIGKILL, False),
    ],
)
@pytest.mark.cluster
def test_ranks_die_with_their_agent(tmp_path, monkeypatch, how, pdeathsig):
    if not pdeathsig:
        monkeypatch.setenv(NO_PDEATHSIG_ENV, "1")  # the agent inherits it
    make_r1(tmp_path / "agent" / "models" / "tiny", preset="tiny")
    http_port = free_ports(1)[0]
    with running_agent(tmp_path / "agent") as a:
        started = a.client().start_rank(**rank_request(http_port=http_port))
        wait_health(http_port)
        a.proc.send_signal(how)
        a.proc.wait(15)
    deadline = time.monotonic() + 10
    while pid_alive(started["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(started["pid"])
    if not pdeathsig:  # it left on its own, not by a signal
        log = (a.runs / started["id"] / "rank.log").read_text()
        assert "leaving: the process that started it is gone" in log


@pytest.mark.cluster
def test_app_shutdown_stops_its_ranks(tmp_path):
    make_r1(tmp_path / "models" / "tiny", preset="tiny")
    secret = b"s" * 32
    app = create_agent_app(secret, tmp_path / "models", dict, runs_dir=tmp_path / "runs")
    body = json.dumps(rank_request(http_port=free_ports(1)[0])).encode()
    ids = {"node": app.state.node_id, "boot": app.state.boot_id}
    headers = sign(secret, "POST", "/ranks", body, **ids) | {"Content-Type": "application/json"}
    with TestClient(app) as http:
        assert http.post("/ranks", content=body, headers=headers).status_code == 200
        [run] = app.state.runs.all()
    assert run.proc.returncode == -signal.SIGTERM  # stopped by the agent, not left behind
