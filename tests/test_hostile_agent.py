"""Hostile requests against a real agent over real HTTP, table-driven.

Every case must be refused with its 4xx; afterwards the agent still answers a signed request, has
started no rank, and nothing outside its models folder changed (nor any file inside it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import netns
import psutil
import pytest
from conftest import ROOT
from test_agent import running_agent
from test_cluster_hosts import Machine, cli, listening

from launcher.agent_client import AgentClient
from launcher.auth import (
    ANY,
    CONTENT_SHA256,
    NONCE,
    SIGNATURE,
    TARGET,
    TARGET_BOOT,
    TIMESTAMP,
    sign,
    sign_declared,
)

pytestmark = pytest.mark.cluster

MAX_BODY = 4096
R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"
BODY_TIMEOUT = 2.0

HISTOGRAM: Counter[int] = Counter()
SENT: set[int] = set()  # id() of each hostile case sent to the module's agent so far


@dataclass
class Agent:
    base: Path  # the test's whole tmp tree
    root: Path
    port: int
    secret: bytes
    proc: subprocess.Popen
    before: dict = field(default_factory=dict)
    node: str = ""  # whom requests are signed for: from the agent's signed hello
    boot: str = ""

    @property
    def models(self) -> Path:
        return self.root / "models"


def snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(top.rglob("*")):
        if p.name == "agent.log":
            continue
        rel = p.relative_to(top).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir",)
    return out


# --- raw HTTP: nothing normalised, every byte as written ------------------------------------


def exchange(port: int, data: bytes, timeout: float = 15) -> int:
    """Sends data on a fresh connection; the status of the answer (0 when there is none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                received += chunk
    line = received.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0


def wire(method: str, target: str | bytes, headers: list[tuple[str, str]], body: bytes) -> bytes:
    target = target if isinstance(target, bytes) else target.encode()
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    head += [b"Connection: close"]
    head += [f"{k}: {v}".encode("utf-8", "surrogateescape") for k, v in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def signed(agent: Agent, method: str, target: str | bytes, body: bytes = b"", **kw) -> dict:
    t = target if isinstance(target, str) else target.decode("latin-1")
    return sign(agent.secret, method, t, body, **({"node": agent.node, "boot": agent.boot} | kw))


def send(
    agent: Agent,
    method: str,
    target: str | bytes,
    body: bytes = b"",
    auth: dict | None = None,
    extra: list[tuple[str, str]] | None = None,
    length: bool = True,
) -> int:
    headers = list((signed(agent, method, target, body) if auth is None else auth).items())
    if length:
        headers.append(("Content-Length", str(len(body))))
    headers += extra if extra is not None else [("Content-Type", "application/json")]
    return exchange(agent.port, wire(method, target, headers, body))


def ok(agent: Agent, method: str, target: str, body: bytes = b"") -> int:
    return send(agent, method, target, body)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    (outside / "target").write_text("do not touch")
    with running_agent(base / "agent", MAX_BODY, BODY_TIMEOUT, {"hostname": "hostile"}) as started:
        a = Agent(base, started.root, started.port, started.secret, started.proc)
        a.node, a.boot = started.ids()["node"], started.ids()["boot"]
        models = a.models
        tiny = models / "tiny"  # a real-looking model folder: a start would pass _model_folder
        tiny.mkdir()
        (tiny / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
        (models / "link_out").symlink_to(Path("..") / ".." / "outside")
        (models / "link_abs").symlink_to(outside)
        (models / "dangle").symlink_to(outside / "new")
        (models / "d").mkdir()
        (models / "d" / "f.partial").symlink_to(outside / "target")
        (tiny / "evil").symlink_to(outside)
        (models / "afile").write_text("x")
        a.before = snapshot(base)
        a.rss = psutil.Process(started.proc.pid).memory_info().rss  # before any hostile byte
        yield a


# --- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    method: str
    target: str | bytes
    body: bytes = b""
    expect: int | tuple[int, ...] = 400
    # (agent, method, target, body) -> signature headers; None: signed correctly
    auth: Callable[[Agent, str, str | bytes, bytes], dict] | None = None
    extra: list[tuple[str, str]] | None = None


START = {
    "model": "tiny",
    "split": [2, 2],
    "rank": 0,
    "hostfile": [["127.0.0.1:5000"], ["127.0.0.1:5001"]],
    "http_host": "127.0.0.1",
    "http_port": 8000,
    "name": "r0",
}
SHA = hashlib.sha256(b"evil").hexdigest()
COMPLETE = {"path": "x/y", "size": 4, "sha256": SHA}

ENDPOINTS = [
    ("GET", "/health", b""),
    ("GET", "/ranks", b""),
    ("POST", "/ranks", json.dumps(START).encode()),
    ("PUT", "/files/chunk?path=x/y&offset=0", b"evil"),
    ("POST", "/files/complete", json.dumps(COMPLETE).encode()),
    ("GET", "/no/such/path", b""),
    ("POST", "/ranks/stop-all", b""),
]


def _drop(name: str):
    def auth(a, m, t, b):
        h = signed(a, m, t, b)
        del h[name]
        return h

    return auth


def _set(name: str, value: str):
    def auth(a, m, t, b):
        return signed(a, m, t, b) | {name: value}

    return auth


def _at(offset: float | None, absolute: float | None = None):
    def auth(a, m, t, b):
        return signed(a, m, t, b, now=absolute if absolute is not None else time.time() + offset)

    return auth


def _for_body(signed_body: bytes):
    def auth(a, m, t, b):
        return signed(a, m, t, signed_body)

    return auth


def _upper_sig(a, m, t, b):
    h = signed(a, m, t, b)
    return h | {SIGNATURE: h[SIGNATURE].upper()}


def _flip_sig(a, m, t, b):
    h = signed(a, m, t, b)
    s = h[SIGNATURE]
    return h | {SIGNATURE: ("1" if s[0] == "0" else "0") + s[1:]}


AUTH_MUTATIONS: dict[str, Callable] = {
    "no-headers": lambda a, m, t, b: {},
    "no-timestamp": _drop(TIMESTAMP),
    "no-nonce": _drop(NONCE),
    "no-signature": _drop(SIGNATURE),
    "ts-letters": _set(TIMESTAMP, "abc"),
    "ts-empty": _set(TIMESTAMP, ""),
    "ts-negative": _set(TIMESTAMP, "-1"),
    "ts-exponent": _set(TIMESTAMP, "1e10"),
    "ts-hex": _set(TIMESTAMP, "0x10"),
    "ts-long": _set(TIMESTAMP, "1" * 40),
    "nonce-short": _set(NONCE, "abc"),
    "nonce-nonhex": _set(NONCE, "g" * 32),
    "nonce-upper": _set(NONCE, "A" * 32),
    "nonce-long": _set(NONCE, "0" * 65),
    "sig-short": _set(SIGNATURE, "0" * 63),
    "sig-nonhex": _set(SIGNATURE, "z" * 64),
    "sig-upper": _upper_sig,
    "sig-flipped": _flip_sig,
    "sig-empty": _set(SIGNATURE, ""),
    "wrong-secret": lambda a, m, t, b: sign(b"w" * 32, m, t if isinstance(t, str) else "", b),
    "stale-31s": _at(-31),
    "stale-1day": _at(-86400),
    "stale-epoch": _at(None, 0),
    "future-31s": _at(31),
    "future-1day": _at(86400),
    "future-far": _at(None, 999_999_999_999),
    "tampered-method": lambda a, m, t, b: signed(a, "DELETE" if m != "DELETE" else "GET", t, b),
    "tampered-path": lambda a, m, t, b: signed(a, m, "/health" if t != "/health" else "/ranks", b),
    "tampered-query": lambda a, m, t, b: signed(a, m, f"{t}{'&' if '?' in t else '?'}x=1", b),
    "tampered-body": lambda a, m, t, b: signed(a, m, t, b + b" "),
    # Well formed and signed, but for another agent, for any agent, or for an earlier start.
    "for-another-node": lambda a, m, t, b: signed(a, m, t, b, node="another-node"),
    "for-any-node": lambda a, m, t, b: signed(a, m, t, b, node=ANY, boot=ANY),
    "for-an-earlier-boot": lambda a, m, t, b: signed(a, m, t, b, boot="0" * 32),
    "no-target": _drop(TARGET),
    "no-target-boot": _drop(TARGET_BOOT),
    "no-content-sha": _drop(CONTENT_SHA256),
    # Forged but well formed: every header the right shape, the MAC not from the secret.
    "forged-digest": _set(CONTENT_SHA256, "0" * 64),
    "forged-target": _set(TARGET, "another-node"),
    "forged-boot": _set(TARGET_BOOT, "1" * 32),
    "forged-all": lambda a, m, t, b: {
        TIMESTAMP: str(int(time.time())),
        NONCE: os.urandom(16).hex(),
        SIGNATURE: os.urandom(32).hex(),
        CONTENT_SHA256: hashlib.sha256(b).hexdigest(),
        TARGET: a.node,
        TARGET_BOOT: a.boot,
    },
}

AUTH_CASES = [
    Case(f"auth-{name}-{m}-{t}", m, t, b, 401, auth=mut)
    for name, mut in AUTH_MUTATIONS.items()
    for m, t, b in ENDPOINTS
] + [
    # The signed headers are right; the body that follows is another of the same length.
    Case(f"auth-body-swapped-{m}-{t}", m, t, bytes(reversed(b)), 400, auth=_for_body(b))
    for m, t, b in ENDPOINTS
    if b and bytes(reversed(b)) != b
]

# Paths refused for uploads: traversal, absolute, encodings, backslashes, NUL, unicode tricks.
BAD_PATHS = [
    "../x",
    "../../outside/target",
    "a/../../x",
    "..",
    ".",
    "./x",
    "a/./b",
    "a/..",
    "/etc/passwd",
    "/tmp/x",
    "//x",
    "a//b",
    "a/",
    "..\\x",
    "a\\b",
    "C:\\x",
    "x\x00y",
    "\x00",
    "%2e%2e/x",
    "%2e%2e%2fx",
    "..%2fx",
    "\u2025/x",  # two-dot leader
    "\uff0e\uff0e/x",  # fullwidth dots
    "caf\u00e9",
    "a\u202eb",  # right-to-left override
    ".\u200b./x",  # zero-width space
    "x\n",
    " x",
    "x y",
    "a:b",
    ".hidden",
    "-rf",
    "x.partial",
    "a/b.partial",
    "/".join(["a"] * 17),
    "a" * 256,
    "a/" * 600,
    # symlinks prepared in the models folder
    "link_out/x",
    "link_out",
    "link_abs/x",
    "dangle",
    "dangle/x",
    "d/f",
    "tiny/evil/x",
]

# Query strings sent byte for byte: the agent decodes them, to something refused.
RAW_QUERY_PATHS = [
    "%2e%2e%2fx",
    "..%2Fx",
    "%2E%2E/x",
    "%c0%ae%c0%ae/x",
    "%00",
    "..%5cx",
    "%u002e%u002e/x",
    "%2fetc%2fpasswd",
    "x%0a",
    "%ff%fe",
]


def _path_cases() -> list[Case]:
    cases = []
    for i, p in enumerate(BAD_PATHS):
        q = quote(p, safe="")
        cases.append(Case(f"status-path{i}:{p[:20]!r}", "GET", f"/files/status?path={q}"))
        cases.append(
            Case(f"chunk-path{i}:{p[:20]!r}", "PUT", f"/files/chunk?path={q}&offset=0", b"evil")
        )
        body = json.dumps({"path": p, "size": 4, "sha256": SHA}).encode()
        expect = 400
        cases.append(Case(f"complete-path{i}:{p[:20]!r}", "POST", "/files/complete", body, expect))
    for i, q in enumerate(RAW_QUERY_PATHS):
        cases.append(Case(f"status-raw{i}:{q}", "GET", f"/files/status?path={q}"))
        cases.append(Case(f"chunk-raw{i}:{q}", "PUT", f"/files/chunk?path={q}&offset=0", b"evil"))
    # Unencoded bytes in the request target: refused by the HTTP parser or by the agent.
    for i, raw in enumerate([b"../x", b"/etc/passwd", b"a b", b"\xc3\xa9", b"a\\b"]):
        cases.append(Case(f"chunk-bytes{i}", "PUT", b"/files/chunk?offset=0&path=" + raw, b"e"))
    # Query parameters of the wrong shape.
    for i, q in enumerate(
        ["offset=0", "path=x", "path=x&offset=-1", "path=x&offset=abc", "path=x&offset=1e3"]
    ):
        cases.append(Case(f"chunk-query{i}:{q}", "PUT", f"/files/chunk?{q}", b"evil"))
    cases.append(Case("chunk-offset-gap", "PUT", "/files/chunk?path=x/y&offset=5", b"e", 409))
    cases.append(Case("chunk-into-file", "PUT", "/files/chunk?path=afile/y&offset=0", b"e", 409))
    for i, body in enumerate(
        [
            {"path": "x/y", "size": 4, "sha256": "0" * 63},
            {"path": "x/y", "size": -1, "sha256": SHA},
            {"path": "x/y", "size": "4", "sha256": SHA},
            {"path": "x/y", "size": 4, "sha256": SHA, "extra": 1},
            {"path": "x/y", "size": 4},
            {"path": ["x"], "size": 4, "sha256": SHA},
        ]
    ):
        cases.append(
            Case(f"complete-body{i}", "POST", "/files/complete", json.dumps(body).encode())
        )
    cases.append(
        Case("complete-nothing", "POST", "/files/complete", json.dumps(COMPLETE).encode(), 404)
    )
    return cases


# Every field of the start request, with values that must never reach a command line.
START_FIELDS = {
    "model": [
        "../tiny",
        "../../outside",
        "/etc",
        "/usr/bin/python3",
        "tiny; rm -rf /",
        "tiny && id",
        "$(id)",
        "--help",
        "-m",
        "tiny\x00",
        "tiny/../tiny",
        "",
        "t" * 2000,
        "nonexistent",
        "tiny/config.json",
        "link_out",
        "link_abs",
        "tiny/evil",
        "afile",
        123,
        ["tiny"],
        None,
        {"path": "tiny"},
    ],
    "split": [[], [0], [-1], [1001], ["2", "2"], [2.0, 2.0], "2,2", [2] * 65, [True, True], None],
    "rank": [-1, 2, "0", 0.0, True, 10**30, None, [0], "0; id"],
    "hostfile": [
        [["127.0.0.1:5000"]],
        [["127.0.0.1:5000 --x"], ["127.0.0.1:5001"]],
        [["host:5000"], ["127.0.0.1:5001"]],
        [["127.0.0.1:abc"], ["127.0.0.1:5001"]],
        [["127.0.0.1:99999"], ["127.0.0.1:5001"]],
        [["127.0.0.1:0"], ["127.0.0.1:5001"]],
        [["127.0.0.1:-1"], ["127.0.0.1:5001"]],
        [["127.0.0.1:"], ["127.0.0.1:5001"]],
        [[":5000"], ["127.0.0.1:5001"]],
        [["$(id):1"], ["127.0.0.1:5001"]],
        [["127.0.0.1:5000\n--flag"], ["127.0.0.1:5001"]],
        [["[fe80::1%--x]:5000"], ["127.0.0.1:5001"]],
        [["[::1%$(id)]:5000"], ["127.0.0.1:5001"]],
        [["1" * 65], ["127.0.0.1:5001"]],
        [["127.0.0.1:5000"] * 17, ["127.0.0.1:5001"]],
        [[], ["127.0.0.1:5001"]],
        [[1], ["127.0.0.1:5001"]],
        "127.0.0.1:5000",
        [["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]],
    ],
    "http_host": [
        "localhost",
        "0.0.0.0; id",
        "127.0.0.1 --x",
        "--help",
        "fe80::1%--help",
        "::1%$(id)",
        "::1%a b",
        "fe80::1%\n",
        "127.0.0.1%x",
        "",
        "1" * 65,
        2130706433,
        None,
    ],
    "http_port": [80, 0, -1, 65536, "8000", 8000.5, True, None, 10**20],
    "name": [
        "-rf",
        "--help",
        "a b",
        "a;b",
        "",
        "x" * 65,
        "a\nb",
        "\u00e4",
        ".hidden",
        "$(id)",
        1,
        None,
    ],
    "backend": ["mpi", "ring --x", "", None, "jaccl", "RING"],
    "max_context": [0, -1, 10**8, "5", 1.5],
}
EXTRA_FIELDS = {
    "python": "/bin/sh",
    "argv": ["/bin/sh", "-c", "id"],
    "cmd": "id",
    "command": ["id"],
    "entrypoint": "os.system",
    "module": "http.server",
    "executable": "/bin/sh",
    "env": {"LD_PRELOAD": "/tmp/evil.so"},
    "cwd": "/",
    "shell": True,
}
MALFORMED = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"str"',
    b"1",
    b'{"model": }',
    b"{'model': 'tiny'}",
    b"\xff\xfe{}",
    b'{"rank": NaN}',
    b"[" * 3000,
    b'{"a":' * 500 + b"1" + b"}" * 500,
    json.dumps(START).encode()[:-1],
    json.dumps(START).encode() + b"garbage",
    json.dumps([START]).encode(),
]
CONTENT_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "application/octet-stream",
    "text/json",
]


def _start_cases() -> list[Case]:
    cases = []
    for fieldname, values in START_FIELDS.items():
        for i, v in enumerate(values):
            body = json.dumps(START | {fieldname: v}).encode()
            cases.append(Case(f"start-{fieldname}{i}:{str(v)[:24]!r}", "POST", "/ranks", body))
        if fieldname in ("model", "split", "rank", "http_host", "http_port", "name"):
            body = json.dumps({k: v for k, v in START.items() if k != fieldname}).encode()
            cases.append(Case(f"start-missing-{fieldname}", "POST", "/ranks", body))
    for k, v in EXTRA_FIELDS.items():
        body = json.dumps(START | {k: v}).encode()
        cases.append(Case(f"start-extra-{k}", "POST", "/ranks", body))
    for i, body in enumerate(MALFORMED):
        cases.append(Case(f"start-malformed{i}:{body[:16]!r}", "POST", "/ranks", body))
    for ct in CONTENT_TYPES:
        body = json.dumps(START).encode()
        cases.append(
            Case(f"start-ctype:{ct}", "POST", "/ranks", body, extra=[("Content-Type", ct)])
        )
    # Other ways in: other methods and routes.
    cases += [
        Case("start-PATCH", "PATCH", "/ranks", json.dumps(START).encode(), 405),
        Case("start-PUT", "PUT", "/ranks", json.dumps(START).encode(), 405),
        Case("start-dotdot-route", "POST", "/files/../ranks", json.dumps(START).encode(), 404),
        # "/%72anks" routes to /ranks, so it must be signed as sent, not as decoded.
        Case(
            "start-encoded-route-signed-decoded",
            "POST",
            "/%72anks",
            json.dumps(START).encode(),
            401,
            auth=lambda a, m, t, b: signed(a, m, "/ranks", b),
        ),
        Case("stop-unknown", "POST", "/ranks/abc/stop", b"", 404),
        Case("stop-traversal", "POST", "/ranks/..%2f..%2fetc/stop", b"", 404),
        Case("log-unknown", "GET", "/ranks/abc/log", b"", 404),
        Case("log-tail-negative", "GET", "/ranks/abc/log?tail=-1", b"", 400),
        Case("log-tail-huge", "GET", "/ranks/abc/log?tail=1000000000", b"", 400),
        Case("models-delete", "DELETE", "/models", b"", 405),
    ]
    return cases


PATH_CASES = _path_cases()
START_CASES = _start_cases()
ALL_CASES = AUTH_CASES + PATH_CASES + START_CASES


def expect_of(case: Case) -> tuple[int, ...]:
    return case.expect if isinstance(case.expect, tuple) else (case.expect,)


def send_case(agent: Agent, case: Case) -> int:
    auth = None if case.auth is None else case.auth(agent, case.method, case.target, case.body)
    status = send(agent, case.method, case.target, case.body, auth=auth, extra=case.extra)
    HISTOGRAM[status] += 1
    SENT.add(id(case))
    return status


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_hostile_request(agent, case):
    status = send_case(agent, case)
    assert status in expect_of(case), f"{case.id}: {status}, expected {case.expect}"


REPLAY_ENDPOINTS = [
    ("GET", "/health"),
    ("GET", "/ranks"),
    ("GET", "/models"),
    ("GET", "/facts"),
    ("GET", "/files/status?path=x/y"),
]


@pytest.mark.parametrize("method,target", REPLAY_ENDPOINTS)
def test_replayed_nonce(agent, method, target):
    headers = signed(agent, method, target)
    assert send(agent, method, target, auth=headers) == 200, target  # the one legitimate use
    replays = {
        "same-request": headers,
        "new-timestamp": signed(agent, method, target, nonce=headers[NONCE], now=time.time() + 1),
        "other-path": signed(agent, "GET", "/health", nonce=headers[NONCE]),
    }
    for name, h in replays.items():
        t = "/health" if name == "other-path" else target
        status = send(agent, method if name != "other-path" else "GET", t, auth=h)
        HISTOGRAM[status] += 1
        assert status == 401, f"replay {name} of {method} {target}: {status}"


def _raw_head(agent: Agent, method: str, target: str, lines: list[str], length=None) -> bytes:
    """A head with signed headers; length: the body length they declare (of a digest no body
    sent here matches), else none."""
    if length is None:
        headers = signed(agent, method, target)
    else:
        ids = {"node": agent.node, "boot": agent.boot}
        headers = sign_declared(agent.secret, method, target, "0" * 64, length, **ids)
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *lines]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _chunked(data: bytes, size: int = 1000) -> bytes:
    out = b""
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


SIZE_TARGETS = [
    ("PUT", "/files/chunk?path=big/file&offset=0"),
    ("POST", "/ranks"),
    ("POST", "/files/complete"),
    ("GET", "/health"),
]
SIZE_CASES = [
    # (name, header lines, the length the signature declares, body bytes, expected)
    ("declared-max+1", [f"Content-Length: {MAX_BODY + 1}"], MAX_BODY + 1, b"", 413),
    ("declared-1GB", ["Content-Length: 1000000000"], 10**9, b"", 413),
    ("declared-huge", ["Content-Length: " + "9" * 30], None, b"", (413, 400)),
    ("declared-negative", ["Content-Length: -1"], None, b"", 400),
    ("declared-letters", ["Content-Length: abc"], None, b"", 400),
    # A signed request declares its length: a chunked body is refused before it is read.
    ("chunked", ["Transfer-Encoding: chunked"], None, _chunked(b"x" * (MAX_BODY + 1)), 411),
    ("chunked-many", ["Transfer-Encoding: chunked"], None, _chunked(b"y" * 3 * MAX_BODY, 97), 411),
    # More than the signed length declares: refused, and the extra is never read as a body.
    ("longer-than-signed", ["Content-Length: 100"], 10, b"z" * 100, 401),
]


@pytest.mark.parametrize("method,target", SIZE_TARGETS)
def test_oversized_bodies(agent, method, target):
    for name, lines, length, body, expect in SIZE_CASES:
        status = exchange(agent.port, _raw_head(agent, method, target, lines, length) + body)
        HISTOGRAM[status] += 1
        expect = expect if isinstance(expect, tuple) else (expect,)
        assert status in expect, f"{name} {method} {target}: {status}, expected {expect}"


@pytest.mark.parametrize("method,target", SIZE_TARGETS[:3])
def test_unsigned_oversized_body_is_refused_before_it_is_read(agent, method, target):
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    status = exchange(agent.port, head.encode() + b"x" * 1000)
    HISTOGRAM[status] += 1
    assert status == 401, f"unsigned 1GB {method} {target}: {status}"


def _drip(agent: Agent, method: str, target: str, results: dict) -> None:
    """A signed head, then the body one byte a second: the agent must cut it off."""
    length = 30
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=20) as s:
        s.sendall(_raw_head(agent, method, target, [f"Content-Length: {length}"], length))
        s.settimeout(1.0)
        received = b""
        for _ in range(length):
            with contextlib.suppress(OSError):
                s.sendall(b"x")
            try:
                chunk = s.recv(65536)
                received += chunk
                if not chunk or received.startswith(b"HTTP/"):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                received += chunk
    line = received.split(b"\r\n", 1)[0].split()
    status = int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0
    results[(method, target)] = (status, time.monotonic() - start)


def test_slow_drip_bodies_are_cut_off(agent):
    results: dict = {}
    threads = [threading.Thread(target=_drip, args=(agent, m, t, results)) for m, t in SIZE_TARGETS]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == len(SIZE_TARGETS), results
    for (m, t), (status, elapsed) in results.items():
        HISTOGRAM[status] += 1
        assert status == 408, f"slow drip {m} {t}: {status} after {elapsed:.1f}s"
        assert elapsed < BODY_TIMEOUT + 4, f"slow drip {m} {t} held {elapsed:.1f}s"


def test_zz_agent_survived_untouched(agent):
    """Holds alone and in any order: first sends every hostile case not yet sent to the module's
    agent (all of them when run alone), then finds the agent alive and nothing changed."""
    for case in ALL_CASES:
        if id(case) not in SENT:
            send_case(agent, case)
    assert agent.proc.poll() is None, "the agent died"
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10):
        pass
    target = "/ranks"
    headers = signed(agent, "GET", target)
    data = wire("GET", target, list(headers.items()), b"")
    asked = time.monotonic()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    answered = time.monotonic() - asked
    grown = psutil.Process(agent.proc.pid).memory_info().rss - agent.rss
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", received
    assert json.loads(body) == [], f"a rank was started: {body!r}"
    assert ok(agent, "GET", "/health") == 200
    assert psutil.Process(agent.proc.pid).children() == [], "the agent has child processes"
    assert not any((agent.root / "runs").iterdir()), "a run folder was made"
    after = snapshot(agent.base)
    models = agent.models.relative_to(agent.base).as_posix() + "/"
    outside_before = {k: v for k, v in agent.before.items() if not k.startswith(models)}
    outside_after = {k: v for k, v in after.items() if not k.startswith(models)}
    assert outside_after == outside_before, "something changed outside the models folder"
    new_in_models = {
        k: v for k, v in after.items() if k.startswith(models) and agent.before.get(k) != v
    }
    # A refused upload leaves nothing behind, not even a folder.
    assert new_in_models == {}, new_in_models
    gone = set(agent.before) - set(after)
    assert not gone, gone
    total = sum(HISTOGRAM.values())
    print(f"\nhostile requests: {total}")
    print("status histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(HISTOGRAM.items())))
    print(f"new folders inside models: {sorted(new_in_models)}")
    mib = grown / 2**20
    print(f"agent RSS grown by {mib:.1f} MiB; a signed request answered in {answered:.3f} s")
    assert total >= 200, total
    assert mib < 32, f"the agent grew by {mib:.1f} MiB under the hostile requests"
    assert answered < 1.0, answered


# --- a captured request sent elsewhere: to another agent, to the same agent after a restart ---


def _send_captured(port: int, method: str, target: str, headers: dict, body: bytes) -> int:
    extra = [("Content-Length", str(len(body)))]
    return exchange(port, wire(method, target, [*headers.items(), *extra], body))


def test_a_captured_request_is_refused_by_another_agent_and_after_a_restart(tmp_path):
    """Two agents of one cluster (one secret): a request captured on its way to the first is
    refused by the second, and by the first once it has started again; the launcher's client
    meanwhile says hello again to the restarted agent and goes on."""
    facts = {"hostname": "a", "node_id": "node-first"}
    with running_agent(tmp_path / "a", facts=facts) as first:
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "secret").write_bytes((tmp_path / "a" / "secret").read_bytes())
        (tmp_path / "b" / "secret").chmod(0o600)
        with running_agent(tmp_path / "b", facts={"hostname": "b", "node_id": "node-second"}) as b:
            ids = first.ids()
            target, body = "/files/chunk?path=captured.bin&offset=0", b"captured"
            sent = sign(first.secret, "PUT", target, body, **ids)
            unsent = sign(first.secret, "PUT", target, body, **ids)
            # On its way to the first agent: another one refuses it, the first takes it once.
            assert _send_captured(b.port, "PUT", target, sent, body) == 401
            assert _send_captured(first.port, "PUT", target, sent, body) == 200
            assert not (b.models / "captured.bin.partial").exists()
            client = AgentClient(first.url, first.secret, timeout=10)
            assert client.ranks() == []
    with running_agent(tmp_path / "a", facts=facts, port=first.port) as again:
        assert again.ids()["node"] == ids["node"] and again.ids()["boot"] != ids["boot"]
        for headers in (sent, unsent):  # seen before the restart, or never sent
            assert _send_captured(again.port, "PUT", target, headers, body) == 401
        assert (again.models / "captured.bin.partial").read_bytes() == b"captured"
        # The client bound to the earlier start: a signed refusal, a new hello, the answer.
        assert client.ranks() == [] and client.boot_id == again.ids()["boot"]
        client.close()


