"""`mlxdist doctor`: is this Mac (or a captured one) ready to be a node, one line per check."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from launcher.rankspec import AGENT_PORT
from mlxdist.cli.app import app

if TYPE_CHECKING:
    from launcher.doctor import AgentReading, MlxReading, Readings, Row

console = Console(stderr=True, soft_wrap=True)
COLOURS = {"ok": "green", "warn": "yellow", "fail": "red", "missing": "dim"}


@app.command("doctor")
def doctor_cmd(
    capture: Path | None = typer.Option(
        None, "--capture", metavar="DIR", help="run the commands, keep their raw outputs in DIR"
    ),
    source: Path | None = typer.Option(
        None, "--from", metavar="DIR", help="check a capture folder instead (on any OS)"
    ),
    cluster: str | None = typer.Option(
        None, help="find this cluster's agents (zeroconf) for the agent and clock checks"
    ),
    agent: list[str] = typer.Option([], "--agent", metavar="URL", help="an agent to check"),
    interface: list[str] = typer.Option([], help="interface to discover agents on"),
    secret_file: Path | None = typer.Option(None, "--secret-file", help="the cluster secret"),
    need_gb: float | None = typer.Option(
        None, "--need-gb", help="GB a plan puts on this Mac: checked against the GPU's limit"
    ),
) -> None:
    """Check one Mac's readiness (macOS, MLX, memory, cables, bridge, RDMA, secret, agents,
    clock) and say what to fix; exit 1 when a check fails."""
    raise typer.Exit(doctor(capture, source, cluster, agent, interface, secret_file, need_gb))


def doctor(
    capture: Path | None,
    source: Path | None,
    cluster: str | None,
    agent_urls: list[str],
    interfaces: list[str],
    secret_file: Path | None,
    need_gb: float | None,
) -> int:
    from launcher.doctor import GB, Readings, failed, run_checks
    from launcher.doctor_readings import (
        DoctorError,
        load_mlx,
        mlx_reading,
        read_capture,
        run_commands,
        save_mlx,
    )
    from launcher.hostfacts import MACOS_COMMANDS

    if capture is not None and source is not None:
        raise DoctorError("give --capture DIR or --from DIR, not both")
    on_mac = sys.platform == "darwin"
    if source is not None:
        files, reason, mlx = read_capture(source), f"not in {source}", load_mlx(source)
    elif on_mac:
        files, reason, mlx = run_commands(folder=capture), "the command failed", mlx_reading()
        if capture is not None:
            save_mlx(capture, mlx)
            console.print(f"kept the commands' outputs in {capture} (attach it to a bug report)")
    else:
        if capture is not None:
            raise DoctorError(
                "--capture runs macOS commands: run it on the Mac, then check its folder here "
                "with --from DIR"
            )
        console.print(
            f"doctor's checks are for macOS and this is {sys.platform}: it checks MLX, the secret "
            "and the agents here (--from DIR checks a folder a Mac captured)"
        )
        files = {name: None for name in MACOS_COMMANDS}
        reason, mlx = f"not a Mac ({sys.platform})", mlx_reading()
    readings = Readings(
        files,
        missing_reason=reason,
        mlx=mlx,
        on_mac=on_mac or source is not None,
        cluster=cluster,
        need_bytes=None if need_gb is None else int(need_gb * GB),
    )
    _live_readings(readings, source, cluster, agent_urls, interfaces, secret_file)
    rows = run_checks(readings)
    mac = source is not None or on_mac
    advertisement, txt = _advertisement(files, mlx, cluster, mac, live=source is None)
    rows.append(advertisement)
    _print(rows, txt)
    return 1 if failed(rows) else 0


def _live_readings(
    r: Readings,
    source: Path | None,
    cluster: str | None,
    agent_urls: list[str],
    interfaces: list[str],
    secret_file: Path | None,
) -> None:
    """The secret's mode and the agents' answers, read on this machine."""
    from launcher.doctor_readings import secret_reading
    from launcher.secret import default_secret_path, load_secret
    from quantize.errors import UserError

    if source is not None and secret_file is None:
        r.notes["secret"] = "not checked for a capture (--secret-file checks one here)"
    else:
        r.secret = secret_reading(secret_file or default_secret_path())
    if cluster is None and not agent_urls:
        r.notes["agent"] = "not checked: give --cluster NAME or --agent URL"
        return
    try:
        secret = load_secret(secret_file)
    except UserError as e:
        r.notes["agent"] = f"cannot sign requests: {e}"
        return
    r.agents = _probe_agents(r, source, cluster, agent_urls, interfaces, secret)


def _own_node_id() -> str | None:
    from launcher.secret import config_dir

    path = config_dir() / "node_id"
    return path.read_text().strip() if path.exists() else None


def _probe_agents(
    r: Readings,
    source: Path | None,
    cluster: str | None,
    agent_urls: list[str],
    interfaces: list[str],
    secret: bytes,
) -> list[AgentReading]:
    from launcher.doctor_readings import probe_agent

    readings = [probe_agent(url, secret) for url in agent_urls]
    if cluster is None:
        return readings
    from launcher.discovery import browse
    from launcher.hostfacts import collect
    from launcher.interfaces import listen_addresses
    from launcher.secret import config_dir
    from quantize.errors import UserError

    try:
        addresses = listen_addresses(collect(node_id_path=config_dir() / "node_id"), interfaces)
    except UserError as e:
        r.notes["agent"] = f"cannot look for agents: {e}"
        return readings
    own = _own_node_id()
    found = browse(cluster, addresses)
    for a in found:
        name = a.hostname or a.node_id[:8]
        readings.append(probe_agent(a.url, secret, name, this_node=a.node_id == own))
    if source is None and own and not any(a.node_id == own for a in found):
        r.notes["own agent"] = (
            f"this Mac's agent is not advertised in cluster {cluster!r}: start "
            f"`mlxdist agent --cluster {cluster}` here"
        )
    return readings


def _advertisement(
    files: dict, mlx: MlxReading | None, cluster: str | None, mac: bool, live: bool
) -> tuple[Row, dict[str, str] | None]:
    """The TXT record the agent would advertise for these facts, and whether it fits."""
    from launcher.discovery import txt_record
    from launcher.doctor import MISSING, check_advertisement
    from launcher.doctor_readings import node_facts
    from launcher.hostfacts import HostFactsError, collect_linux
    from launcher.secret import config_dir
    from mlxdist.cli.agent import agent_facts

    with tempfile.TemporaryDirectory() as tmp:
        # The id this machine already has, else a throwaway one: doctor creates no state.
        own = config_dir() / "node_id"
        node_id_path = own if live and own.exists() else Path(tmp) / "node_id"
        try:
            if mac:
                facts = node_facts(files, mlx.working_set if mlx else 0, node_id_path)
            else:
                facts = collect_linux(node_id_path=node_id_path)
        except HostFactsError as e:
            return check_advertisement(None, f"the facts cannot be read: {e}", MISSING), None
    name = cluster or "default"
    data = agent_facts(facts, name, AGENT_PORT, [])
    if mlx is not None and mlx.version:
        data["mlx_version"] = mlx.version
    elif not live:  # a capture without mlx.json: its MLX is unknown, not this machine's
        data["mlx_version"] = ""
    try:
        txt = txt_record(name, facts.node_id, AGENT_PORT, data)
    except ValueError as e:
        message = f"{e}: the agent cannot advertise this Mac (a bug: report it with a --capture)"
        return check_advertisement(None, message), None
    return check_advertisement(txt), txt


def _print(rows: list[Row], txt: dict[str, str] | None) -> None:
    table = Table(title="mlxdist doctor")
    for col in ("check", "status", "what is wrong and what to do"):
        table.add_column(col, overflow="fold")
    for row in rows:
        colour = COLOURS.get(row.status, "")
        table.add_row(row.check, f"[{colour}]{row.status}[/]", row.message)
    out = Console()
    # Piped output keeps one line per check: a table cut at 80 columns wraps its advice.
    out = out if out.is_terminal else Console(width=1000)
    out.print(table)
    if txt is not None:
        out.print("advertised as (zeroconf TXT record):")
        for key, value in txt.items():
            out.print(f"  {key}={value}", markup=False, highlight=False)
    last = rows[-1]
    out.print(f"advertisement: {last.status}: {last.message}", markup=False, highlight=False)
