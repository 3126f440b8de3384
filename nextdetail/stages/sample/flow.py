"""The `sample` flow: class-conditional samples of the trained transformer (a cached stage), with a real
photo of each class beside its samples."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from prefect import flow

from nextdetail.conf.schema import PipelineConfig
from nextdetail.figures import grid_rows
from nextdetail.pipeline.parts import build_one, fan_out
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
from nextdetail.stages.sample import SampleResult
from nextdetail.stages.sample.tasks import (
    SampleInputs,
    chosen_classes,
    group_artifact,
    group_part,
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
    """One real image per class (the first held-out one by key, else the first training one), PNG-encoded. The
    index is sorted in Arrow, not as Python rows, and each tar that holds a chosen image is streamed once, up to its
    last chosen image: ImageNet's 1,000 classes' first val images lie in at most its 64 val tars, where reading
    them one by one streamed a whole tar per class (and 2.6 M index rows became Python dicts first)."""
    import numpy as np
    import pyarrow.compute as pc

    index = tokens.open().index().select(["key", "split", "shard", "class_index"])
    ordered = index.append_column("train_first", pc.not_equal(index["split"], "val")).sort_by(
        [("class_index", "ascending"), ("train_first", "ascending"), ("key", "ascending")])
    if not len(ordered):
        return ()
    classes = ordered["class_index"].to_numpy()
    firsts = ordered.take(np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])).to_pylist()
    wanted_by_tar: dict[str, dict[str, int]] = {}
    for r in firsts:
        wanted_by_tar.setdefault(r["shard"], {})[r["key"]] = r["class_index"]
    store = Store(shards.url, cfg.storage.options)
    photos: dict[int, bytes] = {}
    for tar, wanted in sorted(wanted_by_tar.items()):
        photos.update(_photos_of(store, tar, wanted, cfg.shard.image_format))
    return tuple(sorted(photos.items()))


def _photos_of(store: Store, tar: str, wanted: dict[str, int], image_format: str) -> dict[int, bytes]:
    """{class: PNG} of the `wanted` keys (key → class) of one tar, streamed until the last of them. Not
    `storage.shards.read_tar_images`: that one reads to the tar's end and stacks one image size; changing it would
    re-key every stage that reads shards."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from nextdetail.errors import UserError
    from nextdetail.figures import png_bytes

    left, out = dict(wanted), {}
    with store.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as members:
        for member in members:
            key, _, ext = member.name.partition(".")
            if ext == image_format and key in left:
                with Image.open(io.BytesIO(members.extractfile(member).read())) as im:  # type: ignore[union-attr]
                    out[left.pop(key)] = png_bytes(Image.fromarray(np.asarray(im.convert("RGB"))))
                if not left:
                    break
    if left:
        raise UserError(f"{store.url(tar)}: {len(left)} samples of the manifest are missing (first: "
                        f"{next(iter(left))}); re-run the shard stage")
    return out


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
        classes = chosen_classes(cfg.sample, json.loads(Store(shards.url, cfg.storage.options).read_bytes(
            "classes.json"))["classes"])  # checked before any group is sent
        groups = [tuple(classes[i : i + cfg.sample.classes_per_task])
                  for i in range(0, len(classes), cfg.sample.classes_per_task)]  # fixed by the list, not the workers
        shown = set(grid_rows(classes))  # grid.png's classes: each group keeps its own of them for the merge

        def photos(of: set[int]) -> tuple[tuple[int, bytes], ...]:  # a task gets only the real photos it draws:
            return tuple((c, data) for c, data in inputs.references if c in of)  # ImageNet's 1,000 at 256 px ≈ 150 MB

        with on_workers_offering(cfg.sample.resources):
            fan_out(sample_group, [(g, (group_artifact(artifact, key, g), replace(inputs, references=photos(set(g))),
                                        g, cfg.sample, tuple(c for c in g if c in shown))) for g in groups],
                    desc="sample", unit="class group", progress=progress)
        inputs = replace(inputs, groups=tuple((group_part(g), g) for g in groups), references=photos(shown))
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
