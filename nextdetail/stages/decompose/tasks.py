"""The `decompose` stage: shard tars → base factors B_1 … B_n per image (CART §3.1, Eq. 10) in Zarr.

Data flow (all of it in this file, the solver in `models/mumford_shah.py`, the Zarr layout in
`storage/factors.py`):
  manifest.parquet of the shard dataset ─▶ plan_factors(): one `FactorJob` per tar (its written rows)
    ─▶ write_factors (one cached Prefect task per tar, in parallel on Dask):
         read the tar → decode → (B, 3, H, W) in [0, 1] → Ambrosio–Tortorelli, `order` times, in
         batches → one Zarr array per tar (images, order, 3, H, W), one shard written whole
    ─▶ write_index (one cached task): index.parquet (key → tar, row), consolidated Zarr metadata

Artifact layout under ``<root>/factors/<shard dataset dir>/<settings id>/``::

    factors.zarr/…   index.parquet   _parts/<tar>.json (per-tar markers)   _COMPLETE.json

Identities: a tar's is `key.part(that shard tar's identity)` — the stage's recipe (the settings that change
the numbers — α, λ, ε, iterations, tolerances, order, dtype, chunking — and its code, `_at_cpu.cpp` included)
and that tar; batch size, device and threads are left out: they change how fast, not what. The dataset's is
the stage identity. Changing α therefore re-runs this stage (and what reads it), never `shard`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nextdetail.conf.schema import DecomposeConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.storage import factors
from nextdetail.storage.fs import TMP_MARK, Store
from nextdetail.storage.hashing import stable_hash
from nextdetail.storage.shards import read_tar_images

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


@dataclass(frozen=True)
class FactorJob:
    split: str
    tar: str  # tar name in the shard dataset
    keys: tuple[str, ...]  # written samples, in tar order (row i of the array = keys[i])
    class_indices: tuple[int, ...]

    @property
    def part(self) -> str:
        return f"_parts/{self.tar.removesuffix('.tar')}"


def settings_dir_name(cfg: DecomposeConfig) -> str:
    return f"order{cfg.order}-alpha{cfg.alpha:g}-{stable_hash(cfg.identity_settings())[:12]}"


def plan_factors(
    manifest: Any, tar_identities: dict[str, str], store: Store, key: StageKey
) -> list[tuple[Artifact, FactorJob]]:
    """One (artifact, job) per tar of the manifest that holds at least one written sample; a part's identity is
    the stage's recipe + its tar's identity (`key.part`): a tar the shard stage did not rewrite is not redone."""
    rows = collections.defaultdict(list)
    for r in manifest.select(["key", "split", "shard", "index_in_shard", "class_index", "status"]).to_pylist():
        if r["index_in_shard"] >= 0:
            rows[(r["split"], r["shard"])].append((r["index_in_shard"], r["key"], r["class_index"]))
    plan = []
    for (split, tar), items in rows.items():
        items.sort()
        job = FactorJob(split, tar, tuple(k for _, k, _ in items), tuple(c for _, _, c in items))
        identity = key.part({"tar": tar_identities[tar]})
        lineage = {"stage_identity": key.identity, "recipe": key.recipe, "upstream": {"shard": tar_identities[tar]}}
        plan.append((Artifact("decompose", identity, store, f"{job.part}.json", lineage=lineage), job))
    return plan


@stage_task(name="write_factors")
def write_factors(
    artifact: Artifact, job: FactorJob, shards_url: str, shards_options: dict, image_format: str,
    cfg: DecomposeConfig,
) -> tuple[dict, list[str]]:
    """Decompose one tar's images batch by batch, then write its Zarr array: one shard, whole."""
    import torch

    from nextdetail.models.mumford_shah import ATConfig, ATResult, decompose

    torch.set_num_threads(cfg.torch_threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("decompose.device=cuda but this worker has no CUDA device; use decompose.device=cpu")
    images = read_tar_images(Store(shards_url, shards_options), job.tar, job.keys, image_format)  # (N, H, W, 3)
    n, h, w, c = images.shape
    array = factors.create_array(artifact.store, job.split, job.tar, n, (cfg.order, c, h, w), cfg.dtype,
                                 cfg.chunk_images)
    at: ATConfig = ATConfig.from_settings(cfg, side=w)
    outer, cg, error = [], [], 0.0
    stored_all = np.empty(array.shape, dtype=cfg.dtype)  # the tar's shard, written whole once it is all computed
    t0 = time.time()
    for start in range(0, n, cfg.batch_size):
        batch = torch.from_numpy(images[start : start + cfg.batch_size]).to(device)
        current = batch.permute(0, 3, 1, 2).float().div_(255)  # (b, 3, H, W) in [0, 1]
        stats: list[ATResult] = []
        stacked = decompose(current, cfg.order, at, stats).transpose(0, 1)  # (b, order, 3, H, W)
        outer.extend(r.outer_iterations for r in stats)
        cg.extend(s + u for r in stats for s, u in r.cg_iterations)
        stored_all[start : start + len(batch)], batch_error = factors.quantize(stacked.cpu().numpy(), cfg.dtype)
        error = max(error, batch_error)
    factors.write_whole(artifact.store, job.split, job.tar, stored_all)
    seconds = time.time() - t0
    summary = {"tar": job.tar, "images": n, "seconds": round(seconds, 3),
               "images_per_s": round(n / max(seconds, 1e-9), 2),
               "mean_outer_iterations": round(float(np.mean(outer)), 2) if outer else 0.0,
               "mean_cg_iterations_per_alternation": round(float(np.mean(cg)), 2) if cg else 0.0,
               "storage_max_error": error}  # |stored − computed|, largest over the tar's factors (in [0, 1] units)
    # Every file of the array, chunks included, goes in the part's marker with its sha256: `cache verify` then
    # vouches for every byte it re-reads, and the content hash (relative to the array) is what downstream keys on.
    array_rel = f"factors.zarr/{factors.array_path(job.split, job.tar)}"
    # (not a temporary a killed writer of the same tar left beside the shard: never renamed, never read)
    files = {rel: artifact.store.sha256(rel) for rel in artifact.store.find(array_rel) if TMP_MARK not in rel}
    summary["content_sha256"] = stable_hash({rel[len(array_rel):]: sha for rel, sha in files.items()})
    return summary, files


@stage_task(name="write_factor_index")
def write_index(artifact: Artifact, jobs: list[FactorJob], summaries: list[dict]) -> tuple[dict, list[str]]:
    """index.parquet (key → tar, row) and consolidated Zarr metadata: the decomposition is readable."""
    import pyarrow as pa

    from nextdetail.storage.manifest import write_table

    rows = [{"key": k, "split": j.split, "shard": j.tar, "row": i, "class_index": ci}
            for j in jobs for i, (k, ci) in enumerate(zip(j.keys, j.class_indices, strict=True))]
    write_table(artifact.store, "index.parquet", pa.Table.from_pylist(rows, schema=factors.INDEX_SCHEMA))
    factors.consolidate(artifact.store)
    images = sum(s["images"] for s in summaries)
    summary = {"images": images, "tars": len(jobs), "url": artifact.store.url(),
               # what downstream keys on (early cutoff): every tar's factor bytes and the index
               "content_sha256": stable_hash({"tars": {j.part: s.get("content_sha256") for j, s in zip(jobs, summaries,
                                                                                                     strict=True)},
                                              "index": artifact.store.sha256("index.parquet")}),
               "first_key": rows[0]["key"] if rows else None,
               "splits": dict(collections.Counter(j.split for j in jobs for _ in j.keys)),
               "mean_outer_iterations": round(float(np.mean([s["mean_outer_iterations"] for s in summaries])), 2)
               if summaries else 0.0,
               # what storing the factors changed (quantization, or float16's rounding): recorded in lineage
               "storage_max_error": max((s.get("storage_max_error", 0.0) for s in summaries), default=0.0)}
    return summary, ["index.parquet", "factors.zarr/zarr.json"]


def dataset_artifact(store: Store, key: StageKey, parts: list[Artifact]) -> Artifact:
    """The decomposition (index.parquet + the consolidated Zarr group): the stage's identity."""
    return Artifact("decompose", key.identity, store, "_COMPLETE.json", lineage={**key.lineage(), "tars": len(parts)})

