"""The `mlxdist` command: the app, with its commands registered by importing their modules."""

from mlxdist.cli.app import app, main

# isort: off
# The order of these imports is the order of `mlxdist --help`.
from mlxdist.cli import launch, chat, quantize, plan, agent, doctor, testing  # noqa: F401
# isort: on

__all__ = ["app", "main"]
