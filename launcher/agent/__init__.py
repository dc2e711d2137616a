"""`mlxdist agent`: the control service on every Mac. It receives model shards and starts, watches
and stops this Mac's MLX rank for the launcher.

Every request is signed (launcher.auth) and checked before any handler runs, 404s included.
Nothing a request carries becomes a command or a flag: a rank is always
`python -m mlxdist.rank` with validated values, and files land only inside models_dir.
"""

from .app import create_agent_app, serve_agent
from .requests import StartRank

__all__ = ["StartRank", "create_agent_app", "serve_agent"]
