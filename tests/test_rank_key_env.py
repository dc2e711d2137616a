"""Rank 0 takes the API key out of its environment before anything else (mlxdist/rank.py main),
so no process the rank starts while loading inherits it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher.rankspec import API_KEY_ENV
from mlxdist import rank


def test_the_key_leaves_the_environment_before_the_flags_are_read(monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "k" * 16)
    with pytest.raises(SystemExit):  # refused at the first step: the flags
        rank.main([])
    assert "required: --model" in capsys.readouterr().err
    assert API_KEY_ENV not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert API_KEY_ENV not in child.stdout and "PATH" in child.stdout
