"""The rooms' import rules hold, and each one would catch a wrong import.

`lint-imports` checks the contracts in pyproject.toml against the real tree; then, in a scratch
copy, one wrong import per rule is added and the check must fail naming that rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("mlxdist", "launcher", "quantize")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # The scratch copy's packages must be the ones found, not the installed (editable) tree.
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_tree_keeps_every_contract():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout
    assert done.stdout.count("KEPT") == 5


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


# (module that gains the import, the import, the contract that must report it broken)
WRONG = [
    ("quantize/checkpoint.py", "import launcher.hosts", "quantize below launcher below mlxdist"),
    ("launcher/planner.py", "import mlxdist.client.bench", "quantize below launcher below mlxdist"),
    ("mlxdist/runtime/stage.py", "import mlxdist.serving.stops", "serving over the runtime"),
    ("mlxdist/runtime/sampling.py", "import mlxdist.cli.models", "serving over the runtime"),
    ("mlxdist/cli/models.py", "import mlxdist.runtime.sampling", "imports neither the runtime"),
    ("mlxdist/client/bench.py", "import mlx.core", "The client speaks HTTP only"),
    ("mlxdist/client/bench.py", "import mlxdist.serving.stops", "The client speaks HTTP only"),
    ("quantize/recipes.py", "import quantize.convert", "No import cycle"),
]


@pytest.mark.parametrize(("module", "line", "contract"), WRONG)
def test_a_wrong_import_breaks_its_contract(scratch, module, line, contract):
    path = scratch / module
    original = path.read_text()
    path.write_text(f"{line}  # noqa\n{original}")
    try:
        done = _lint(scratch)
    finally:
        path.write_text(original)
    assert done.returncode != 0
    # "NAME BROKEN", or "NAME BROKEN (1 ignored import)" for a contract with an exception
    broken = [s for s in done.stdout.splitlines() if " BROKEN" in s]
    assert any(contract in s for s in broken), done.stdout
