"""The `tokenize` flow: reuse a verified token cache with this identity, or write one and publish it.

Where encoding runs:
- by default in the flow's process, one tar after another (Prefect's thread runner with one worker): all cores
  go to torch, or the model sits on the GPU once;
- with `tokens.resources` (e.g. {GPU: 1}), one task per tar on the pipeline's Dask cluster, each on a worker that
  offers those resources (`dask worker --resources GPU=1`; checked before the run starts). A worker loads the
  tokenizer once (`tasks.load_tokenizer`'s per-process cache) and encodes tar after tar; torch uses
  `tokens.torch_threads` threads per task (default 1 there: the workers share the machine's cores).
Either way each tar is a cached task writing into this run's attempt, so a killed run resumes (the next attempt
adopts the finished tars), and publishing is the same create-only marker: the published cache is the same bytes
for any placement (tested against a one-process run).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.models.tokenizer import TokenizerSpec
from nextdetail.pipeline.parts import fan_out
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
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
    parts = _encode_on_cluster(plan, attempt, inputs, cfg, progress) if cfg.tokens.resources else \
        _encode_here(plan, attempt, inputs, cfg, progress)
    if parts is not None:  # None: another writer published meanwhile
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


def _published_meanwhile(plan: Any) -> bool:
    if plan.cache.exists(tokens.MARKER):
        plan.cache.refresh(tokens.MARKER)
        return plan.artifact.completed() is not None
    return False


def _encode_here(plan: Any, attempt: Any, inputs: TokenInputs, cfg: PipelineConfig,
                 progress: bool) -> list[tuple[str, dict]] | None:
    """Every tar in this process, in plan order → [(part marker, record)]; None once another writer published."""
    from tqdm.auto import tqdm

    parts: list[tuple[str, dict]] = []
    for job in tqdm(plan.jobs, desc="tokenize", unit="tar", disable=not progress):
        if _published_meanwhile(plan):  # stop encoding: the other cache is the one
            return None
        part = part_artifact(plan, attempt, job)
        parts.append((part.marker, encode_tokens.submit(part, job, inputs, cfg.tokens, attempt).result()))
    return parts


def _encode_on_cluster(plan: Any, attempt: Any, inputs: TokenInputs, cfg: PipelineConfig,
                       progress: bool) -> list[tuple[str, dict]] | None:
    """One task per tar on the Dask workers offering `tokens.resources` → [(part marker, record)] in plan order (what
    publishing hashes); None when another writer published first."""
    if _published_meanwhile(plan):
        return None
    settings = cfg.tokens.model_copy(update={"torch_threads": cfg.tokens.torch_threads or 1})
    named = [((job.split, job.tar), part_artifact(plan, attempt, job), job) for job in plan.jobs]
    with on_workers_offering(cfg.tokens.resources):  # only workers that offer them take a tar
        records, _, _ = fan_out(encode_tokens, [(name, (part, job, inputs, settings, attempt))
                                                for name, part, job in named],
                                desc="tokenize", unit="tar", progress=progress)
    return [(part.marker, records[name]) for name, part, _ in named]


def _check(plan: Any, record: dict, cfg: PipelineConfig, progress: bool) -> list[str]:
    """Files of a published cache that fail verification (sha256: all read; a remote cache is pulled
    into the local mirror on the way, which training then reads)."""
    if cfg.tokens.verify == "size":
        return []
    return tokens.TokenCache(plan.cache.url(), plan.cache.options, cfg.tokens.local_cache).verify(progress=progress)


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, decompose: DecomposeResult | None,
        train_tokenizer: TokenizerResult, progress: bool = True, scheduler: str | None = None) -> TokensResult:
    """The tokenize flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name): in this
    process, or with `tokens.resources` on the Dask scheduler at `scheduler` (default: `cfg.dask`, a LocalCluster
    for this call)."""
    upstream = {"shard": shard, "decompose": decompose, "train_tokenizer": train_tokenizer}
    return run_flow(stage_flow, cfg.dask, cfg.tokens.resources is not None, scheduler, cfg, key, progress=progress, **upstream)
