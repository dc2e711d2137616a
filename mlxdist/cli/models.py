"""Which model folder a user means: a folder, a GGUF file (imported once), or the demo model."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from quantize.checkpoint import CheckpointError
from quantize.gguf import default_smollm2_gguf, import_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def home() -> Path:
    return Path(os.environ.get("MLXDIST_HOME", Path.home() / ".cache" / "mlxdist"))


def resolve_model(spec: str | None) -> Path:
    """The MLX model folder for spec; GGUF files are imported into the cache on first use."""
    if spec is None:
        return _imported(default_smollm2_gguf(), DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return _imported(path, f"{path.stem}-{key.hexdigest()[:12]}")
    if path.exists():
        raise CheckpointError(f"{path} is neither a model folder nor a .gguf file")
    raise CheckpointError(f"model path {path} does not exist: give a model folder or a .gguf file")


def _imported(gguf: Path, name: str) -> Path:
    out = home() / "models" / name
    if not (out / "config.json").is_file():
        print(f"preparing {name} from {gguf.name} (once, into {out})", file=sys.stderr)
        import_gguf(gguf, out)
    return out
