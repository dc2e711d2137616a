"""Safetensors files written piece by piece: the header is laid out first from known shapes,
then each tensor (or each slice of one, such as one expert of a stacked tensor) is written at
its offset, so no file or tensor has to be whole in memory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import sha256_file

_DTYPE_NAMES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
}
# Same-width numpy views, so bytes can be taken from MLX arrays without a conversion.
_VIEW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


def layout(slots: list[TensorSlot]) -> tuple[bytes, dict[str, int]]:
    """The file's header bytes and each tensor's absolute offset in the file."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    start = 0
    for s in slots:
        header[s.name] = {
            "dtype": _DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [start, start + s.nbytes],
        }
        start += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    offsets, pos = {}, len(head)
    for s in slots:
        offsets[s.name] = pos
        pos += s.nbytes
    return head, offsets


def to_bytes(a: mx.array) -> memoryview:
    """The raw bytes of an evaluated array, in row-major order."""
    a = mx.contiguous(a.view(_VIEW[a.dtype.size]) if a.dtype not in _VIEW.values() else a)
    return memoryview(np.asarray(a)).cast("B")


class PieceFile:
    """One output file: created at a temporary name with its header, filled by write_at()."""

    def __init__(self, path: Path, slots: list[TensorSlot]):
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.head, self.offsets = layout(slots)
        self.size = len(self.head) + sum(s.nbytes for s in slots)
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, self.head, 0)
        os.ftruncate(self.fd, self.size)

    def write_at(self, name: str, offset: int, data: memoryview) -> None:
        """Writes data at byte offset within tensor name's region."""
        pos = self.offsets[name] + offset
        while data:
            n = os.pwrite(self.fd, data, pos)
            data, pos = data[n:], pos + n

    def finish(self) -> str:
        """Flushes, renames into place, and returns the file's sha256."""
        os.fsync(self.fd)
        os.close(self.fd)
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        return digest

    def abandon(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
