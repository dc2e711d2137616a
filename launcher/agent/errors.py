"""What the agent answers when it will not do as asked."""

from __future__ import annotations


class Refused(Exception):
    """A request the agent will not carry out: answered as {"error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra
