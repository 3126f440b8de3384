"""Base factors B_1 … B_n in a Zarr v3 group, one array per shard tar.

Layout of ``<decomposition>/factors.zarr`` (local path or fsspec URL)::

    zarr.json                     group (consolidated metadata once the stage is complete)
    train/train-000003/zarr.json  (images, order, 3, H, W) uint8|uint16 quantized over [0, 1] (each RGB plane a
                                  lossless WebP / JPEG-XL image: `image_codec.py`; `read` gives floats back), or
                                  float16|float32 (blosc-zstd)
    train/train-000003/c/0/0/0/0/0  the tar's ONE object: a Zarr v3 shard (`sharding_indexed`) of inner chunks
                                  (chunk_images, order, 3, H, W), its index (crc32c-checked) at the end
    …
    ../index.parquet              key, split, shard, row (in that shard's array), class_index

One array per tar, one shard per array: each Dask task creates and writes its own array, so no object is ever
shared between workers (no locks), and appending images to a dataset re-runs only the tars that changed. The
shard is written whole, once (`write_whole`): a partial write into a shard is read-modify-write, and concurrent
partial writes can lose data (zarr-python PR #3683), so there are none. Objects per image → per tar: ImageNet's
1.28 M factor objects become ≈ 1,300 (one per 1000-image tar), which is what a push, a pull, a listing and an S3
request bill count. A reader still gets one image without the rest: the shard's index gives its byte range.
Zarr writes every object atomically (temp + rename on disk, one PUT on S3); a tar's factors count only
once its completion marker exists, so a killed task never leaves a half-written array in use.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from nextdetail.storage.codecs import check_codecs, refusal
from nextdetail.storage.fs import Store

LEVELS = {"uint8": 255, "uint16": 65535}
"""Quantized stores: the top level of each dtype stands for 1.0 (a factor is an image in [0, 1])."""
IMAGE_FORMAT = {"uint8": "webp", "uint16": "jpegxl"}  # WebP has no 16-bit mode (image_codec.py: measured)


def quantize(values: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
    """(values as stored in `dtype`, the largest absolute error that storing makes): a float dtype by a cast; a
    quantized one by rounding to its levels over [0, 1] (at most half a level, plus what lay outside [0, 1])."""
    if dtype in LEVELS:
        levels = LEVELS[dtype]
        stored = np.rint(np.clip(values, 0.0, 1.0) * levels).astype(dtype)
        error = np.abs(stored.astype(np.float64) / levels - values)
    else:
        stored = values.astype(dtype)
        error = np.abs(stored.astype(np.float64) - values)
    return stored, float(error.max()) if error.size else 0.0


def read(array: Any, selection: Any = slice(None)) -> np.ndarray:
    """`array[selection]` as float32 factors in [0, 1]-scale, whatever the store's dtype."""
    values = np.asarray(array[selection])
    levels = LEVELS.get(str(values.dtype))
    return values.astype(np.float32) / levels if levels else values.astype(np.float32)

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("shard", pa.string()),  # tar name
    ("row", pa.int32()),  # row in that tar's array
    ("class_index", pa.int32()),
])


def array_path(split: str, tar: str) -> str:
    return f"{split}/{tar.removesuffix('.tar')}"


def create_groups(store: Store, splits: list[str]) -> None:
    """The root group and one group per split, made once before the tasks run: concurrent
    tasks creating the same parent group would race."""
    import zarr

    from nextdetail.storage.image_codec import register

    check_codecs(store, "factors.zarr")
    register()
    group = zarr.open_group(store.zarr_store("factors.zarr"), mode="a", zarr_format=3)
    for split in splits:
        group.require_group(split)


def create_array(store: Store, split: str, tar: str, n_images: int, image_shape: tuple[int, ...],
                 dtype: str, chunk_images: int) -> Any:
    """One tar's array: (images, order, C, H, W) in one shard of inner chunks of `chunk_images` images, each a
    lossless image per RGB plane for uint8/uint16 (`image_codec`), blosc-zstd with byte shuffle for floats. Write
    it with `write_whole`. An existing array with the same
    layout is opened, not recreated: a second writer of the same tar (two pipelines racing) must not delete
    the chunks the first has written — both write the same bytes, each chunk atomically. One of another
    layout (the tar changed) is replaced."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.errors import ContainsArrayError

    from nextdetail.storage.image_codec import LosslessImageCodec, register

    register()
    group = zarr.open_group(store.zarr_store("factors.zarr"), mode="r+", zarr_format=3)
    spec = dict(shape=(n_images, *image_shape), chunks=(max(1, min(chunk_images, n_images)), *image_shape),
                shards=(n_images, *image_shape), dtype=dtype, compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), fill_value=np.nan)
    if dtype in LEVELS:
        spec.update(serializer=LosslessImageCodec(IMAGE_FORMAT[dtype]), compressors=None, fill_value=0)
    try:
        return group.create_array(array_path(split, tar), **spec, overwrite=False)
    except ContainsArrayError:
        if refusal(store, f"factors.zarr/{array_path(split, tar)}") is None:  # one with other codecs: replaced unread
            existing = group[array_path(split, tar)]
            if (existing.shape, existing.chunks, existing.shards, str(existing.dtype)) == (
                    spec["shape"], spec["chunks"], spec["shards"], dtype):
                return existing
    return group.create_array(array_path(split, tar), **spec, overwrite=True)


def write_whole(store: Store, split: str, tar: str, values: np.ndarray) -> None:
    """All of a tar's factors (as stored: `quantize`) into its array (`create_array`), as one object written once.

    The shard is encoded in memory, from the array's own metadata, and written with one atomic write. Not through
    Zarr's own `array[...] = values`: its sharding codec merges every write into the shard already there, so it
    reads that shard first, and a torn one left by a killed task fails its index checksum instead of being
    replaced (and a merge is the read-modify-write this layout avoids: the module docstring)."""
    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    from nextdetail.storage.image_codec import register

    register()
    rel = f"factors.zarr/{array_path(split, tar)}"
    objects = {"zarr.json": cpu.Buffer.from_bytes(store.read_bytes(f"{rel}/zarr.json"))}
    staged = zarr.open_array(MemoryStore(objects), mode="r+", zarr_format=3)  # MemoryStore keeps its objects here
    if values.shape != staged.shape or staged.shards != staged.shape:
        raise ValueError(f"write_whole: {values.shape} for {rel} of shape {staged.shape} in shards of {staged.shards}; "
                         "one shard per tar, written whole")
    staged[...] = values
    key = staged.metadata.encode_chunk_key((0,) * values.ndim)  # the one shard: c/0/0/0/0/0
    store.write_bytes(f"{rel}/{key}", objects[key].to_bytes())


def consolidate(store: Store) -> None:
    """The group's metadata in its root `zarr.json`. Zarr opens every array to do it, so the image codec must be
    registered in this process first (a fresh Dask worker that ran no factor task has not)."""
    import zarr

    from nextdetail.storage.image_codec import register

    register()
    with warnings.catch_warnings():  # "not part of the v3 spec yet": we read it back with zarr-python only
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store.zarr_store("factors.zarr"), zarr_format=3)


def open_group(store: Store) -> Any:
    """The factors group, read-only; its metadata checked first (`codecs.check_codecs`): consolidated, it holds
    the metadata Zarr opens every array with."""
    import zarr

    from nextdetail.storage.image_codec import register

    check_codecs(store, "factors.zarr")
    register()
    return zarr.open_group(store.zarr_store("factors.zarr", read_only=True), mode="r", zarr_format=3)


def open_array(store: Store, group: Any, split: str, tar: str) -> Any:
    """One tar's array of `group` (`open_group(store)`), its own metadata checked first: Zarr reads that one when
    the group is not consolidated."""
    check_codecs(store, f"factors.zarr/{array_path(split, tar)}")
    return group[array_path(split, tar)]


def open_lazy(store: Store, index: pa.Table, split: str) -> Any:
    """All of a split's factors as one lazy dask array (images, order, C, H, W), in index order, as stored
    (a quantized store's integers: `read` scales them)."""
    import dask.array as da

    group = open_group(store)
    rows = index.filter(pa.compute.equal(index["split"], split))
    tars = list(dict.fromkeys(rows["shard"].to_pylist()))  # index order: tars in plan order
    return da.concatenate([da.from_zarr(open_array(store, group, split, tar)) for tar in tars], axis=0)


def read_index(store: Store) -> pa.Table:
    """The decomposition's index.parquet: key, split, shard (tar), row, class_index."""
    from nextdetail.storage.manifest import read_table

    return read_table(store, "index.parquet")
