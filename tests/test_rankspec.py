"""The rank's command line: RankSpec both ways, and every starter's argv read back by the rank."""

from __future__ import annotations

import io
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from launcher import local
from launcher.agent import StartRank
from launcher.agent.ranks import Runs
from launcher.rankspec import DRAFT_TOKENS, MAX_CONTEXT_ENV, RANK_MODULE, RankSpec
from launcher.ssh import SshClient

BASE = ["--host", "127.0.0.1", "--port", "8080"]

# (spec, its argv): one row per mode, and every optional flag at least once.
SPECS = [
    (RankSpec("/m", split=(2, 3)), ["--model", "/m", "--split", "2,3", *BASE, "--backend", "ring"]),
    (
        RankSpec("/m", "expert", ranks=3),
        ["--model", "/m", "--parallel", "expert", "--ranks", "3", *BASE, "--backend", "ring"],
    ),
    (
        RankSpec("/m", "expert", ranks=2, experts=(5, 3), attention="replicated"),
        ["--model", "/m", "--parallel", "expert", "--ranks", "2", "--experts", "5,3", *BASE]
        + ["--backend", "ring", "--attention", "replicated"],
    ),
    (
        RankSpec("/m", "tensor", ranks=2, name="tiny", host="10.0.0.1", port=18080),
        ["--model", "/m", "--parallel", "tensor", "--ranks", "2", "--host", "10.0.0.1"]
        + ["--port", "18080", "--name", "tiny", "--backend", "ring"],
    ),
    (
        RankSpec("/m", split=(4,), max_context=4096, heartbeat="[fe80::1%en0]:9", node="mac-1"),
        ["--model", "/m", "--split", "4", *BASE, "--backend", "ring", "--max-context", "4096"]
        + ["--heartbeat", "[fe80::1%en0]:9", "--node", "mac-1"],
    ),
    (
        RankSpec("/m", split=(2, 2), kv_bits=8, prompt_cache_bytes=0),
        ["--model", "/m", "--split", "2,2", *BASE, "--backend", "ring", "--kv-bits", "8"]
        + ["--prompt-cache-bytes", "0"],
    ),
    (
        RankSpec("/m", "expert", ranks=2, kv_bits=4, prompt_cache_bytes=2**31),
        ["--model", "/m", "--parallel", "expert", "--ranks", "2", *BASE, "--backend", "ring"]
        + ["--kv-bits", "4", "--prompt-cache-bytes", str(2**31)],
    ),
]


@pytest.fixture(autouse=True)
def no_context_env(monkeypatch):
    monkeypatch.delenv(MAX_CONTEXT_ENV, raising=False)


@pytest.mark.parametrize("spec,argv", SPECS)
def test_argv_of_a_known_spec(spec, argv):
    assert spec.to_argv() == argv


@pytest.mark.parametrize("spec", [s for s, _ in SPECS])
def test_round_trip(spec):
    assert RankSpec.from_argv(spec.to_argv()) == spec


def test_pipeline_ranks_are_the_split():
    assert RankSpec("/m", split=[2, 2, 2]) == RankSpec("/m", split=(2, 2, 2), ranks=3)
    assert RankSpec("/m", split=[2, 2, 2]).ranks == 3
    assert RankSpec.from_argv(["--model", "/m", "--split", "1,2", "--ranks", "7"]).ranks == 2


def test_for_split_counts_ranks_outside_pipeline_mode():
    assert RankSpec.for_split("/m", [2, 2]) == RankSpec("/m", split=(2, 2))
    assert RankSpec.for_split("/m", [2, 2], "tensor") == RankSpec("/m", "tensor", ranks=2)
    spec = RankSpec.for_split("/m", [2, 2, 2], "expert", [3, 3, 2])
    assert (spec.split, spec.ranks, spec.experts) == (None, 3, (3, 3, 2))


