"""The stage mechanism every stage reuses: content-addressed artifacts on Prefect's own caching.

An `Artifact` (storage/artifacts.py) is named by its identity — a hash of exactly the settings, upstream identities, input
fingerprints and code version it depends on — and is complete when its JSON completion marker
(written last, atomically) carries that identity and every file it lists still has its recorded size.

`stage_task` turns a function that writes an artifact into a Prefect task whose cache key *is* the
identity (`ArtifactCachePolicy`). The marker stays the truth:
- a Prefect cache record whose artifact is gone or incomplete is dropped, so the task recomputes;
- an artifact that is complete but unknown to this Prefect (a teammate's bucket, a fresh
  PREFECT_HOME) is reused by the task body without recomputing;
- retries (with back-off) only for I/O and infrastructure errors, never for `UserError`/bad data.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from nextdetail.errors import UserError
from nextdetail.storage.artifacts import Artifact

__all__ = ["Artifact", "ArtifactCachePolicy", "build_artifact", "is_transient", "stage_task"]


def _drop_cache_record(result_store: Any, key: str) -> None:
    """Delete Prefect's record for `key` so the task runs again (the artifact behind it is gone)."""
    storage = getattr(result_store, "result_storage", None)
    if storage is None:
        from prefect.results import get_default_result_storage

        storage = get_default_result_storage(_sync=True)
    resolve = getattr(storage, "_resolve_path", None)
    if resolve is not None:
        with contextlib.suppress(FileNotFoundError, OSError):
            Path(resolve(key)).unlink()


class ArtifactCachePolicy(CachePolicy):
    """Cache key = the `artifact` argument's identity; a record without a complete artifact is dropped."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any) -> str:
        artifact: Artifact = inputs["artifact"]
        if artifact.completed() is None:
            _drop_cache_record(task_ctx.result_store, artifact.cache_key)
        return artifact.cache_key


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

    The task returns the marker's record. Its Prefect state is ``Cached`` on a cache hit; the record's
    ``"work"`` is ``"reused"`` when an artifact Prefect did not know was found complete, ``"ran"`` otherwise.
    """
    if fn is None:
        return functools.partial(stage_task, name=name, retries=retries, retry_delay_seconds=retry_delay_seconds)

    @functools.wraps(fn)
    def body(artifact: Artifact, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return build_artifact(artifact, fn, *args, **kwargs)

    return task(
        body,
        name=name or fn.__name__,
        cache_policy=ArtifactCachePolicy(),
        persist_result=True,
        retries=retries,
        retry_delay_seconds=list(retry_delay_seconds),
        retry_condition_fn=_retry_condition,
    )
