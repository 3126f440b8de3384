"""The `evaluate` flow: reference statistics (cached by content, shareable), the tokenizer's reconstruction
metrics, then FID / IS / KID / precision-recall of the transformer's checkpoints and a report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.artifacts import Artifact
from nextdetail.pipeline.parts import build_one, collect_parts, submit_parts
from nextdetail.pipeline.runtime import on_workers_offering, run_flow
from nextdetail.pipeline.tasks import build_artifact
from nextdetail.stages.evaluate import EvalResult
from nextdetail.stages.evaluate.reference_stats import (
    ReferenceSpec,
    RefHandle,
    ensure_reference,
    part_artifact,
    plan_reference,
    reference_features,
    reference_spec,
    reference_stats,
    tar_groups,
    withdraw_if_damaged,
)
from nextdetail.stages.evaluate.tasks import (
    CheckpointRef,
    EvalInputs,
    class_groups,
    evaluate_classes,
    evaluate_stage,
    evaluation_store,
    group_artifact,
    plan_evaluation,
    run_evaluation,
    sampling_config,
)
from nextdetail.stages.evaluate.tokenizer_metrics import (
    TokenizerEvalInputs,
    plan_tokenizer_metrics,
    tokenizer_metrics,
)
from nextdetail.stages.shard import ShardResult
from nextdetail.stages.tokenize import TokensResult
from nextdetail.stages.train_ar import ARResult
from nextdetail.stages.train_tokenizer import TokenizerResult
from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


def reference_root(cfg: PipelineConfig) -> Store:
    e = cfg.eval
    return Store(e.reference_cache or cfg.storage.root,
                 e.reference_cache_options if e.reference_cache_options is not None else cfg.storage.options)


def extractor_identity(cfg: PipelineConfig) -> dict[str, str]:
    """The extractor's name and weights sha256 (builds it: Inception's weights must be at hand)."""
    from nextdetail.models.feature_extractor import build_extractor

    return build_extractor(cfg.eval.extractor, cfg.eval.inception_weights, cfg.eval.weights_cache)[1].identity()


def get_reference(cfg: PipelineConfig, spec: ReferenceSpec, extractor: dict[str, str], progress: bool) -> RefHandle:
    """The reference statistics of `spec`: from the cache when complete and intact, else computed (a task)."""
    return start_reference(cfg, spec, extractor)(progress)


def start_reference(cfg: PipelineConfig, spec: ReferenceSpec, extractor: dict[str, str]
                    ) -> Callable[[bool], RefHandle]:
    """`get_reference` in two halves: with `eval.resources` a split's tars are submitted now, one task per group
    of tars (`tar_groups`), largest first; the returned call (progress) → the handle waits for them and merges."""
    e, root = cfg.eval, reference_root(cfg)
    artifact = plan_reference(root, spec, extractor)
    withdraw_if_damaged(artifact, get_run_logger().warning)
    groups, futures = [], {}
    if e.resources is not None and spec.kind == "split" and artifact.completed() is None:
        groups = [(group, part_artifact(artifact, group)) for group in tar_groups(spec.tars())]
        with on_workers_offering(e.resources):
            futures = submit_parts(reference_features, [(group[0][0], (part, spec, group, e.extractor,
                                                                       e.inception_weights, e.weights_cache,
                                                                       e.batch_size, e.device, e.torch_threads))
                                                        for group, part in groups],
                                   weight=lambda args: sum(len(keys) for _, keys in args[2]))

    def finish(progress: bool) -> RefHandle:
        if futures:
            collect_parts(futures, desc="reference features", unit="tar group", progress=progress)
        parts = tuple(part.store.url() for _, part in groups)
        with on_workers_offering(e.resources):
            fut = reference_stats.submit(artifact, spec, e.extractor, e.inception_weights, e.weights_cache,
                                         e.batch_size, e.device, progress, parts)
        record = fut.result()
        get_run_logger().info("evaluate: reference statistics of %s (%d images) %s → %s", spec.label,
                              record["summary"]["images"], record["work"], artifact.store.url())
        return RefHandle(artifact.store.url(), root.options, record)

    return finish


def list_checkpoints(ar: ARResult, which: str, options: dict) -> list[CheckpointRef]:
    """last → transformer.pt; best → best.pt; all → every kept step checkpoint (transformer.pt if none)."""
    exported = f"{ar.url}/transformer.pt"
    if which == "best":
        return [CheckpointRef("best", f"{ar.url}/best.pt", step=ar.summary.get("best_step"))]
    if which == "all":
        from nextdetail.storage.checkpoints import CHECKPOINTS

        names = [n for n in Store(ar.url, options).listdir(CHECKPOINTS) if n.startswith("step-") and n.endswith(".pt")]
        refs = [CheckpointRef(f"step {int(n[5:-3])}", exported, f"{ar.url}/{CHECKPOINTS}/{n}", int(n[5:-3]))
                for n in sorted(names)]
        if refs:
            return refs
    return [CheckpointRef("last", exported, step=ar.summary.get("steps"))]


@flow(name="evaluate", log_prints=False, persist_result=False, validate_parameters=False)
def stage_flow(cfg: PipelineConfig, key: StageKey, shard: ShardResult, train_tokenizer: TokenizerResult,
                  tokenize: TokensResult, train_ar: ARResult, progress: bool = True) -> EvalResult:
    shards, tokenizer, tokens, ar = shard, train_tokenizer, tokenize, train_ar  # the upstream results, by stage name
    from nextdetail.stages.sample.flow import reference_images

    t0 = time.time()
    e = cfg.eval
    dataset_dir, ar_dir = ar.url.rstrip("/").rsplit("/", 2)[-2:]
    out_root = key.output(cfg, dataset_dir)
    refs = list_checkpoints(ar, e.checkpoints, cfg.storage.options)
    evaluation = evaluation_store(out_root.sub(ar_dir), key, e)
    extractor = extractor_identity(cfg)
    spec = reference_spec(e.reference, shards.url, shards.identity, cfg.shard.image_format, cfg.storage.options,
                          e.reference_max)
    reference = start_reference(cfg, spec, extractor)  # on the cluster: its tars first, then the class groups,
    sampling = None  # which sample while the reference statistics are merged and the tokenizer is measured
    if e.resources is not None and Artifact("evaluate", key.identity, evaluation).completed() is None:
        sampling = _start_sampling(cfg, key, evaluation, refs, shards)
    ref = reference(progress)
    tok_summary = None
    if e.rfid:
        held_out = get_reference(cfg, reference_spec(e.rfid_split, shards.url, shards.identity, cfg.shard.image_format,
                                                     cfg.storage.options, None), extractor, progress)
        cache = tokens.open()
        tinputs = TokenizerEvalInputs(tokens.url, tokens.options, tokens.local_cache, tokenizer.checkpoint_url,
                                      cache.record["lineage"]["upstream"]["tokenizer_sha256"], shards.url,
                                      cfg.shard.image_format, cfg.storage.options, e.rfid_split, held_out)
        tart = plan_tokenizer_metrics(out_root, tokens.identity, tinputs, extractor)
        record = tokenizer_metrics.submit(tart, tinputs, e, progress).result()
        tok_summary = {**record["summary"], "identity": tart.identity}
    what = {"model": f"the CART transformer `{ar_dir}`", "dataset": f"`{dataset_dir}`", "train_ar_url": ar.url,
            "train_ar_identity": ar.identity}
    inputs = EvalInputs(tuple(refs), ref, cfg.storage.options, what, reference_images(cfg, shards, tokens), tok_summary,
                        roots=(cfg.storage.root,))
    artifact = plan_evaluation(evaluation, key, inputs, e, subdir=False)  # `evaluation`: its directory, from above
    if sampling is not None:
        inputs = replace(inputs, groups=sampling(progress))
    with on_workers_offering(e.resources):  # the merge builds the extractor on eval.device too
        return build_one(EvalResult, evaluate_stage, artifact, inputs, e, sampling_config(e, cfg.sample), progress,
                         started=t0, fields={"reference": {"url": ref.url, "identity": ref.identity,
                                                           "work": ref.record["work"]}})


def _start_sampling(cfg: PipelineConfig, key: StageKey, evaluation: Store, refs: list[CheckpointRef],
                    shards: ShardResult) -> Callable[[bool], tuple[tuple[str, tuple[str, ...]], ...]]:
    """Submit every checkpoint × class group as one task on the workers offering `eval.resources` (samples +
    features, written beside the evaluation) and return how to wait for them: (progress) → (checkpoint label, its
    groups' directories in class order), for the merge."""
    classes = json.loads(Store(shards.url, cfg.storage.options).read_bytes("classes.json"))["classes"]
    scfg = sampling_config(cfg.eval, cfg.sample)
    groups = class_groups(len(classes), cfg.eval.classes_per_task)
    parts = [((ref.label, g), group_artifact(evaluation, key, ref, g), ref) for ref in refs for g in groups]
    roots = (cfg.storage.root,)
    with on_workers_offering(cfg.eval.resources):
        futures = submit_parts(evaluate_classes, [(name, (part, ref, name[1], cfg.storage.options, roots, cfg.eval,
                                                          scfg)) for name, part, ref in parts])

    def wait(progress: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
        collect_parts(futures, desc="evaluate", unit="class group", progress=progress)
        return tuple((ref.label, tuple(part.store.url() for (label, _), part, _ in parts if label == ref.label))
                     for ref in refs)

    return wait


def run(cfg: PipelineConfig, key: StageKey, *, shard: ShardResult, train_tokenizer: TokenizerResult,
        tokenize: TokensResult, train_ar: ARResult, progress: bool = True, scheduler: str | None = None) -> EvalResult:
    """The evaluate flow (`key`: the stage's, `pipeline.declaration.key_of`; upstream results by stage name): in this
    process, or with `eval.resources` class groups on the Dask scheduler at `scheduler` (default: `cfg.dask`, a
    LocalCluster for this call)."""
    upstream = {"shard": shard, "train_tokenizer": train_tokenizer, "tokenize": tokenize, "train_ar": train_ar}
    return run_flow(stage_flow, cfg.dask, cfg.eval.resources is not None, scheduler, cfg, key, progress=progress, **upstream)


def evaluate_files(cfg: PipelineConfig, key: StageKey, checkpoints: list[str], out: str, shards: ShardResult | None,
                   progress: bool = True) -> EvalResult:
    """`nextdetail eval --ckpt A [--ckpt B …]`: exported checkpoints (transformer.pt / best.pt) evaluated into
    `out`, outside the pipeline's cache (`key`: `pipeline.declaration.files_key` of the checkpoints); the reference statistics still come from (and go to) their cache."""
    e = cfg.eval
    if shards is None and "/" not in e.reference and not e.reference.endswith(".npz"):
        raise UserError(f"eval.reference={e.reference} is a split name; it needs the shard dataset")
    extractor = extractor_identity(cfg)
    spec = reference_spec(e.reference, shards.url if shards else "", shards.identity if shards else "",
                          cfg.shard.image_format, cfg.storage.options, e.reference_max)
    rart = plan_reference(reference_root(cfg), spec, extractor)
    record = ensure_reference(rart, spec, e.extractor, e.inception_weights, e.weights_cache, e.batch_size, e.device,
                              progress)
    ref = RefHandle(rart.store.url(), rart.store.options, record)
    refs = []
    for path in checkpoints:
        parent, name = path.rstrip("/").rsplit("/", 1)
        if Store(parent, cfg.storage.options).size(name) is None:
            raise UserError(f"{path}: no such checkpoint; pass a transformer.pt or best.pt of `nextdetail train-ar`")
        label = name if name not in {r.label for r in refs} else f"{len(refs) + 1}-{name}"  # names samples/<label>.tar
        refs.append(CheckpointRef(label, path))
    inputs = EvalInputs(tuple(refs), ref, cfg.storage.options, {"model": ", ".join(f"`{p}`" for p in checkpoints)},
                        roots=(cfg.storage.root,))
    t0 = time.time()
    store = Store(out, cfg.storage.options)
    artifact = plan_evaluation(store, key, inputs, e, subdir=False)
    done = build_artifact(artifact, lambda a: run_evaluation(a.store, inputs, e, sampling_config(e, cfg.sample), print,
                                                             progress))
    return EvalResult(store.url(), artifact.identity, done["summary"], done["work"], round(time.time() - t0, 3),
                      {"url": ref.url, "identity": ref.identity, "work": record["work"]})
