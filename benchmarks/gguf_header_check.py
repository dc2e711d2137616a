"""Our GGUF header check (quantize.gguf._check_file) against llama.cpp's own reader, gguf-py's
GGUFReader, on the SmolLM2 GGUF and on broken files: time, and what each says.

    .venv/bin/pip install gguf    # only for this comparison; the project does not depend on it
    .venv/bin/python benchmarks/gguf_header_check.py

The header check exists so that a truncated or forged file ends as one line instead of crashing
inside MLX's loader; the question is whether the well-kept reader could do that job."""

from __future__ import annotations

import multiprocessing
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from quantize.gguf import GGUFError, _check_file, default_smollm2_gguf  # noqa: E402

LIMIT = 20.0  # seconds a reader may take on one file before it is called hung


def _theirs(path: str) -> None:
    from gguf import GGUFReader

    GGUFReader(path)


def _ours(path: str) -> None:
    _check_file(Path(path))


def _run(fn, path: Path) -> str:
    """What fn says of path, and how long it took, in a child process (a reader may hang)."""
    with multiprocessing.Pool(1) as pool:
        t0 = time.perf_counter()
        job = pool.apply_async(_outcome, (fn, str(path)))
        try:
            said = job.get(LIMIT)
        except multiprocessing.TimeoutError:
            return f"still running after {LIMIT:.0f} s (stopped)"
        return f"{time.perf_counter() - t0:.2f} s: {said}"


def _outcome(fn, path: str) -> str:
    try:
        fn(path)
    except GGUFError as e:
        return f"GGUFError: {str(e)[:90]}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:90]}"
    return "read"


def _broken(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    truncated = folder / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    # A header that claims 2**40 metadata entries of a 2**40-long array: nothing but the count.
    forged = folder / "forged-count.gguf"
    kv = struct.pack("<Q", 3) + b"key" + struct.pack("<I", 9) + struct.pack("<IQ", 4, 2**40)
    forged.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    return {"truncated to a third": truncated, "forged array length": forged}


def main() -> None:
    good = default_smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"SmolLM2-135M-Instruct (whole)": good, **_broken(good, Path(tmp))}
        print("| file | ours (quantize.gguf) | gguf-py GGUFReader |\n|---|---|---|")
        for name, path in files.items():
            print(f"| {name} | {_run(_ours, path)} | {_run(_theirs, path)} |")


if __name__ == "__main__":
    main()
