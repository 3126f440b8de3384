"""How a stage's flow runs its tasks — written once for every stage.

- `build_one`: a stage with one artifact submits its one task and waits; the task (`tasks/stage.stage_task`)
  says whether it built the artifact or found it complete; the result is logged in one line.
- `fan_out`: a stage with many parts (one tar each: shard, decompose) submits every part's task to the
  task runner (Dask), collects them as they finish with a progress bar, and says which ran and which were
  found complete. `submit_parts` + `collect_parts` are its two halves, for a flow that has other work to do
  while its parts run (evaluate computes the reference statistics while the class groups sample).
- Parts run in submission order (`_SUBMITTED`), largest first when the caller gives their `weight`
  (longest-processing-time first, so the largest tar never starts last and runs alone).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.futures import as_completed

from nextdetail.pipeline.result import StageResult

R = TypeVar("R", bound=StageResult)


def build_one(result: type[R], task: Any, artifact: Any, *args: Any, started: float,
              fields: dict[str, Any] | None = None) -> R:
    """Submit `task(artifact, *args)`, wait for it, and return `result` of its record (work: ran | reused; `fields`:
    the result type's own further fields), logged in one line with where to look."""
    record = task.submit(artifact, *args).result()
    out = result(artifact.store.url(), artifact.identity, record["summary"], record["work"],
                 round(time.time() - started, 3), **(fields or {}))
    get_run_logger().info(f"{out.line()} → {out.outputs()[0][1].split()[0]}")
    return out


_SUBMITTED = itertools.count(1)
"""Parts go to Dask in submission order, across fan-outs (Dask ranks tasks sent within 100 ms of each other alike,
then by key: `evaluate_classes-…` before `reference_features-…`, a tokenize job's tars at random), at priority
−1, −2, …; a stage's single tasks (`build_one`, a merge) keep Dask's default 0, so they run next whatever is queued."""


def submit_parts(task: Any, parts: Sequence[tuple[Hashable, tuple[Any, ...]]],
                 weight: Callable[[tuple[Any, ...]], float] | None = None) -> dict[Any, Hashable]:
    """Submit `task(*args)` for every (name, args) part at once → {future: name}. With `weight(args)` (e.g. a
    tar's images) the heaviest parts go first; the records are keyed by name, so their order is not."""
    import dask

    ordered = sorted(parts, key=lambda part: -weight(part[1])) if weight is not None else parts
    futures = {}
    for name, args in ordered:
        with dask.annotate(priority=-next(_SUBMITTED)):
            futures[task.submit(*args)] = name
    return futures


def collect_parts(futures: dict[Any, Hashable], *, desc: str, unit: str, progress: bool,
                  size: Callable[[dict[str, Any]], int] = lambda record: 1,
                  on_record: Callable[[Hashable, dict[str, Any]], None] | None = None,
                  total: int | None = None) -> tuple[dict[Hashable, dict[str, Any]], list[Hashable], list[Hashable]]:
    """Collect submitted parts' records as they finish → (record by name, names that ran, names found complete).
    `size(record)` advances the bar (of `total`, default one per part); `on_record(name, record)` sees each record
    as it arrives (e.g. to log a rate)."""
    from tqdm import tqdm

    records: dict[Hashable, dict[str, Any]] = {}
    ran: list[Hashable] = []
    reused: list[Hashable] = []
    bar = tqdm(total=len(futures) if total is None else total, desc=desc, unit=unit, disable=not progress, leave=False)
    for fut in as_completed(list(futures)):
        name = futures[fut]
        record = records[name] = fut.result()
        (ran if record["work"] == "ran" else reused).append(name)
        if on_record is not None:
            on_record(name, record)
        bar.update(size(record))
    bar.close()
    return records, ran, reused


def fan_out(task: Any, parts: Sequence[tuple[Hashable, tuple[Any, ...]]], *, desc: str, unit: str, progress: bool,
            size: Callable[[dict[str, Any]], int] = lambda record: 1,
            on_record: Callable[[Hashable, dict[str, Any]], None] | None = None,
            total: int | None = None, weight: Callable[[tuple[Any, ...]], float] | None = None
            ) -> tuple[dict[Hashable, dict[str, Any]], list[Hashable], list[Hashable]]:
    """Submit `task(*args)` for every (name, args) part at once (`weight`: heaviest first) and collect the records
    as they finish (`collect_parts`)."""
    return collect_parts(submit_parts(task, parts, weight), desc=desc, unit=unit, progress=progress, size=size,
                         on_record=on_record, total=total)
