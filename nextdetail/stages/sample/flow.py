"""The `sample` flow: class-conditional samples of the trained transformer (a cached stage), with a real
photo of each class beside its samples."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from prefect import flow

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.parts import build_one, fan_out
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
from nextdetail.stages.sample import SampleResult
from nextdetail.stages.sample.tasks import (
    SampleInputs,
    group_artifact,
    plan_samples,
    run_sampling,
    sample_group,
    sample_stage,
)
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.tokenize import TokensResult
from nextdetail.stages.train_ar import ARResult
from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def reference_images(cfg: PipelineConfig, shards: ShardResult, tokens: TokensResult) -> tuple[tuple[int, bytes], ...]:
    """One real image per class (the first held-out one, else the first training one), PNG-encoded."""
    from PIL import Image

    from nextdetail.figures import png_bytes
    from nextdetail.storage.shards import read_tar_images

    rows = tokens.open().index().select(["key", "split", "shard", "class_index"]).to_pylist()
    rows.sort(key=lambda r: (r["split"] != "val", r["key"]))
    first: dict[int, dict] = {}
    for r in rows:
        first.setdefault(r["class_index"], r)
    store = Store(shards.url, cfg.storage.options)
    out = []
    for c, r in sorted(first.items()):
        image = read_tar_images(store, r["shard"], (r["key"],), cfg.shard.image_format)[0]
        out.append((c, png_bytes(Image.fromarray(image))))
    return tuple(out)


@flow(name="sample", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult, tokenize: TokensResult, train_ar: ARResult,
                progress: bool = True) -> SampleResult:
    shards, tokens, ar = shard, tokenize, train_ar  # the upstream results, by stage name
    t0 = time.time()
    name = "transformer.pt" if cfg.sample.checkpoint == "last" else "best.pt"
    inputs = SampleInputs(f"{ar.url}/{name}", cfg.storage.options, reference_images(cfg, shards, tokens),
                          roots=(cfg.storage.root,))
    dataset_dir, ar_dir = ar.url.rstrip("/").rsplit("/", 2)[-2:]
    artifact = plan_samples(key.output(cfg, dataset_dir, ar_dir), key, cfg.sample)
    if cfg.sample.resources is not None and artifact.completed() is None:
        classes = cfg.sample.classes if cfg.sample.classes is not None else list(range(len(
            json.loads(Store(shards.url, cfg.storage.options).read_bytes("classes.json"))["classes"])))
        groups = [tuple(classes[i : i + cfg.sample.classes_per_task])
                  for i in range(0, len(classes), cfg.sample.classes_per_task)]  # fixed by the list, not the workers
        parts = [(g, group_artifact(artifact, key, g)) for g in groups]
        with on_workers_offering(cfg.sample.resources):
            fan_out(sample_group, [(g, (part, inputs, g, cfg.sample)) for g, part in parts], desc="sample",
                    unit="class group", progress=progress)
        inputs = replace(inputs, groups=tuple(part.store.url() for _, part in parts))
    with on_workers_offering(cfg.sample.resources):  # the merge loads the sampler on sample.device for its summary
        return build_one(SampleResult, sample_stage, artifact, inputs, cfg.sample, progress, started=t0)


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, tokenize: TokensResult, train_ar: ARResult,
        progress: bool = True, scheduler: str | None = None) -> SampleResult:
    """The sample flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name): in this
    process, or with `sample.resources` class groups on the Dask scheduler at `scheduler` (default: `cfg.dask`, a
    LocalCluster for this call)."""
    upstream = {"shard": shard, "tokenize": tokenize, "train_ar": train_ar}
    return run_flow(stage_flow, cfg.dask, cfg.sample.resources is not None, scheduler, cfg, key, progress=progress, **upstream)


def sample_files(cfg: PipelineConfig, checkpoint: str, out: str, progress: bool = True) -> SampleResult:
    """`nextdetail sample --ckpt`: samples of a transformer.pt / best.pt from anywhere into `out`, outside the
    pipeline's cache (nothing is reused or recorded)."""
    inputs = SampleInputs(checkpoint, cfg.storage.options, roots=(cfg.storage.root,))  # + the checkpoint's own root
    summary, _ = run_sampling(Store(out, cfg.storage.options), inputs, cfg.sample, progress=progress)
    return SampleResult(summary["url"], "", summary, work="ran (outside the pipeline's cache)")
