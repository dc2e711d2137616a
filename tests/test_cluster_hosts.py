"""A cluster of stand-in Macs: agents in network namespaces on one bridge, each with its own
link-local address, found by zeroconf; `mlxdist launch` across three of them runs tiny-r1 from
per-node shards and prints what a single process prints. Where namespaces cannot be made, the
same tests run on loopback with separate ports, and say so."""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import psutil
import pytest
from conftest import ROOT
from mlx_lm import load
from mlx_lm.generate import generate_step
from netns import available, bridged_hosts, pids_in

from launcher.rankspec import HEARTBEAT_TOKEN_ENV

pytestmark = pytest.mark.cluster

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@dataclass
class Machine:
    name: str  # namespace, or "" on loopback
    ip: str
    agent_port: int

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv] if self.name else list(argv)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlxdist.cli", *args]


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    why = available()
    if why is None:
        with bridged_hosts(4) as hosts:
            yield [Machine(h.name, h.ip, 52417) for h in hosts], "eth0"
        return
    print(f"\nnetwork namespaces unavailable ({why}): running on loopback with separate ports")
    yield [Machine("", "127.0.0.1", 52417 + i) for i in range(4)], loopback_interface()


def loopback_interface() -> str:
    """The interface that holds 127.0.0.1: lo on Linux, lo0 on macOS."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    raise RuntimeError("no interface holds 127.0.0.1")


def start_agents(hosts, interface, work: Path, clusters: list[str], extra_env=None) -> list:
    """One agent per machine, of the given cluster names, sharing the launcher's secret."""
    agents = []
    for i, (m, name) in enumerate(zip(hosts, clusters)):
        config = work / f"node{i}"
        config.mkdir()
        shutil.copy(work / "launcher" / "secret", config / "secret")
        (config / "secret").chmod(0o600)
        args = ["agent", "--cluster", name, "--interface", interface, "--port", str(m.agent_port)]
        env = dict(os.environ, MLXDIST_CONFIG=str(config), **(extra_env(i) if extra_env else {}))
        log = open(config / "agent.log", "w")
        agents.append(subprocess.Popen(m.cmd(*cli(*args)), env=env, cwd=ROOT, stderr=log))
    # The agents start and announce themselves: an agent listens only once it has announced
    # itself (its Advertiser registers first), so this waits no longer than they take.
    deadline = time.monotonic() + 60
    for i, (m, agent) in enumerate(zip(hosts, agents)):
        while not listening(agent, m):
            log = (work / f"node{i}" / "agent.log").read_text()[-2000:]
            assert agent.poll() is None, f"the agent on {m.ip} exited: {log}"
            assert time.monotonic() < deadline, f"the agent on {m.ip} did not start: {log}"
            time.sleep(0.1)
    return agents


