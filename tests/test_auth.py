"""The signing both ways, table-driven: each field of a request or an answer changed is refused."""

from __future__ import annotations

import pytest

from launcher.auth import (
    ANY,
    CONTENT_SHA256,
    NONCE,
    SIGNATURE,
    TARGET,
    TARGET_BOOT,
    TIMESTAMP,
    AuthError,
    Verifier,
    check_response,
    sign,
    sign_response,
)

SECRET = b"s" * 32
NOW = 1_000_000.0
NODE, BOOT = "node-a", "b" * 32


def verifier() -> Verifier:
    return Verifier(SECRET, window=30, node_id=NODE, boot_id=BOOT)


def signed(**kw) -> dict[str, str]:
    args = {"method": "POST", "path": "/ranks?x=1", "body": b"{}", "node": NODE, "boot": BOOT}
    args |= kw
    return sign(SECRET, args.pop("method"), args.pop("path"), args.pop("body"), now=NOW, **args)


def test_a_signed_request_passes_once():
    v = verifier()
    h = signed()
    assert {TIMESTAMP, NONCE, SIGNATURE, CONTENT_SHA256, TARGET, TARGET_BOOT} == set(h)
    v.verify("POST", "/ranks?x=1", b"{}", h, now=NOW + 5)
    with pytest.raises(AuthError, match="replayed"):
        v.verify("POST", "/ranks?x=1", b"{}", h, now=NOW + 6)


# (what the agent receives differently from what was signed, the reason it refuses)
REQUEST_CASES = {
    "method": (dict(method="GET"), {}, "bad signature"),
    "path": (dict(path="/ranks?x=2"), {}, "bad signature"),
    "body, same length": (dict(body=b"[]"), {}, "not the one the signature declares"),
    "body, longer": (dict(body=b"{ }"), {}, "bad signature"),
    "declared length": (dict(), {"content-length": "3"}, "bad signature"),
    "declared digest": (dict(), {CONTENT_SHA256: "0" * 64}, "bad signature"),
    "target node": (dict(), {TARGET: "node-b"}, "bad signature"),
    "target boot": (dict(), {TARGET_BOOT: "c" * 32}, "bad signature"),
    "timestamp": (dict(), {TIMESTAMP: str(int(NOW) + 1)}, "bad signature"),
    "nonce": (dict(), {NONCE: "f" * 32}, "bad signature"),
    "signature": (dict(), {SIGNATURE: "0" * 64}, "bad signature"),
    "chunked": (dict(), {"transfer-encoding": "chunked"}, "declares its length"),
    "no target": (dict(), {TARGET: None}, "missing"),
    "no digest": (dict(), {CONTENT_SHA256: None}, "missing"),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_each_request_field_changed_is_refused(case):
    received, changed, reason = REQUEST_CASES[case]
    h = signed()
    for name, value in changed.items():
        h.pop(name, None)
        if value is not None:
            h[name] = value
    args = {"method": "POST", "path": "/ranks?x=1", "body": b"{}"} | received
    with pytest.raises(AuthError, match=reason) as info:
        verifier().verify(args["method"], args["path"], args["body"], h, now=NOW)
    assert info.value.status in (400, 401, 411)


@pytest.mark.parametrize(
    "node, boot, reason",
    [
        ("node-b", BOOT, "another agent"),
        (NODE, "c" * 32, "earlier start"),
        (ANY, BOOT, "another agent"),  # "*" is for the hello alone
        (NODE, ANY, "earlier start"),
    ],
)
def test_a_request_for_another_agent_or_start_is_refused(node, boot, reason):
    with pytest.raises(AuthError, match=reason) as info:
        verifier().verify("POST", "/ranks?x=1", b"{}", signed(node=node, boot=boot), now=NOW)
    assert info.value.status == 401


def test_only_the_hello_may_name_any_agent():
    v = verifier()
    v.verify(
        "GET", "/hello", b"", signed(method="GET", path="/hello", body=b"", node=ANY, boot=ANY), NOW
    )
    for method, path in [("GET", "/health"), ("POST", "/hello"), ("GET", "/hello?x=1")]:
        h = signed(method=method, path=path, body=b"", node=ANY, boot=ANY)
        with pytest.raises(AuthError, match="another agent"):
            v.verify(method, path, b"", h, NOW)


def test_stale_foreign_and_missing_are_refused_and_nonces_are_forgotten():
    v = verifier()
    with pytest.raises(AuthError, match="bad signature"):
        v.verify(
            "GET", "/", b"", sign(b"t" * 32, "GET", "/", b"", node=NODE, boot=BOOT, now=NOW), NOW
        )
    for skew in (-31, 31):
        with pytest.raises(AuthError, match="stale"):
            h = signed(method="GET", path="/", body=b"")
            v.verify("GET", "/", b"", h, NOW - skew)
    with pytest.raises(AuthError, match="missing"):
        v.verify("GET", "/", b"", {}, NOW)
    for i in range(50):
        h = sign(SECRET, "GET", "/", b"", node=NODE, boot=BOOT, now=NOW + i)
        v.verify("GET", "/", b"", h, NOW + i)
    later = NOW + 1000
    v.verify("GET", "/", b"", sign(SECRET, "GET", "/", b"", node=NODE, boot=BOOT, now=later), later)
    assert len(v._seen) == 1


def test_a_signed_answer_passes():
    h = sign_response(SECRET, "a" * 32, 200, b'{"ok": true}', NODE, BOOT)
    assert check_response(SECRET, "a" * 32, 200, b'{"ok": true}', h) == (NODE, BOOT)


# (the answer's field changed, as the client sees it)
RESPONSE_CASES = {
    "nonce": dict(nonce="b" * 32),
    "status": dict(status=500),
    "body": dict(body=b'{"ok": false}'),
    "node": dict(headers={"X-Mlxdist-Node": "node-b"}),
    "boot": dict(headers={"X-Mlxdist-Boot": "c" * 32}),
    "signature": dict(headers={"X-Mlxdist-Response-Signature": "0" * 64}),
    "secret": dict(secret=b"t" * 32),
    "unsigned": dict(headers={"X-Mlxdist-Response-Signature": None}),
}


@pytest.mark.parametrize("case", list(RESPONSE_CASES))
def test_each_answer_field_changed_is_refused(case):
    change = RESPONSE_CASES[case]
    h = sign_response(change.get("secret", SECRET), "a" * 32, 200, b'{"ok": true}', NODE, BOOT)
    for name, value in change.get("headers", {}).items():
        h.pop(name)
        if value is not None:
            h[name] = value
    nonce, status = change.get("nonce", "a" * 32), change.get("status", 200)
    with pytest.raises(AuthError):
        check_response(SECRET, nonce, status, change.get("body", b'{"ok": true}'), h)
