"""The coordinator's HTTP APIs (app.py builds the app; context.py is what they share)."""

from mlxdist.serving.api.app import create_app
from mlxdist.serving.api.context import Inflight

__all__ = ["Inflight", "create_app"]
