"""One handler for every command: a UserError raised under any of them is one `error:` line on
stderr and exit 1, never a traceback. No rank process: real faults where they are cheap, a
monkeypatched one where the fault needs a cluster."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from launcher.agent_client import AgentError
from launcher.auth import AuthError
from launcher.hostfacts import HostFactsError
from launcher.hosts import HostsError
from launcher.interfaces import InterfaceError
from launcher.local import LaunchError
from launcher.secret import SecretError
from mlxdist.cli import app
from mlxdist.client.api_client import ClientError
from quantize.checkpoint import CheckpointError
from quantize.convert import QuantizeError
from quantize.errors import UserError
from quantize.gguf import GGUFError
from quantize.recipes import RecipeError
from quantize.source import SourceError


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_error(result, *fragments: str) -> str:
    """The run ended with exit 1 and exactly one `error:` line, its stderr's only line."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, UserError), result.exception  # handled, not raised
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["launch", "{missing}", "--local", "2", "--prompt", "hi"],
        ["serve", "{missing}"],
        ["bench", "{missing}"],
        ["plan", "{missing}", "--simulate", "2x192GB"],
    ],
    ids=["launch", "serve", "bench", "plan"],
)
def test_a_missing_model_is_one_line(tmp_path, args):
    missing = str(tmp_path / "no-such-model")
    result = run(*[a.format(missing=missing) for a in args])
    assert_one_error(result, f"model path {missing} does not exist", "give a model folder")


@pytest.mark.parametrize(
    "config,fragments",
    [
        ({"model_type": "bert"}, ["model type 'bert'", "is not supported", "kimi_k2"]),
        (
            {
                "model_type": "qwen3_moe",
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
            },
            ["FP8"],
        ),
    ],
    ids=["unsupported-type", "fp8-qwen3"],
)
@pytest.mark.parametrize("command", ["plan", "bench"])
def test_a_model_mlxdist_cannot_run_is_one_line(tmp_path, config, fragments, command):
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
    args = ["--simulate", "2x192GB"] if command == "plan" else ["--local", "2"]
    assert_one_error(run(command, str(tmp_path), *args), *fragments)


def test_quantize_missing_source_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run("quantize", str(missing), str(tmp_path / "out"))
    assert_one_error(result, f"SRC {missing} does not exist")


def test_quantize_without_out_is_one_line(tmp_path):
    assert_one_error(run("quantize", str(tmp_path)), "give OUT")


def test_plan_turns_its_value_errors_into_one_line():
    assert_one_error(run("plan", "x", "--simulate", "2xbogus"), "'2xbogus' is not a memory size")
    assert_one_error(run("plan", "x"), "give exactly one of --hosts FILE and --simulate")


@pytest.mark.parametrize("command", ["agent", "status"])
def test_a_missing_secret_is_one_line(tmp_path, command):
    secret = tmp_path / "secret"
    result = run(command, "--secret-file", str(secret))
    assert_one_error(result, f"no secret at {secret}", "mlxdist init")


def test_init_refuses_to_replace_a_secret(tmp_path):
    secret = tmp_path / "secret"
    assert run("init", "--secret-file", str(secret)).exit_code == 0
    assert_one_error(run("init", "--secret-file", str(secret)), "already exists", "--force")


def test_agent_turns_an_os_error_into_one_line(monkeypatch):
    def taken(*_):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr("mlxdist.cli.agent.run_agent", taken)
    assert_one_error(run("agent"), "Address already in use")


def test_chat_with_no_server_is_one_line():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_one_error(run("chat", "--url", f"http://127.0.0.1:{port}"), "cannot reach")


def test_testing_make_r1_unknown_preset_is_one_line(tmp_path):
    result = run("testing", "make-r1", str(tmp_path / "r1"), "--preset", "nope")
    assert_one_error(result, "unknown preset 'nope'", "tiny")


def test_testing_make_r1_bad_set_is_one_line(tmp_path):
    result = run("testing", "make-r1", str(tmp_path / "r1"), "--set", "nonsense")
    assert_one_error(result, "expected key=value")


