"""The API's guards on a real rank serving real HTTP (issue 15, the API part): the key on every
route in OpenAI's 401 shape, the official openai client with the key, `serve` refusing an open
API beyond loopback, the 4 MiB body limit enforced while reading (rank 0 does not grow), the Host
check against DNS rebinding, CORS only for the named origins, and `mlxdist chat --api-key`.

One rank of tiny-r1 for the whole module, with the production limits (docs/security.md)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from conftest import ROOT, run_cli

from launcher.local import start_local, wait_ready

KEY = "test-key-0123456789abcdef"
ORIGIN = "http://app.example:3000"
EXTRA_HOST = "mlx.lan"
MiB = 2**20
QUESTION = [{"role": "user", "content": "hi"}]
# OpenAI's answer to a wrong key: https://platform.openai.com/docs/guides/error-codes
WRONG = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


# ------------------------------------------------------------------ no rank: refused at once


def test_serve_on_every_interface_without_a_key_refuses_to_start():
    """The real command, in a process of its own: one line, exit 1, before any rank."""
    started = time.monotonic()
    r = run_cli("serve", "--host", "0.0.0.0", env={"MLXDIST_API_KEY": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "--host 0.0.0.0" in lines[0] and "--api-key" in lines[0], lines
    assert "--insecure-no-api-key" in lines[0] and "Traceback" not in r.stderr + r.stdout
    assert time.monotonic() - started < 30  # no model read, no rank started


def one_error(*args: str) -> str:
    from typer.testing import CliRunner

    from mlxdist.cli import app

    result = CliRunner().invoke(app, list(args), env={"MLXDIST_API_KEY": ""})
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--local", "1", "--host", "192.168.1.20"], "--insecure-no-api-key"),
        (["--host", "::"], "--insecure-no-api-key"),
        (["--host", "mac-studio.local"], "--insecure-no-api-key"),
        (["--hosts", "hosts.toml"], "--insecure-no-api-key"),
        (["--api-key", "short"], "8 to 256 printable"),
        (["--api-key-file", "/nonexistent/key"], "cannot read the API key file"),
        (["--cors-origin", "*"], "--cors-origin takes an origin"),
    ],
)
def test_serve_refusals_are_one_line(args, fragment):
    assert fragment in one_error("serve", *args)


@pytest.mark.parametrize(
    "header,name",
    [
        ("localhost:8080", "localhost"),
        ("LocalHost.", "localhost"),
        ("[::1]:8080", "::1"),
        ("::1", "::1"),
        ("10.0.0.5", "10.0.0.5"),
        ("evil.example:80", "evil.example"),
        ("", ""),
    ],
)
def test_the_name_a_host_header_gives(header, name):
    from mlxdist.serving.guard import host_name

    assert host_name(header) == name


def test_names_bound_to_loopback_a_lan_address_and_every_interface():
    from mlxdist.serving.guard import bound_names

    me = socket.gethostname().lower()
    assert {"localhost", "127.0.0.1", "::1", me} <= bound_names("127.0.0.1")
    lan = bound_names("192.168.1.20", ("mlx.lan",))
    assert {"192.168.1.20", "mlx.lan", me} <= lan and "localhost" not in lan
    assert "localhost" in bound_names("0.0.0.0") and "evil.example" not in bound_names("0.0.0.0")


# ------------------------------------------------------------------ the key's way to rank 0


def test_an_agent_puts_the_key_in_rank_0s_environment_only(monkeypatch, tmp_path):
    from launcher.agent.ranks import Runs
    from launcher.agent.requests import StartRank
    from launcher.rankspec import API_KEY_ENV, RankSpec

    calls = []

    class Popen:
        pid = 4242

        def __init__(self, args, env, **_):
            calls.append((list(args), env))

    monkeypatch.setattr("subprocess.Popen", Popen)
    monkeypatch.setenv(API_KEY_ENV, "the-agents-own-0000")  # never passed on by itself
    (tmp_path / "runs").mkdir()
    runs = Runs(tmp_path / "runs", "/py")
    req = {"model": "tiny", "split": [2, 2], "http_host": "10.0.0.1", "http_port": 18080}
    req |= {"name": "tiny", "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5000"]]}
    api = {"api_key": KEY, "max_body_mb": 8, "docs": True}
    api |= {"allowed_hosts": [EXTRA_HOST], "cors_origins": [ORIGIN]}
    assert KEY not in repr(StartRank(**req, **api, rank=0))
    runs.start(tmp_path, StartRank(**req, **api, rank=0))
    runs.start(tmp_path, StartRank(**req, rank=1))
    (argv0, env0), (_, env1) = calls
    assert env0[API_KEY_ENV] == KEY and API_KEY_ENV not in env1
    assert not any(KEY in word for word in argv0)
    spec = RankSpec.from_argv(argv0[3:])
    assert (spec.max_body_mb, spec.docs) == (8, True)
    assert spec.allowed_hosts == (EXTRA_HOST,) and spec.cors_origins == (ORIGIN,)
    with pytest.raises(ValueError):
        StartRank(**req, rank=0, cors_origins=["http://a.example/$(reboot)"])


@pytest.mark.parametrize("token", ["ab" * 16, ""])
def test_over_ssh_the_key_goes_on_stdin_into_the_environment(token, tmp_path):
    from launcher.rankenv import RankEnv
    from launcher.ssh import rank_script

    show = 'printf "%s|%s" "$MLXDIST_API_KEY" "$MLXDIST_HEARTBEAT_TOKEN"'
    script = rank_script(RankEnv({}), "sh", ["-c", show], str(tmp_path / "pid"))
    assert KEY not in script
    line = f"{token or '-'} {KEY}\n"  # as SshClient.start_rank writes it for rank 0
    done = subprocess.run(["sh", "-c", script], input=line, capture_output=True, text=True)
    assert done.stdout == f"{KEY}|{token}", done.stderr


# ------------------------------------------------------------------ one real rank, keyed


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tiny_r1, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    api = {"api_key": KEY, "cors_origins": (ORIGIN,), "allowed_hosts": (EXTRA_HOST,)}
    cluster = start_local(tiny_r1, [4], api=api)
    try:
        wait_ready(cluster, timeout=300)
        yield cluster
    finally:
        cluster.stop()
        print(f"--- rank 0 log ---\n{cluster.log_tail(0, 30)}")


def authed(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.cluster
def test_the_key_never_travels_on_a_command_line(served):
    argv = Path(f"/proc/{served.procs[0].pid}/cmdline").read_bytes()
    assert KEY.encode() not in argv and b"--model" in argv


@pytest.mark.cluster
@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("POST", "/mlxdist/logits"),
        ("GET", "/mlxdist/stats"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_no_key_or_a_wrong_key_gets_openai_401(served, method, path):
    body = {"messages": QUESTION, "prompt": [1, 2], "max_tokens": 1}
    for headers, code in [({}, None), (authed("wrong-key-0000"), "invalid_api_key")]:
        r = httpx.request(method, served.url + path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert error["code"] == code and "API key" in error["message"]
        assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    r = httpx.request(method, served.url + path, headers={"Authorization": f"Basic {KEY}"})
    assert r.status_code == 401 and r.json()["error"] == WRONG | {"message": ANY_MESSAGE}


class _Any:
    def __eq__(self, other) -> bool:
        return isinstance(other, str)


ANY_MESSAGE = _Any()


@pytest.mark.cluster
def test_the_official_openai_client_with_the_key(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny-r1", messages=QUESTION, max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens >= 1
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"


@pytest.mark.cluster
def test_health_is_open_and_says_nothing_more_without_the_key(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    full = httpx.get(served.url + "/health", headers=authed()).json()
    assert full["status"] == "ok" and full["nodes"][0]["host"] and full["vocab_size"]


@pytest.mark.cluster
def test_docs_routes_are_off_by_default(served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(served.url + path, headers=authed()).status_code == 404, path


# ------------------------------------------------------------------ body limit


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _head(url: str, extra: str) -> bytes:
    host = urlsplit(url).netloc
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def declared_too_large(url: str, size: int = 64 * MiB) -> int:
    """Headers declaring size bytes, no body sent: the answer comes without it."""
    with _connect(url) as s:
        s.sendall(_head(url, f"Content-Length: {size}\r\n"))
        return _status(s.recv(65536))


def streamed_too_large(url: str, size: int = 64 * MiB) -> tuple[int, int]:
    """A chunked body of up to size bytes, sent until the server answers: (status, bytes sent)."""
    piece = b"%x\r\n" % MiB + b" " * MiB + b"\r\n"
    sent = 0
    with _connect(url) as s:
        s.sendall(_head(url, "Transfer-Encoding: chunked\r\n") + b"%x\r\n{\r\n" % 1)
        answer = b""
        while sent < size:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(piece)
            except OSError:  # closed after its answer: read it below
                break
            sent += MiB
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            pass
        return (_status(answer) if answer else 0), sent


@pytest.mark.cluster
def test_a_body_over_the_limit_gets_413_and_rank_0_does_not_grow(served):
    url, pid = served.url, served.procs[0].pid
    # Under the 4 MiB limit: read and judged (an unknown model), not refused for its size.
    pad = {"model": "nope", "messages": QUESTION, "pad": "x" * (3 * MiB)}
    r = httpx.post(url + "/v1/chat/completions", json=pad, headers=authed(), timeout=60)
    assert r.status_code == 404, r.text
    over = httpx.post(url + "/v1/completions", content=b"{" + b" " * 4 * MiB, headers=authed())
    assert over.status_code == 413 and over.json()["error"]["code"] == "body_too_large"
    # Anthropic's clients get Anthropic's shape, for this refusal and a wrong method alike
    over = httpx.post(url + "/v1/messages", content=b"{" + b" " * 4 * MiB, headers=authed())
    assert over.status_code == 413 and over.json()["error"]["type"] == "request_too_large"
    wrong = httpx.get(url + "/v1/messages", headers=authed())
    assert wrong.status_code == 405 and wrong.json()["type"] == "error", wrong.text
    assert declared_too_large(url) == 413 and streamed_too_large(url)[0] == 413  # warm
    # The loop answers stats after it has kept the last answer's caches (the prefix cache does
    # so once the answer is out): none of that lands inside the measurement below.
    assert httpx.get(url + "/mlxdist/stats", headers=authed(), timeout=60).status_code == 200
    before = rss(pid)
    for _ in range(4):
        assert declared_too_large(url) == 413
        status, sent = streamed_too_large(url)
        assert status == 413 and 4 * MiB <= sent < 32 * MiB, sent
    grown = rss(pid) - before
    print(
        f"rank 0 rss {before / MiB:.1f} MiB, grew {grown / MiB:.2f} MiB over 8 refused bodies"
        f" (chunked: {sent / MiB:.0f} MiB sent before the 413)"
    )
    assert grown < 4 * MiB
    assert httpx.get(url + "/v1/models", headers=authed()).status_code == 200


# ------------------------------------------------------------------ Host and CORS


@pytest.mark.cluster
def test_a_foreign_host_gets_400(served):
    port = urlsplit(served.url).port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", ""):
        r = httpx.get(served.url + "/v1/models", headers=authed() | {"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    r = httpx.get(served.url + "/health", headers={"Host": "evil.example"})
    assert r.status_code == 400  # the open route too
    r = httpx.post(served.url + "/v1/messages", headers=authed() | {"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", EXTRA_HOST, socket.gethostname()):
        r = httpx.get(served.url + "/v1/models", headers=authed() | {"Host": host})
        assert r.status_code == 200, host


@pytest.mark.cluster
def test_cors_only_for_the_named_origin(served):
    def cors(r: httpx.Response) -> dict:
        return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}

    url = served.url + "/v1/models"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    for origin in ("http://evil.example", "null"):
        assert cors(httpx.get(url, headers=authed() | {"Origin": origin})) == {}
        assert cors(httpx.options(url, headers=preflight | {"Origin": origin})) == {}
    assert cors(httpx.get(url, headers=authed())) == {}
    got = httpx.get(url, headers=authed() | {"Origin": ORIGIN})
    assert got.status_code == 200 and cors(got)["access-control-allow-origin"] == ORIGIN
    early = httpx.options(url, headers=preflight | {"Origin": ORIGIN})  # a preflight has no key
    assert early.status_code == 200 and cors(early)["access-control-allow-origin"] == ORIGIN
    assert "authorization" in cors(early)["access-control-allow-headers"].lower()
    # the official browser SDKs' own headers pass the preflight too
    sdk = preflight | {"Access-Control-Request-Headers": "x-stainless-os,anthropic-beta,x-api-key"}
    early = httpx.options(served.url + "/v1/messages", headers=sdk | {"Origin": ORIGIN})
    assert early.status_code == 200, early.text
    assert "x-stainless-os" in cors(early)["access-control-allow-headers"].lower()
    refused = httpx.get(url, headers={"Origin": ORIGIN})  # the page can read its 401
    assert refused.status_code == 401 and cors(refused)["access-control-allow-origin"] == ORIGIN


# ------------------------------------------------------------------ mlxdist chat


@pytest.mark.cluster
def test_mlxdist_chat_with_the_key(served, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | {"HOME": str(tmp_path)}

    def chat(*extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "mlxdist.cli", "chat", "--url", served.url, *extra]
        return subprocess.run(
            [*args, "--max-tokens", "3"],
            input="hi\n",
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )

    ok = chat("--api-key", KEY)
    assert ok.returncode == 0 and "tok/s" in ok.stderr + ok.stdout, ok.stderr
    no = chat()
    assert no.returncode != 0 and "API key" in no.stderr and "Traceback" not in no.stderr
