"""hosts.toml parsing, and the hostfiles mlx.launch reads."""

import json

import pytest
from conftest import ROOT

from launcher.hostfile import mlx_launch_hostfile
from launcher.hosts import HostsError, parse_hosts, read_hosts


def test_example_file_parses():
    hosts = read_hosts(ROOT / "hosts.example.toml")
    assert hosts.backend == "auto"
    assert [h.name for h in hosts.hosts] == ["studio-1", "studio-2"]
    first = hosts.hosts[0]
    assert (first.address, first.memory_gb, first.rank, first.agent_port) == (
        "10.20.0.11",
        192,
        0,
        52417,
    )


def test_ranks_order_hosts():
    text = """
[[hosts]]
name = "a"
address = "10.0.0.1"
[[hosts]]
name = "b"
address = "10.0.0.2"
rank = 0
"""
    assert [h.name for h in parse_hosts(text).hosts] == ["b", "a"]


@pytest.mark.parametrize(
    "body,message",
    [
        ('backend = "tcp"\n[[hosts]]\nname="a"\naddress="1.2.3.4"', "backend must be one of"),
        ("", "no [[hosts]]"),
        ('[[hosts]]\nname="a b"\naddress="1.2.3.4"', "name must be"),
        ('[[hosts]]\nname="a"\naddress="mac.local"', "address must be an IP"),
        ('[[hosts]]\nname="a"\naddress="1.2.3.4"\nmemory_gb=-1', "memory_gb must be a positive"),
        ('[[hosts]]\nname="a"\naddress="1.2.3.4"\nssh="-oProxyCommand=x"', "ssh must be"),
        ('[[hosts]]\nname="a"\naddress="1.2.3.4"\ncolour="red"', "unknown fields: colour"),
        (
            '[[hosts]]\nname="a"\naddress="1.2.3.4"\n[[hosts]]\nname="a"\naddress="1.2.3.5"',
            "differ",
        ),
        ("[[hosts]\n", "not valid TOML"),
    ],
)
def test_bad_hosts_files(body, message):
    with pytest.raises(HostsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_hosts(body)


def test_mlx_launch_hostfile_format():
    text = mlx_launch_hostfile([("me@a", ["169.254.0.1"]), ("me@b", ["169.254.0.2"])])
    data = json.loads(text)
    assert data["backend"] == "ring"
    assert data["hosts"][1] == {"ssh": "me@b", "ips": ["169.254.0.2"], "rdma": []}
