"""`mlxdist launch` as a user runs it: real processes, real ranks, one clear line on faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, rank_pids, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    err = result.stderr.strip()
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    # Progress lines may come first; the fault itself is one line, and the last.
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert err.splitlines()[-1] == lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.cluster
def test_demo_model_answers_paris(tmp_path):
    # The default model is the demo model, prepared on first use into MLXDIST_HOME.
    question = "What is the capital of France?"
    result = run_cli(
        "launch",
        "--local",
        "2",
        "--prompt",
        question,
        "--temp",
        "0",
        "--max-tokens",
        "24",
        env={"MLXDIST_HOME": str(tmp_path)},
    )
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0
    assert "Paris" in result.stdout
    assert rank_pids(str(tmp_path)) == []


def test_missing_model_path(tmp_path):
    result = run_cli("launch", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert_one_line_error(result, "does not exist")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "num_hidden_layers": 2})
    )
    result = run_cli("launch", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(result, "'bert'", "not supported")


def test_more_ranks_than_layers(tiny_r1):
    result = run_cli("launch", str(tiny_r1), "--local", "5", "--prompt", "hi")
    assert_one_line_error(result, "4 layers over 5 ranks")
    assert rank_pids(str(tiny_r1)) == []


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_gguf(tmp_path, kind):
    from quantize.gguf import default_smollm2_gguf

    bad = tmp_path / "broken.gguf"
    if kind == "random":
        bad.write_bytes(os.urandom(4096))
    else:
        with open(default_smollm2_gguf(), "rb") as f:
            bad.write_bytes(f.read(1 << 20))
    result = run_cli("launch", str(bad), "--prompt", "hi", env={"MLXDIST_HOME": str(tmp_path)})
    assert_one_line_error(result, "broken.gguf")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.cluster
def test_no_rank_outlives_a_normal_end(tiny_r1):
    result = run_cli("launch", str(tiny_r1), "--local", "2", "--prompt", "hi", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert rank_pids(str(tiny_r1)) == []


@pytest.mark.cluster
def test_no_rank_outlives_ctrl_c(tiny_r1):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlxdist.cli", "launch", str(tiny_r1), "--local", "2"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect(">>> ")
        assert len(rank_pids(str(tiny_r1))) == 2
        child.sendintr()  # Ctrl-C at the prompt, as a person would press it
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    assert "interrupted" in child.before
    deadline = time.monotonic() + 10
    while rank_pids(str(tiny_r1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rank_pids(str(tiny_r1)) == []


@pytest.mark.skipif(
    sys.platform != "linux",
    reason="a SIGKILLed launcher's ranks die by prctl's parent-death signal, Linux only",
)
@pytest.mark.cluster
def test_no_rank_outlives_a_launcher_killed_outright(tiny_r1, tmp_path):
    model = tmp_path / "killed"
    shutil.copytree(tiny_r1, model)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mlxdist.cli", "launch", str(model), "--local", "2"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while len(rank_pids(str(model))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(rank_pids(str(model))) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while rank_pids(str(model)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rank_pids(str(model)) == []


@pytest.mark.cluster
def test_rank_that_crashes_while_loading(tiny_r1, tmp_path):
    model = tmp_path / "damaged"
    shutil.copytree(tiny_r1, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    # Cut the file that holds the last layer short: the rank that loads it fails mid-load.
    damaged = Path(model / index["weight_map"]["model.layers.3.mlp.gate.weight"])
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run_cli("launch", str(model), "--local", "2", "--prompt", "hi", timeout=120)
    assert_one_line_error(result, "rank 1", "while loading", "exceeding the size of the file")
    assert rank_pids(str(model)) == []


def test_make_r1_command(tmp_path):
    out = tmp_path / "r1"
    result = run_cli("testing", "make-r1", str(out), "--set", "num_hidden_layers=3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["model_type"] == "deepseek_v3"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.layers.3.") for k in index["weight_map"])  # the MTP layer
    assert_one_line_error(run_cli("testing", "make-r1", str(tmp_path / "x"), "--preset", "huge"))


def test_speculative_mtp_without_the_layer_is_refused_before_any_rank(tiny_r1, tmp_path):
    """--speculative mtp on a conversion made without --keep-mtp: launch, serve and bench say
    so in one line before starting a rank."""
    out = tmp_path / "q4"
    result = run_cli("quantize", str(tiny_r1), str(out), "--bits", "4")
    assert result.returncode == 0, result.stderr
    for command in (["serve"], ["launch", "--prompt", "hi"], ["bench"]):
        result = run_cli(command[0], str(out), "--local", "2", "--speculative", "mtp", *command[1:])
        assert_one_line_error(result, "--speculative mtp", "--keep-mtp")
        assert "loading" not in result.stderr
        assert rank_pids(str(out)) == []