def test_max_context_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv(MAX_CONTEXT_ENV, "512")
    assert RankSpec.from_argv(["--model", "/m", "--split", "2"]).max_context == 512
    assert (
        RankSpec.from_argv(["--model", "/m", "--split", "2", "--max-context", "9"]).max_context == 9
    )
    monkeypatch.setenv(MAX_CONTEXT_ENV, "0")
    assert RankSpec.from_argv(["--model", "/m", "--split", "2"]).max_context is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/m"], "--split is needed in pipeline mode"),
        (["--model", "/m", "--split", ""], "--split is needed in pipeline mode"),
        (["--model", "/m", "--parallel", "expert"], "--ranks is needed in expert mode"),
        (["--model", "/m", "--parallel", "tensor", "--ranks", "0"], "--ranks is needed in tensor"),
        (["--split", "2,2"], "the following arguments are required: --model"),
        (["--model", "/m", "--split", "2,x"], "--split takes whole numbers"),
        (["--model", "/m", "--split", "2", "--experts", "3,"], "--experts takes whole numbers"),
        (["--model", "/m", "--parallel", "sequence", "--ranks", "2"], "invalid choice"),
        (["--model", "/m", "--split", "2", "--attention", "half"], "invalid choice"),
        (["--model", "/m", "--split", "2", "--port", "http"], "invalid int value"),
        (["--model", "/m", "--split", "2", "--colour", "red"], "unrecognized arguments"),
        (["--model", "/m", "--split", "2", "--experts", "3"], "--experts is for expert mode"),
        (["--model", "/m", "--split", "2", "--kv-bits", "6"], "invalid choice"),
        (["--model", "/m", "--split", "2", "--prompt-cache-bytes", "-1"], "must be 0 (off)"),
        (["--model", "/m", "--split", "2", "--prompt-cache-bytes", "2GB"], "invalid int value"),
        (
            ["--model", "/m", "--parallel", "tensor", "--ranks", "2", "--experts", "1,1"],
            "expert mode",
        ),
    ],
)
def test_bad_argv_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        RankSpec.from_argv(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields",
    [
        {"split": None},
        {"split": ()},
        {"parallel": "expert", "ranks": None},
        {"parallel": "tensor", "ranks": 2, "split": (1, 1)},
        {"parallel": "sequence"},
        {"attention": "half"},
        {"experts": (4, 4)},
        {"parallel": "tensor", "ranks": 2, "split": None, "experts": (4, 4)},
        {"kv_bits": 2},
        {"prompt_cache_bytes": -1},
    ],
)
def test_bad_spec_is_refused(fields):
    with pytest.raises(ValueError):
        RankSpec(**{"model": "/m", "split": (2, 2)} | fields)


# ---------------------------------------------------------------------------------------------
# The three starters, each caught where it would start its process


class _Popen:
    def __init__(self, args, **_):
        self.args = args
        self.pid = 4242
        self.returncode = None
        self.stdin = io.BytesIO()  # what an ssh starter writes to its remote shell

    def poll(self):
        return None


class _Started(list):
    """Each command line started; stdin: what was written to each one's stdin."""

    def __init__(self) -> None:
        super().__init__()
        self.stdin: list[io.BytesIO] = []

    def clear(self) -> None:
        super().clear()
        self.stdin.clear()


@pytest.fixture
def started(monkeypatch):
    calls = _Started()

    def popen(args, **kw):
        calls.append(list(args))
        proc = _Popen(args, **kw)
        calls.stdin.append(proc.stdin)
        return proc

    monkeypatch.setattr("subprocess.Popen", popen)
    return calls


def _rank_flags(command: list[str]) -> list[str]:
    """The flags after `PYTHON -m mlxdist.rank`."""
    assert command[1:3] == ["-m", RANK_MODULE]
    return command[3:]


def local_argv(started, tmp_path, req: dict) -> list[list[str]]:
    local.start_local(
        Path(req["model"]),
        req["split"],
        host=req["http_host"],
        port=req["http_port"],
        name=req["name"],
        run_dir=tmp_path / "local",
        parallel=req.get("parallel", "pipeline"),
        experts=req.get("experts"),
    )
    return [_rank_flags(c) for c in started]


