"""The `train_tokenizer` flow: one cached training task on the shard tars + the decomposition.

Training runs in the flow's process (all cores to torch, or the GPU), or as `tokenizer.nproc` torchrun processes
the task launches; with `tokenizer.resources` on a Dask worker offering them, and with `tokenizer.nodes` = N > 1
across N hosts' workers — as train_ar (`pipeline/torchrun.py:launch_nodes`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.models.tokenizer import TokenizerSpec
from nextdetail.pipeline.artifacts import Artifact
from nextdetail.pipeline.parts import build_one
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
from nextdetail.stages.decompose import DecomposeResult
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.train_tokenizer import STAGE, TokenizerResult
from nextdetail.stages.train_tokenizer.tasks import adopt_tokenizer, plan_training, train_tokenizer
from nextdetail.storage.factor_loader import TrainData, read_sample_index

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def train_data(cfg: PipelineConfig, shards: ShardResult, decomposition: DecomposeResult | None,
               split: str = "train") -> TrainData:
    """The images (and factors) the tokenizer trains on; `decomposition` None: order 0, images alone."""
    factors_url = None if decomposition is None else decomposition.url
    index = read_sample_index(shards.url, factors_url, cfg.storage.options)
    counts: dict[str, int] = {}
    for row in index.select(["split", "shard"]).to_pylist():
        if row["split"] == split:
            counts[row["shard"]] = counts.get(row["shard"], 0) + 1
    if not counts:
        raise UserError(f"train_tokenizer: {factors_url or shards.url} has no {split!r} images; "
                        f"add {split!r} to data.splits")
    return TrainData(shards.url, factors_url, cfg.storage.options, cfg.shard.image_format, split,
                     tuple(counts.items()))


def plan_tokenizer(cfg: PipelineConfig, key: StageKey, shards: ShardResult | None) -> Artifact:
    """The tokenizer artifact this config trains: `<root>/tokenizer/<shards dir>/v…-order…-maps…-<identity>/`; an
    adopted one (`tokenizer.pretrained`, no data): `<root>/tokenizer/pretrained/<file stem>-<identity>/`."""
    if cfg.tokenizer.pretrained:
        stem = cfg.tokenizer.pretrained.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        return Artifact("train_tokenizer", key.identity, key.output(cfg, "pretrained", f"{stem}-{key.identity[:12]}"),
                        "_COMPLETE.json", lineage=key.lineage())
    dataset_dir = shards.url.rstrip("/").rsplit("/", 1)[-1]
    return plan_training(key.output(cfg, dataset_dir), key, TokenizerSpec.from_config(cfg))


@flow(name="train_tokenizer", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult | None,
                         decompose: DecomposeResult | None, progress: bool = True) -> TokenizerResult:
    shards, decomposition = shard, decompose  # the upstream results, by stage name
    t0 = time.time()
    log = get_run_logger()
    spec = TokenizerSpec.from_config(cfg)
    artifact = plan_tokenizer(cfg, key, shards)
    if cfg.tokenizer.pretrained:  # adopt the released weights: no data read, no training
        source = cfg.tokenizer.pretrained
        log.info("train_tokenizer: adopting %s (%d token maps) → %s", source,
                 spec.n_maps, artifact.store.url())
        return build_one(TokenizerResult, adopt_tokenizer, artifact, source,
                         cfg.storage.options if "://" in source else {}, spec, started=t0)
    data = train_data(cfg, shards, decomposition)
    log.info("train_tokenizer: %d images, order %d, %d token maps, %d steps → %s", sum(n for _, n in data.tars),
             spec.order, spec.n_maps, cfg.tokenizer.steps,
             artifact.store.url())
    on_cluster = STAGE.uses_dask(cfg)
    with on_workers_offering(cfg.tokenizer.resources):
        # A worker's progress bar would go to the worker's terminal: the log has the steps.
        return build_one(TokenizerResult, train_tokenizer, artifact, data, cfg.tokenizer, spec,
                         progress and not on_cluster, started=t0)


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult | None, decompose: DecomposeResult | None,
        progress: bool = True, scheduler: str | None = None) -> TokenizerResult:
    """The train_tokenizer flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name):
    in this process, or with `tokenizer.resources` / `tokenizer.nodes` > 1 on the Dask scheduler at `scheduler`
    (default: `cfg.dask`, a LocalCluster for this call unless dask.address names one)."""
    upstream = {"shard": shard, "decompose": decompose}
    return run_flow(stage_flow, cfg.dask, STAGE.uses_dask(cfg), scheduler, cfg, key, progress=progress, **upstream)
