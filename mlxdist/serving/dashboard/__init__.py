"""The cluster's dashboard: a page served with the API (and by `mlxdist status --web`), fed
live by server-sent events from a Board."""

from mlxdist.serving.dashboard.board import Board
from mlxdist.serving.dashboard.routes import add_dashboard

__all__ = ["Board", "add_dashboard"]