def agent_argv(started, tmp_path, req: dict) -> list[list[str]]:
    runs = Runs(tmp_path / "runs", "/py")
    (tmp_path / "runs").mkdir()
    hostfile = [[f"10.0.0.{r + 1}:5000"] for r in range(len(req["split"]))]
    for rank in range(len(req["split"])):
        runs.start(Path(req["model"]), StartRank(**req, rank=rank, hostfile=hostfile))
    return [_rank_flags(c) for c in started]


def ssh_argv(started, tmp_path, req: dict) -> list[list[str]]:
    client = SshClient("me@mac", python="/py", logs=tmp_path)
    hostfile = [[f"10.0.0.{r + 1}:5000"] for r in range(len(req["split"]))]
    for rank in range(len(req["split"])):
        client.start_rank(**req, rank=rank, hostfile=hostfile)
    scripts = [c[-1] for c in started]
    return [_rank_flags(shlex.split(s.split("exec ", 1)[1])) for s in scripts]


REQUESTS = [
    {"split": [2, 2]},
    {"split": [1, 2, 1]},
    {"split": [4, 4], "parallel": "expert"},
    {"split": [4, 4, 4], "parallel": "expert", "experts": [3, 3, 2]},
    {"split": [4, 4], "parallel": "tensor"},
]


@pytest.mark.parametrize("fields", REQUESTS)
@pytest.mark.parametrize("starter", [local_argv, agent_argv, ssh_argv])
def test_every_starter_gives_the_spec_of_the_request(starter, fields, started, tmp_path):
    model = tmp_path / "tiny"  # local reads its routed experts when none are given
    model.mkdir()
    (model / "config.json").write_text('{"n_routed_experts": 8, "num_hidden_layers": 4}')
    req = {"model": str(model), "http_host": "127.0.0.1", "http_port": 18080, "name": "tiny"}
    req |= fields
    expected = RankSpec.for_split(
        str(model),
        req["split"],
        req.get("parallel", "pipeline"),
        req.get("experts"),
        name="tiny",
        port=18080,
    )
    argvs = starter(started, tmp_path, req)
    assert len(argvs) == len(req["split"])
    for argv in argvs:
        spec = RankSpec.from_argv(argv)
        assert spec.to_argv() == argv
        if starter is local_argv:  # local ranks always beat to rank 0 on loopback
            assert spec.heartbeat.startswith("127.0.0.1:")
            spec = replace(spec, heartbeat=None)
        assert spec == expected


def test_agent_and_ssh_carry_max_context_and_their_heartbeat(started, tmp_path):
    req = {"model": "/models/tiny", "split": [2, 2], "http_host": "10.0.0.1"}
    req |= {"http_port": 18080, "name": "tiny", "max_context": 4096}
    expected = RankSpec("/models/tiny", split=(2, 2), name="tiny", host="10.0.0.1", port=18080)
    expected = replace(expected, max_context=4096)
    [ssh0, ssh1] = ssh_argv(started, tmp_path, req)
    assert RankSpec.from_argv(ssh0) == RankSpec.from_argv(ssh1) == expected
    started.clear()
    beats = {"heartbeat_port": 18081, "heartbeat_token": "ab" * 16, "node": "mac-1"}
    beating = replace(expected, heartbeat="10.0.0.1:18081", node="mac-1")
    [agent0, _] = agent_argv(started, tmp_path, req | beats)
    assert RankSpec.from_argv(agent0) == beating
    started.clear()
    [ssh0, _] = ssh_argv(started, tmp_path, req | beats)
    assert RankSpec.from_argv(ssh0) == beating
    # The token reaches the remote shell on its stdin, never on a command line.
    assert not any("ab" * 16 in word for call in started for word in call)
    assert [w.getvalue() for w in started.stdin] == [b"ab" * 16 + b"\n"] * 2


# --kv-bits to every rank, --prompt-cache-bytes to rank 0 alone (it tells the others)
KV = {"kv_bits": 8}
BUDGET = 3 * 2**30


