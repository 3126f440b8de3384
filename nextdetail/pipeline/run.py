"""`nextdetail run`: every stage as one Prefect flow (each stage a subflow), skipping what is up to date.

shard → decompose → train_tokenizer → tokenize → train_ar → sample → evaluate. For each stage the flow
computes its identity (pipeline/declaration.py); when a lineage record of that identity names a complete artifact the
stage is skipped and its result read from the record (no cluster; in the UI a subflow that did no work, so the
run's graph has one node per stage), otherwise its flow runs and a record is written. How runs look in the UI
(names, tags, parameters, artifacts) is `flows/ui.py`. Every run appends its rows to the Parquet run log (storage/lineage.py).

- ``until``: stop after this stage;  ``only``: run this stage alone (its upstream must be up to date);
- ``force``: rebuild these stages from scratch (their recorded artifact is deleted first); a rebuilt stage whose
  artifact identity comes out the same leaves its downstream up to date.
The Dask cluster starts only when a stage that needs it (shard, decompose) runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from prefect import flow, get_run_logger, tags

from nextdetail.cache.current import intact
from nextdetail.conf import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.pipeline import ui
from nextdetail.pipeline.code import CODE_RULE
from nextdetail.pipeline.declaration import StageKey, key_of
from nextdetail.pipeline.result import NOT_NEEDED, UP_TO_DATE, PipelineResults
from nextdetail.pipeline.runtime import dask_cluster, prefect_api
from nextdetail.stages import REGISTRY, select_stages
from nextdetail.storage.lineage import Lineage, environment, run_row

STAGE_RETRY_DELAYS = (2.0, 10.0)


def run_with_retries(stage: str, runner: Callable[[], Any], log: Any) -> Any:
    """Run a stage's flow; on an I/O or infrastructure failure (`is_transient`: S3 errors, lost Dask workers,
    a crashed process) run it again after a back-off — its finished tasks are reused, so it resumes. The
    tasks retry on their own too; this catches what fails between them, in the flow. Bad config or data
    (`UserError`, ValueError, …) fails at once."""
    from nextdetail.pipeline.tasks import is_transient

    for delay in (*STAGE_RETRY_DELAYS, None):
        try:
            return runner()
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            log.warning("%s: %s: %s — retrying the stage in %g s (finished work is reused)", stage,
                        type(exc).__name__, str(exc)[:300], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


Branches = dict[str, PipelineConfig]  # model name → its config: the pipeline's branches (conf.load_branches)


def as_branches(cfg: PipelineConfig | Branches) -> Branches:
    return dict(cfg) if isinstance(cfg, dict) else {cfg.ar.model: cfg}


@flow(name="nextdetail-pipeline", log_prints=False, persist_result=False, validate_parameters=False)
def pipeline_flow(cfg: PipelineConfig | Branches, stages: list[str], force: list[str], only: str | None = None,
                  progress: bool = True) -> PipelineResults:
    """Every selected stage of every branch (one per model), stage by stage; an identity met twice in one run
    (the branches' shared shard and decompose) is visited once. Returns the first branch's results; the
    others are in `.branches`."""
    log = get_run_logger()
    branches = as_branches(cfg)
    first = next(iter(branches))
    run_started = time.time()
    run_id = uuid.uuid4().hex[:12]
    results = {m: PipelineResults(run_id) for m in branches}
    for res in results.values():
        res.branches = results
    lineage = Lineage.of(next(iter(branches.values())))
    env = environment()
    rows: dict[str, dict[str, Any]] = {}  # stage identity → its run-log row (one per artifact, all its models)
    visited: dict[str, str] = {}  # stage identity → the branch that visited it in this run
    why = ui.status_before(branches, stages)
    with contextlib.ExitStack() as stack:
        cluster: list[str] = []

        def scheduler() -> str:  # started on first use, shared by every stage (and branch) that needs one
            if not cluster:
                c = branches[first].dask
                cluster.append(stack.enter_context(dask_cluster(**c.model_dump())))
            return cluster[0]

        for stage in stages:
            for model, bcfg in branches.items():
                res = results[model]
                if not REGISTRY[stage].is_needed(bcfg):  # nothing downstream reads it: no artifact, no record
                    res.work[stage] = NOT_NEEDED
                    log.info("%s: not needed by this config", stage)
                    continue
                key = key_of(bcfg, stage, res)
                res.identities[stage] = key.identity
                if key.identity in visited:  # the same artifact as another branch's: one copy, visited once
                    other = results[visited[key.identity]]
                    res[stage], res.work[stage] = other[stage], other.work[stage]
                    res.shared[stage] = visited[key.identity]
                    rows[key.identity]["model"] += f",{model}"
                    continue
                visited[key.identity] = model
                started = time.time()
                res.work[stage] = _visit(stage, bcfg, key, res, lineage, force, only, log, started, env,
                                         functools.partial(REGISTRY[stage].run, bcfg, key, res, progress, scheduler))
                rows[key.identity] = run_row(run_id, started, stage, model, key.identity, res[stage], res.work[stage],
                                             bcfg.preset)
                ui.publish_stage(bcfg, model, stage, res[stage], res.work[stage])
                ui.publish_report(bcfg, model, stage, res[stage])
    if any(REGISTRY[s].result.REPORT for s in stages):  # evaluations: every one under the root, side by side
        ui.publish_comparison(branches[first])
    ui.publish_run(branches, results, force, why)
    run_log = lineage.append_run(run_id, run_started, list(rows.values()))
    for res in results.values():
        res.run_log = run_log
    return results[first]


def _visit(stage: str, cfg: PipelineConfig, key: StageKey, results: PipelineResults, lineage: Lineage,
           force: list[str], only: str | None, log: Any, started: float, env: dict[str, Any],
           runner: Callable[[], Any]) -> str:
    """One stage of one branch: skip it when its identity's record names an intact artifact, else run it
    (deleting the recorded artifact first under --force) and write its lineage record. Returns the work."""
    record = lineage.read(stage, key.identity)
    complete = record is not None and intact(cfg, stage, record)
    if complete and stage not in force:
        results[stage] = REGISTRY[stage].recorded(cfg, record)
        log.info("%s: up to date (%s) → %s", stage, key.identity[:12], results[stage].url)
        ui.show_reused(stage, key.identity, results[stage].url)
        return UP_TO_DATE
    if only is not None and stage != only:
        raise UserError(f"--only {only}: its upstream stage {stage} is not up to date; run "
                        f"`nextdetail run --until {stage}` first (or drop --only)")
    if complete and stage in force:  # the artifact as this root holds it: never where the record was written
        store = lineage.artifact_store(record)
        log.info("%s: --force: deleting %s and rebuilding it", stage, store.url())
        store.remove_tree("")
    results[stage] = run_with_retries(stage, runner, log)
    if stage in force and not complete and results[stage].reused:  # built before lineage knew it
        log.info("%s: --force: deleting %s and rebuilding it", stage, results[stage].url)
        lineage.roots.store(results[stage].url).remove_tree("")
        results[stage] = run_with_retries(stage, runner, log)
    result = results[stage]
    lineage.write({
        "stage": stage, "identity": key.identity,
        "artifact": {"identity": result.identity, "url": result.url, "marker": "_COMPLETE.json"},
        "settings": key.settings, "upstream": key.upstream, "inputs": key.inputs, "code": key.code,
        "code_rule": CODE_RULE,
        **env, "run_id": results.run_id, "preset": cfg.preset, "model": cfg.ar.model, "started": started,
        "finished": time.time(), "seconds": round(time.time() - started, 3),
        "result": {k: v for k, v in dataclasses.asdict(result).items() if k != "options"},
    })
    return "ran"


def run_pipeline(cfg: PipelineConfig | Branches, until: str | None = None, progress: bool = True,
                 only: str | None = None, force: Iterable[str] = ()) -> PipelineResults:
    """Run the selected stages (of every branch: one config per model) as one Prefect flow; returns each
    stage's result by name (the first branch's; all of them in `.branches`)."""
    force = list(force)
    stages = select_stages(until, only, force)
    branches = as_branches(cfg)
    check_stage_resources(branches, stages)
    with prefect_api(), tags(*ui.run_tags(branches)):
        return ui.named_pipeline(pipeline_flow, branches, stages, force, only)(branches, stages, force, only,
                                                                               progress=progress)


def check_stage_resources(branches: Branches, stages: Iterable[str], address: str | None = None) -> None:
    """Before any work: the Dask workers offer what the selected stages ask for (`Stage.resources`, on `Stage.nodes`
    distinct hosts), else one line (`runtime.check_resources`). `address`: the scheduler to ask (default: each
    branch's `dask.address`)."""
    from nextdetail.pipeline.runtime import check_resources

    for bcfg in branches.values():
        asks = {s: ask for s in stages if REGISTRY[s].is_needed(bcfg) and (ask := REGISTRY[s].asks(bcfg))}
        check_resources(asks, address or bcfg.dask.address, bcfg.dask.resources)


def run_stage(cfg: PipelineConfig, stage: str, upstream: dict[str, Any] | None = None, progress: bool = True,
              scheduler: str | None = None) -> Any:
    """One stage's flow on its upstream stages' results (tests, notebooks; call inside `runtime.prefect_api`):
    its key computed as `run_pipeline` computes it. `scheduler`: a Dask scheduler for shard and decompose
    (default: a LocalCluster for this call)."""
    upstream = upstream or {}
    check_stage_resources({"": cfg}, [stage], scheduler)
    return REGISTRY[stage].run(cfg, key_of(cfg, stage, upstream), upstream, progress,
                            (lambda: scheduler) if scheduler else None)


@flow(name="nextdetail-scheduled", log_prints=False, persist_result=False, flow_run_name="{preset} · scheduled")
def scheduled_pipeline(preset: str | None = "tiny", config_file: str | None = None, overrides: list[str] | None = None,
                       until: str | None = None, only: str | None = None, force: list[str] | None = None,
                       models: list[str] | None = None) -> dict[str, dict[str, str]]:
    """The pipeline with JSON parameters (a preset or config file + overrides, the models): what a deployment
    runs. Returns what happened to each stage of each model's branch (up to date | ran)."""
    from nextdetail.conf import load_branches, parse_models
    from nextdetail.conf.secrets import resolve_credentials

    branches = {m: resolve_credentials(c) for m, c in load_branches(None if config_file else preset, config_file,
                                                                    overrides or [], parse_models(models),
                                                                    until=only or until).items()}
    stages, force = select_stages(until, only, force or []), list(force or [])
    with tags(*ui.run_tags(branches)):  # the stages are this run's own subflows: one node each in its graph
        results = pipeline_flow.fn(branches, stages, force, only, progress=False)
    return {model: dict(res.work) for model, res in results.branches.items()}
