"""The pure parts of fetching: rate and time left, the progress line, the fetch choice without
agents, and the agent's checks of a fetch request; the repo's listing against its index on a
loopback Hub."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.agent.requests import FetchFiles, ProbeHub
from launcher.fetch import FetchError, Meter, check_fetch, choose_fetch, progress_line
from launcher.nodefiles import EVERY_FILE
from launcher.remote import Node
from launcher.ssh import SshClient


@pytest.mark.parametrize(
    "samples, total, rate, left",
    [
        ([], 100, 0.0, None),
        ([(0.0, 0)], 100, 0.0, None),
        ([(0.0, 0), (2.0, 50)], 100, 25.0, 2.0),
        ([(0.0, 0), (1.0, 10), (2.0, 10)], 30, 5.0, 4.0),
        ([(0.0, 0), (20.0, 100), (21.0, 200)], 400, 100.0, 2.0),  # older than the window: gone
    ],
)
def test_meter(samples, total, rate, left):
    meter = Meter(window=10.0)
    for t, done in samples:
        meter.add(t, done)
    assert meter.rate() == pytest.approx(rate)
    assert meter.left(total) == (None if left is None else pytest.approx(left))


@pytest.mark.parametrize(
    "args, line",
    [
        (("a", 0, 2_000_000_000, 0.0, None), "a: 0 bytes of 2.00 GB, 0 bytes/s, time left unknown"),
        (("a", 10**9, 2 * 10**9, 1e8, 10.0), "a: 1.00 GB of 2.00 GB, 100.00 MB/s, 10 s left"),
        (("total", 5, 5, 0.0, None), "total: 5 bytes of 5 bytes, 0 bytes/s, done"),
    ],
)
def test_progress_line(args, line):
    assert progress_line(*args) == line


def test_choice_without_asking_any_agent():
    ssh = [Node("mini", "10.0.0.9", SshClient("me@mini"))]
    assert choose_fetch("auto", ssh, "org/m") == ("push", "mini has no agent to fetch with")
    with pytest.raises(FetchError, match="needs an agent on every node; mini has none"):
        choose_fetch("hub", ssh, "org/m")
    with pytest.raises(FetchError, match="needs a Hugging Face repo id"):
        choose_fetch("hub", [], None)
    with pytest.raises(FetchError, match="'rsync' is not one of auto, hub, push"):
        check_fetch("rsync")


@pytest.mark.parametrize(
    "body, error",
    [
        ({"repo": "org/m", "files": ["config.json"]}, None),
        ({"repo": "org/m", "files": ["a.safetensors"], "revision": "v1.0", "token": "hf_x"}, None),
        ({"repo": "../m", "files": ["config.json"]}, "repo must be org/name"),
        ({"repo": "org/m/x", "files": ["config.json"]}, "repo must be org/name"),
        ({"repo": "org/m", "files": ["../secret"]}, "not a file name"),
        ({"repo": "org/m", "files": ["nodes/0/a"]}, "not a file name"),
        ({"repo": "org/m", "files": ["a.incomplete"]}, "not a file name"),
        ({"repo": "org/m", "files": ["a", "a"]}, "must not repeat"),
        ({"repo": "org/m", "files": []}, "at least 1"),
        ({"repo": "org/m", "files": ["a"], "revision": "../main"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "revision": "refs/pr/1", "verify": True}, None),
        ({"repo": "org/m", "files": ["a"], "revision": "refs//1"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "revision": "refs/pr/"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "revision": "/etc/x"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "revision": "refs/./1"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "revision": "refs/../../x"}, "branch, tag or commit"),
        ({"repo": "org/m", "files": ["a"], "verify": "yes"}, "valid boolean"),
        ({"repo": "org/m", "files": ["a"], "token": "hf x\r\nX: y"}, "without spaces"),
        ({"repo": "org/m", "files": ["a"], "endpoint": "http://evil"}, "Extra inputs"),
    ],
)
def test_fetch_requests_are_checked(body, error):
    if error is None:
        assert FetchFiles(**body).files == body["files"]
        return
    with pytest.raises(ValidationError) as e:
        FetchFiles(**body)
    said = "; ".join(err["msg"] for err in e.value.errors())  # what the agent answers
    assert error in said
    assert "hf x" not in said


def test_a_token_is_not_in_the_request_objects_repr():
    assert "hf_secret" not in repr(FetchFiles(repo="o/m", files=["a"], token="hf_secret"))
    assert "hf_secret" not in repr(ProbeHub(repo="o/m", token="hf_secret"))


def test_plan_says_plainly_that_tensor_mode_needs_every_file():
    from conftest import run_cli

    config = Path(__file__).parent / "data" / "deepseek-r1-config.json"
    done = run_cli("plan", str(config), "--simulate", "2x512GB", "--parallel", "tensor", "--json")
    assert EVERY_FILE["tensor"] in json.loads(done.stdout)["notes"]
    done = run_cli("plan", str(config), "--simulate", "2x512GB", "--parallel", "pipeline")
    assert "every file" not in done.stdout  # a pipeline node gets only its layers' files


def test_the_fetch_routes_are_signed_and_checked(tmp_path):
    """The agent's own app in-process: an unsigned fetch is refused; a signed one with a bad
    file name is refused in one line that does not repeat the token."""
    from starlette.testclient import TestClient

    from launcher.agent import create_agent_app
    from launcher.auth import sign

    secret = b"k" * 32
    app = create_agent_app(secret, tmp_path / "models", dict, runs_dir=tmp_path / "runs")
    body = json.dumps({"repo": "o/m", "files": ["../x"], "token": "hf_notlogged"}).encode()
    with TestClient(app) as http:
        assert http.post("/fetch", content=body).status_code == 401
        assert http.get("/fetch/abc").status_code == 401
        ids = {"node": app.state.node_id, "boot": app.state.boot_id}
        headers = sign(secret, "POST", "/fetch", body, **ids) | {"Content-Type": "application/json"}
        answer = http.post("/fetch", content=body, headers=headers)
        assert answer.status_code == 400 and "not a file name" in answer.json()["error"]
        assert "hf_notlogged" not in answer.text
        headers = sign(secret, "GET", "/fetch/abc", b"", **ids)
        answer = http.get("/fetch/abc", headers=headers)
        assert answer.status_code == 404 and answer.json()["error"] == "no fetch 'abc'"


@contextlib.contextmanager
def _hub_file(monkeypatch, answer):
    """A loopback server the agent's downloads go to: answer(handler) writes each GET's reply."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from launcher.agent import hubfetch

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            answer(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/f"
    monkeypatch.setattr(hubfetch, "hf_hub_url", lambda *a, **k: url)
    try:
        yield
    finally:
        server.shutdown()


def test_a_download_stops_at_the_size_the_hub_listed(tmp_path, monkeypatch):
    """A server that streams more than the listing's size is cut off before the extra bytes
    reach the disk (the free-disk check counted the listed size)."""
    from launcher.agent.hubfetch import Fetch, Fetches, FetchFailed, HubFile

    def flood(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(8 << 20))
        handler.end_headers()
        handler.wfile.write(b"x" * (8 << 20))

    fetches = Fetches(tmp_path / "models", tmp_path / "cache")
    fetch = Fetch("id", "org/m", "main", ["model.safetensors"], commit="0" * 40)
    partial = tmp_path / "part"
    with _hub_file(monkeypatch, flood):
        with pytest.raises(FetchFailed, match="sent more than its 1000 bytes"):
            fetches._download(
                fetch, HubFile("model.safetensors", 1000, "e" * 64, True), partial, None
            )
    assert partial.stat().st_size <= 1000


@pytest.mark.parametrize("revision", ["refs/../x", "a//b", "a/", "/a", ".", "a/./b", "a\\b"])
def test_the_agent_refuses_a_revision_that_is_no_path_under_refs(revision):
    """Behind the request's check, the agent's own: a revision becomes a path under refs/."""
    from launcher.agent.hubfetch import FetchFailed, check_revision

    with pytest.raises(FetchFailed, match="is not a branch, tag or commit"):
        check_revision(revision)
    assert check_revision("refs/pr/1") == "refs/pr/1"


def test_a_download_is_hashed_as_it_arrives_and_a_resume_reads_back_only_its_start(
    tmp_path, monkeypatch
):
    """_download returns the whole file's digest: the bytes that came hashed on arrival, the
    part an earlier run left read back once (and counted as read back)."""
    import hashlib

    from launcher.agent.hubfetch import Fetch, Fetches, HubFile

    data = bytes(range(256)) * 400

    def ranged(handler) -> None:
        first = int(handler.headers["Range"].removeprefix("bytes=").rstrip("-"))
        handler.send_response(206)
        handler.send_header("Content-Length", str(len(data) - first))
        handler.end_headers()
        handler.wfile.write(data[first:])

    fetches = Fetches(tmp_path / "models", tmp_path / "cache")
    want = HubFile("model.safetensors", len(data), hashlib.sha256(data).hexdigest(), True)
    with _hub_file(monkeypatch, ranged):
        for kept in (0, 1000):
            partial = tmp_path / f"part{kept}"
            partial.write_bytes(data[:kept])
            fetch = Fetch("id", "org/m", "main", [want.name], commit="0" * 40)
            assert fetches._download(fetch, want, partial, None) == want.etag
            assert (fetch.rehashed, fetch.received) == (kept, len(data) - kept)
            assert partial.read_bytes() == data


def test_a_token_is_cut_out_of_any_error_text(monkeypatch):
    from launcher.agent.hubfetch import scrub as agent_scrub
    from launcher.fetch import scrub

    monkeypatch.setenv("HF_TOKEN", "hf_abc123")
    said = "401: bad credentials: Bearer hf_abc123"
    assert scrub(said) == agent_scrub(said, "hf_abc123") == "401: bad credentials: Bearer <token>"
    assert agent_scrub(said, None) == said


def test_the_listing_is_read_at_the_pinned_commit_and_unlisted_files_are_refused(
    monkeypatch, tmp_path
):
    """On a loopback Hub: repo_sizes asks the tree at the commit main names, recursively (a
    weight file in a subfolder is listed); an index naming a file the repo lacks is refused in
    one line naming the file and the repo, not a KeyError."""
    from hub import COMMIT, running_hub, write_hf_cache
    from huggingface_hub import constants

    from launcher.fetch import hub_shares, repo_sizes
    from launcher.nodefiles import UnlistedError

    index = {"metadata": {}, "weight_map": {"a": "w/one.safetensors", "b": "two.safetensors"}}
    small = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode()}
    served = small | {"w/one.safetensors": b"1" * 10}  # two.safetensors is not in the repo
    snapshot = write_hf_cache(tmp_path / "hub", small, repo_id="org/m")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with running_hub({"org/m": served}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        sizes = repo_sizes("org/m", "main")
        trees = [r for r in hub.requests if "/tree/" in r]
    assert sizes["w/one.safetensors"] == 10 and "two.safetensors" not in sizes
    assert len(trees) == 1 and f"/tree/{COMMIT}" in trees[0] and "recursive=true" in trees[0]
    with pytest.raises(UnlistedError) as e:
        hub_shares(snapshot, sizes, "pipeline", [1, 1])
    assert str(e.value).startswith("the index of org/m names 1 weight file(s)")
    assert ": two.safetensors;" in str(e.value)
