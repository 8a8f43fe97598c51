"""The prefix cache's disk tier: cached prefixes (token ids + latents) as files, so they outlive the process.

One file per prefix, named by a hash of its tokens, written to a temporary name and renamed (a crash leaves no
half file under a real name):

    b"HYBRIDKV" | u64 header length | JSON header | int64 tokens | latents (raw, the header's dtype and shape)

The header carries the model's identity (config.json and every weight file's size, plus the KV dtype) and a
CRC32 of the payload. A file of another model, a damaged header or a failed CRC is skipped with a warning and
never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

MAGIC = b"HYBRIDKV"
SUFFIX = ".kvp"
_DTYPES = {"bfloat16": (torch.bfloat16, torch.int16), "float32": (torch.float32, torch.float32),
           "float16": (torch.float16, torch.float16)}  # fmt: skip


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries two int arrays share."""
    m = min(len(a), len(b))
    return int(np.argmin(np.append(a[:m] == b[:m], False)))


def model_identity(path: str | Path, kv_dtype: torch.dtype) -> str:
    """What the latents depend on: config.json's bytes, every safetensors file's name and size, the KV dtype."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(str(kv_dtype).encode())
    return h.hexdigest()


class PrefixStore:
    def __init__(self, directory: str | Path, identity: str):
        self.dir, self.identity = Path(directory), identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: dict[Path, np.ndarray] = {}  # file -> its tokens
        for f in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                header, tokens, _ = self._read_head(f)
            except (OSError, ValueError, KeyError, TypeError) as e:
                warnings.warn(f"{f}: not a usable prefix-cache file, ignored ({e})", stacklevel=2)
                continue
            if header.get("identity") != identity:
                warnings.warn(f"{f}: cached for a different model or KV dtype, ignored", stacklevel=2)
                continue
            self.entries[f] = tokens

    @staticmethod
    def _read_head(f: Path) -> tuple[dict, np.ndarray, int]:
        """(header, tokens, byte offset of the latents)."""
        with open(f, "rb") as fh:
            if fh.read(8) != MAGIC:
                raise ValueError("bad magic")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 1 << 20:
                raise ValueError("header too long")
            header = json.loads(fh.read(n))
            count = int(header["tokens"])
            tokens = np.frombuffer(fh.read(8 * count), np.int64)
            if len(tokens) != count:
                raise ValueError("truncated token list")
            return header, tokens, fh.tell()

    def longest(self, ids: np.ndarray, min_length: int) -> tuple[np.ndarray, torch.Tensor] | None:
        """The stored prefix sharing the most leading tokens with ids (at least min_length), loaded; or None."""
        best, best_len = None, min_length - 1
        for f, tokens in self.entries.items():
            same = common_prefix(tokens, ids)
            if same > best_len:
                best, best_len = f, same
        if best is None:
            return None
        try:
            return self.entries[best], self._load(best)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"{best}: prefix-cache file unreadable, ignored ({e})", stacklevel=2)
            del self.entries[best]
            return None

    def _load(self, f: Path) -> torch.Tensor:
        header, tokens, offset = self._read_head(f)
        dtype, storage = _DTYPES[header["dtype"]]
        shape = tuple(header["shape"])
        if len(shape) != 3 or shape[1] != len(tokens):
            raise ValueError(f"latents of shape {list(shape)} do not match {len(tokens)} tokens")
        with open(f, "rb") as fh:
            fh.seek(offset)
            payload = fh.read()
        need = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        if len(payload) != need:
            raise ValueError(f"payload has {len(payload)} bytes, expected {need} (truncated?)")
        if zlib.crc32(payload) != header["crc32"]:
            raise ValueError("checksum mismatch (corrupted)")
        return torch.frombuffer(bytearray(payload), dtype=storage).view(dtype).view(shape)

    def save(self, tokens: np.ndarray, kv: torch.Tensor) -> None:
        name = self.dir / (hashlib.sha1(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest() + SUFFIX)
        if name in self.entries:
            return
        dtype = str(kv.dtype).removeprefix("torch.")
        payload = kv.contiguous().view(_DTYPES[dtype][1]).numpy().tobytes()
        header = json.dumps({"identity": self.identity, "tokens": len(tokens), "dtype": dtype,
                             "shape": list(kv.shape), "crc32": zlib.crc32(payload)}).encode()  # fmt: skip
        tmp = name.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", len(header)) + header)
            fh.write(np.ascontiguousarray(tokens, np.int64).tobytes())
            fh.write(payload)
        os.replace(tmp, name)
        self.entries[name] = np.array(tokens, np.int64)
