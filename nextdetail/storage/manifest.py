"""The Parquet manifest: one row per source file, written or skipped, with the reason."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nextdetail.storage.fs import Store

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),  # webdataset __key__
    ("split", pa.string()),
    ("shard", pa.string()),  # tar name, e.g. train-000003.tar
    ("index_in_shard", pa.int32()),  # -1 when skipped
    ("class_index", pa.int32()),  # -1 when unknown
    ("wnid", pa.string()),
    ("source_path", pa.string()),  # relative to the source root
    ("size", pa.int64()),  # source file bytes
    ("width", pa.int32()),  # of the original image; -1 when it did not decode
    ("height", pa.int32()),
    ("content_hash", pa.string()),  # sha256 of the source bytes; "" when unreadable
    ("status", pa.string()),  # written | converted | skipped
    ("reason", pa.string()),  # conversions (comma-separated) or the skip reason
])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_table(store: Store, rel: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes(rel, buf.getvalue())


def read_table(store: Store, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def sample_index(manifest: pa.Table) -> pa.Table:
    """Every written sample as (key, split, shard, row, class_index) — the layout of a decomposition's
    index.parquet, derived from the shard manifest: row = the sample's rank by `index_in_shard` within its
    tar, the order decompose writes its factors in. What order 0 reads instead of a decomposition."""
    rows = sorted((r["split"], r["shard"], r["index_in_shard"], r["key"], r["class_index"])
                  for r in manifest.select(["key", "split", "shard", "index_in_shard", "class_index"]).to_pylist()
                  if r["index_in_shard"] >= 0)
    out, rank, last = [], 0, None
    for split, tar, _, key, ci in rows:
        rank = rank + 1 if (split, tar) == last else 0
        last = (split, tar)
        out.append({"key": key, "split": split, "shard": tar, "row": rank, "class_index": ci})
    from nextdetail.storage.factors import INDEX_SCHEMA

    return pa.Table.from_pylist(out, schema=INDEX_SCHEMA)
