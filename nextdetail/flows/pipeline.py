"""`nextdetail run`: the stages in order (shard → decompose → train_tokenizer → tokenize → train_ar → sample →
evaluate), up to `--until`; one cluster for all."""

from __future__ import annotations

from typing import Any

from nextdetail.conf import STAGES, PipelineConfig
from nextdetail.errors import UserError
from nextdetail.flows.runtime import dask_cluster, prefect_api


def run_pipeline(cfg: PipelineConfig, until: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every stage up to and including `until`; returns each stage's result by name."""
    if until is not None and until not in STAGES:
        raise UserError(f"--until {until!r}: no such stage (stages: {', '.join(STAGES)})")
    from nextdetail.flows.decompose import run_decompose
    from nextdetail.flows.evaluate import run_evaluate
    from nextdetail.flows.sample import run_sample
    from nextdetail.flows.shard import run_shard
    from nextdetail.flows.tokenize import run_tokenize
    from nextdetail.flows.train_ar import run_train_ar
    from nextdetail.flows.train_tokenizer import run_train_tokenizer

    results: dict[str, Any] = {}
    runners = {
        "shard": lambda scheduler: run_shard(cfg, progress=progress, scheduler=scheduler),
        "decompose": lambda scheduler: run_decompose(cfg, results["shard"], progress=progress, scheduler=scheduler),
        "train_tokenizer": lambda _: run_train_tokenizer(cfg, results["shard"], results["decompose"], progress=progress),
        "tokenize": lambda _: run_tokenize(cfg, results["shard"], results["decompose"], results["train_tokenizer"],
                                           progress=progress),
        "train_ar": lambda _: run_train_ar(cfg, results["shard"], results["train_tokenizer"], results["tokenize"],
                                           progress=progress),
        "sample": lambda _: run_sample(cfg, results["shard"], results["tokenize"], results["train_ar"],
                                       progress=progress),
        "evaluate": lambda _: run_evaluate(cfg, results["shard"], results["train_tokenizer"], results["tokenize"],
                                           results["train_ar"], progress=progress),
    }
    with prefect_api(), dask_cluster(**cfg.dask.model_dump()) as scheduler:
        for stage in STAGES:
            results[stage] = runners[stage](scheduler)
            if stage == until:
                break
    return results
