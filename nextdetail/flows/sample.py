"""The `sample` flow: class-conditional samples of the trained transformer (a cached stage), with a real
photo of each class beside its samples."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import flow

from nextdetail.conf.schema import PipelineConfig
from nextdetail.flows.parts import build_one
from nextdetail.stages.results import ARResult, SampleResult, ShardResult, TokensResult
from nextdetail.storage.fs import Store
from nextdetail.tasks.sample import SampleInputs, plan_samples, sample_stage

if TYPE_CHECKING:
    from nextdetail.conf.stages import StageKey


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
def sample_flow(cfg: PipelineConfig, key: StageKey, shards: ShardResult, tokens: TokensResult, ar: ARResult,
                progress: bool = True) -> SampleResult:
    t0 = time.time()
    name = "transformer.pt" if cfg.sample.checkpoint == "last" else "best.pt"
    inputs = SampleInputs(f"{ar.url}/{name}", cfg.storage.options, reference_images(cfg, shards, tokens),
                          roots=(cfg.storage.root,))
    dataset_dir, ar_dir = ar.url.rstrip("/").rsplit("/", 2)[-2:]
    artifact = plan_samples(key.output(cfg, dataset_dir, ar_dir), key, cfg.sample)
    return build_one(SampleResult, sample_stage, artifact, inputs, cfg.sample, progress, started=t0)


def run_sample(cfg: PipelineConfig, key: StageKey, shards: ShardResult, tokens: TokensResult, ar: ARResult,
               progress: bool = True) -> SampleResult:
    return sample_flow(cfg, key, shards, tokens, ar, progress=progress)