def _kv_of(argvs: list[list[str]]) -> list[tuple[int | None, int | None]]:
    specs = [RankSpec.from_argv(argv) for argv in argvs]
    return [(spec.kv_bits, spec.prompt_cache_bytes) for spec in specs]


def test_local_gives_kv_bits_to_every_rank_and_the_budget_to_rank_0(started, tmp_path):
    local.start_local(
        Path("/models/tiny"), [1, 1, 2], run_dir=tmp_path, prompt_cache_bytes=BUDGET, **KV
    )
    assert _kv_of([_rank_flags(c) for c in started]) == [(8, BUDGET), (8, None), (8, None)]


def test_agent_gives_kv_bits_to_every_rank_and_the_budget_to_rank_0(started, tmp_path):
    req = {"model": "/models/tiny", "split": [2, 2], "http_host": "10.0.0.1"}
    req |= {"http_port": 18080, "name": "tiny", **KV}
    runs = Runs(tmp_path / "runs", "/py")
    (tmp_path / "runs").mkdir()
    hostfile = [["10.0.0.1:5000"], ["10.0.0.2:5000"]]
    runs.start(Path("/m"), StartRank(**req, rank=0, hostfile=hostfile, prompt_cache_bytes=BUDGET))
    runs.start(Path("/m"), StartRank(**req, rank=1, hostfile=hostfile))
    assert _kv_of([_rank_flags(c) for c in started]) == [(8, BUDGET), (8, None)]


@pytest.mark.parametrize(
    "fields,why",
    [
        ({"rank": 1, "prompt_cache_bytes": BUDGET}, "prompt_cache_bytes is rank 0's"),
        ({"rank": 0, "prompt_cache_bytes": -1}, "greater than or equal to 0"),
        ({"rank": 0, "kv_bits": 6}, "Input should be 4 or 8"),
        ({"rank": 0, "kv_bits": "8"}, "Input should be 4 or 8"),
    ],
)
def test_agent_refuses_a_bad_kv_request(fields, why):
    from pydantic import ValidationError

    req = {"model": "m", "split": [2, 2], "http_host": "10.0.0.1", "http_port": 18080}
    req |= {"name": "tiny", "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5000"]]}
    with pytest.raises(ValidationError, match=why):
        StartRank(**req | fields)


def test_remote_over_ssh_gives_kv_bits_to_every_rank_and_the_budget_to_rank_0(started, tmp_path):
    """start_remote's fields, through the ssh starter's command lines (the agent's request
    body is StartRank's, checked above)."""
    from launcher.remote import Node, start_remote

    nodes = [
        Node(f"mac-{r}", f"10.0.0.{r + 1}", SshClient(f"me@mac-{r}", python="/py", logs=tmp_path))
        for r in range(3)
    ]
    start_remote(nodes, ["/m"] * 3, [1, 1, 2], name="tiny", prompt_cache_bytes=BUDGET, **KV)
    scripts = [c[-1] for c in started]
    argvs = [_rank_flags(shlex.split(s.split("exec ", 1)[1])) for s in scripts]
    assert _kv_of(argvs) == [(8, BUDGET), (8, None), (8, None)]
    started.clear()
    start_remote(nodes, ["/m"] * 3, [1, 1, 2], name="tiny", prompt_cache_bytes=0)
    scripts = [c[-1] for c in started]
    argvs = [_rank_flags(shlex.split(s.split("exec ", 1)[1])) for s in scripts]
    assert _kv_of(argvs) == [(None, 0), (None, None), (None, None)]


# --speculative and --draft-tokens to rank 0 alone (it drafts; the others verify as they decode)
DRAFTS = {"speculative": "ngram", "draft_tokens": 6}
NO_DRAFTS = ("none", DRAFT_TOKENS)


def _drafts_of(argvs: list[list[str]]) -> list[tuple[str, int]]:
    specs = [RankSpec.from_argv(argv) for argv in argvs]
    return [(spec.speculative, spec.draft_tokens) for spec in specs]


