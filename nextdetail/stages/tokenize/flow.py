"""The `tokenize` flow: reuse a verified token cache with this identity, or write one and publish it.

Encoding runs in the flow's process, one tar after another (Prefect's thread runner with one worker):
all cores go to torch, or the model sits on the GPU once. Each tar is a cached task, so a killed run
resumes: the next attempt adopts the finished tars.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.models.tokenizer import TokenizerSpec
from nextdetail.stages.decompose import DecomposeResult
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.tokenize import TokensResult
from nextdetail.stages.tokenize.tasks import (
    TokenInputs,
    encode_tokens,
    part_artifact,
    plan_tokens,
    publish_tokens,
)
from nextdetail.stages.train_tokenizer import TokenizerResult
from nextdetail.storage import tokens
from nextdetail.storage.factor_loader import read_sample_index
from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def token_inputs(cfg: PipelineConfig, shards: ShardResult, decomposition: DecomposeResult | None,
                 tokenizer: TokenizerResult) -> TokenInputs:
    sha = tokenizer.summary.get("tokenizer_sha256")
    if not sha:  # a checkpoint from before the marker recorded it
        sha = Store(tokenizer.url, cfg.storage.options).sha256("tokenizer.pt")
        if sha is None:
            raise UserError(f"{tokenizer.checkpoint_url} is missing; re-run `nextdetail train-tokenizer`")
    return TokenInputs(shards.url, None if decomposition is None else decomposition.url, cfg.storage.options,
                       cfg.shard.image_format,
                       tokenizer.checkpoint_url, sha)


@flow(name="tokenize", log_prints=False, persist_result=False, validate_parameters=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult, decompose: DecomposeResult | None,
                  train_tokenizer: TokenizerResult, progress: bool = True) -> TokensResult:
    shards, decomposition, tokenizer = shard, decompose, train_tokenizer  # the upstream results, by stage name
    from tqdm.auto import tqdm

    from nextdetail.models.quant import schedule_of

    t0 = time.time()
    log = get_run_logger()
    spec = TokenizerSpec.from_config(cfg)
    inputs = token_inputs(cfg, shards, decomposition, tokenizer)
    index = read_sample_index(inputs.shards_url, inputs.factors_url, cfg.storage.options)
    plan = plan_tokens(key.output(cfg), key, index, inputs, cfg.tokens)
    options = plan.cache.options

    def result(record: dict, work: str) -> TokensResult:
        out = TokensResult(plan.cache.url(), plan.identity, record["summary"], work, round(time.time() - t0, 3),
                           options, cfg.tokens.local_cache)
        log.info(out.line() + f" → {out.url} ({work}, {out.seconds:.1f}s)")
        return out

    work = "ran"
    record = plan.artifact.completed()
    if record is not None:
        bad = _check(plan, record, cfg, progress)
        if not bad:
            return result(record, "reused")
        log.warning("tokenize: the cache %s is broken (%d files fail their sha256, first %s); rebuilding it",
                    plan.cache.url(), len(bad), bad[0])
        tokens.invalidate(plan.cache, f"sha256 mismatch: {bad[:10]}")
        work = "rebuilt"
    elif plan.cache.exists(tokens.MARKER):
        log.warning("tokenize: the cache %s has a marker but misses files; rebuilding it", plan.cache.url())
        tokens.invalidate(plan.cache, "files missing or of the wrong size")
        work = "rebuilt"

    attempt = tokens.Attempt.start(plan.cache)
    removed = attempt.remove_stale()
    if removed:
        log.info("tokenize: removed %d attempts abandoned over an hour ago", len(removed))
    layout = tokens.token_layout(schedule_of(spec),
                                 spec.order, spec.vocab_size, cfg.tokens.variants)
    splits = sorted({job.split for job in plan.jobs})
    tokens.create_group(attempt, layout, plan.identity, splits)
    log.info("tokenize: %d images in %d tars, %d token maps (%d tokens) × %s → %s", plan.index.num_rows,
             len(plan.jobs), len(layout["maps"]), layout["tokens_per_image"], cfg.tokens.variants, attempt.store.url())
    parts: list[tuple[str, dict]] = []
    for job in tqdm(plan.jobs, desc="tokenize", unit="tar", disable=not progress):
        if plan.cache.exists(tokens.MARKER):  # another writer published meanwhile: stop encoding
            plan.cache.refresh(tokens.MARKER)
            if plan.artifact.completed() is not None:
                break
        part = part_artifact(plan, attempt, job)
        parts.append((part.marker, encode_tokens.submit(part, job, inputs, cfg.tokens, attempt).result()))
    else:
        record = publish_tokens.submit(plan.artifact, plan, attempt, parts, layout, inputs).result()
        if record.get("summary", {}).get("attempt") == attempt.rel:
            return result(record, work)
    # Another writer's cache is the published one: ours is garbage.
    attempt.discard()
    record = plan.artifact.completed()
    if record is None:
        raise OSError(f"{plan.cache.url()}: another writer's marker vanished; run again")
    log.info("tokenize: another writer published %s first; using it", plan.cache.url())
    return result(record, "reused")


def _check(plan: Any, record: dict, cfg: PipelineConfig, progress: bool) -> list[str]:
    """Files of a published cache that fail verification (sha256: all read; a remote cache is pulled
    into the local mirror on the way, which training then reads)."""
    if cfg.tokens.verify == "size":
        return []
    return tokens.TokenCache(plan.cache.url(), plan.cache.options, cfg.tokens.local_cache).verify(progress=progress)


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, decompose: DecomposeResult | None, train_tokenizer: TokenizerResult, progress: bool = True) -> TokensResult:
    """The tokenize flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name)."""
    return stage_flow(cfg, key, shard=shard, decompose=decompose, train_tokenizer=train_tokenizer, progress=progress)
