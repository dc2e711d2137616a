"""A rank takes the API key and the heartbeat token out of its environment before anything else
(mlxdist/rank.py main), so no process the rank starts while loading inherits them; the heartbeat
still signs with the token it kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.rankspec import API_KEY_ENV, HEARTBEAT_TOKEN_ENV
from mlxdist import rank
from mlxdist.runtime import heartbeat


def test_the_key_leaves_the_environment_before_the_flags_are_read(monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "k" * 16)
    monkeypatch.setenv(HEARTBEAT_TOKEN_ENV, "t" * 32)
    monkeypatch.setattr(heartbeat, "_kept", None)
    with pytest.raises(SystemExit):  # refused at the first step: the flags
        rank.main([])
    assert "required: --model" in capsys.readouterr().err
    assert API_KEY_ENV not in os.environ and HEARTBEAT_TOKEN_ENV not in os.environ
    assert heartbeat._token() == "t" * 32  # kept for the heartbeat's hellos
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert API_KEY_ENV not in child.stdout and HEARTBEAT_TOKEN_ENV not in child.stdout
    assert "PATH" in child.stdout
