"""Benchmark: what one Prefect task run costs a Dask worker beside its work (issue 40).

`--tasks` trivial task runs (a task that returns its argument) go through the pipeline's Dask task runner
(`runtime.dask_task_runner`) to one external `dask worker --nthreads 1`, twice in one run:

- baseline  the worker builds the flow run's Prefect settings for every task run, as Prefect itself does
            (`runtime._flow_context_of` uncached on that worker: pydantic-settings reads the environment, .env files,
            the profiles and pyproject.toml each time);
- figure    as the pipeline runs: each worker builds a flow run's settings once.

Each side: a warm-up flow run, then the timed one; per task run the worker's own compute time (Dask's task stream,
median) and the worker process's CPU. Also the Prefect server's and this (the flow's) process's CPU per task run,
which the settings do not change.

    PYTHONPATH=. python benchmarks/task_overhead.py [--tasks N]

Prints one JSON line: figure = the worker's ms per task run with the settings built once, baseline = rebuilt per task
run, ratio = figure / baseline (lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _per_task_settings() -> None:
    """On a worker: Prefect's own behaviour, the flow's settings built for every task run."""
    from nextdetail.pipeline import runtime

    runtime._flow_context_of = runtime._flow_context_of.__wrapped__


def measure(address: str, tasks: int) -> dict[str, float]:
    """One timed flow run of `tasks` trivial task runs on the cluster at `address` → ms per task run."""
    import psutil
    from distributed import Client, get_task_stream
    from prefect import flow, task

    from nextdetail.pipeline.runtime import dask_task_runner

    @task(persist_result=False)
    def echo(i: int) -> int:
        return i

    @flow(task_runner=dask_task_runner(address), persist_result=False)
    def many(n: int) -> list[int]:
        return [future.result() for future in [echo.submit(i) for i in range(n)]]

    many(tasks)  # warm-up: imports, the worker's first flow context
    family = psutil.Process().children(recursive=True)
    role = {p.pid: "server" if "--lifespan" in " ".join(p.cmdline()) else
            "worker" if "multiprocessing-fork" in " ".join(p.cmdline()) else "other" for p in family}
    before = {p.pid: sum(p.cpu_times()[:2]) for p in family}
    flow_cpu = time.process_time()
    with Client(address) as client, get_task_stream(client) as stream:
        many(tasks)
    flow_cpu = time.process_time() - flow_cpu
    spent = {"server": 0.0, "worker": 0.0, "other": 0.0}
    for p in family:
        spent[role[p.pid]] += sum(p.cpu_times()[:2]) - before[p.pid]
    compute = [s["stop"] - s["start"] for d in stream.data for s in d["startstops"] if s["action"] == "compute"]
    ms = 1000 / tasks
    return {"worker_ms": round(1000 * statistics.median(compute), 1), "worker_cpu_ms": round(spent["worker"] * ms, 1),
            "server_cpu_ms": round(spent["server"] * ms, 1), "flow_cpu_ms": round(flow_cpu * ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=60)
    args = parser.parse_args()
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment(Path(tempfile.mkdtemp(prefix="nextdetail-overhead-")))  # before Prefect is imported
    from helpers import external_dask

    from nextdetail.pipeline.runtime import prefect_api

    out: dict[str, Any] = {"benchmark": "task_overhead", "tasks": args.tasks}
    with prefect_api():
        with external_dask(("w0", [])) as address:
            from distributed import Client

            with Client(address) as client:
                client.run(_per_task_settings)
            out["per_task_settings"] = measure(address, args.tasks)
        with external_dask(("w0", [])) as address:
            out["settings_once"] = measure(address, args.tasks)
    figure, baseline = out["settings_once"]["worker_ms"], out["per_task_settings"]["worker_ms"]
    out.update(figure=figure, baseline=baseline, ratio=round(figure / baseline, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
