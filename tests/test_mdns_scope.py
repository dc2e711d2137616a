"""mDNS is heard and answered only on the interfaces an agent was told to use (issue 15).

python-zeroconf reads every datagram that reaches UDP port 5353 on any address of the host;
`launcher/mdns_scope.py` keeps each of its listeners to the links of the named addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time

import netns
import pytest
from conftest import ROOT
from test_cluster_hosts import cli
from zeroconf import DNSOutgoing, ServiceInfo, const

from launcher.discovery import SERVICE
from launcher.mdns_scope import link_networks, on_link, scoped_zeroconf

# Sends DNS-SD queries for the service type to TARGET/KIND pairs, each again every 0.5 s until
# answered or PATIENCE seconds passed, and prints [{pair: the answer's source address or null},
# the number of queries sent].
# legacy: a PTR question from an ephemeral port (answered straight back, RFC 6762 6.7);
# qu: a PTR question with the unicast-response bit, from port 5353 (answered to port 5353).
# The packet is built here by hand, not by zeroconf, so the probe does not share its parser.
PROBE = r"""
import json, socket, sys, time
service, patience = sys.argv[1], float(sys.argv[2])
name = b"".join(bytes([len(p)]) + p.encode() for p in service.rstrip(".").split(".")) + b"\0"
found, sent = {}, 0
for pair in sys.argv[3:]:
    target, kind = pair.split("/")
    qclass = 0x8001 if kind == "qu" else 0x0001
    query = bytes.fromhex("4d5300000001000000000000") + name + (12).to_bytes(2, "big")
    query += qclass.to_bytes(2, "big")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5353 if kind == "qu" else 0))
    s.settimeout(0.5)
    found[pair], deadline = None, time.monotonic() + patience
    while found[pair] is None and time.monotonic() < deadline:
        s.sendto(query, (target, 5353))
        sent += 1
        try:
            while True:
                data, (source, _) = s.recvfrom(9000)
                if data[2] & 0x80 and name in data:  # an answer naming the service
                    found[pair] = source
                    break
        except socket.timeout:
            pass
    s.close()
print(json.dumps([found, sent]))
"""


def test_every_listener_of_this_zeroconf_reads_only_the_named_links():
    """The hook holds for the installed zeroconf: each socket's listener is scoped, and an
    announcement from another link is never read while one from the named link is. Should a
    zeroconf release build its listeners otherwise, scoped_zeroconf refuses and this fails."""
    assert link_networks(["127.0.0.1"]) == [ipaddress.ip_network("127.0.0.0/8")]
    assert on_link("127.0.0.9", link_networks(["127.0.0.1"])) and not on_link("fe80::1%lo", [])
    zc = scoped_zeroconf(["127.0.0.1"])
    try:
        assert len(zc.engine.protocols) >= 2  # the 0.0.0.0:5353 reader and 127.0.0.1's own
        info = ServiceInfo(SERVICE, f"planted.{SERVICE}", port=1, server="planted.local.")
        out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
        out.add_answer_at_time(info.dns_pointer(), 0)
        (packet,) = out.packets()

        async def deliver(source: str) -> int:
            for listener in zc.engine.protocols:
                listener.datagram_received(packet, (source, 5353))
            return len(zc.cache.async_all_by_details(SERVICE, const._TYPE_PTR, const._CLASS_IN))

        def seen_from(source: str) -> int:
            return asyncio.run_coroutine_threadsafe(deliver(source), zc.loop).result(5)

        assert seen_from("192.168.200.6") == 0  # another link: not read
        assert seen_from("127.0.0.7") == 1  # the named link: read and cached
    finally:
        zc.close()


# What a TCP connection to each ADDRESS:PORT from here meets: "open", "refused" (the host is
# reached and turns it away) or "silent".
REACH = r"""
import json, socket, sys
met = {}
for target in sys.argv[1:]:
    address, port = target.rsplit(":", 1)
    try:
        socket.create_connection((address, int(port)), timeout=3).close()
        met[target] = "open"
    except ConnectionRefusedError:
        met[target] = "refused"
    except OSError:
        met[target] = "silent"
print(json.dumps(met))
"""


def probe(host, patience: float, *pairs: str) -> tuple[dict, int]:
    argv = [sys.executable, "-c", PROBE, SERVICE, str(patience), *pairs]
    done = subprocess.run(host.cmd(*argv), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found, sent = json.loads(done.stdout)
    return found, sent


@pytest.mark.cluster
@pytest.mark.skipif(netns.available() is not None, reason=f"needs namespaces: {netns.available()}")
def test_a_unicast_query_to_an_address_the_agent_was_not_told_to_use_gets_no_answer(tmp_path):
    """An agent told to use eth0 (a1, link A, shared with a peer) has a cable (link B) to an
    attacker, its end b1. The attacker's queries to b1, and to a1 routed over B, get no answer;
    the same queries from the peer on A to a1 do."""
    config = tmp_path / "agent"
    env = dict(os.environ, MLXDIST_CONFIG=str(config))
    subprocess.run(cli("init"), env=env, cwd=ROOT, check=True, capture_output=True)
    with netns.bridged_hosts(2, subnet="169.254.130") as (agent, peer):
        attacker = netns.Host(f"{agent.name}x", "192.168.200.6")
        subprocess.run(["ip", "netns", "add", attacker.name], check=True)
        try:
            netns.cable(agent, attacker, 1)  # b1 = 192.168.200.5 on the agent's side
            b1, a1 = "192.168.200.5", agent.ip
            subprocess.run(
                attacker.cmd("ip", "route", "add", f"{a1}/32", "dev", "tb1b"), check=True
            )
            args = cli("agent", "--cluster", "scope", "--interface", "eth0", "--port", "52417")
            log = open(tmp_path / "agent.log", "w")
            proc = subprocess.Popen(agent.cmd(*args), env=env, cwd=ROOT, stderr=log)
            try:
                started = time.monotonic()
                seen, _ = probe(peer, 60, f"{a1}/legacy")  # waits for the agent's announcement
                assert seen == {f"{a1}/legacy": a1}, (tmp_path / "agent.log").read_text()
                print(f"agent answering after {time.monotonic() - started:.1f} s")
                pairs = [f"{t}/{k}" for t in (b1, a1) for k in ("legacy", "qu")]
                from_b, sent = probe(attacker, 1.5, *pairs)
                from_a, _ = probe(peer, 1.5, f"{a1}/legacy", f"{a1}/qu")
                print(f"from link B, {sent} queries:", from_b, "from link A:", from_a)
                assert from_b == dict.fromkeys(pairs), "answered on a link it was not given"
                # Not vacuous: link B reaches the agent, at b1 and at a1 (its API answers there).
                reach = [sys.executable, "-c", REACH, f"{b1}:52417", f"{a1}:52417"]
                done = subprocess.run(attacker.cmd(*reach), capture_output=True, text=True)
                met = json.loads(done.stdout)
                assert met == {f"{b1}:52417": "refused", f"{a1}:52417": "open"}, met
                assert from_a == {f"{a1}/legacy": a1, f"{a1}/qu": a1}
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            for pid in netns.pids_in(attacker.name):
                os.kill(pid, 9)
            subprocess.run(["ip", "netns", "del", attacker.name], capture_output=True)
