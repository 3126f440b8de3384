"""The `train_tokenizer` flow: one cached training task on the shard tars + the decomposition.

Training runs in the flow's process (Prefect's thread runner, all cores to torch), not on the Dask
cluster: it is one long task that wants every core, or a GPU.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.flows.parts import build_one
from nextdetail.models.tokenizer import TokenizerSpec
from nextdetail.stages.results import DecomposeResult, ShardResult, TokenizerResult
from nextdetail.storage.artifacts import Artifact
from nextdetail.storage.factor_loader import TrainData
from nextdetail.storage.factors import read_index
from nextdetail.storage.fs import Store
from nextdetail.tasks.train_tokenizer import plan_training, train_tokenizer

if TYPE_CHECKING:
    from nextdetail.conf.stages import StageKey


def train_data(cfg: PipelineConfig, shards: ShardResult, decomposition: DecomposeResult, split: str = "train") -> TrainData:
    index = read_index(Store(decomposition.url, cfg.storage.options))
    counts: dict[str, int] = {}
    for row in index.select(["split", "shard"]).to_pylist():
        if row["split"] == split:
            counts[row["shard"]] = counts.get(row["shard"], 0) + 1
    if not counts:
        raise UserError(f"train_tokenizer: the decomposition {decomposition.url} has no {split!r} images; "
                        f"add {split!r} to data.splits")
    return TrainData(shards.url, decomposition.url, cfg.storage.options, cfg.shard.image_format, split,
                     tuple(counts.items()))


def plan_tokenizer(cfg: PipelineConfig, key: StageKey, shards: ShardResult) -> Artifact:
    """The tokenizer artifact this config trains: `<root>/tokenizer/<shards dir>/v…-order…-maps…-<identity>/`."""
    dataset_dir = shards.url.rstrip("/").rsplit("/", 1)[-1]
    root = key.output(cfg, dataset_dir)
    return plan_training(root, key, TokenizerSpec.from_config(cfg))


@flow(name="train_tokenizer", log_prints=False, persist_result=False, validate_parameters=False)
def train_tokenizer_flow(cfg: PipelineConfig, key: StageKey, shards: ShardResult, decomposition: DecomposeResult,
                         progress: bool = True) -> TokenizerResult:
    t0 = time.time()
    log = get_run_logger()
    spec = TokenizerSpec.from_config(cfg)
    data = train_data(cfg, shards, decomposition)
    artifact = plan_tokenizer(cfg, key, shards)
    out = artifact.store
    log.info("train_tokenizer: %d images, order %d, %d token maps, %d steps → %s", sum(n for _, n in data.tars),
             spec.order, len(spec.patch_nums) + spec.order * spec.detail_depth, cfg.tokenizer.steps, out.url())
    return build_one(TokenizerResult, train_tokenizer, artifact, data, cfg.tokenizer, spec, progress, started=t0)


def run_train_tokenizer(cfg: PipelineConfig, key: StageKey, shards: ShardResult, decomposition: DecomposeResult,
                        progress: bool = True) -> TokenizerResult:
    return train_tokenizer_flow(cfg, key, shards, decomposition, progress=progress)