def listening(agent: subprocess.Popen, m: Machine) -> bool:
    """Whether m's agent (the process started in its namespace) accepts connections on its port:
    read from the namespace's TCP table (no process started to look), or by connecting on
    loopback."""
    if not m.name:
        try:
            socket.create_connection((m.ip, m.agent_port), timeout=1).close()
        except OSError:
            return False
        return True
    try:
        rows = Path(f"/proc/{agent.pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    port = f":{m.agent_port:04X}"
    return any(r.split()[1].endswith(port) and r.split()[3] == "0A" for r in rows)  # LISTEN


def stop_agents(agents) -> None:
    for a in agents:
        a.terminate()
    for a in agents:
        try:
            a.wait(10)
        except subprocess.TimeoutExpired:
            a.kill()


_CUTS: dict[Path, Path] = {}  # tiny-r1's three node folders, cut once a session


def prepare(tiny_r1: Path, work: Path) -> tuple[dict, Path]:
    """A launcher configuration with a fresh secret, and tiny-r1 cut into three node folders
    (the first caller's cut, which launches only read, serves every later one)."""
    launcher_env = dict(os.environ, MLXDIST_CONFIG=str(work / "launcher"))
    subprocess.run(cli("init"), env=launcher_env, cwd=ROOT, check=True, capture_output=True)
    if tiny_r1 not in _CUTS:
        out = work / "tiny-r1-3n"
        done = subprocess.run(
            cli("quantize", str(tiny_r1), str(out), "--split", "2,1,1"),
            cwd=ROOT,
            capture_output=True,
        )
        assert done.returncode == 0, done.stderr
        _CUTS[tiny_r1] = out
    return launcher_env, _CUTS[tiny_r1]


@pytest.fixture(scope="module")
def cluster(machines, tiny_r1, tmp_path_factory):
    """Agents of cluster alpha on machines 1-3, one of cluster beta on machine 0 (where the
    launcher runs), a shared secret, and tiny-r1 cut into three node folders."""
    hosts, interface = machines
    work = tmp_path_factory.mktemp("cluster")
    launcher_env, out = prepare(tiny_r1, work)
    agents = start_agents(hosts, interface, work, ["beta", "alpha", "alpha", "alpha"])
    try:
        yield hosts, interface, launcher_env, out, work
    finally:
        stop_agents(agents)


def rank_processes(hosts) -> list[int]:
    """mlxdist rank processes alive in any of the machines."""
    pids = []
    namespaces = {m.name for m in hosts if m.name}
    candidates = [p for ns in namespaces for p in pids_in(ns)] if namespaces else None
    for p in psutil.process_iter(["cmdline"]):
        if candidates is not None and p.pid not in candidates:
            continue
        if "mlxdist.rank" in " ".join(p.info["cmdline"] or []):
            pids.append(p.pid)
    return pids


def assert_no_rank_left(hosts, wait: float = 10.0) -> None:
    """No rank process remains on any machine (after a short wait for them to exit)."""
    deadline = time.monotonic() + wait
    while rank_processes(hosts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rank_processes(hosts) == []


@functools.cache
def reference_text(model: Path) -> str:
    """What one mlx-lm process answers, greedy, for the same raw prompt (once per folder)."""
    m, tokenizer = load(str(model))
    prompt = tokenizer.encode(PROMPT)
    tokens = []
    for t, _ in generate_step(mx.array(prompt), m, max_tokens=MAX_TOKENS):
        if t in tokenizer.eos_token_ids:
            break
        tokens.append(t)
    return tokenizer.decode(tokens)


def test_discovery_finds_exactly_its_cluster(cluster):
    hosts, interface, env, _, _ = cluster
    args = cli("status", "--cluster", "alpha", "--interface", interface)
    done = subprocess.run(hosts[0].cmd(*args), env=env, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert "3 agents" in done.stdout
    if hosts[0].name:  # each machine has its own address
        found = set(re.findall(r"169\.254\.\d+\.\d+", done.stdout))
        assert found == {m.ip for m in hosts[1:]}


def run_with(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """A command as the tests run it: from the project, env given, its output kept, 300 s."""
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def launch_args(out: Path, *where: str) -> list[str]:
    return cli(
        "launch",
        str(out),
        *where,
        "--prompt",
        PROMPT,
        "--no-chat",
        "--temp",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
    )


def test_launch_across_three_hosts_equals_one_process(cluster):
    hosts, interface, env, out, work = cluster
    args = launch_args(out, "--cluster", "alpha", "--interface", interface)
    started = time.monotonic()
    done = run_with(hosts[0].cmd(*args), env)
    print(done.stderr[-3000:], f"\n{time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stderr
    expected = reference_text(out)
    assert expected.strip(), "the reference should say something"
    assert done.stdout.rstrip("\n") == expected
    # Each node received only its own folder of out (other tests push other models to the
    # same agents); the beta agent received nothing at all.
    assert sorted((work / "node0" / "models").rglob("manifest.json")) == []
    for i in range(1, 4):
        pushed = sorted((work / f"node{i}" / "models" / out.name).rglob("manifest.json"))
        assert len(pushed) == 1 and pushed[0].parent.parent.name == "nodes"
    assert_no_rank_left(hosts)


def write_hosts_file(folder: Path, machines, fields) -> Path:
    """A hosts.toml listing machines in rank order, each with the extra lines fields(m) gives."""
    lines = []
    for i, m in enumerate(machines):
        lines += ["[[hosts]]", f'name = "mac{i}"', f'address = "{m.ip}"', f"rank = {i}"]
        lines += fields(m)
    path = folder / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch_from(machine, out: Path, hosts_file: Path, env: dict):
    """Runs `mlxdist launch --hosts` on machine, as a user there would."""
    return run_with(machine.cmd(*launch_args(out, "--hosts", str(hosts_file))), env)


def test_expert_launch_across_three_hosts_equals_one_process(cluster, tiny_r1):
    """Expert parallelism through the agents: each host gets only its expert node folder (every
    layer, a third of the routed experts) and the answer is one process's."""
    hosts, interface, env, _, work = cluster
    out = work / "tiny-r1-3x"
    cut = subprocess.run(
        cli("quantize", str(tiny_r1), str(out), "--nodes", "3", "--parallel", "expert"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert cut.returncode == 0, cut.stderr
    args = launch_args(out, "--cluster", "alpha", "--interface", interface, "--parallel", "expert")
    done = run_with(hosts[0].cmd(*args), env)
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr
    assert "experts 3" in done.stderr  # the plan names each node's experts
    assert done.stdout.rstrip("\n") == reference_text(out)
    held = []  # each host's one folder, in whatever order the ring put the hosts
    for i in range(1, 4):
        manifests = sorted((work / f"node{i}" / "models" / out.name).rglob("manifest.json"))
        assert len(manifests) == 1, manifests
        manifest = json.loads(manifests[0].read_text())
        assert manifest["parallel"] == "expert"
        held.append(manifest["experts"])
    assert sorted(held) == [[0, 1, 4], [2, 5, 6], [3, 7]]  # a few of each group of 4
    assert_no_rank_left(hosts)


def test_launch_from_a_hosts_file(cluster, tmp_path):
    hosts, _, env, out, _ = cluster
    hosts_file = write_hosts_file(tmp_path, hosts[1:], lambda m: [f"agent_port = {m.agent_port}"])
    done = launch_from(hosts[0], out, hosts_file, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == reference_text(out)
    assert_no_rank_left(hosts)


def test_bench_across_hosts_with_the_key_it_made(cluster, tmp_path):
    """bench --hosts serves on a cluster address, so the API gets a key only the bench knows;
    every measurement request must carry it (a 401 would fail the bench)."""
    hosts, _, env, out, _ = cluster
    hosts_file = write_hosts_file(tmp_path, hosts[1:], lambda m: [f"agent_port = {m.agent_port}"])
    args = ["--prompt-tokens", "8", "--decode-tokens", "4", "--streams", "2", "--json"]
    # A follow-up turn and a long prompt too, each sent with the key, but small: by default
    # (400 and 2048 tokens) they are most of a minute of prefill across the namespaces.
    args += ["--conversation-tokens", "16", "--long-prompt-tokens", "16"]
    done = run_with(hosts[0].cmd(*cli("bench", str(out), "--hosts", str(hosts_file), *args)), env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ranks"] == len(hosts) - 1 and result["decode_tokens"] == 4, result
    assert result["conversation_tokens"] == 16 and result["long_prompt_tokens"] == 16, result
    assert result["decode_tps"] > 0 and result["aggregate_tps"] > 0, result
    assert [r["rank"] for r in result["per_rank"]] == list(range(result["ranks"]))
    assert_no_rank_left(hosts)


STAND_IN_SSH = """#!/bin/sh
# Stand-in for ssh (no sshd here): runs the remote command in the network namespace that the
# destination names, as ssh would run it in the remote host's shell. Not exec'd: as over ssh, the
# rank is no child of the launcher, and its stdin is the one the launcher holds.
while [ "$1" != "--" ]; do shift; done
shift
host="${1#*@}"
shift
ip netns exec "$host" sh -c "$1"
"""


def stand_in_ssh(folder: Path) -> str:
    """A PATH with the ssh stand-in first."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(STAND_IN_SSH)
    (bin_dir / "ssh").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_tensor_launch_across_two_hosts_equals_two_local_ranks(cluster, tiny_r1, tmp_path):
    """Tensor parallelism through the agents: each host is pushed the whole model, each rank
    holds half of every layer, and the answer is that of two tensor ranks on one machine
    (themselves checked against one process in test_expert.py)."""
    hosts, interface, env, _, work = cluster
    here = run_with(launch_args(tiny_r1, "--local", "2", "--parallel", "tensor"), env)
    assert here.returncode == 0, here.stderr
    assert here.stdout.strip(), "the local answer should say something"
    hosts_file = write_hosts_file(tmp_path, hosts[1:3], lambda m: [])
    args = launch_args(tiny_r1, "--hosts", str(hosts_file), "--parallel", "tensor")
    done = run_with(hosts[0].cmd(*args), env)
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr
    assert "1/2 of every layer" in done.stderr
    assert done.stdout == here.stdout
    for i in (1, 2):  # the whole model on each host, the third host untouched
        pushed = work / f"node{i}" / "models" / tiny_r1.name / "whole"
        assert sorted(p.name for p in pushed.iterdir()) == sorted(
            p.name for p in tiny_r1.iterdir() if p.is_file()
        )
    assert not (work / "node3" / "models" / tiny_r1.name).exists()
    assert_no_rank_left(hosts)

    # tiny-r1's 4 heads do not divide over 3 hosts: one line says so, before anything is sent
    args = launch_args(
        tiny_r1, "--cluster", "alpha", "--interface", interface, "--parallel", "tensor"
    )
    refused = subprocess.run(
        hosts[0].cmd(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "num_attention_heads=4 does not divide by 3" in refused.stderr.strip().splitlines()[-1]
    assert not (work / "node3" / "models" / tiny_r1.name).exists()


def test_launch_over_ssh_where_no_agent_runs(cluster, tmp_path):
    hosts, _, env, out, _ = cluster
    if not hosts[0].name:
        pytest.skip("the ssh stand-in runs commands in network namespaces")
    hosts_file = ssh_hosts_file(tmp_path, hosts[1:])
    done = launch_from(hosts[0], out, hosts_file, dict(env, PATH=stand_in_ssh(tmp_path)))
    print(done.stderr[-2000:])
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == reference_text(out)
    assert_no_rank_left(hosts)


def ssh_hosts_file(folder: Path, machines) -> Path:
    """A hosts.toml whose hosts run no agent: their ranks start over ssh."""
    fields = ["agent_port = 52999", "memory_gb = 24"]
    return write_hosts_file(folder, machines, lambda m: [*fields, f'ssh = "root@{m.name}"'])


def test_ssh_ranks_beat_and_leave_with_a_killed_launcher(cluster, tmp_path):
    """Ranks over ssh beat to rank 0 (the token in their environment, on no command line), and
    when the launcher is killed with SIGKILL, its ssh clients' stdin closes and every rank leaves,
    though no parent of theirs died."""
    hosts, _, env, out, _ = cluster
    if not hosts[0].name:
        pytest.skip("the ssh stand-in runs commands in network namespaces")
    env = dict(env, PATH=stand_in_ssh(tmp_path), TMPDIR=str(tmp_path))  # ssh logs land here
    env["MLXDIST_API_KEY"] = key = "api-key-" + "cd" * 12  # --hosts serves on a cluster address
    args = cli("serve", str(out), "--hosts", str(ssh_hosts_file(tmp_path, hosts[1:])))
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(
            hosts[0].cmd(*args), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log
        )
    try:
        line, deadline = "", time.monotonic() + 300
        while not line.startswith("serving") and launcher.poll() is None:
            left = deadline - time.monotonic()
            if left > 0 and select.select([launcher.stdout], [], [], left)[0]:
                line = launcher.stdout.readline().decode()
            else:
                break
        assert line.startswith("serving"), (tmp_path / "launcher.log").read_text()[-3000:]
        ranks = [psutil.Process(p) for p in rank_processes(hosts)]
        ranks = [p for p in ranks if p.cmdline()[1:3] == ["-m", "mlxdist.rank"]]  # not ssh's
        assert len(ranks) == 3
        commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
        for p in ranks:
            assert "--heartbeat" in p.cmdline()
            token = p.environ()[HEARTBEAT_TOKEN_ENV]
            assert len(token) == 32 and not any(token in c for c in commands)
        assert not any(key in c for c in commands)
    finally:
        launcher.kill()
        launcher.wait()
    assert_no_rank_left(hosts)
    logs = [p.read_text() for p in tmp_path.glob("mlxdist-ssh-*/*.log")]
    assert len(logs) == 3
    assert any("leaving: its stdin closed" in text for text in logs), logs
