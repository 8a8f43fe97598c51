"""Safetensors checkpoints read as published: index + shards (or one file), memory-mapped, zero-copy.

Headers are parsed here rather than through the safetensors package so that a truncated or damaged shard is
reported with its file and tensor name before any byte of it is used, and so that tensors are views of a
shared private mapping (one copy of ~1 TB in memory, never two).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "I8": torch.int8,
    "BOOL": torch.bool,
}


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of safetensors dtype `dtype` (e.g. "F8_E4M3") and `shape`."""
    return math.prod(shape) * DTYPES[dtype].itemsize


class CheckpointError(RuntimeError):
    """The checkpoint on disk does not match what the config says it holds (the message names file and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes): no safetensors header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise CheckpointError(f"{path}: header length {hlen} does not fit a {size}-byte file (truncated?)")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        need = tensor_nbytes(dtype, shape)
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor '{name}' spans {end - begin} bytes but {dtype}{list(shape)} needs {need}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {base + end} but the file has {size} bytes (truncated file)"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    return out


class Checkpoint:
    """Every tensor of a checkpoint directory, by name; data is mapped lazily, one private mapping per shard.

    prefix: the text model's tensors are named `prefix + name` (K2.5's "language_model."); they are keyed here by
    `name`, and tensors outside the prefix (K2.5's vision tower and projector) are listed in `skipped` only.
    """

    def __init__(self, directory: str | Path, prefix: str = ""):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        index = self.dir / INDEX_NAME
        if index.exists():
            self._read_index(index)
        elif (self.dir / SINGLE_NAME).exists():
            self.tensors = read_header(self.dir / SINGLE_NAME)
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self.skipped = [name for name in self.tensors if not name.startswith(prefix)]
        if prefix:
            self.tensors = {name[len(prefix):]: info for name, info in self.tensors.items() if name.startswith(prefix)}

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object): {e}") from None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            path = self.dir / shard
            if not path.exists():
                raise CheckpointError(
                    f"{path}: shard listed in {INDEX_NAME} is missing (it holds '{names[0]}' and {len(names) - 1} more)"
                )
            header = read_header(path)
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{path}: tensor '{name}' is listed in {INDEX_NAME} but not in this shard")
                self.tensors[name] = header[name]
            for name in header.keys() - set(names):
                raise CheckpointError(f"{path}: tensor '{name}' is in this shard but not in {INDEX_NAME}")

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy CPU tensor over the mapped file (copy-on-write: writes never reach the disk)."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        if mapped is None:
            with open(info.file, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mapped
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the file pages behind a tensor that was copied elsewhere, so RAM never holds it twice."""
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-info.start // page) * page  # whole pages inside the tensor only: neighbours stay mapped
        end = (info.start + info.nbytes) // page * page
        if end <= start:
            return
        mapped = self._maps.get(info.file)
        if mapped is not None:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
