"""webdataset shards: names, the hash-bucket assignment of samples to shards, deterministic writing.

Assignment: a sample's shard is ``sha256(key) mod S`` with S a power of two (≥ samples/target), so
appending k images changes at most k shards and every other shard stays byte-identical. S only
changes when a split outgrows it (then every shard of that split is rewritten once). Samples inside
a shard are sorted by key; tar members carry mtime 0 and no owner, so equal inputs give equal bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from typing import IO, TYPE_CHECKING

import webdataset as wds

from nextdetail.errors import UserError
from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    import numpy as np


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


def read_tar_bytes(shards: Store, tar: str, image_format: str) -> dict[str, bytes]:
    """key → encoded image bytes of one tar (read once; the caller decodes per sample)."""
    out = {}
    with shards.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            key, _, ext = member.name.partition(".")
            if ext == image_format:
                out[key] = tf.extractfile(member).read()
    return out


def read_tar_images(shards: Store, tar: str, keys: tuple[str, ...], image_format: str) -> np.ndarray:
    """The images of `keys` from one tar as uint8 (N, H, W, 3), in the order of `keys`."""
    import numpy as np
    from PIL import Image

    wanted = {k: i for i, k in enumerate(keys)}
    out: list[np.ndarray | None] = [None] * len(keys)
    with shards.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            key, _, ext = member.name.partition(".")
            if ext != image_format or key not in wanted:
                continue
            data = tf.extractfile(member).read()
            with Image.open(io.BytesIO(data)) as im:
                out[wanted[key]] = np.asarray(im.convert("RGB"))
    missing = [k for k, a in zip(keys, out, strict=True) if a is None]
    if missing:
        raise UserError(f"{shards.url(tar)}: {len(missing)} samples of the manifest are missing (first: "
                        f"{missing[0]}); re-run the shard stage")
    shapes = {a.shape for a in out}  # type: ignore[union-attr]
    if len(shapes) != 1:
        raise UserError(f"{shards.url(tar)}: images of different sizes {sorted(shapes)[:3]}; decompose needs "
                        "shard.resolution set (center-cropped, one size)")
    return np.stack(out)  # type: ignore[arg-type]