def test_local_gives_the_drafts_to_rank_0_alone(started, tmp_path):
    local.start_local(Path("/models/tiny"), [1, 1, 2], run_dir=tmp_path, **DRAFTS)
    argvs = [_rank_flags(c) for c in started]
    assert _drafts_of(argvs) == [("ngram", 6), NO_DRAFTS, NO_DRAFTS]
    assert not any("--speculative" in argv for argv in argvs[1:])


def test_agent_gives_the_drafts_to_rank_0_alone(started, tmp_path):
    req = {"model": "/models/tiny", "split": [2, 2], "http_host": "10.0.0.1"}
    req |= {"http_port": 18080, "name": "tiny"}
    runs = Runs(tmp_path / "runs", "/py")
    (tmp_path / "runs").mkdir()
    hostfile = [["10.0.0.1:5000"], ["10.0.0.2:5000"]]
    runs.start(Path("/m"), StartRank(**req, rank=0, hostfile=hostfile, **DRAFTS))
    runs.start(Path("/m"), StartRank(**req, rank=1, hostfile=hostfile))
    assert _drafts_of([_rank_flags(c) for c in started]) == [("ngram", 6), NO_DRAFTS]


@pytest.mark.parametrize(
    "fields,why",
    [
        ({"rank": 1, "speculative": "ngram"}, "prompt lookup's settings are rank 0's"),
        ({"rank": 1, "draft_tokens": 6}, "prompt lookup's settings are rank 0's"),
        ({"rank": 0, "speculative": "eagle"}, "Input should be 'none', 'ngram' or 'mtp'"),
        ({"rank": 0, "draft_tokens": 0}, "greater than or equal to 1"),
        ({"rank": 0, "draft_tokens": 17}, "less than or equal to 16"),
        ({"rank": 0, "draft_tokens": "4"}, "Input should be a valid integer"),
    ],
)
def test_agent_refuses_a_bad_speculative_request(fields, why):
    from pydantic import ValidationError

    req = {"model": "m", "split": [2, 2], "http_host": "10.0.0.1", "http_port": 18080}
    req |= {"name": "tiny", "hostfile": [["10.0.0.1:5000"], ["10.0.0.2:5000"]]}
    with pytest.raises(ValidationError, match=why):
        StartRank(**req | fields)


def _agent_node(app, secret: bytes, name: str, address: str):
    """A node whose client speaks to the agent's own app, signed, in this process."""
    from starlette.testclient import TestClient

    from launcher.agent_client import AgentClient
    from launcher.remote import Node

    client = AgentClient("http://testserver", secret, timeout=10)
    client._http = TestClient(app, base_url="http://testserver")  # ASGI, not a socket
    return Node(name, address, client)


def test_remote_through_agents_gives_the_drafts_to_rank_0_alone(started, tmp_path):
    """start_remote's requests, signed, through the agent app's validation to its rank argv
    (the app's lifespan is not entered, so no fake rank is signalled at its end)."""
    from launcher.agent import create_agent_app
    from launcher.remote import start_remote

    secret = b"s" * 32
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text('{"num_hidden_layers": 4}')
    app = create_agent_app(secret, tmp_path / "models", dict, runs_dir=tmp_path / "runs")
    nodes = [_agent_node(app, secret, f"mac-{r}", f"127.0.0.{r + 1}") for r in range(2)]
    start_remote(nodes, ["tiny"] * 2, [2, 2], name="tiny", **DRAFTS)
    assert _drafts_of([_rank_flags(c) for c in started]) == [("ngram", 6), NO_DRAFTS]
    started.clear()
    start_remote(nodes, ["tiny"] * 2, [2, 2], name="tiny")
    assert _drafts_of([_rank_flags(c) for c in started]) == [NO_DRAFTS, NO_DRAFTS]