# --- impostors announced over real zeroconf, in network namespaces ---------------------------

# argv: address, port, cluster, real node id, log file. One process without the secret that
# announces itself twice into the cluster (once under a name that sorts first, once with a real
# agent's node id) and answers every request 200, claiming 10 TB of memory.
IMPOSTOR = """
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zeroconf import ServiceInfo, Zeroconf

address, port, cluster, real_id, log = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
TB = 10 * 10**12
CLAIM = {"ok": True, "node_id": real_id, "boot_id": "0" * 32, "facts": "0" * 16,
         "hostname": "0000-first", "chip": "Apple M9 Ultra", "memory_total": TB,
         "memory_available": TB, "models": [], "stopped": [], "time": 0}

class Yes(BaseHTTPRequestHandler):
    def answer(self):
        with open(log, "a") as f:
            f.write(f"{self.command} {self.path}\\n")
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        body = json.dumps(CLAIM).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k in ("X-Mlxdist-Node", "X-Mlxdist-Boot"):  # the right shapes, no proof behind
            self.send_header(k, real_id if k.endswith("Node") else "0" * 32)
        self.send_header("X-Mlxdist-Response-Signature", "ab" * 32)
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a):
        pass

server = ThreadingHTTPServer((address, port), Yes)
zc = Zeroconf(interfaces=[address])
for name, node_id in (("0000-first", "0000-first"), ("zzzz-copy", real_id)):
    txt = {"cluster": cluster, "id": node_id, "port": str(port), "host": "0000-first",
           "os": "15.0", "mlx": "0.32", "mlxdist": "0.1", "facts": "0" * 16}
    zc.register_service(ServiceInfo(
        "_mlxdist._tcp.local.", f"{name}._mlxdist._tcp.local.",
        addresses=[socket.inet_aton(address)], port=port, properties=txt,
        server=f"{name}.local."))
print("announced", flush=True)
server.serve_forever()
"""


