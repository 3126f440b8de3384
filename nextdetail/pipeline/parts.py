"""How a stage's flow runs its tasks — written once for every stage.

- `build_one`: a stage with one artifact submits its one task and waits; the task (`tasks/stage.stage_task`)
  says whether it built the artifact or found it complete; the result is logged in one line.
- `fan_out`: a stage with many parts (one tar each: shard, decompose) submits every part's task to the
  task runner (Dask), collects them as they finish with a progress bar, and says which ran and which were
  found complete. `submit_parts` + `collect_parts` are its two halves, for a flow that has other work to do
  while its parts run (evaluate computes the reference statistics while the class groups sample).
- Parts run in submission order (`_SUBMITTED`), largest first when the caller gives their `weight`
  (longest-processing-time first, so the largest tar never starts last and runs alone).
- On a Dask cluster a part is a plain Dask task, not a Prefect task run (`runtime.dask_task_runner`'s
  `submit_part`): Prefect records the stage (its flow run, its single tasks) and, per fan-out, one progress
  artifact; Dask runs the parts. A part as a task run cost 69 ms of CPU beside its work (the Prefect server 42, its
  worker 19), as a Dask task 10 (`benchmarks/part_overhead.py`; issue 40): on a small machine that CPU is the
  workers', and at ImageNet a stage has thousands of parts. A part keeps its task's retries of transient failures
  (done on the worker; each retry logged by the flow) and its marker; a failure names the part. In the flow's own
  threads (tokenize in one process) parts stay task runs.
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
    from prefect.context import FlowRunContext

    ordered = sorted(parts, key=lambda part: -weight(part[1])) if weight is not None else parts
    flow_run = FlowRunContext.get()
    submit_part = getattr(flow_run.task_runner if flow_run is not None else None, "submit_part", None)
    submit = (lambda args: submit_part(task, args)) if callable(submit_part) else (lambda args: task.submit(*args))
    futures = {}
    for name, args in ordered:
        with dask.annotate(priority=-next(_SUBMITTED)):
            futures[submit(args)] = name
    return futures


def collect_parts(futures: dict[Any, Hashable], *, desc: str, unit: str, progress: bool,
                  size: Callable[[dict[str, Any]], int] = lambda record: 1,
                  on_record: Callable[[Hashable, dict[str, Any]], None] | None = None,
                  total: int | None = None) -> tuple[dict[Hashable, dict[str, Any]], list[Hashable], list[Hashable]]:
    """Collect submitted parts' records as they finish → (record by name, names that ran, names found complete).
    `size(record)` advances the bar (of `total`, default one per part); `on_record(name, record)` sees each record
    as it arrives (e.g. to log a rate)."""
    import sys

    from tqdm import tqdm

    records: dict[Hashable, dict[str, Any]] = {}
    ran: list[Hashable] = []
    reused: list[Hashable] = []
    bar = tqdm(total=len(futures) if total is None else total, desc=desc, unit=unit, disable=not progress, leave=False)
    first = next(iter(futures), None)
    distributed = sys.modules.get("distributed")  # imported where parts are Dask futures; else not needed
    plain = distributed is not None and isinstance(first, distributed.Future)  # Dask tasks (`submit_parts`)
    # distributed's as_completed follows the futures on the default client's loop unless told theirs: on another
    # client's (a caller's own Client) they were seen in bursts, seconds late
    finished = distributed.as_completed(list(futures), loop=first.client.loop) if plain else \
        as_completed(list(futures))
    shown = _PartsProgress(desc, unit, len(futures)) if plain else None
    for fut in finished:
        name = futures[fut]
        try:
            record = fut.result()
        except Exception as exc:
            exc.add_note(f"in {desc}'s part {name!r}")
            raise
        if plain:
            record, retried = record
            for line in retried:
                get_run_logger().warning("%s: part %r: %s", desc, name, line)
            shown.advance()
        records[name] = record
        (ran if record["work"] == "ran" else reused).append(name)
        if on_record is not None:
            on_record(name, record)
        bar.update(size(record))
    bar.close()
    if shown is not None:
        shown.close()
    return records, ran, reused


class _PartsProgress:
    """A fan-out's progress in the Prefect UI (its parts are no task runs there): one progress artifact of the
    flow run, updated at most every `EVERY` seconds and when the last part is in."""

    EVERY = 2.0

    def __init__(self, desc: str, unit: str, total: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.desc, self.unit, self.total, self.done, self.shown_at = desc, unit, total, 0, time.monotonic()
        self.id = create_progress_artifact(0.0, description=self._line())

    def _line(self) -> str:
        return f"{self.desc}: {self.done} of {self.total} {self.unit}s done"

    def advance(self) -> None:
        self.done += 1
        if time.monotonic() - self.shown_at >= self.EVERY:
            self._show()

    def _show(self) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.id, 100.0 * self.done / max(self.total, 1), description=self._line())
        self.shown_at = time.monotonic()

    def close(self) -> None:
        self._show()


def fan_out(task: Any, parts: Sequence[tuple[Hashable, tuple[Any, ...]]], *, desc: str, unit: str, progress: bool,
            size: Callable[[dict[str, Any]], int] = lambda record: 1,
            on_record: Callable[[Hashable, dict[str, Any]], None] | None = None,
            total: int | None = None, weight: Callable[[tuple[Any, ...]], float] | None = None
            ) -> tuple[dict[Hashable, dict[str, Any]], list[Hashable], list[Hashable]]:
    """Submit `task(*args)` for every (name, args) part at once (`weight`: heaviest first) and collect the records
    as they finish (`collect_parts`)."""
    return collect_parts(submit_parts(task, parts, weight), desc=desc, unit=unit, progress=progress, size=size,
                         on_record=on_record, total=total)
