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
