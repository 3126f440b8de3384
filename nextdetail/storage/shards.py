"""webdataset shards: names, the hash-bucket assignment of samples to shards, deterministic writing.

Assignment: a sample's shard is ``sha256(key) mod S`` with S a power of two (≥ samples/target), so
appending k images changes at most k shards and every other shard stays byte-identical. S only
changes when a split outgrows it (then every shard of that split is rewritten once). Samples inside
a shard are sorted by key; tar members carry mtime 0 and no owner, so equal inputs give equal bytes.
"""

from __future__ import annotations

import hashlib
import math
from typing import IO

import webdataset as wds


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_count_for(n_items: int, samples_per_shard: int) -> int:
    """Smallest power of two with a mean of at most `samples_per_shard` samples per shard."""
    need = max(1, math.ceil(n_items / samples_per_shard))
    return 1 << (need - 1).bit_length()


def shard_index_of(key: str, n_shards: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n_shards


class _HashingFile:
    """Write-only file wrapper that counts and hashes what goes through it (tarfile stream mode)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class ShardTarWriter:
    """A webdataset `TarWriter` with reproducible members; `.size`/`.sha256` describe the bytes written."""

    def __init__(self, f: IO[bytes]) -> None:
        self._out = _HashingFile(f)
        self._tar = wds.TarWriter(self._out, mtime=0, user="", group="", mode=0o444)

    def write(self, sample: dict[str, bytes | str]) -> None:
        self._tar.write(sample)

    def close(self) -> None:
        self._tar.tarstream.close()  # ends the archive without closing the caller's file

    @property
    def size(self) -> int:
        return self._out.size

    @property
    def sha256(self) -> str:
        return self._out.sha.hexdigest()
