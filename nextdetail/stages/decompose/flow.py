"""The `decompose` flow: plan one task per shard tar, decompose in parallel, then index + consolidate."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.parts import fan_out
from nextdetail.pipeline.runtime import dask_cluster, dask_task_runner
from nextdetail.stages.decompose import DecomposeResult
from nextdetail.stages.decompose.tasks import (
    dataset_artifact,
    plan_factors,
    settings_dir_name,
    write_factors,
    write_index,
)
from nextdetail.stages.shard import ShardResult
from nextdetail.storage import factors
from nextdetail.storage.fs import Store
from nextdetail.storage.manifest import read_table

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


@flow(name="decompose", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult, progress: bool = True) -> DecomposeResult:
    shards, = shard,  # the upstream results, by stage name
    t0 = time.time()
    log = get_run_logger()
    shard_store = Store(shards.url, cfg.storage.options)
    manifest = read_table(shard_store, "manifest.parquet")
    dataset_dir = shards.url.rstrip("/").rsplit("/", 1)[-1]
    out = key.output(cfg, dataset_dir, settings_dir_name(cfg.decompose))
    plan = plan_factors(manifest, shards.tar_identities, out, key)
    n_images = sum(len(job.keys) for _, job in plan)
    log.info("decompose: %d images in %d tars, order %d, α=%g λ=%g → %s", n_images, len(plan),
             cfg.decompose.order, cfg.decompose.alpha, cfg.decompose.lambda_, out.url())
    factors.create_groups(out, sorted({job.split for _, job in plan}))

    def logged(tar: str, record: dict) -> None:
        if record["work"] == "ran":
            s = record["summary"]
            log.info("decompose: %s %d images at %.1f img/s", s["tar"], s["images"], s["images_per_s"])

    records, ran, reused = fan_out(
        write_factors, [(job.tar, (a, job, shards.url, cfg.storage.options, cfg.shard.image_format, cfg.decompose))
                        for a, job in plan],
        desc="decompose", unit="img", progress=progress, size=lambda r: r["summary"]["images"], on_record=logged,
        total=n_images)
    dataset = dataset_artifact(out, key, [a for a, _ in plan])
    record = write_index.submit(dataset, [job for _, job in plan], [records[job.tar]["summary"] for _, job in plan]).result()
    result = DecomposeResult(out.url(), dataset.identity, record["summary"], "ran" if ran or record["work"] == "ran"
                             else "reused", round(time.time() - t0, 3), tars_ran=ran, tars_reused=reused,
                             index_work=record["work"])
    log.info(result.line())
    return result


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, progress: bool = True,
        scheduler: str | None = None) -> DecomposeResult:
    """The decompose flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name) on the
    Dask scheduler at `scheduler` (default: `cfg.dask`, a LocalCluster for this call). Inside `runtime.prefect_api`."""
    if scheduler is None:
        with dask_cluster(**cfg.dask.model_dump()) as address:
            return run(cfg, key, shard=shard, progress=progress, scheduler=address)
    return stage_flow.with_options(task_runner=dask_task_runner(scheduler))(cfg, key, shard=shard, progress=progress)
