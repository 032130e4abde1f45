"""safetensors files read and written a slice at a time, so a merge holds a few rows of one tensor in memory,
never a whole shard (nor a whole tensor).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data, each
tensor row-major little-endian. Reading it by hand (rather than through a framework) lets the merge run with
numpy alone on bf16 weights, which numpy has no type for: bf16 is the top half of a float32, widened by a
shift and narrowed with round-to-nearest-even, exactly as torch does.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

# Arrays of float32 (or float64) values: what every merge computes in.
Array = np.ndarray[Any, Any]

ITEM_SIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
CHUNK_BYTES = 64 * 1024 * 1024  # rows are read, changed and written this many bytes at a time


class TensorFileError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class TensorFile:
    """The header of one safetensors file; tensors are read from it on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TensorFileError(f"{path.name}: not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise TensorFileError(f"{path.name}: not a safetensors file (header of {size} bytes)")
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TensorFileError(f"{path.name}: not a safetensors file ({exc})") from None
        file_size = path.stat().st_size
        self.metadata: dict[str, str] | None = header.pop("__metadata__", None)
        data_start = 8 + size
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (data_start + int(o) for o in entry["data_offsets"])
            expected = math.prod(shape) * ITEM_SIZE.get(dtype, 0)
            if dtype not in ITEM_SIZE or end - begin != expected or end > file_size:
                raise TensorFileError(f"{path.name}: tensor {name} ({dtype} {list(shape)}) is damaged or truncated")
            self.tensors[name] = TensorInfo(name, dtype, shape, begin, end)

    def rows(self, info: TensorInfo, start: int, stop: int) -> Array:
        """Rows [start, stop) of a float tensor as float32 (float64 for F64), shape (stop-start, *rest)."""
        with open(self.path, "rb") as f:
            f.seek(info.begin + start * info.row_bytes)
            raw = f.read((stop - start) * info.row_bytes)
        return to_float(raw, info.dtype).reshape((stop - start, *info.shape[1:]))

    def full(self, info: TensorInfo) -> Array:
        if not info.shape:
            with open(self.path, "rb") as f:
                f.seek(info.begin)
                return to_float(f.read(info.nbytes), info.dtype).reshape(())
        return self.rows(info, 0, info.shape[0])

    def copy_raw(self, info: TensorInfo, out: IO[bytes]) -> None:
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            left = info.nbytes
            while left:
                block = f.read(min(left, CHUNK_BYTES))
                if not block:
                    raise TensorFileError(f"{self.path.name}: tensor {info.name} is truncated")
                out.write(block)
                left -= len(block)


def to_float(raw: bytes, dtype: str) -> Array:
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").copy()
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8").copy()
    raise TensorFileError(f"cannot compute on {dtype} weights (only F64, F32, F16 and BF16)")


def from_float(values: Array, dtype: str) -> bytes:
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        # round to nearest, ties to even (torch's float -> bfloat16); NaNs stay NaNs
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        nan = np.isnan(values.reshape(-1))
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded.tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "F64":
        return np.ascontiguousarray(values, dtype="<f8").tobytes()
    raise TensorFileError(f"cannot write {dtype} weights")


def row_chunks(info: TensorInfo) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about CHUNK_BYTES (as float32) each."""
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, math.prod(info.shape[1:]) * 4)
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def write_header(
    out: IO[bytes], entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> None:
    """The header for tensors written next, in this order, back to back."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * ITEM_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does it
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