def test_a_launcher_error_deep_in_launch_is_one_line(monkeypatch, tmp_path):
    """A rank that cannot start needs a cluster: the launcher's fault is raised in its place."""

    def fails(*_, **__):
        raise LaunchError("rank 1 exited with code 1: see its log")

    monkeypatch.setattr("mlxdist.cli.launch._launch_model", lambda model: tmp_path)
    monkeypatch.setattr("mlxdist.cli.launch._parallel_options", lambda *_: {})
    monkeypatch.setattr("mlxdist.cli.launch._start_here", fails)
    launch = ("launch", "--local", "2", "--parallel", "pipeline", "--prompt", "hi")
    assert_one_error(run(*launch), "rank 1 exited")


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--speculative", "ngram", "--draft-tokens", "0"], "--draft-tokens takes 1 to 16, not 0"),
        (["--speculative", "eagle"], "--speculative takes none, ngram or mtp, not 'eagle'"),
        (["--draft-tokens", "4"], "--draft-tokens is for --speculative ngram"),
    ],
)
@pytest.mark.parametrize("command", ["launch", "serve", "bench"])
def test_bad_speculative_options_are_one_line(command, flags, said):
    """Refused before any model is read or rank started (no model is given: the demo's)."""
    assert_one_error(run(command, "--local", "2", *flags), said)


@pytest.fixture
def keeps_sigterm():
    """serve takes SIGTERM as Ctrl-C; in this process the handler is put back after the test."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_rank_failure_while_serving_is_one_line(monkeypatch, tmp_path, keeps_sigterm):
    class Running:
        url = "http://127.0.0.1:1"
        stopped = False

        def stop(self) -> None:
            Running.stopped = True

    monkeypatch.setattr("mlxdist.cli.launch._launch_model", lambda model: tmp_path)
    monkeypatch.setattr("mlxdist.cli.launch._serve_here", lambda *_: Running())
    monkeypatch.setattr("mlxdist.cli.launch._rank_failure", lambda running: "rank 1 died")
    assert_one_error(run("serve", "--parallel", "pipeline"), "rank 1 died")
    assert Running.stopped


@pytest.mark.parametrize(
    "command,line,code",
    [
        ("launch", "interrupted: every rank stopped", 130),
        ("bench", "interrupted: every rank stopped", 130),
        ("serve", "stopped: every rank stopped", 0),
    ],
)
def test_ctrl_c_keeps_each_commands_line_and_code(monkeypatch, command, line, code):
    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlxdist.cli.launch._launch_model", interrupted)
    result = run(command)
    assert result.exit_code == code, result.output
    assert result.stderr.strip().splitlines() == [line]


def test_usage_errors_and_help_stay_clicks():
    missing = run("plan")
    assert missing.exit_code == 2 and "Missing argument" in missing.output
    assert run("launch", "--bogus").exit_code == 2
    helped = run("--help")
    assert helped.exit_code == 0
    for command in ("launch", "serve", "chat", "bench", "quantize", "plan", "init", "agent"):
        assert command in helped.output


def test_the_real_command_prints_one_line(tmp_path):
    """`python -m mlxdist.cli`, the console script's main(): the same one line, exit 1."""
    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [sys.executable, "-m", "mlxdist.cli", "plan", str(missing), "--simulate", "2x192GB"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.splitlines() == [
        f"error: model path {missing} does not exist: give a model folder or a .gguf file"
    ]


USER_ERRORS = [
    CheckpointError,
    GGUFError,
    QuantizeError,
    RecipeError,
    SourceError,
    LaunchError,
    HostsError,
    AgentError,
    SecretError,
    HostFactsError,
    InterfaceError,
    ClientError,
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: e.__name__)
def test_every_user_facing_error_is_a_user_error(error):
    assert issubclass(error, UserError)


@pytest.mark.parametrize("error", [HostsError, RecipeError], ids=lambda e: e.__name__)
def test_value_errors_stay_value_errors(error):
    assert issubclass(error, ValueError)


def test_errors_that_servers_answer_are_not_user_errors():
    from launcher.agent.app import Refused
    from mlxdist.serving.api.errors import APIError

    for error in (AuthError, Refused, APIError):
        assert not issubclass(error, UserError), error
