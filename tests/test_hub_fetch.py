"""Each node gets only its files: real agents (in network namespaces when this machine can make
them, else on loopback ports) fetch their share of tiny-r1 from a loopback Hub that speaks the
Hub's API (tests/hub.py), or are pushed it by the launcher."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from hub import COMMIT, REPO, FakeHub, _handler, model_files
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from netns import available, bridged_hosts

from launcher.agent_client import AgentClient, AgentError
from launcher.fetch import (
    FetchError,
    choose_fetch,
    hub_fetch,
    hub_shares,
    pin_commit,
    progress_line,
    repo_sizes,
)
from launcher.nodefiles import node_files
from launcher.remote import Node, push_files
from launcher.secret import create_secret, load_secret
from quantize.checkpoint import human_bytes, weight_map

WHY_NOT = available()
# The agents run in network namespaces, as on separate machines: without them every test here is
# skipped with the reason shown (a skip, not a pass), as the other namespace tests do.
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(WHY_NOT is not None, reason=f"agents need network namespaces: {WHY_NOT}"),
]
ROOT = Path(__file__).resolve().parents[1]
SPLIT = [2, 2]
HUB_IP = "169.254.100.250"  # the launcher's side of the namespaces' bridge
PORT = 52460


class SlowHub(FakeHub):
    """A FakeHub on a given address that can send its files slowly (delay per 64 kB), so a
    test can stop an agent halfway through a file."""

    def __init__(self, ip: str) -> None:
        super().__init__()
        self.server.server_close()
        self.delay = 0.0
        self.auth: list[str] = []  # the Authorization header of every request
        self.echo_auth = False  # refuse tree listings, echoing the token back (as a bad proxy)
        hub = self
        base = _handler(self)

        class Slow(base):
            def _route(self, body: bool) -> None:
                said = self.headers.get("Authorization", "")
                hub.auth.append(said)
                if hub.echo_auth and "/tree/" in self.path:
                    return self._send(
                        json.dumps({"error": f"bad credentials: {said}"}).encode(),
                        {"X-Error-Message": f"bad credentials: {said}"},
                        True,
                        401,
                    )
                super()._route(body)

            def _send(self, data: bytes, headers: dict, body: bool, status: int = 200) -> None:
                if not (body and hub.delay and len(data) > 1 << 16):
                    return super()._send(data, headers, body, status)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # the agent was stopped halfway
                    for i in range(0, len(data), 1 << 16):
                        self.wfile.write(data[i : i + (1 << 16)])
                        self.wfile.flush()
                        time.sleep(hub.delay)

        self.server = ThreadingHTTPServer((ip, 0), Slow)
        self.url = f"http://{ip}:{self.server.server_address[1]}"


@contextlib.contextmanager
def serving(hub: FakeHub):
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.server.shutdown()
        hub.server.server_close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def hosts_and_hub_address(n: int):
    """n namespaces on a bridge, and an address of this namespace on that bridge (for the Hub)."""
    with bridged_hosts(n) as hosts:
        switch = hosts[0].name.rsplit("h", 1)[0] + "sw"
        ours, theirs = f"{switch}hub", f"{switch}hb"
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        try:
            _ip("link", "set", theirs, "netns", switch)
            _ip("-n", switch, "link", "set", theirs, "master", "br0")
            _ip("-n", switch, "link", "set", theirs, "up")
            _ip("addr", "add", f"{HUB_IP}/24", "dev", ours)
            _ip("link", "set", ours, "up")
            yield [(h.name, h.ip, PORT) for h in hosts], HUB_IP, "eth0"
        finally:
            subprocess.run(["ip", "link", "del", ours], capture_output=True)


class Agents:
    """One `mlxdist agent` per host, each with its own models folder and Hugging Face cache."""

    def __init__(self, hosts, interface: str, work: Path, hub_url: str):
        self.hosts, self.interface, self.work, self.hub_url = hosts, interface, work, hub_url
        secret = create_secret(work / "secret")
        self.secret = load_secret(secret)
        self.procs: list[subprocess.Popen | None] = [None] * len(hosts)
        for i in range(len(hosts)):
            (work / f"node{i}").mkdir()
            shutil.copy(secret, work / f"node{i}" / "secret")
            (work / f"node{i}" / "secret").chmod(0o600)
            self.start(i)
        self.nodes = [
            Node(f"node{i}", ip, AgentClient(f"http://{ip}:{port}", self.secret))
            for i, (_, ip, port) in enumerate(hosts)
        ]
        for node in self.nodes:
            self.wait(node)

    def config(self, i: int) -> Path:
        return self.work / f"node{i}"

    def cache(self, i: int) -> Path:
        return self.config(i) / "hf"

    def start(self, i: int, cache: Path | None = None, models: Path | None = None) -> None:
        ns, _, port = self.hosts[i]
        env = dict(
            os.environ,
            MLXDIST_CONFIG=str(self.config(i)),
            HF_HUB_CACHE=str(cache or self.cache(i)),
            HF_ENDPOINT=self.hub_url,
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        env.pop("HF_TOKEN", None)
        argv = [sys.executable, "-m", "mlxdist.cli", "agent", "--cluster", "fetch"]
        argv += ["--interface", self.interface, "--port", str(port)]
        argv += ["--models-dir", str(models)] if models else []
        argv = ["ip", "netns", "exec", ns, *argv]
        log = open(self.config(i) / "agent.log", "a")
        self.procs[i] = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=log, stdout=log)

    def wait(self, node: Node) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                node.client.health()
                return
            except AgentError:
                assert time.monotonic() < deadline, "the agent did not start"
                time.sleep(0.2)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(i)


@pytest.fixture(scope="module")
def world(tiny_r1, tmp_path_factory):
    work = tmp_path_factory.mktemp("hubfetch")
    with hosts_and_hub_address(2) as (hosts, hub_ip, interface):
        hub = SlowHub(hub_ip)
        hub.repos[REPO] = model_files(tiny_r1)
        with serving(hub), pytest.MonkeyPatch.context() as patch:
            # The launcher's own requests (the commit, the listing) go to this Hub too.
            patch.setattr(constants, "ENDPOINT", hub.url)
            agents = Agents(hosts, interface, work, hub.url)
            try:
                yield hub, agents, tiny_r1
            finally:
                agents.stop()


def shares(model: Path) -> list[list[str]]:
    repo = sorted(p.name for p in model.iterdir() if p.is_file())
    return [node_files(weight_map(model), repo, "pipeline", SPLIT, r) for r in range(len(SPLIT))]


def cached(cache: Path, repo: str = REPO) -> dict[str, int]:
    """The files of the repo's snapshot in a cache, with the bytes behind each."""
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {p.name: p.stat().st_size for s in snapshots.iterdir() for p in s.iterdir()}


