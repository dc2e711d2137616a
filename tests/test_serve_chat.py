"""`mlxdist serve` and `mlxdist chat` as a person runs them, each in a pseudo-terminal.

One served tiny-r1 cluster; the chat holds a conversation, is interrupted, is reset, outlives the
server, and leaves.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest
from conftest import ROOT, rank_pids

from launcher.hostfile import free_ports

FIGURES = re.compile(
    r"s to first token, [\d.]+ tok/s, (\d+) prompt (?:\((\d+) cached\) )?\+ (\d+) completion tokens"
)


def spawn(*args: str, env: dict | None = None, timeout: float = 60) -> pexpect.spawn:
    import os

    return pexpect.spawn(
        sys.executable,
        ["-m", "mlxdist.cli", *args],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        dimensions=(40, 200),
    )


@contextlib.contextmanager
def _serve(tiny_r1: Path):
    """`mlxdist serve` of tiny_r1 on 2 local ranks: (the process, its URL)."""
    port = free_ports(1)[0]
    args = ["serve", str(tiny_r1), "--local", "2", "--port", str(port), "--max-context", "2048"]
    server = spawn(*args, timeout=120)
    try:
        server.expect(r"serving tiny-r1 at (http://127\.0\.0\.1:\d+)/v1")
        yield server, server.match.group(1)
    finally:
        server.close(force=True)


@pytest.fixture(scope="module")
def served(tiny_r1):
    with _serve(tiny_r1) as server:
        yield server


@pytest.fixture
def served_for_the_chat(tiny_r1, tmp_path):
    """A server of the chat test's own, which that test stops (the module's one stays up for the
    other tests, whatever the order), on a copy of tiny-r1: its ranks are told apart by path."""
    model = Path(shutil.copytree(tiny_r1, tmp_path / "served" / tiny_r1.name))
    with _serve(model) as (server, url):
        yield server, url, model


@pytest.mark.cluster
def test_serve_answers_on_localhost_only(served):
    _, url = served
    health = httpx.get(url + "/health").json()
    assert health["ranks"] == 2 and health["model"] == "tiny-r1"
    assert health["context"] == 2048  # --max-context, below the model's 4096
    assert url.startswith("http://127.0.0.1:")  # never all interfaces by default


@pytest.mark.cluster
def test_serve_refuses_a_port_in_use(served, tiny_r1):
    _, url = served
    port = url.rsplit(":", 1)[1]
    child = spawn("serve", str(tiny_r1), "--local", "2", "--port", port)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "error: cannot listen on 127.0.0.1:" in child.before
    assert "Traceback" not in child.before


def _saved(path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


def _command(chat: pexpect.spawn, line: str, reply: str) -> None:
    chat.sendline(line)
    chat.expect_exact(reply)
    chat.expect_exact(">>> ")


@pytest.mark.cluster
def test_chat_conversation_ctrl_c_reset_lost_server_quit(served_for_the_chat, tmp_path):
    server, url, model = served_for_the_chat
    chat = spawn("chat", "--url", url, "--max-tokens", "8", env={"MLXDIST_CONFIG": str(tmp_path)})
    try:
        chat.expect_exact("/help lists the commands")
        chat.expect_exact(">>> ")

        # Two turns: the second prompt holds the first turn too.
        chat.sendline("Hello there")
        chat.expect(FIGURES)
        first_prompt = int(chat.match.group(1))
        assert int(chat.match.group(3)) == 8
        chat.expect_exact(">>> ")
        chat.sendline("And a second \\")
        chat.expect_exact("... ")
        chat.sendline("line")
        chat.expect(FIGURES)
        assert int(chat.match.group(1)) > first_prompt + 8
        # the first turn came from the prefix cache, up to where R1's template renders it
        # differently in history (its generation prompt's "<think>" is not kept there)
        assert first_prompt - 3 <= int(chat.match.group(2) or 0) < first_prompt
        chat.expect_exact(">>> ")
        _command(chat, f"/save {tmp_path / 'two.json'}", "saved 4 messages")
        two = _saved(tmp_path / "two.json")
        assert [m["role"] for m in two] == ["user", "assistant"] * 2
        assert two[2]["content"] == "And a second \nline"

        # Ctrl-C during a long answer stops it at once and keeps the conversation.
        _command(chat, "/set max_tokens 4000", "max_tokens = 4000")
        chat.sendline("Tell me a very long story")
        chat.expect_exact("Tell me a very long story")
        chat.expect(r"\S")  # the answer has begun
        time.sleep(0.3)
        chat.sendintr()
        t0 = time.perf_counter()
        chat.expect_exact("(stopped)")
        chat.expect_exact(">>> ")
        assert time.perf_counter() - t0 < 5
        _command(chat, f"/save {tmp_path / 'after.json'}", "saved")
        assert _saved(tmp_path / "after.json")[:4] == two
        _command(chat, "/set max_tokens 4", "max_tokens = 4")
        chat.sendline("Still there?")
        chat.expect(FIGURES, timeout=10)  # the cluster is free: the stopped answer was cancelled
        chat.expect_exact(">>> ")
        _command(chat, "/stats", "answers:")

        _command(chat, "/reset", "conversation forgotten")
        _command(chat, f"/save {tmp_path / 'none.json'}", "saved 0 messages")

        # The server goes away: the chat says so and stays.
        server.sendintr()
        server.expect(pexpect.EOF)
        server.close()
        assert server.exitstatus == 0 and "every rank stopped" in server.before
        assert rank_pids(str(model)) == []
        chat.sendline("Anyone?")
        chat.expect_exact("error: lost the connection")
        chat.expect_exact(">>> ")

        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0
    assert "Hello there" in (tmp_path / "history").read_text()


def test_chat_reports_a_server_that_is_not_there():
    port = free_ports(1)[0]
    child = spawn("chat", "--url", f"http://127.0.0.1:{port}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert f"error: cannot reach http://127.0.0.1:{port}" in child.before
    assert "Traceback" not in child.before
