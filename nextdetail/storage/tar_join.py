"""Tars written in parts, joined as bytes: the class groups of `sample` and `evaluate` each write a complete
`samples.tar` (a `ShardTarWriter`: fixed headers, no offsets in them), and the merge copies each one's members as
written, then ends the archive once. The result is the bytes one writer streaming every member makes — a copy at
the store's speed instead of decoding and re-encoding every sample in the merge (at ImageNet 50,000 PNGs).

Apart from `storage/shards.py` so that the stages that read shards keep their code identity."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from typing import IO, Any


def tar_members(tar: bytes, name: str) -> memoryview:
    """An archive's members without its end-of-archive blocks: what its writer had written before it closed. Walks
    the headers (each a 512-byte block, its checksum checked, then its data's blocks: ustar, pax and GNU entries
    alike) without parsing them into `TarInfo`s — tarfile's parser took 80 % of the copy's time. A damaged or
    truncated archive is refused (`tarfile.ReadError` naming `name`)."""
    block, end = tarfile.BLOCKSIZE, 0
    while True:
        header = tar[end : end + block]
        if len(header) < block:
            raise tarfile.ReadError(f"{name}: truncated at byte {end} (no end of archive); re-run the stage")
        if not any(header):  # the end of archive: two zero blocks
            if any(tar[end + block : end + 2 * block]) or len(tar) < end + 2 * block:
                raise tarfile.ReadError(f"{name}: damaged at byte {end} (a lone zero block); re-run the stage")
            return memoryview(tar)[:end]
        try:
            intact = int(header[148:156].rstrip(b"\0 "), 8) == sum(header[:148]) + 8 * 32 + sum(header[156:])
            size = header[124:136]
            data = int.from_bytes(size[1:], "big") if size[0] & 0x80 else int(size.rstrip(b"\0 ") or b"0", 8)
        except ValueError:  # not octal digits
            intact = False
        if not intact:
            raise tarfile.ReadError(f"{name}: damaged header at byte {end}; re-run the stage")
        end += block + -(-data // block) * block


def end_of_archive(members: int) -> bytes:
    """What `tarfile.TarFile.close` appends after `members` bytes of members: two zero blocks, then zeros up to a
    whole record (its `tar -b20` padding)."""
    return bytes(2 * tarfile.BLOCKSIZE + (-(members + 2 * tarfile.BLOCKSIZE)) % tarfile.RECORDSIZE)


def join_tars(out: IO[bytes], parts: Iterable[tuple[bytes, str]], digest: Any = None) -> int:
    """Write the members of every (archive bytes, its name for errors) in `parts`, in order, then one end of archive
    to `out`; `digest` (a hashlib object), when given, is fed the same bytes. Returns the bytes written. One part is
    held at a time."""
    written = 0
    for tar, name in parts:
        members = tar_members(tar, name)
        written += _put(out, members, digest)
    return written + _put(out, end_of_archive(written), digest)


def _put(out: IO[bytes], data: bytes | memoryview, digest: Any) -> int:
    out.write(data)
    if digest is not None:
        digest.update(data)
    return len(data)