def blob_bytes(cache: Path, repo: str = REPO) -> int:
    blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    return sum(p.stat().st_size for p in blobs.iterdir() if not p.name.endswith(".incomplete"))


def test_each_node_fetches_only_its_files(world):
    hub, agents, model = world
    files = shares(model)
    assert files[0] != files[1]  # the split gives the two nodes different weight files
    lines: list[str] = []
    infos = hub_fetch(
        agents.nodes, REPO, None, files, show=lambda rows: lines.append(progress_line(*rows[-1]))
    )
    for i, (mine, info) in enumerate(zip(files, infos)):
        share = sum((model / f).stat().st_size for f in mine)
        assert cached(agents.cache(i)) == {f: (model / f).stat().st_size for f in mine}
        assert blob_bytes(agents.cache(i)) == share == info["total"] == info["done"]
        assert info["received"] == share
        folder = agents.config(i) / "models" / info["folder"]
        assert sorted(p.name for p in folder.iterdir()) == mine
        print(f"\nnode{i}: received {info['received']} bytes, its share {share} bytes ({mine})")
    assert lines and lines[-1].startswith("total:") and lines[-1].endswith("done")


def test_an_interrupted_fetch_resumes(world):
    hub, agents, model = world
    big = max(shares(model)[1], key=lambda f: (model / f).stat().st_size)
    size = (model / big).stat().st_size
    for leftover in agents.cache(1).glob("models--*"):
        shutil.rmtree(leftover)
    hub.delay = 0.02
    try:
        started = agents.nodes[1].client.fetch_start(REPO, [big])
        deadline = time.monotonic() + 60
        while agents.nodes[1].client.fetch_status(started["id"])["done"] < size // 4:
            assert time.monotonic() < deadline, "the fetch made no progress"
            time.sleep(0.05)
        agents.kill(1)  # the agent goes away halfway through the file
    finally:
        hub.delay = 0.0
    [partial] = agents.cache(1).glob("models--*/blobs/*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size
    agents.start(1)
    agents.wait(agents.nodes[1])
    [info] = hub_fetch([agents.nodes[1]], REPO, None, [[big]])
    assert info["received"] == size - kept  # only the rest came over the network
    assert (REPO, big, f"bytes={kept}-") in hub.ranges
    assert cached(agents.cache(1))[big] == size == blob_bytes(agents.cache(1))
    print(f"\nresumed {big} at byte {kept} of {size}")


def test_a_later_fetch_trusts_its_checked_blobs_unless_asked_to_verify(world):
    """A second fetch reads back only the small files (the weights' blobs are named by the
    sha256 they were checked against on arrival); a blob changed on disk at the same size
    passes that, and --verify (verify=True) finds it, names it and deletes it."""
    hub, agents, model = world
    files = shares(model)
    hub_fetch(agents.nodes[:1], REPO, None, files[:1])
    weights = [f for f in files[0] if f.endswith(".safetensors")]
    small = sum((model / f).stat().st_size for f in files[0] if f not in weights)
    [again] = hub_fetch(agents.nodes[:1], REPO, None, files[:1])
    assert again["received"] == 0 and again["rehashed"] == small  # no weight byte read
    blob = (agents.cache(0) / "models--org--tiny-r1" / "snapshots").glob(f"*/{weights[0]}")
    blob = next(blob).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: a damaged disk or a tampered cache
    blob.write_bytes(bytes(data))
    [trusted] = hub_fetch(agents.nodes[:1], REPO, None, files[:1])
    assert trusted["rehashed"] == small  # by design: only verify reads the weights again
    with pytest.raises(FetchError) as e:
        hub_fetch(agents.nodes[:1], REPO, None, files[:1], verify=True)
    assert weights[0] in str(e.value) and "sha256" in str(e.value) and "node0" in str(e.value)
    assert not blob.exists()  # refused and deleted: the next fetch gets it whole again
    [info] = hub_fetch(agents.nodes[:1], REPO, None, files[:1], verify=True)
    assert info["received"] == (model / weights[0]).stat().st_size
    assert info["rehashed"] == sum((model / f).stat().st_size for f in files[0]) - info["received"]


def test_bytes_that_differ_from_the_listing_are_refused_as_they_arrive(world):
    """The Hub lists a weight file with another sha256 than the bytes it sends: the file,
    hashed while it was written, is refused and named, and nothing of it is kept."""
    hub, agents, model = world
    name = max(shares(model)[1], key=lambda f: (model / f).stat().st_size)
    data = (model / name).read_bytes()
    wrong = hashlib.sha256(b"other" + data).hexdigest()
    for leftover in agents.cache(1).glob("models--*"):
        shutil.rmtree(leftover)
    hub.tree_override[name] = {"lfs": {"oid": wrong, "size": len(data), "pointerSize": 130}}
    try:
        with pytest.raises(FetchError) as e:
            hub_fetch(agents.nodes[1:], REPO, None, [[name]])
    finally:
        hub.tree_override.clear()
    assert str(e.value).startswith(f"node1: {name} of {REPO} differs from the Hub's size or sha256")
    assert not list(agents.cache(1).glob("models--*/blobs/*"))  # neither blob nor .incomplete


def poll(node: Node, started: dict) -> dict:
    deadline = time.monotonic() + 60
    while (info := node.client.fetch_status(started["id"]))["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, "the fetch did not end"
        time.sleep(0.05)
    return info


def test_every_node_gets_the_one_commit_even_if_the_branch_moves(world, monkeypatch):
    """The branch moves on the Hub after the first agent was asked: the second still gets
    the commit the launcher resolved once, not the branch's new one."""
    from huggingface_hub import HfApi

    hub, agents, _ = world
    moved = "f" * 40
    start = agents.nodes[0].client.fetch_start

    def start_then_move(*args, **kwargs):
        answer = start(*args, **kwargs)
        hub.commit = moved  # a push to main, mid-launch
        return answer

    monkeypatch.setattr(agents.nodes[0].client, "fetch_start", start_then_move)
    try:
        infos = hub_fetch(agents.nodes, REPO, "main", [["config.json"], ["config.json"]])
        assert HfApi().model_info(REPO, revision="main").sha == moved  # it did move
    finally:
        hub.commit = COMMIT
    assert [i["commit"] for i in infos] == [COMMIT, COMMIT]
    assert [i["revision"] for i in infos] == [COMMIT, COMMIT]  # what the agents were sent


@pytest.mark.parametrize("hostile", ["commit", "config.json", "weights"])
def test_a_commit_or_etag_that_is_no_hash_is_refused_before_any_path(world, hostile):
    """A broken or hostile Hub answering '../..' for the commit or a file's hash: the agent
    refuses in one line naming the repo, and writes nothing outside its cache's blobs."""
    hub, agents, model = world
    evil = "../../../../escaped"
    weights = sorted(shares(model)[0])[-1]
    if hostile == "commit":
        hub.commit = evil
    elif hostile == "config.json":
        hub.tree_override["config.json"] = {"oid": evil}
    else:
        size = (model / weights).stat().st_size
        hub.tree_override[weights] = {"lfs": {"oid": evil, "size": size, "pointerSize": 130}}
    try:
        node = agents.nodes[0]
        info = poll(node, node.client.fetch_start(REPO, ["config.json", weights], "main"))
        if hostile == "commit":  # the launcher refuses it too, before asking any agent
            with pytest.raises(FetchError, match="not 40 hex digits"):
                pin_commit(REPO, "main")
    finally:
        hub.commit = COMMIT
        hub.tree_override.clear()
    assert info["state"] == "failed" and f"{REPO}@main" in info["error"]
    assert "\n" not in info["error"] and "refused" in info["error"]
    assert not [p for p in agents.work.rglob("escaped*")]
    assert not (agents.cache(0) / "escaped").exists()


def test_a_revision_with_a_slash_is_kept_as_the_hub_cache_keeps_it(world, tmp_path):
    """refs/pr/1 (a pull request's head): fetched, and its ref written at refs/refs/pr/1 as
    huggingface_hub writes it; the launcher resolves it too."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision

    hub, agents, _ = world
    hub.revisions.add("refs/pr/1")
    node = agents.nodes[0]
    info = poll(node, node.client.fetch_start(REPO, ["config.json"], "refs/pr/1"))
    assert info["state"] == "done" and info["commit"] == COMMIT, info["error"]
    ours = agents.cache(0) / "models--org--tiny-r1" / "refs"
    theirs = tmp_path / "theirs"
    _cache_commit_hash_for_specific_revision(str(theirs), "refs/pr/1", COMMIT)
    assert (ours / "refs" / "pr" / "1").read_text() == (theirs / "refs/refs/pr/1").read_text()
    assert pin_commit(REPO, "refs/pr/1") == COMMIT


def test_the_push_path_sends_each_node_only_its_files_once(world):
    _, agents, model = world
    files = shares(model)
    sent: dict[str, int] = {}

    def count(name: str, done: int, total: int) -> None:
        sent[name] = done

    rels = [f"{model.name}/pushed/{r}" for r in range(2)]
    push_files(model, agents.nodes, files, rels, count)
    for i, (mine, rel) in enumerate(zip(files, rels)):
        folder = agents.config(i) / "models" / rel
        assert sorted(p.name for p in folder.iterdir()) == mine
        share = sum((model / f).stat().st_size for f in mine)
        got = sum(v for k, v in sent.items() if k.startswith(f"node{i}: "))
        assert got == share
        print(f"\nnode{i}: pushed {got} bytes, its share {share} bytes")
    sent.clear()
    push_files(model, agents.nodes, files, rels, count)
    assert sum(sent.values()) == 0  # held whole already: nothing is sent again


def test_the_token_goes_to_the_hub_and_nowhere_else(world, monkeypatch):
    hub, agents, model = world
    token = "hf_" + os.urandom(12).hex()
    monkeypatch.setenv("HF_TOKEN", token)
    hub.auth.clear()
    [info] = hub_fetch(agents.nodes[:1], REPO, None, [["config.json"]])
    assert f"Bearer {token}" in hub.auth  # the agent used it
    assert token not in repr(info)
    assert token not in (agents.config(0) / "agent.log").read_text(errors="replace")
    proc = agents.procs[0]
    assert token not in " ".join(psutil.Process(proc.pid).cmdline())
    assert token not in str(psutil.Process(proc.pid).environ())


def test_a_token_echoed_back_in_an_error_is_never_shown(world, monkeypatch):
    """A server that refuses the listing and repeats the Authorization header in its error:
    the one line the launcher shows, and the agent's log, hold no token."""
    hub, agents, _ = world
    token = "hf_" + os.urandom(12).hex()
    monkeypatch.setenv("HF_TOKEN", token)
    hub.echo_auth = True
    try:
        with pytest.raises(HfHubHTTPError) as raw:  # what huggingface_hub raises holds it
            list(HfApi(token=token).list_repo_tree(REPO, revision=COMMIT))
        assert token in str(raw.value)
        with pytest.raises(FetchError) as e:
            hub_fetch(agents.nodes[:1], REPO, None, [["config.json"]])
    finally:
        hub.echo_auth = False
    assert "401" in str(e.value) and REPO in str(e.value)
    assert token not in str(e.value) and "\n" not in str(e.value)
    assert token not in (agents.config(0) / "agent.log").read_text(errors="replace")


def test_auto_fetches_from_the_hub_only_when_every_node_reaches_it(world):
    _, agents, _ = world
    how, why = choose_fetch("auto", agents.nodes, REPO)
    assert how == "hub", why
    assert why == f"every node reaches the Hub and sees {REPO}"
    how, why = choose_fetch("auto", agents.nodes, "org/not-there")
    assert how == "push" and why.startswith("node0 cannot reach the Hub (") and "NotFound" in why
    assert choose_fetch("auto", agents.nodes, None) == ("push", "the model is a local folder")
    assert choose_fetch("push", agents.nodes, REPO) == ("push", "--fetch push")


@contextlib.contextmanager
def node1_on_a_small_disk(agents, tmp_path: Path, where: str):
    """node1's agent restarted with its `where` (cache or models) folder on a 1 MB file system;
    afterwards as it was."""
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        agents.kill(1)
        agents.start(1, **{where: small})
        agents.wait(agents.nodes[1])
        yield small
    finally:
        agents.kill(1)
        subprocess.run(["umount", str(small)], check=False)
        agents.start(1)
        agents.wait(agents.nodes[1])


def test_a_share_larger_than_the_nodes_free_disk_is_refused(world, tmp_path):
    """node1's Hugging Face cache on a 1 MB file system: its share (several MB) is refused
    before a byte is sent, naming the node and the bytes."""
    hub, agents, model = world
    with node1_on_a_small_disk(agents, tmp_path, "cache"):
        free = agents.nodes[1].client.facts()["hf_cache_free"]
        assert 0 < free <= 2**20  # the agent reports its cache's disk
        before = len(hub.ranges)
        with pytest.raises(FetchError) as e:
            hub_fetch(agents.nodes[1:], REPO, None, shares(model)[1:])
        share = sum((model / f).stat().st_size for f in shares(model)[1])
        assert str(e.value).startswith(f"node1: needs {human_bytes(share)} ({share} bytes)")
        assert "free in its Hugging Face cache" in str(e.value) and "\n" not in str(e.value)
        assert len(hub.ranges) == before  # nothing was downloaded


def launch_repo(hub, agents, tmp_path, repo, fetch, parallel, prompt, max_tokens):
    """`mlxdist launch REPO --hosts` from this namespace, over the agents, its own cache."""
    lines = []
    for i, (_, ip, port) in enumerate(agents.hosts):
        lines += ["[[hosts]]", f'name = "node{i}"', f'address = "{ip}"', f"rank = {i}"]
        lines += [f"agent_port = {port}"]
    (tmp_path / "hosts.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "launcher").mkdir()
    shutil.copy(agents.work / "secret", tmp_path / "launcher" / "secret")
    cache = tmp_path / "launcher-hf"
    env = dict(
        os.environ,
        MLXDIST_CONFIG=str(tmp_path / "launcher"),
        HF_HUB_CACHE=str(cache),
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    argv = [sys.executable, "-m", "mlxdist.cli", "launch", repo, "--hosts"]
    argv += [str(tmp_path / "hosts.toml"), "--fetch", fetch, "--parallel", parallel]
    argv += ["--prompt", prompt, "--no-chat", "--temp", "0", "--max-tokens", str(max_tokens)]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mlx_repo(world, tmp_path_factory):
    """tiny-r1 quantised by mlxdist, served as org/tiny-r1-4bit (as mlx-community's repos hold
    MLX models): what mlx-lm loads for the reference."""
    hub, _, model = world
    out = tmp_path_factory.mktemp("mlx") / "tiny-r1-4bit"
    argv = [sys.executable, "-m", "mlxdist.cli", "quantize", str(model), str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hub.repos["org/tiny-r1-4bit"] = {n: d for n, d in model_files(out).items()}
    return "org/tiny-r1-4bit", out


def one_file_repo(hub, mlx_repo) -> str:
    """The same quantised tiny-r1 as one model.safetensors without an index (as small repos
    on the Hub are), served as org/tiny-r1-one-file."""
    import mlx.core as mx

    repo, model = mlx_repo
    one = {n: d for n, d in hub.repos[repo].items() if not n.endswith(".safetensors")}
    del one["model.safetensors.index.json"]
    tensors = {}
    for f in sorted(model.glob("*.safetensors")):
        tensors |= mx.load(str(f))
    merged = model.parent / "one-file.safetensors"
    mx.save_safetensors(str(merged), tensors, metadata={"format": "mlx"})
    hub.repos["org/tiny-r1-one-file"] = one | {"model.safetensors": merged.read_bytes()}
    return "org/tiny-r1-one-file"


@pytest.mark.parametrize(
    "fetch, parallel, one_file",
    [
        ("hub", "pipeline", False),
        ("push", "pipeline", False),
        ("hub", "tensor", False),
        ("auto", "auto", False),
        ("hub", "pipeline", True),
    ],
)
def test_launch_of_a_repo_id_equals_one_process(
    world, mlx_repo, tmp_path, fetch, parallel, one_file
):
    """`mlxdist launch org/name --hosts --fetch`: the launcher reads the config and index (all
    of the repo with push), the nodes get their files, the answer is one process's. A repo of
    one weight file without an index: every node fetches that file, and the launch says so."""
    from test_cluster_hosts import MAX_TOKENS, PROMPT, reference_text

    hub, agents, _ = world
    repo, model = mlx_repo
    if one_file:
        repo = one_file_repo(hub, mlx_repo)
    done = launch_repo(hub, agents, tmp_path, repo, fetch, parallel, PROMPT, MAX_TOKENS)
    cache = tmp_path / "launcher-hf"
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip("\n") == reference_text(model)
    if one_file:
        size = len(hub.repos[repo]["model.safetensors"])
        assert f"{repo} keeps its weights in one file without an index" in done.stderr
        assert "every node needs that whole file, in pipeline mode too" in done.stderr
        assert set(cached(cache, repo)) == {"config.json"}  # the launcher read no weights
        for i in range(2):
            assert cached(agents.cache(i), repo)["model.safetensors"] == size
        return
    if fetch == "auto":  # the agents reach the Hub: they fetch
        assert f"files: hub (every node reaches the Hub and sees {repo})" in done.stderr
    else:
        assert f"files: {fetch} (--fetch {fetch})" in done.stderr
    held = set(cached(cache, repo))
    if fetch != "push":  # the launcher read only what a plan needs; the nodes fetched the rest
        assert held == {"config.json", "model.safetensors.index.json"}
        assert "node0: " in done.stderr and "bytes received of its share of" in done.stderr
    else:  # the launcher fetched the repo once, then pushed each node only its files
        assert {n for n in hub.repos[repo] if n.endswith(".safetensors")} <= held
    if parallel == "tensor":
        assert "every node needs every file in tensor mode" in done.stderr


@pytest.fixture(scope="module")
def community_repo(world, tmp_path_factory):
    """A tiny llama quantised as mlx-community's repos are (4 bits, here group 32, in three
    shards with an index, the files mlx_lm.convert writes), served as
    mlx-community/tiny-llama-4bit."""
    from mlxdist.testing.make_model import make_model  # what `testing make-model llama` writes

    hub, _, _ = world
    work = tmp_path_factory.mktemp("community")
    make_model("llama", work / "llama")
    out = work / "tiny-llama-4bit"
    quantize = [sys.executable, "-m", "mlxdist.cli", "quantize", str(work / "llama"), str(out)]
    quantize += ["--group-size", "32", "--max-file-size", "0.0002"]
    done = subprocess.run(quantize, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    files = {n: d for n, d in model_files(out).items() if n != "manifest.json"}
    assert len([n for n in files if n.endswith(".safetensors")]) > 2
    hub.repos["mlx-community/tiny-llama-4bit"] = files
    return "mlx-community/tiny-llama-4bit", out


def test_a_pre_quantised_repo_is_planned_from_its_index_and_fetched_by_share(
    world, community_repo, tmp_path
):
    """`mlxdist plan` of the repo id reads config.json and the index only; two nodes then fetch
    it from the Hub by that plan's split, each receiving exactly its share's bytes."""
    hub, agents, _ = world
    repo, model = community_repo
    cache = tmp_path / "launcher-hf"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_ENDPOINT=hub.url)
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}
    argv = [sys.executable, "-m", "mlxdist.cli", "plan", repo, "--simulate", "2x192GB"]
    argv += ["--parallel", "pipeline", "--json"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert hub.fetched(repo) == {"config.json", "model.safetensors.index.json"}
    assert set(cached(cache, repo)) == hub.fetched(repo)  # no weight file came here
    split = json.loads(done.stdout)["split"]
    snapshot = next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
    rows = hub_shares(snapshot, repo_sizes(repo, COMMIT), "pipeline", split)
    assert rows[0].files != rows[1].files
    infos = hub_fetch(agents.nodes, repo, None, [r.files for r in rows])
    for i, (row, info) in enumerate(zip(rows, infos)):
        share = sum((model / f).stat().st_size for f in row.files)
        assert row.bytes == share == info["received"] == blob_bytes(agents.cache(i), repo)
        assert set(cached(agents.cache(i), repo)) == set(row.files)
        print(f"\nnode{i}: {share} bytes of {repo} ({row.files})")


def test_a_push_larger_than_a_nodes_free_disk_is_refused(world, mlx_repo, tmp_path):
    """node1's models folder on a 1 MB file system: the launch refuses before pushing, in one
    line naming the node and the bytes."""
    hub, agents, _ = world
    repo, _ = mlx_repo
    with node1_on_a_small_disk(agents, tmp_path, "models") as small:
        done = launch_repo(hub, agents, tmp_path, repo, "push", "pipeline", "Hi", 2)
        assert done.returncode == 1
        [line] = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
        assert line.startswith("error: node node1 needs ") and "free in its models folder" in line
        assert not any(small.iterdir())  # nothing was sent
