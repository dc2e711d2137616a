"""The cluster secret: 32 random bytes, as hex, in a file only its owner can read."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from quantize.errors import UserError

SECRET_BYTES = 32


class SecretError(UserError):
    """The secret file is missing, unsafe or unreadable; the message says what to do."""


def config_dir() -> Path:
    return Path(os.environ.get("MLXDIST_CONFIG", Path.home() / ".mlxdist"))


def default_secret_path() -> Path:
    return config_dir() / "secret"


def create_secret(path: Path | None = None, force: bool = False) -> Path:
    """Writes a new secret (mode 0600); refuses to replace an existing one unless force."""
    path = Path(path or default_secret_path())
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if (path.exists() or path.is_symlink()) and not force:
        raise SecretError(f"{path} already exists: keep it, or replace it with --force")
    # Written beside the target and renamed over it, so no reader ever sees a looser file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_secret(path: Path | None = None) -> bytes:
    """The secret's bytes; refuses a file that is missing or open to group or others."""
    path = Path(path or default_secret_path())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SecretError(f"no secret at {path}: run mlxdist init") from None
    except OSError as e:
        raise SecretError(f"cannot read the secret {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretError(f"{path} is readable by others: chmod 600 {path}")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SecretError(f"{path} belongs to another user")
        text = os.read(fd, 4096).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < SECRET_BYTES:
        raise SecretError(f"{path} does not hold a secret: run mlxdist init --force")
    return secret
