"""A run with nothing to do, without Prefect: when every stage a run would visit is up to date in every branch —
the identities `status` computes, each artifact intact as `run` itself checks it (`intact`) — `nextdetail run`
rebuilds the results from the lineage records, appends its run-log rows and prints its summary, starting
neither a Prefect server nor a Dask cluster (as `dvc repro` with nothing to do). Anything else, `--force`, or a
scheduled run (`serve`: it shows in Prefect as a run that did nothing) goes through the Prefect flow.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.result import NOT_NEEDED, UP_TO_DATE, PipelineResults
from nextdetail.stages import REGISTRY
from nextdetail.storage.fs import Store
from nextdetail.storage.lineage import Lineage, recorded_artifact, run_row


def intact(cfg: PipelineConfig, stage: str, record: dict[str, Any]) -> bool:
    """Whether a recorded artifact can be used as is: complete, and the token cache verified by sha256 as its
    own flow verifies it before every use (`tokens.verify`; a same-size corruption is caught here too)."""
    lineage = Lineage.of(cfg)
    if not recorded_artifact(record, lineage.roots):
        return False
    verify = REGISTRY[stage].verify
    return verify is None or not verify(cfg, lineage.artifact_store(record))


def current_results(branches: dict[str, PipelineConfig], stages: list[str],
                    force: Iterable[str] = ()) -> PipelineResults | None:
    """The results of a run of `stages` (every branch: one config per model) that has nothing to do, with its
    run-log rows written; None when some stage would run (then the Prefect flow must)."""
    from nextdetail.cache.status import branch_status

    if list(force):
        return None
    statuses = branch_status(branches, tuple(stages))
    for model, cfg in branches.items():
        for stage in stages:
            st = statuses[model][stage]
            if st.state == NOT_NEEDED:
                continue
            if st.state != UP_TO_DATE or (not st.shared_with and REGISTRY[stage].verify is not None
                                           and not intact(cfg, stage, st.record)):
                return None
    run_id, started = uuid.uuid4().hex[:12], time.time()
    results = {m: PipelineResults(run_id) for m in branches}
    rows: dict[str, dict[str, Any]] = {}
    for model, cfg in branches.items():
        res = results[model]
        res.branches = results
        for stage in stages:
            st = statuses[model][stage]
            res.work[stage] = st.state
            if st.state == NOT_NEEDED:
                continue
            res.identities[stage] = st.identity
            if st.shared_with:  # the same artifact as an earlier branch's: one row naming both models
                res[stage], res.shared[stage] = results[st.shared_with][stage], st.shared_with
                rows[st.identity]["model"] += f",{model}"
                continue
            res[stage] = REGISTRY[stage].recorded(cfg, st.record)
            rows[st.identity] = run_row(run_id, started, stage, model, st.identity, res[stage], UP_TO_DATE,
                                        cfg.preset)
    root = next(iter(branches.values())).storage
    run_log = Lineage(Store(root.root, root.options)).append_run(run_id, started, list(rows.values()))
    for res in results.values():
        res.run_log = run_log
    return results[next(iter(branches))]
