"""The environment a rank starts with: what `mlx.launch` gives a rank of each backend.

Every starter (local, agent, ssh) builds it here so a rank started by mlxdist sees exactly what
one started by mlx.launch from the same hostfile would. As mlx.launch does, the result comes in
two parts: plain variables, and variables that name a file holding some content (the starter
writes the file where the rank runs and sets the variable to its path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .hostfile import ring_hostfile

# What a rank can be started on ("auto" is resolved before this): MLX's ring and jaccl, and
# jaccl-ring, which mlx.launch starts as jaccl with MLX_JACCL_RING=1 (the rank's C++ backend is
# jaccl, which then connects each rank to its two ring neighbours only).
BACKENDS = ("ring", "jaccl", "jaccl-ring")

JACCL_PORT = 32323  # mlx.launch's --starting-port: the JACCL coordinator listens on it
# What the hostfile mlxdist writes for jaccl lists in "envs" (MLX's docs suggest it for JACCL):
# every starter sets it too, so a rank gets the same whether mlx.launch or mlxdist starts it.
JACCL_ENVS = {"MLX_METAL_FAST_SYNCH": "1"}
FILE_NAMES = {"MLX_HOSTFILE": "hostfile.json", "MLX_IBV_DEVICES": "ibv_devices.json"}


def mlx_backend(backend: str) -> str:
    """The name mx.distributed.init takes for a backend (RankSpec.backend)."""
    return "jaccl" if backend == "jaccl-ring" else backend


def backend_envs(backend: str) -> dict[str, str]:
    """The variables a backend's hostfile sets for every rank ("envs")."""
    return dict(JACCL_ENVS) if mlx_backend(backend) == "jaccl" else {}


@dataclass(frozen=True)
class RankEnv:
    env: dict[str, str]  # variables set as they are
    files: dict[str, str] = field(default_factory=dict)  # variable -> content of its file

    def items(self, paths: dict[str, str]) -> dict[str, str]:
        """Every variable, the file ones pointing at paths[name] where their content was written."""
        return {**self.env, **{name: paths[name] for name in self.files}}


def rank_env(
    rank: int,
    world: int,
    backend: str = "ring",
    ring: list[list[str]] | None = None,
    rdma: list[list[str | list[str] | None]] | None = None,
    coordinator: str | None = None,
    extra: dict[str, str] | None = None,
) -> RankEnv:
    """What rank `rank` of `world` gets.

    ring: every rank's "ip:port" entries (the ring hostfile), for the ring backend.
    rdma: the N x N matrix of RDMA device names (None on the diagonal, and for jaccl-ring where
    two ranks are not ring neighbours), for jaccl and jaccl-ring.
    coordinator: "ip:port" of rank 0's JACCL coordinator, for jaccl and jaccl-ring.
    extra: more of the hostfile's own variables ("envs"), set first as mlx.launch does, after
    the backend's own (backend_envs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    env = backend_envs(backend) | (extra or {})
    files: dict[str, str] = {}
    if backend == "ring":
        if world > 1:
            files["MLX_HOSTFILE"] = ring_hostfile(ring or [])
    elif world > 1:
        if rdma is None or len(rdma) != world or any(len(row) != world for row in rdma):
            raise ValueError(f"{backend} needs a {world} x {world} matrix of RDMA devices")
        if not coordinator:
            raise ValueError(f"{backend} needs rank 0's coordinator address")
        env["MLX_JACCL_COORDINATOR"] = coordinator
        if backend == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
        files["MLX_IBV_DEVICES"] = json.dumps(rdma)
    env["MLX_RANK"] = str(rank)
    return RankEnv(env, files)


def write_files(renv: RankEnv, folder: Path) -> dict[str, str]:
    """Writes each file variable's content into folder; returns every variable to set."""
    paths = {}
    for name, content in renv.files.items():
        path = folder / FILE_NAMES.get(name, f"{name.lower()}.json")
        path.write_text(content)
        paths[name] = str(path)
    return renv.items(paths)
