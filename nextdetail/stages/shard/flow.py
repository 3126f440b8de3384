"""The `shard` flow: list the source, plan the tars, write them in parallel, then the manifest."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.parts import fan_out
from nextdetail.pipeline.runtime import dask_cluster, dask_task_runner
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.shard.tasks import (
    dataset_artifact,
    plan_shards,
    shard_dir_name,
    write_manifest,
    write_shard,
)
from nextdetail.storage.embedded import build_embedded
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256
from nextdetail.storage.sources import list_source

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def resolve_source(cfg: PipelineConfig, store: Store) -> str:
    """The source URL; the embedded dataset is built (once) under the storage root."""
    if cfg.data.source == "embedded":
        return build_embedded(store, cfg.data.embedded, log=get_run_logger().info).url()
    return cfg.data.source


@flow(name="shard", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, progress: bool = True) -> ShardResult:
    t0 = time.time()
    log = get_run_logger()
    store = Store(cfg.storage.root, cfg.storage.options)
    source_url = resolve_source(cfg, store)
    source_options = cfg.storage.options  # the embedded build lives under storage.root, on its endpoint
    listing = list_source(source_url, cfg.data.splits, cfg.data.layout, source_options)
    n_items = sum(len(v) for v in listing.items.values())
    if n_items == 0:
        raise UserError(f"data.source {source_url!r} holds no files; point data.source at a dataset")
    fingerprints = None
    if cfg.shard.fingerprint == "content":
        src = Store(source_url, source_options, follow_links=True)
        fingerprints = {}
        for it in (it for items in listing.items.values() for it in items):
            try:
                fingerprints[it.relpath] = bytes_sha256(src.read_bytes(it.relpath))
            except OSError:
                fingerprints[it.relpath] = "unreadable"
    out = key.output(cfg, shard_dir_name(listing.url, cfg.data, cfg.shard))
    plan = plan_shards(listing, cfg.shard, out, key, fingerprints)
    log.info("shard: %d files, %d classes → %d tars in %s", n_items, len(listing.classes), len(plan), out.url())

    records, ran, reused = fan_out(write_shard, [(job.name, (a, job, source_url, source_options, cfg.shard))
                                                 for a, job in plan], desc="shard", unit="tar", progress=progress)
    ordered = [records[job.name]["summary"] for _, job in plan]
    dataset = dataset_artifact(out, key, [a for a, _ in plan])
    record = write_manifest.submit(dataset, [job for _, job in plan], ordered, listing.classes).result()
    # What is on disk: a part whose files all went to the manifest (no image in its bucket) writes no tar.
    on_disk = {job.name for _, job in plan if records[job.name]["summary"]["samples"]}
    result = ShardResult(out.url(), dataset.identity, record["summary"], shards_ran=[n for n in ran if n in on_disk],
                         shards_reused=[n for n in reused if n in on_disk], manifest_work=record["work"])
    result.work = "ran" if ran or record["work"] == "ran" else "reused"
    # A tar as decompose keys its part on: identity and bytes (`content_sha256` in the dataset summary).
    result.tar_identities = {job.name: f"{a.identity}:{records[job.name]['summary']['tar_sha256']}"
                             for a, job in plan if records[job.name]["summary"]["samples"]}
    result.seconds = round(time.time() - t0, 3)
    log.info(result.line())
    return result


def run(cfg: PipelineConfig, key: StageKey, *, progress: bool = True,
        scheduler: str | None = None) -> ShardResult:
    """The shard flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name) on the
    Dask scheduler at `scheduler` (default: `cfg.dask`, a LocalCluster for this call). Inside `runtime.prefect_api`."""
    if scheduler is None:
        with dask_cluster(**cfg.dask.model_dump()) as address:
            return run(cfg, key, progress=progress, scheduler=address)
    return stage_flow.with_options(task_runner=dask_task_runner(scheduler))(cfg, key, progress=progress)
