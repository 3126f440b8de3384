"""The `tokenize` stage: shard tars + base factors + trained tokenizer → the shared token cache.

Data flow (all of it in this file; the cache's layout and its attempt/publish protocol in
`storage/tokens.py`, the model in `models/tokenizer.py`):
  index.parquet of the decomposition (key → tar, row) ─▶ plan_tokens(): the cache identity and one
    `TokenJob` per tar
  ─▶ reuse: a published cache with this identity whose files all verify is used as is (a remote one
    is pulled into the local mirror on the way); one that fails is withdrawn and rebuilt
  ─▶ encode_tokens (one cached Prefect task per tar, in this process: all cores or the GPU):
       adopt the part from an earlier attempt if it verifies, else read the tar's images and
       B_1 … B_n → Algorithm 1 (`img_to_indices`) per stored variant (none, hflip) → M token maps,
       flattened to L tokens → one one-chunk array (images, variants, L) in the attempt's Zarr group
  ─▶ publish_tokens: index.parquet, consolidated metadata, then `_COMPLETE.json` create-only with the
    sha256 of every file: one of two concurrent writers wins, the other uses the winner's cache

Identity: the stage's (pipeline/declaration.py): `tokens.*` (variants, splits), the shard, decomposition and
tokenizer identities (the last with tokenizer.pt's sha256), and the code its flow imports. Where the
cache lives, batch size, device and threads change how, not what: left out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from nextdetail.conf.schema import TokensConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.storage import factors, tokens
from nextdetail.storage.codecs import check_codecs, refusal
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import stable_hash

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


@dataclass(frozen=True)
class TokenJob:
    split: str
    tar: str  # tar name in the shard dataset
    keys: tuple[str, ...]  # row i of the tar's factors = row i of its tokens = keys[i]


@dataclass(frozen=True)
class TokenInputs:
    """What encoding reads: the shard tars, the decomposition, the tokenizer checkpoint."""

    shards_url: str
    factors_url: str | None  # the decomposition directory (factors.zarr, index.parquet); None: order 0
    options: dict  # storage.options
    image_format: str
    tokenizer_url: str  # tokenizer.pt
    tokenizer_sha256: str


@dataclass(frozen=True)
class TokenPlan:
    key: StageKey
    identity: str
    cache: Store  # <cache root>/tokens/<identity>
    artifact: Artifact  # the published cache: _COMPLETE.json, checksums, create-only
    jobs: tuple[TokenJob, ...]
    index: Any  # pa.Table: the decomposition's rows of the encoded splits, in job order


def plan_tokens(caches: Store, key: StageKey, index: Any, inputs: TokenInputs, cfg: TokensConfig) -> TokenPlan:
    """The cache's identity and location, and one job per tar of the wanted splits."""
    import pyarrow.compute as pc

    splits = cfg.splits or sorted(set(index["split"].to_pylist()))
    missing = sorted(set(splits) - set(index["split"].to_pylist()))
    if missing:
        raise UserError(f"tokens.splits: {missing} not among the sharded images (they have "
                        f"{sorted(set(index['split'].to_pylist()))}); add them to data.splits")
    rows = index.filter(pc.is_in(index["split"], value_set=pa.array(splits)))
    by_tar: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for r in rows.select(["split", "shard", "row", "key"]).to_pylist():
        by_tar.setdefault((r["split"], r["shard"]), []).append((r["row"], r["key"]))
    jobs = tuple(TokenJob(split, tar, tuple(k for _, k in sorted(items))) for (split, tar), items in by_tar.items())
    identity = key.identity  # keys on the tokenizer's weights: its upstream identity carries their sha256
    cache = caches.sub(identity)
    lineage = {**key.lineage(), "upstream": {**key.upstream, "tokenizer_sha256": inputs.tokenizer_sha256}}
    artifact = Artifact("tokenize", identity, cache, tokens.MARKER, lineage=lineage, checksums=True, exclusive=True)
    return TokenPlan(key, identity, cache, artifact, jobs, rows)