def _in(host, env: dict, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        host.cmd(*argv), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    return done


def _agent_in(host, config: Path, cluster: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MLXDIST_CONFIG=str(config))
    args = cli("agent", "--cluster", cluster, "--interface", "eth0", "--port", "52417")
    return subprocess.Popen(host.cmd(*args), env=env, cwd=ROOT, stderr=open(log, "w"))


@pytest.mark.skipif(netns.available() is not None, reason=f"needs namespaces: {netns.available()}")
def test_impostors_are_never_listed_planned_or_started_on_and_a_twin_is_refused(tmp_path, tiny_r1):
    """A launcher, a real agent, an impostor without the secret (announced under a name that
    sorts first and again under the real agent's node id), later a real twin of the agent.
    status, plan and a launch see the real agent alone; the impostor is asked only its hello."""
    env = dict(os.environ, MLXDIST_CONFIG=str(tmp_path / "launcher"))
    subprocess.run(cli("init"), env=env, cwd=ROOT, check=True, capture_output=True)
    secret = tmp_path / "launcher" / "secret"
    configs = [tmp_path / "real", tmp_path / "twin"]
    for config in configs:
        config.mkdir(mode=0o700)
        shutil.copy(secret, config / "secret")
        (config / "secret").chmod(0o600)
    one_node = tmp_path / "tiny-r1-1n"  # tiny-r1 with its folder for one node
    done = subprocess.run(
        cli("quantize", str(tiny_r1), str(one_node), "--split", "4"), cwd=ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    status = cli("status", "--cluster", "guard", "--interface", "eth0")
    plan = cli("plan", str(R1_CONFIG), "--cluster", "guard", "--interface", "eth0", "--json")
    procs = []
    with netns.bridged_hosts(4, subnet="169.254.120") as (launcher, real, fake, twin):
        try:
            procs.append(_agent_in(real, configs[0], "guard", tmp_path / "real.log"))
            log = tmp_path / "impostor.log"
            log.touch()
            deadline = time.monotonic() + 30
            while not (configs[0] / "node_id").exists():
                assert time.monotonic() < deadline, (tmp_path / "real.log").read_text()
                time.sleep(0.2)
            real_id = (configs[0] / "node_id").read_text().strip()
            argv = [sys.executable, "-c", IMPOSTOR, fake.ip, "52417", "guard", real_id, str(log)]
            procs.append(subprocess.Popen(fake.cmd(*argv), cwd=ROOT, stdout=subprocess.PIPE))
            assert procs[-1].stdout.readline().strip() == b"announced"
            # The real agent announces itself too: it listens once it has.
            while not listening(procs[0], Machine(real.name, real.ip, 52417)):
                assert procs[0].poll() is None, (tmp_path / "real.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "real.log").read_text()
                time.sleep(0.1)

            done = _in(launcher, env, *status)
            assert done.returncode == 0, done.stderr
            assert "1 agents" in done.stdout and real.ip in done.stdout
            assert fake.ip not in done.stdout and "0000-first" not in done.stdout
            assert "M9" not in done.stdout and "10000" not in done.stdout
            # Each announcement that did not prove itself is named once, with the reason.
            left_out = "is left out: does not know this cluster's secret"
            assert f"0000-first (node 0000-first) {left_out}" in done.stderr
            assert f"0000-first (node {real_id}) {left_out}" in done.stderr
            done = _in(launcher, env, *plan)
            planned = json.loads(done.stdout)
            # R1 on one Linux host does not fit (exit 1); 10 TB would have made it fit.
            assert planned["fits"] is False and done.returncode == 1, done.stderr
            assert len(planned["nodes"]) == 1 and "0000-first" not in done.stdout
            assert fake.ip not in done.stdout
            # A launch pushes the model to the real agent alone and starts its rank there.
            launch = cli("launch", str(one_node), "--cluster", "guard", "--interface", "eth0")
            launch += ["--prompt", "Hi", "--no-chat", "--temp", "0", "--max-tokens", "1"]
            done = _in(launcher, env, *launch, timeout=300)
            assert done.returncode == 0, done.stderr
            assert list((configs[0] / "models" / one_node.name).rglob("*.safetensors"))
            # It was found every time under both names, asked who it is, and nothing more.
            asked = log.read_text().splitlines()
            assert len(asked) >= 6 and set(asked) == {"GET /hello"}, asked
            print(f"impostor: 2 announcements, {len(asked)} requests, all of them its hello")

            # A second agent with the same node id (a cloned disk) cannot announce itself.
            shutil.copy(configs[0] / "node_id", configs[1] / "node_id")
            twin_agent = _agent_in(twin, configs[1], "guard", tmp_path / "twin.log")
            procs.append(twin_agent)
            assert twin_agent.wait(60) != 0
            said = (tmp_path / "twin.log").read_text()
            assert f"another agent already announces node id {real_id}" in said, said
            assert "Traceback" not in said
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_two_agents_proving_one_node_id_are_both_refused_in_one_line(tmp_path):
    """Twins the launcher reaches both (on two links, or named in a hosts file): refused."""
    from launcher.cluster import nodes_from_hosts
    from launcher.discovery import Agent as Announced
    from launcher.discovery import CollisionError, verified
    from launcher.local import LaunchError

    facts = {"hostname": "twin", "node_id": "node-twin"}
    with running_agent(tmp_path / "a", facts=facts) as a:
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / "secret", tmp_path / "b" / "secret")
        (tmp_path / "b" / "secret").chmod(0o600)
        with running_agent(tmp_path / "b", facts=facts) as b:
            seen = [Announced("node-twin", "c", ["127.0.0.1"], agent.port, {}) for agent in (a, b)]
            with pytest.raises(CollisionError) as info:
                verified(seen, a.secret)
            assert a.url in str(info.value) and b.url in str(info.value)
            # The same agent announced twice (one boot id) is one agent.
            assert len(verified([seen[0], seen[0]], a.secret)) == 1
            hosts = tmp_path / "hosts.toml"
            hosts.write_text(
                "".join(
                    f'[[hosts]]\nname = "{n}"\naddress = "127.0.0.1"\nagent_port = {x.port}\n'
                    for n, x in (("one", a), ("two", b))
                )
            )
            with pytest.raises(LaunchError, match="two agents answer as node node-twin") as info:
                nodes_from_hosts(hosts, a.secret)
            assert "one (127.0.0.1)" in str(info.value) and "two (127.0.0.1)" in str(info.value)
