"""The stage mechanism every stage reuses: content-addressed artifacts, their completion markers the one truth.

An `Artifact` (storage/artifacts.py) is named by its identity — derived from its stage's key (pipeline/declaration.py) —
and is complete when its JSON completion marker (written last, atomically) carries that identity and every
file it lists still has its recorded size.

`stage_task` turns a function that writes an artifact into a Prefect task whose body first asks the marker:
a complete artifact (this run's, an earlier one's, a teammate's bucket) is reused without recomputing. Prefect's
own result cache is not used: its records live under each machine's PREFECT_HOME (on a multi-host Dask cluster,
a local path per worker host) and would be a second truth beside the marker. Retries (with back-off) only for
I/O and infrastructure errors, never for `UserError`/bad data.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from nextdetail.errors import UserError
from nextdetail.pipeline.artifacts import Artifact

__all__ = ["Artifact", "build_artifact", "is_transient", "stage_task"]


def is_transient(exc: BaseException) -> bool:
    """I/O and infrastructure failures are worth a retry; bad configuration or data never is. A missing file
    counts as I/O (a concurrent writer's rename, an object store's listing lag); a permission or path-type
    error does not (retrying cannot fix it)."""
    if isinstance(exc, (UserError, ValueError, TypeError, KeyError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__name__ in {
        "KilledWorker", "CommClosedError", "ClientError", "EndpointConnectionError",
    }


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False


def build_artifact(artifact: Artifact, fn: Callable[..., tuple[dict[str, Any], Any]], *args: Any,
                   **kwargs: Any) -> dict[str, Any]:
    """The complete artifact's record if there is one (``work == "reused"``); else run
    ``fn(artifact, *args, **kwargs) -> (summary, files)`` and publish (``"ran"``). Every stage task's body,
    and what commands running outside Prefect (`nextdetail eval --ckpt`) call directly."""
    record = artifact.completed()
    if record is not None:
        return {**record, "work": "reused"}
    started = time.time()
    summary, files = fn(artifact, *args, **kwargs)
    try:
        return {**artifact.publish(summary, files, started), "work": "ran"}
    except FileExistsError:  # exclusive: another writer published the same identity first
        record = artifact.completed()
        if record is None:
            raise OSError(f"{artifact.store.url(artifact.marker)} exists but is not complete") from None
        return {**record, "work": "reused", "lost_race": True}


def stage_task(
    fn: Callable[..., tuple[dict[str, Any], list[str]]] | None = None,
    *,
    name: str | None = None,
    retries: int = 2,
    retry_delay_seconds: Sequence[float] = (2.0, 10.0),
) -> Any:
    """Decorate ``fn(artifact, *args) -> (summary, files)`` that writes `files` under `artifact.store`.

    The task returns the marker's record; its ``"work"`` is ``"reused"`` when the artifact was found complete,
    ``"ran"`` when this call built it. Nothing is kept in Prefect's result storage.
    """
    if fn is None:
        return functools.partial(stage_task, name=name, retries=retries, retry_delay_seconds=retry_delay_seconds)

    @functools.wraps(fn)
    def body(artifact: Artifact, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return build_artifact(artifact, fn, *args, **kwargs)

    return task(
        body,
        name=name or fn.__name__,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=retries,
        retry_delay_seconds=list(retry_delay_seconds),
        retry_condition_fn=_retry_condition,
    )