def part_artifact(plan: TokenPlan, attempt: tokens.Attempt, job: TokenJob) -> Artifact:
    identity = plan.key.artifact({"split": job.split, "tar": job.tar, "keys": job.keys})
    return Artifact("tokenize", identity, attempt.store, tokens.part_marker(job.split, job.tar), checksums=True)


# ---- encoding -----------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str], Any] = {}  # (sha256, device) → model: loaded once per process (a Dask worker's too)
_MODELS_LOCK = threading.Lock()  # a worker with several threads loads it once
LOADS = 0  # how many times this process loaded a tokenizer (the cluster test reads it on each worker)


def load_tokenizer(inputs: TokenInputs, device: str) -> Any:
    global LOADS
    from nextdetail.models.tokenizer import load_tokenizer as load

    key = (inputs.tokenizer_sha256, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = load(inputs.tokenizer_url, inputs.options, inputs.tokenizer_sha256,
                                "its train_tokenizer marker").to(device)
            LOADS += 1
        return _MODELS[key]


def encode_images(model: Any, images: np.ndarray, bases: np.ndarray | None, variants: list[str],
                  batch_size: int, device: str) -> np.ndarray:
    """uint8 images (N, H, W, 3) and float B_1 … B_n (N, n, 3, H, W) in [0, 1] → tokens (N, variants, L)."""
    import torch

    n = len(images)
    length = sum(m.side * m.side for m in model.schedule)
    out = np.empty((n, len(variants), length), dtype=tokens.token_dtype(model.spec.vocab_size))
    for start in range(0, n, batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float()
        x = x.div_(127.5).sub_(1)  # (b, 3, H, W) in [-1, 1]
        b = None
        if bases is not None:
            b = torch.from_numpy(np.ascontiguousarray(bases[start : start + batch_size])).to(device).float()
            b = b.transpose(0, 1).mul_(2).sub_(1)  # (n, b, 3, H, W) in [-1, 1]
        for v, variant in enumerate(variants):
            xv, bv = (x, b) if variant == "none" else (x.flip(-1), None if b is None else b.flip(-1))
            maps = model.img_to_indices(xv, bv)  # M × (b, h_k, w_k)
            row = torch.cat([m.flatten(1) for m in maps], dim=1)  # (b, L), maps in prediction order
            out[start : start + len(x), v] = row.cpu().numpy()
    return out


@stage_task(name="encode_tokens")
def encode_tokens(artifact: Artifact, job: TokenJob, inputs: TokenInputs, cfg: TokensConfig,
                  attempt: tokens.Attempt) -> tuple[dict, dict[str, str]]:
    """One tar's token array in this attempt: adopted from an earlier attempt when intact, else encoded."""
    import torch

    t0 = time.time()
    adopted = attempt.adopt(artifact.marker, artifact.identity)
    array_rel = f"{tokens.ZARR}/{tokens.array_name(job.split, job.tar)}"
    if adopted is not None and refusal(attempt.store, array_rel) is None:  # other codecs: encoded here, overwritten
        summary = {**adopted["summary"], "work": "copied", "copied_from": adopted["copied_from"]}
        return summary, adopted["sha256"]
    from nextdetail.storage.shards import read_tar_images

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("tokens.device=cuda but there is no CUDA device here; use tokens.device=cpu")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    model = load_tokenizer(inputs, cfg.device)
    images = read_tar_images(Store(inputs.shards_url, inputs.options), job.tar, job.keys, inputs.image_format)
    order = model.spec.order
    bases = None
    if order:
        store = Store(inputs.factors_url, inputs.options)
        array = factors.open_array(store, factors.open_group(store), job.split, job.tar)
        bases = factors.read(array, (slice(None), slice(None, order)))  # (N, n, 3, H, W): B_1 … B_n, float32
    out = encode_images(model, images, bases, cfg.variants, cfg.batch_size, cfg.device)
    files = tokens.write_array(attempt, job.split, job.tar, out)
    attempt.heartbeat()
    seconds = time.time() - t0
    summary = {"split": job.split, "tar": job.tar, "images": len(out), "work": "encoded", "seconds": round(seconds, 3),
               "images_per_s": round(len(out) / max(seconds, 1e-9), 1)}
    return summary, files


@stage_task(name="publish_tokens")
def publish_tokens(artifact: Artifact, plan: TokenPlan, attempt: tokens.Attempt, parts: list[tuple[str, dict]],
                   layout: dict[str, Any], inputs: TokenInputs) -> tuple[dict, dict[str, str]]:
    """index.parquet, preview.png and consolidated metadata into the attempt; the marker lists every file
    with its sha256 (the parts' checksums, computed when they were written)."""
    from nextdetail.storage.manifest import write_table

    index = pa.Table.from_pylist(plan.index.select(["key", "split", "shard", "row", "class_index"]).to_pylist(),
                                 schema=tokens.INDEX_SCHEMA)
    write_table(attempt.store, "index.parquet", index)
    write_preview(attempt, plan.jobs[0], inputs, layout)
    for rel in attempt.store.find(tokens.ZARR):  # consolidating opens every array, adopted ones included
        if rel.endswith("/zarr.json"):
            check_codecs(attempt.store, rel.removesuffix("/zarr.json"))
    attempt.store.refresh(tokens.ZARR)  # that listing holds the group zarr.json's ETag, which consolidating changes
    tokens.consolidate(attempt)
    files: dict[str, str] = {}
    for marker, record in parts:
        files.update({f"{attempt.rel}/{rel}": digest for rel, digest in record["sha256"].items()})
        files[f"{attempt.rel}/{marker}"] = ""  # the part markers travel with the cache
    attempt.store.refresh()
    for rel in attempt.store.find(tokens.ZARR):  # group metadata (and anything not yet listed)
        files.setdefault(f"{attempt.rel}/{rel}", "")
    files[f"{attempt.rel}/index.parquet"] = ""
    files[f"{attempt.rel}/preview.png"] = ""
    encoded = [record["summary"] for _, record in parts]
    summary = {
        "attempt": attempt.rel, "layout": layout, "images": int(index.num_rows), "tars": len(parts),
        "tokens_per_image": layout["tokens_per_image"], "variants": layout["variants"],
        "token_maps": len(layout["maps"]),
        "splits": {s: int(n) for s, n in zip(*np.unique(index["split"].to_numpy(zero_copy_only=False),
                                                        return_counts=True), strict=True)},
        "encoded_images": sum(s["images"] for s in encoded if s.get("work") == "encoded"),
        "copied_parts": sum(1 for s in encoded if s.get("work") == "copied"),
        "url": artifact.store.url(),
        # what downstream keys on (early cutoff): the token arrays' bytes (relative to the attempt), index, layout
        "content_sha256": stable_hash({"arrays": {rel: digest for _, record in parts
                                                  for rel, digest in record["sha256"].items()},
                                       "index": attempt.store.sha256("index.parquet"), "layout": layout}),
    }
    return summary, files


def write_preview(attempt: tokens.Attempt, job: TokenJob, inputs: TokenInputs, layout: dict[str, Any],
                  n: int = 8) -> None:
    """preview.png: a few images of the first tar (top) over what the decoder makes of their cached
    tokens (bottom, Algorithm 2): the cache round trip, at a glance."""
    import torch
    import zarr

    from nextdetail.figures import png_bytes, reconstruction_grid
    from nextdetail.storage.shards import read_tar_images

    model = load_tokenizer(inputs, "cpu")
    check_codecs(attempt.store, f"{tokens.ZARR}/{tokens.array_name(job.split, job.tar)}")
    array = zarr.open_array(attempt.store.zarr_store(tokens.ZARR), path=tokens.array_name(job.split, job.tar), mode="r",
                            zarr_format=3)
    rows = torch.from_numpy(array[:n, 0].astype(np.int64))  # (n, L), variant "none"
    maps = [rows[:, m["offset"] : m["offset"] + m["length"]].view(-1, m["height"], m["width"]) for m in layout["maps"]]
    with torch.no_grad():
        decoded = model.indices_to_img(maps)  # (n, 3, H, W) in [-1, 1]
    images = read_tar_images(Store(inputs.shards_url, inputs.options), job.tar, job.keys[:n], inputs.image_format)
    originals = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    attempt.store.write_bytes("preview.png", png_bytes(reconstruction_grid(originals, decoded)))

