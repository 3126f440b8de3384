"""The Zarr codecs nextdetail writes, and the check that an array read back names no other.

Factors and token caches live in stores a team shares, so an array's `zarr.json` may have been written by anyone
who can write there. Zarr builds every codec that metadata names as it opens the array: a numcodecs codec such as
`numcodecs.pickle` unpickles its chunks (code) wherever it is registered, and a codec Zarr lacks fails hundreds of
lines deep in its event loop. So before Zarr opens an
existing array or group, `check_codecs` reads its `zarr.json` through the Store and refuses, in one line naming
the file, any codec outside WRITTEN — in the array's own list, nested in a sharding codec, or in the metadata of
the arrays a consolidated group holds (which Zarr uses instead of their own files).
"""

from __future__ import annotations

import json
from typing import Any

from nextdetail.errors import UserError
from nextdetail.storage.fs import Store

# tokens.write_array: BloscCodec as the compressor after Zarr's default serializer (bytes), no filters; factors
# (factors.create_array): one shard per array (`sharding_indexed`, its index checked by `crc32c`) whose inner chunks
# are the same bytes + blosc for floats, or our lossless image serializer (storage/image_codec.py) when quantized.
WRITTEN = ("bytes", "blosc", "nextdetail.lossless_image", "sharding_indexed", "crc32c")


def _names(codecs: Any) -> list[str]:
    """The names in a `codecs` list, a sharding codec's inner lists included; an entry that is neither a name nor
    an object with one is given as its JSON (and so refused)."""
    if not isinstance(codecs, list):
        return [json.dumps(codecs)[:60]]
    names = []
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else codec
        names.append(name if isinstance(name, str) else json.dumps(codec)[:60])
        config = codec.get("configuration") if isinstance(codec, dict) else None
        for key in ("codecs", "index_codecs"):  # sharding_indexed: the chunks' codecs and the shard index's
            if isinstance(config, dict) and key in config:
                names += _names(config[key])
    return names


def codec_names(meta: dict[str, Any]) -> list[str]:
    """Every codec name a Zarr v3 `zarr.json` names: the array's own and, for a consolidated group, those of every
    node it holds (Zarr opens a consolidated group's arrays from these, not from their own files)."""
    names = _names(meta["codecs"]) if "codecs" in meta else []
    consolidated = meta.get("consolidated_metadata")
    nodes = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    for node in nodes.values() if isinstance(nodes, dict) else []:
        names += codec_names(node) if isinstance(node, dict) else [json.dumps(node)[:60]]
    return names


def refusal(store: Store, rel: str) -> str | None:
    """The one line refusing the Zarr array or group at `rel` (under `store`) — its `zarr.json` not a JSON object,
    or naming a codec nextdetail does not write — or None when it passes. A missing `zarr.json` passes: Zarr then
    reports the missing array itself."""
    rel = f"{rel.rstrip('/')}/zarr.json"
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    fix = "not written by nextdetail — delete it and re-run the stage that writes it"
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        return f"{store.url(rel)}: not a JSON object; {fix}"
    foreign = [name for name in codec_names(meta) if name not in WRITTEN]
    if foreign:
        return (f"{store.url(rel)}: codec {foreign[0]!r} is not one nextdetail writes (allowed: {', '.join(WRITTEN)}); "
                f"{fix}")
    return None


def check_codecs(store: Store, rel: str) -> None:
    """Before Zarr opens the existing array or group at `rel`: refuse it in one line (`refusal`) unless it passes."""
    line = refusal(store, rel)
    if line is not None:
        raise UserError(line)