def test_remote_over_ssh_gives_the_drafts_to_rank_0_alone(started, tmp_path):
    from launcher.remote import Node, start_remote

    nodes = [
        Node(f"mac-{r}", f"10.0.0.{r + 1}", SshClient(f"me@mac-{r}", python="/py", logs=tmp_path))
        for r in range(3)
    ]
    start_remote(nodes, ["/m"] * 3, [1, 1, 2], name="tiny", **DRAFTS)
    scripts = [c[-1] for c in started]
    argvs = [_rank_flags(shlex.split(s.split("exec ", 1)[1])) for s in scripts]
    assert _drafts_of(argvs) == [("ngram", 6), NO_DRAFTS, NO_DRAFTS]
    started.clear()
    start_remote(nodes, ["/m"] * 3, [1, 1, 2], name="tiny")
    scripts = [c[-1] for c in started]
    argvs = [_rank_flags(shlex.split(s.split("exec ", 1)[1])) for s in scripts]
    assert _drafts_of(argvs) == [NO_DRAFTS] * 3
    assert not any("--speculative" in argv for argv in argvs)


def test_launch_and_its_replan_give_the_drafts_to_rank_0_alone(started, tmp_path, monkeypatch):
    """launch's settings (as kv_settings and speculative_settings check them) through its start
    on this machine and its plan made again after a failure: rank 0 drafts, in both."""
    from mlxdist.cli.api_options import kv_settings, speculative_settings
    from mlxdist.cli.launch import _replan_here, _start_here
    from mlxdist.testing.make_model import make_model

    path = make_model("llama", tmp_path / "llama")
    monkeypatch.setattr("launcher.local.wait_ready", lambda running: {})  # no rank runs here
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the ranks' run folders
    kv = kv_settings(None, "0") | speculative_settings("ngram", 3) | {"context": 256}
    running = _start_here(path, 3, None, None, {"kv": kv})
    assert _drafts_of([_rank_flags(c) for c in started]) == [("ngram", 3)] + [NO_DRAFTS] * 2
    started.clear()
    _replan_here(path, None, "pipeline", {}, running, kv=kv)
    assert _drafts_of([_rank_flags(c) for c in started]) == [("ngram", 3), NO_DRAFTS]


def test_agents_launch_and_replan_give_the_drafts_to_rank_0_alone(started, tmp_path, monkeypatch):
    """A launch across agents (start_agents_cluster, the hosts file's agents found in its
    place), in tensor mode (which takes the drafts and does not speculate), and its plan made
    again after a node failed (--replan, a pipeline on the 3 left): the agents get the files
    pushed and their ranks started, and only rank 0 drafts, both times."""
    from launcher.agent import create_agent_app
    from launcher.cluster import _with_facts, replan_agents, start_agents_cluster
    from mlxdist.testing.make_model import make_model

    path = make_model("llama", tmp_path / "llama", {"num_key_value_heads": 4})
    monkeypatch.setattr("launcher.local.wait_ready", lambda running: {})  # no rank runs here
    secret = b"s" * 32
    facts = {"memory_total": 64 * 2**30, "memory_available": 60 * 2**30, "os": "Linux"}
    nodes = []
    for r in range(4):
        root = tmp_path / f"agent-{r}"
        app = create_agent_app(secret, root / "models", lambda: facts, runs_dir=root / "runs")
        nodes.append(_agent_node(app, secret, f"mac-{r}", f"127.0.0.{r + 1}"))
    monkeypatch.setattr("launcher.cluster.nodes_from_hosts", lambda *_: _with_facts(nodes))
    where = (tmp_path / "hosts.toml", None, [], secret, 256, None, "tensor", "ring", "push")
    running = start_agents_cluster(path, *where, prompt_cache_bytes=0, **DRAFTS)
    argvs = [_rank_flags(c) for c in started]
    assert [RankSpec.from_argv(argv).parallel for argv in argvs] == ["tensor"] * 4
    assert _drafts_of(argvs) == [("ngram", 6)] + [NO_DRAFTS] * 3
    started.clear()
    running.failed_nodes = ["mac-1"]
    replan_agents(path, 256, None, running)
    argvs = [_rank_flags(c) for c in started]
    assert [RankSpec.from_argv(argv).node for argv in argvs] == ["mac-0", "mac-2", "mac-3"]
    assert _drafts_of(argvs) == [("ngram", 6), NO_DRAFTS, NO_DRAFTS]
