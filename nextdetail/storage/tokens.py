"""The token cache: every image's token maps in a Zarr v3 group, content-addressed and shareable.

Layout under ``<tokens.cache or storage.root>/tokens/<identity>/`` — the path *is* the identity, so
two users with the same inputs name the same cache::

    _COMPLETE.json                  written last and create-only: identity, the attempt it publishes,
                                    every file of that attempt with its size and sha256. Readers trust
                                    nothing that it does not list.
    attempts/<writer>/              one directory per writer (host-pid-random): writers share no file
        _LEASE.json                 the writer's heartbeat; attempts silent for an hour are removed
        tokens.zarr/zarr.json       group; attrs["tokens"] = the token layout (below)
        tokens.zarr/<split>/<tar>   uint16|uint32 (images, variants, L), ONE chunk per tar
        _parts/<split>-<tar>.json   per-tar marker with the sha256 of that array's files
        index.parquet               key, split, shard (tar), row, class_index: the shard manifest's keys

Token layout: ``maps[k] = {index, kind: base|detail, factor, height, width, offset, length}``; row r of
an array holds token map k at ``r[offset : offset + length]`` (row-major h × w), maps in prediction
order (base scales coarse to fine, then the detail factors D_n … D_1).

Why attempts: S3 has no rename, and two runs may produce the same identity at once. Each writes its own
directory; publishing is one create-only write of `_COMPLETE.json` (a hard link locally, a conditional
PUT on S3): exactly one writer wins, the other deletes its directory and uses the winner's. A killed
writer's finished parts are adopted (checksum-verified copies) by the next writer instead of re-encoded.

Reading (`TokenCache`): a local cache is read in place; a remote one through a local mirror of its
files, each downloaded once and kept only if its sha256 matches the marker.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nextdetail.errors import UserError
from nextdetail.pipeline.artifacts import listed_files, withdraw
from nextdetail.storage.codecs import check_codecs
from nextdetail.storage.fs import OutsideRoot, Store, relative_path
from nextdetail.storage.hashing import bytes_sha256, canonical_json

MARKER = "_COMPLETE.json"
LEASE = "_LEASE.json"
ZARR = "tokens.zarr"
STALE_ATTEMPT_S = 3600.0
FORMAT_VERSION = 1

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),  # tar name in the shard dataset
    ("row", pa.int32()),  # row in that tar's token array
    ("class_index", pa.int32()),
])


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def token_layout(schedule: Any, order: int, vocab_size: int, variants: list[str]) -> dict[str, Any]:
    """The attrs that let a reader cut a row of L tokens back into the M token maps."""
    maps, offset = [], 0
    for k, tm in enumerate(schedule):
        factor = {"base": order, "detail": order - tm.source + 1, "global": 0}[tm.kind]  # B_n, D_k; 0: f_I − f̂
        maps.append({"index": k, "kind": tm.kind, "factor": factor,
                     "height": tm.side, "width": tm.side, "offset": offset, "length": tm.side * tm.side})
        offset += tm.side * tm.side
    return {"format": FORMAT_VERSION, "maps": maps, "tokens_per_image": offset, "order": order,
            "vocab_size": vocab_size, "dtype": token_dtype(vocab_size), "variants": list(variants)}


def array_name(split: str, tar: str) -> str:
    return f"{split}/{tar.removesuffix('.tar')}"


def part_marker(split: str, tar: str) -> str:
    return f"_parts/{split}-{tar.removesuffix('.tar')}.json"


# ---- writing (one attempt) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One writer's directory `attempts/<writer>/` inside the cache directory `cache`."""

    cache: Store
    writer: str

    @classmethod
    def start(cls, cache: Store) -> Attempt:
        attempt = cls(cache, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        attempt.heartbeat()
        return attempt

    @property
    def rel(self) -> str:
        return f"attempts/{self.writer}"

    @property
    def store(self) -> Store:
        return self.cache.sub(self.rel)

    def heartbeat(self) -> None:
        self.store.write_bytes(LEASE, canonical_json({"writer": self.writer, "host": socket.gethostname(),
                                                      "pid": os.getpid(), "heartbeat": time.time()}).encode())

    def others(self) -> list[str]:
        self.cache.refresh("attempts")
        return [w for w in self.cache.listdir("attempts") if w != self.writer]

    def remove_stale(self, older_than_s: float = STALE_ATTEMPT_S) -> list[str]:
        """Delete other attempts whose writer has been silent for `older_than_s` (killed runs), except
        the one the published marker names."""
        published = (read_marker(self.cache) or {}).get("summary", {}).get("attempt")
        removed = []
        for writer in self.others():
            if f"attempts/{writer}" == published:
                continue
            try:
                beat = json.loads(self.cache.read_bytes(f"attempts/{writer}/{LEASE}"))["heartbeat"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                beat = 0.0
            if time.time() - beat > older_than_s:
                self.cache.remove_tree(f"attempts/{writer}")
                removed.append(writer)
        return removed

    def adopt(self, marker_rel: str, identity: str) -> dict[str, Any] | None:
        """Copy another attempt's finished part (its marker names `identity` and every file still has its
        sha256) into this attempt; its marker record, or None if no attempt has it intact."""
        for writer in self.others():
            other = self.cache.sub("attempts", writer)
            try:
                record = json.loads(other.read_bytes(marker_rel))
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if record.get("identity") != identity or not record.get("sha256"):
                continue
            blobs = {}
            for rel, digest in record["sha256"].items():
                try:
                    data = other.read_bytes(rel)
                except FileNotFoundError:
                    break
                if bytes_sha256(data) != digest:
                    break
                blobs[rel] = data
            else:
                for rel, data in blobs.items():
                    self.store.write_bytes(rel, data)
                return {**record, "copied_from": writer}
        return None

    def discard(self) -> None:
        self.cache.remove_tree(self.rel)


def create_group(attempt: Attempt, layout: dict[str, Any], identity: str, splits: list[str]) -> None:
    """The attempt's Zarr group with the layout attrs, and one group per split (before parts run)."""
    import zarr

    group = zarr.open_group(attempt.store.zarr_store(ZARR), mode="w", zarr_format=3,
                            attributes={"tokens": layout, "identity": identity})
    for split in splits:
        group.require_group(split)


def write_array(attempt: Attempt, split: str, tar: str, tokens: np.ndarray) -> list[str]:
    """One tar's tokens (images, variants, L) as a one-chunk array; its files relative to the attempt."""
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(attempt.store.zarr_store(ZARR), mode="r+", zarr_format=3)
    name = array_name(split, tar)
    array = group.create_array(name, shape=tokens.shape, chunks=tokens.shape, dtype=tokens.dtype,
                               compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                               fill_value=0, overwrite=True)
    array[...] = tokens
    attempt.store.refresh(f"{ZARR}/{name}")
    return attempt.store.find(f"{ZARR}/{name}")


def consolidate(attempt: Attempt) -> None:
    import zarr

    with warnings.catch_warnings():  # "not part of the v3 spec yet": we read it back with zarr-python only
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(attempt.store.zarr_store(ZARR), zarr_format=3)


# ---- the published cache ------------------------------------------------------------------------


def read_marker(cache: Store) -> dict[str, Any] | None:
    cache.refresh(MARKER)
    try:
        return json.loads(cache.read_bytes(MARKER))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def invalidate(cache: Store, reason: str) -> None:
    """Withdraw a published cache found broken (`artifacts.withdraw`): the next writer rebuilds it, adopting the
    parts that still verify."""
    cache.refresh(MARKER)
    withdraw(cache, MARKER, reason)


class TokenCache:
    """A published token cache: its layout, index and arrays. A local cache is read in place; a remote
    one through `local_dir`, a mirror of its files each downloaded once and kept only if it verifies."""

    def __init__(self, url: str, options: dict | None = None, local_dir: str | None = None) -> None:
        self.cache = Store(url, options)
        record = read_marker(self.cache)
        identity = url.rstrip("/").rsplit("/", 1)[-1]
        if record is None or record.get("identity") != identity:
            raise UserError(f"{url}: no complete token cache here ({MARKER} missing or for another identity); "
                            "run `nextdetail tokenize` with the same settings")
        listed_files(self.cache, MARKER, record)  # a planted path is damage before anything is read or mirrored
        self.record, self.identity = record, identity
        self.attempt: str = relative_path(record["summary"]["attempt"])
        self.layout: dict[str, Any] = record["summary"]["layout"]
        self.sha256: dict[str, str] = record["sha256"]
        if self.cache.is_local:
            self.local = self.cache
        else:
            if local_dir is None:
                raise UserError(f"{url} is remote: reading it needs tokens.local_cache (a local directory)")
            self.local = Store(str(Path(local_dir) / identity))
        self._arrays: dict[str, Any] = {}
        self._index: pa.Table | None = None

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: no open arrays
        return {**self.__dict__, "_arrays": {}}

    @property
    def tokens_per_image(self) -> int:
        return int(self.layout["tokens_per_image"])

    @property
    def variants(self) -> list[str]:
        return list(self.layout["variants"])

    def _fetch(self, rel: str) -> None:
        """Make `rel` (relative to the cache) present in the local mirror, verified."""
        if self.local is self.cache or self.local.exists(rel):
            return
        data = self.cache.read_bytes(rel)
        if bytes_sha256(data) != self.sha256[rel]:
            raise UserError(f"{self.cache.url(rel)}: checksum mismatch (the shared cache is corrupt); re-run "
                            "`nextdetail tokenize`, which detects it and rebuilds")
        self.local.write_bytes(rel, data)

    def verify(self, progress: bool = False) -> list[str]:
        """Check every file against the marker's sha256 (pulling a remote cache into the mirror on the
        way); the files that fail. Afterwards a remote cache is fully mirrored."""
        from tqdm.auto import tqdm

        bad = []
        for rel, digest in tqdm(sorted(self.sha256.items()), desc="verify tokens", unit="file", disable=not progress):
            if self.local is self.cache:
                try:  # read at most to the recorded size + 1: a device or a growing file is damage, not a hang
                    if self.cache.sha256(rel, limit=self.record["files"].get(rel)) != digest:
                        bad.append(rel)
                except OutsideRoot:
                    bad.append(rel)
            else:
                try:
                    self._fetch(rel)
                except (UserError, FileNotFoundError):  # OutsideRoot is a UserError
                    bad.append(rel)
        return bad

    def index(self) -> pa.Table:
        """key, split, shard, row, class_index of every image in the cache."""
        if self._index is None:
            from nextdetail.storage.manifest import read_table

            rel = f"{self.attempt}/index.parquet"
            self._fetch(rel)
            self._index = read_table(self.local, rel)
        return self._index

    def read(self, split: str, tar: str) -> np.ndarray:
        """One tar's tokens (images, variants, L), read whole: its one chunk file decompressed directly
        (Zarr's read path costs ~3 ms per call in its event loop, more than decompressing a chunk)."""
        name = array_name(split, tar)
        meta = self._arrays.get(name)
        if meta is None:
            prefix = f"{self.attempt}/{ZARR}/{name}/"
            files = [rel for rel in self.sha256 if rel.startswith(prefix)]
            if not files:
                raise KeyError(f"{self.cache.url()}: no tokens for {split}/{tar}")
            for rel in files:  # every file first: Zarr reads a missing chunk as fill values
                self._fetch(rel)
            check_codecs(self.local, prefix)  # its zarr.json may name codecs we never write (numcodecs.pickle)
            meta = json.loads(self.local.read_bytes(prefix + "zarr.json"))
            self._arrays[name] = meta
        shape = tuple(meta["shape"])
        codecs = [c["name"] for c in meta["codecs"]]
        if codecs != ["bytes", "blosc"] or tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]) != shape:
            import zarr  # written with another chunking: let Zarr read it (its codecs were checked above)

            return zarr.open_array(self.local.zarr_store(f"{self.attempt}/{ZARR}", read_only=True), path=name, mode="r",
                                   zarr_format=3)[...]
        from numcodecs import blosc

        raw = blosc.decompress(self.local.read_bytes(f"{self.attempt}/{ZARR}/{name}/c/" + "/".join("0" * len(shape))))
        endian = "<" if meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little" else ">"
        return np.frombuffer(raw, dtype=np.dtype(meta["data_type"]).newbyteorder(endian)).reshape(shape)

    def maps(self, row: np.ndarray) -> list[np.ndarray]:
        """A row of L tokens (or rows (..., L)) → the M token maps (..., h_k, w_k)."""
        return [row[..., m["offset"] : m["offset"] + m["length"]].reshape(*row.shape[:-1], m["height"], m["width"])
                for m in self.layout["maps"]]
