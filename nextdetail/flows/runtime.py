"""Process set-up for Prefect and Dask. Import and call `configure_environment` before `prefect`.

- Prefect runs against its ephemeral local server unless PREFECT_API_URL names a real one. The
  server is started once here and its URL exported, so Dask worker processes (which inherit the
  environment) talk to it instead of each starting a server of their own.
- Nothing tries the network: analytics and telemetry are off; PREFECT_HOME defaults to
  ``./.nextdetail/prefect`` so state stays with the project.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    "PREFECT_UI_ENABLED": "false",
}


def configure_environment(work_dir: str | Path = ".nextdetail") -> None:
    """Set Prefect's environment defaults (a user's own settings win). Call before importing prefect."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(work_dir, "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # its SQLite database lives here


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL in use: PREFECT_API_URL if set, else a freshly started ephemeral server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        url = server.api_url
        # Not stopped by hand at exit: Prefect's own atexit handling does it (stopping it here can hang).
        os.environ["PREFECT_API_URL"] = url
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextlib.contextmanager
def dask_cluster(address: str | None, n_workers: int | None, threads_per_worker: int, memory_limit: str) -> Iterator[str]:
    """Yield a scheduler address: `address` as given, else a LocalCluster of worker processes that
    lives for the whole pipeline run (started once, shared by every parallel stage)."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers or os.cpu_count() or 1,
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",  # a free port: concurrent runs never collide
        # Workers import the stage code (and Prefect) at start-up, not inside the first task.
        preload=["nextdetail.tasks.shard"],
        silence_logs=logging.WARNING,
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def dask_task_runner(address: str) -> Any:
    """Prefect's Dask task runner on the scheduler at `address`."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
