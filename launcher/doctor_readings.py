"""Where `mlxdist doctor` gets its readings: a capture folder or the Mac's own commands, MLX,
the secret file's mode and each agent's signed /health (launcher.doctor checks them)."""

from __future__ import annotations

import email.utils
import json
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from launcher.auth import HELLO, NONCE, AuthError, check_response, sign
from launcher.doctor import AgentReading, MlxReading, SecretReading
from launcher.hostfacts import (
    MACOS_COMMANDS,
    HostFacts,
    HostFactsError,
    Runner,
    capture_name,
    capturing_runner,
    collect_macos,
    metal_working_set,
    run_command,
)
from quantize.errors import UserError

MLX_FILE = "mlx.json"  # beside the command outputs: what MLX saw on the captured Mac


class DoctorError(UserError):
    """doctor was given something it cannot use; the message says what to give instead."""


def read_capture(folder: Path) -> dict[str, str | None]:
    """Each command's output from a capture folder; None where the folder lacks its file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DoctorError(f"{folder} is not a folder: give --from a folder of command outputs")
    files: dict[str, str | None] = {}
    for name in MACOS_COMMANDS:
        try:
            files[name] = (folder / name).read_text(errors="replace")
        except OSError:
            files[name] = None
    return files


def run_commands(run: Runner = run_command, folder: Path | None = None) -> dict[str, str | None]:
    """Runs each command once (saving its output in folder when given); None where it failed."""
    if folder is not None:
        run = capturing_runner(run, Path(folder))
    files: dict[str, str | None] = {}
    for name, argv in MACOS_COMMANDS.items():
        try:
            files[name] = run(argv)
        except HostFactsError:
            files[name] = None
    return files


def files_runner(files: Mapping[str, str | None]) -> Runner:
    """A Runner answering each command from readings already taken, so nothing runs twice."""

    def run(argv: list[str]) -> str:
        name = capture_name(argv)
        text = files.get(name)
        if text is None:
            raise HostFactsError(f"{argv[0]}: no {name}")
        return text

    return run


def node_facts(files: Mapping[str, str | None], working_set: int, node_id_path: Path) -> HostFacts:
    """The facts an agent on the read Mac would collect; HostFactsError when readings lack some."""
    try:
        return collect_macos(files_runner(files), node_id_path, lambda: working_set)
    except (KeyError, ValueError) as e:
        raise HostFactsError(f"sysctl.txt lacks {e}") from None


def mlx_reading() -> MlxReading:
    try:
        import mlx.core as mx
    except ImportError:
        return MlxReading(None, False)
    metal = bool(mx.metal.is_available())
    return MlxReading(mx.__version__, metal, metal_working_set() if metal else 0)


def save_mlx(folder: Path, reading: MlxReading) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    data = {
        "version": reading.version,
        "metal": reading.metal,
        "max_recommended_working_set_size": reading.working_set,
    }
    (Path(folder) / MLX_FILE).write_text(json.dumps(data, indent=2) + "\n")


def load_mlx(folder: Path) -> MlxReading | None:
    """What MLX saw on the captured Mac; None when the capture has no (readable) mlx.json."""
    try:
        data = json.loads((Path(folder) / MLX_FILE).read_text())
        version = data.get("version")
        return MlxReading(
            str(version) if version is not None else None,
            bool(data.get("metal")),
            int(data.get("max_recommended_working_set_size") or 0),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def secret_reading(path: Path) -> SecretReading:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    return SecretReading(str(path), mode)


def _date(headers: httpx.Headers) -> float | None:
    value = headers.get("date")
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() if value else None
    except (TypeError, ValueError):
        return None


def probe_agent(
    url: str, secret: bytes, name: str = "", this_node: bool = False, timeout: float = 5.0
) -> AgentReading:
    """One signed GET /hello, timed on this clock; the agent's time from its answer or, when it
    refuses the request as stale, from the Date header every answer carries. An answer not
    signed with the secret counts as a refusal of ours."""
    url = url.rstrip("/")
    name = name or url
    headers = sign(secret, "GET", HELLO, b"")  # for any agent: the hello alone may be
    sent = time.time()
    try:
        r = httpx.get(f"{url}{HELLO}", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        error = str(e) or type(e).__name__
        return AgentReading(name, url, sent, time.time(), None, error, this_node=this_node)
    received = time.time()
    try:
        check_response(secret, headers[NONCE], r.status_code, r.content, r.headers)
    except AuthError as e:
        error = f"did not prove it knows the cluster secret: {e.reason}"
        return AgentReading(name, url, sent, received, 401, error, None, None, this_node)
    try:
        body = r.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    told = body.get("time")
    return AgentReading(
        name,
        url,
        sent,
        received,
        r.status_code,
        str(body.get("error", "")) if r.status_code >= 400 else "",
        float(told) if isinstance(told, (int, float)) else None,
        _date(r.headers),
        this_node,
    )
