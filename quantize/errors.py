"""The one base of every fault a user can cause: the CLI prints it as one line and exits 1."""


class UserError(Exception):
    """A fault the user can cause and fix; its message is one line saying what went wrong and
    what to do."""
