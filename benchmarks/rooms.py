"""Files and lines per room, and the largest file, at one or more git revisions.

    .venv/bin/python benchmarks/rooms.py d913c8d HEAD

A room is a top-level package (quantize/, launcher/) or, inside mlxdist/, a subpackage; modules
directly under a package count as that package's room. Only Python files count; tests/ and
benchmarks/ are listed as rooms of their own."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("quantize", "launcher", "mlxdist", "tests", "benchmarks")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def room_of(path: str) -> str | None:
    parts = path.split("/")
    if parts[0] not in TOPS or not path.endswith(".py"):
        return None
    if parts[0] == "mlxdist" and len(parts) > 2:
        return f"mlxdist/{parts[1]}/"
    return parts[0] + "/"


def measure(rev: str) -> tuple[dict[str, tuple[int, int]], tuple[str, int]]:
    rooms: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    largest = ("", 0)
    for path in _git("ls-tree", "-r", "--name-only", rev).split():
        room = room_of(path)
        if room is None:
            continue
        lines = _git("show", f"{rev}:{path}").count("\n")
        rooms[room][0] += 1
        rooms[room][1] += lines
        if room not in ("tests/", "benchmarks/") and lines > largest[1]:
            largest = (path, lines)
    return {k: (f, n) for k, (f, n) in sorted(rooms.items())}, largest


def main(revs: list[str]) -> None:
    for rev in revs:
        rooms, (path, lines) = measure(rev)
        print(f"\n{rev} ({_git('rev-parse', '--short', rev).strip()})")
        print("| room | files | lines | lines/file |\n|---|---:|---:|---:|")
        for room, (files, n) in rooms.items():
            print(f"| {room} | {files} | {n:,} | {n // files} |")
        print(f"largest product file: {path} ({lines} lines)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["HEAD"])
