"""The `train_ar` flow: one cached training task on a published token cache.

Where training runs:
- by default in the flow's process (all cores to torch, or the GPU), or as `ar.nproc` torchrun processes that the
  task launches and supervises;
- with `ar.resources` (e.g. {GPU: 1}) the task goes to the pipeline's Dask cluster, to a worker offering them
  (`dask worker --resources GPU=1`; checked before the run starts), and trains there as it would here: the CLI's
  machine needs no GPU;
- with `ar.nodes` = N > 1, that worker is node 0 of N: it starts a torchrun agent on a worker offering the same
  resources on each of N − 1 other hosts and one itself (`pipeline/torchrun.py:launch_nodes`), `ar.nproc` ranks
  each, all reading and writing the one shared store.
Every placement trains the same weights from the same global batches (tested against one process).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.parts import build_one
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.tokenize import TokensResult
from nextdetail.stages.train_ar import STAGE, ARResult
from nextdetail.stages.train_ar.tasks import (
    ARData,
    adopt_transformer,
    plan_ar,
    train_ar,
    transformer_config,
)
from nextdetail.stages.train_tokenizer import TokenizerResult
from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def ar_data(cfg: PipelineConfig, shards: ShardResult, tokenizer: TokenizerResult, tokens: TokensResult,
            cache: Any = None) -> ARData:
    classes = json.loads(Store(shards.url, cfg.storage.options).read_bytes("classes.json"))["classes"]
    cache = cache or tokens.open()
    sha = cache.record["lineage"]["upstream"]["tokenizer_sha256"]  # the weights the cache was encoded with
    return ARData(tokens.url, tokens.options, tokens.local_cache, tokens.identity, tokenizer.checkpoint_url, sha,
                  cfg.storage.options, tuple(classes))


@flow(name="train_ar", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult, train_tokenizer: TokenizerResult,
                  tokenize: TokensResult, progress: bool = True) -> ARResult:
    shards, tokenizer, tokens = shard, train_tokenizer, tokenize  # the upstream results, by stage name
    t0 = time.time()
    log = get_run_logger()
    cache = tokens.open()
    data = ar_data(cfg, shards, tokenizer, tokens, cache)
    layout = cache.layout
    tcfg = transformer_config(cfg.ar, layout, len(data.classes), cfg.tokenizer.z_channels)
    dataset_dir = shards.url.rstrip("/").rsplit("/", 1)[-1]
    artifact = plan_ar(key.output(cfg, dataset_dir), key, cfg.ar, tcfg)
    out = artifact.store
    log.info("train_ar: depth %d, width %d, %d classes, %d steps of %d images → %s", tcfg.depth, tcfg.C,
             tcfg.num_classes, cfg.ar.steps, cfg.ar.batch_size, out.url())
    if cfg.ar.pretrained:  # VAR's released weights: no training
        source = cfg.ar.pretrained
        return build_one(ARResult, adopt_transformer, artifact, data, cfg.ar, source,
                         cfg.storage.options if "://" in source else {}, started=t0)
    on_cluster = STAGE.uses_dask(cfg)
    with on_workers_offering(cfg.ar.resources):
        # A worker's progress bar would go to the worker's terminal: the log has the steps.
        return build_one(ARResult, train_ar, artifact, data, cfg.ar, progress and not on_cluster, started=t0)


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, train_tokenizer: TokenizerResult,
        tokenize: TokensResult, progress: bool = True, scheduler: str | None = None) -> ARResult:
    """The train_ar flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name): in this
    process, or with `ar.resources` / `ar.nodes` > 1 on the Dask scheduler at `scheduler` (default: `cfg.dask`, a
    LocalCluster for this call unless dask.address names one)."""
    upstream = {"shard": shard, "train_tokenizer": train_tokenizer, "tokenize": tokenize}
    return run_flow(stage_flow, cfg.dask, STAGE.uses_dask(cfg), scheduler, cfg, key, progress=progress, **upstream)
