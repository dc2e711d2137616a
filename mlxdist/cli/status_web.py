"""`mlxdist status --cluster NAME --web`: the dashboard of the cluster's agents, before any model
runs, served from this process until Ctrl-C (mlxdist/serving/dashboard/agents.py)."""

from __future__ import annotations

from pathlib import Path


def status_web(
    cluster: str,
    interfaces: list[str],
    secret_file: Path | None,
    timeout: float,
    host: str | None,
    port: int | None,
    api_key: str | None = None,
) -> int:
    """Serves the page on host:port (127.0.0.1:8090 unless named) until Ctrl-C; a missing
    secret or a port taken is one line and exit 1."""
    from mlxdist.serving.dashboard.agents import DEFAULT_PORT, serve

    try:
        where = (host or "127.0.0.1", port or DEFAULT_PORT)
        serve(cluster, interfaces, secret_file, timeout, *where, api_key)
    except KeyboardInterrupt:
        pass
    return 0  # a UserError goes up: the CLI says it in one line
