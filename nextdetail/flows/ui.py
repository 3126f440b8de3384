"""Results in the Prefect UI: the keyed artifacts a pipeline run publishes (`prefect.artifacts`).

- `nextdetail-status` (table), at the start of a run: every stage of every branch — up to date, stale (why) or
  missing — as `nextdetail status` prints it;
- `nextdetail-<model>-<stage>` (markdown), after each stage: its summary line, what this run did, and where its
  outputs are (the pictures as links: sample grids, curves, token previews);
- `nextdetail-<model>-report` (markdown) and `nextdetail-<model>-metrics` (table), after evaluate: its report and
  the numbers of every checkpoint it evaluated;
- `nextdetail-compare` (table), at the end: every evaluation under the root (`nextdetail compare`, the settings
  that differ).
A key's latest version is what the Artifacts page shows; each flow run keeps its own. Publishing is best effort:
a failure is logged as a warning and never fails the run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.stages.results import StageResult
from nextdetail.storage.fs import Store

PICTURE = re.compile(r"(\S+\.png)")


def key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("nextdetail", *parts)).lower()).strip("-")


def _best_effort(publish: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from prefect import get_run_logger

        try:
            publish(*args, **kwargs)
        except Exception as err:  # the UI is a view: a run never fails for it
            get_run_logger().warning("Prefect UI: could not publish %s: %s", publish.__name__, str(err)[:200])

    wrapper.__name__ = publish.__name__
    wrapper.__doc__ = publish.__doc__
    return wrapper


@_best_effort
def publish_status(branches: dict[str, PipelineConfig], stages: list[str]) -> None:
    """The status table at the start of a run."""
    from prefect.artifacts import create_table_artifact

    from nextdetail.stages.status import branch_status

    rows = [{"model": model, "stage": st.stage, "state": st.state, "identity": (st.identity or "")[:12],
             "why": "; ".join(st.reasons)[:300]}
            for model, by_stage in branch_status(branches, tuple(stages)).items() for st in by_stage.values()]
    create_table_artifact(rows, key=key("status"), description="what this run found at its start")


@_best_effort
def publish_stage(model: str, stage: str, result: StageResult, work: str) -> None:
    """One stage's markdown: its line, what this run did, its outputs (pictures as links)."""
    from prefect.artifacts import create_markdown_artifact

    lines = [f"### {stage} ({model}) — {work}", "", result.line(), "", f"`{result.work_line()}`", "",
             "| what | where |", "|---|---|"]
    for what, where in result.outputs():
        lines.append(f"| {what} | {PICTURE.sub(lambda m: f'[{m.group(1)}]({_href(m.group(1))})', where)} |")
    create_markdown_artifact("\n".join(lines), key=key(model, stage), description=f"{stage}: {result.line()[:200]}")


@_best_effort
def publish_evaluation(cfg: PipelineConfig, model: str, result: StageResult) -> None:
    """evaluate's report (markdown) and its numbers per checkpoint (table)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    store = Store(result.url, cfg.storage.options)
    report = store.read_bytes("report.md").decode()
    create_markdown_artifact(report, key=key(model, "report"), description=result.line()[:200])
    metrics = json.loads(store.read_bytes("metrics.json"))
    rows = [{k: v for k, v in row.items() if not isinstance(v, (dict, list))} for row in metrics.get("checkpoints", [])]
    create_table_artifact(rows, key=key(model, "metrics"), description="every evaluated checkpoint")


@_best_effort
def publish_comparison(cfg: PipelineConfig) -> None:
    """Every evaluation under the root, the settings that differ (as `nextdetail compare --only-changed`)."""
    from prefect.artifacts import create_table_artifact

    from nextdetail.stages.compare import columns, comparison

    rows = comparison(cfg)
    if rows:
        cols = columns(rows, only_changed=True)
        create_table_artifact([{c: r.get(c) for c in cols} for r in rows], key=key("compare"),
                              description=f"{len(rows)} evaluations under {cfg.storage.root}")


def _href(url: str) -> str:
    return url if "://" in url else f"file://{url}"
