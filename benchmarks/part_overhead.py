"""Benchmark: what one part of a fan-out costs beside its work on a Dask cluster — a Prefect task run, or a plain Dask
task as parts now run (issue 40).

A flow on the pipeline's Dask task runner (`runtime.dask_task_runner`) fans out `--parts` trivial stage-task parts
(each publishes an artifact of one small file, as a tar's part does) to one external `dask worker --nthreads 1`
(`parts.fan_out`), both ways in one run, `--repeat` times each, interleaved, after a warm-up of each:

- baseline  each part a Prefect task run (the runner without `submit_part`: `task.submit`, as until session 29);
- figure    each part a plain Dask task (`submit_part` → `runtime._run_pickled_part`), the flow run keeping one
            progress artifact of them.

Per part (medians over the repeats): the flow's wall time, and the CPU of the Prefect server, the worker process,
the flow's process and the scheduler from the flow's start until all of them are idle again (the server records
task runs from a queue after the flow has returned); each measurement starts on an idle machine. On a cluster
they sit on different machines; on one small machine they share its cores.

    PYTHONPATH=. python benchmarks/part_overhead.py [--parts N] [--repeat N]

Prints one JSON line: figure = CPU ms per part, all processes, as Dask tasks; baseline = as task runs; ratio =
figure / baseline (lower is better).
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

ROLES = {"server": "prefect_server", "worker": "workers", "flow": "flow", "scheduler": "scheduler"}  # scale.py's


def settle(quiet_cpu_s: float = 0.02, every_s: float = 0.5, at_most_s: float = 60.0) -> None:
    """Wait until this process and its children spend under `quiet_cpu_s` CPU-s per `every_s`, twice in a row: the
    Prefect server's backlog of events from the run before is not counted against the next."""
    from scale import cpu_by_pid

    def cpu() -> float:
        return sum(seconds for _, seconds in cpu_by_pid().values())

    quiet, last, deadline = 0, cpu(), time.monotonic() + at_most_s
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(every_s)
        now = cpu()
        quiet, last = (quiet + 1 if now - last < quiet_cpu_s else 0), now


def measure(address: str, parts: int, as_task_runs: bool, root: Path) -> dict[str, float]:
    """One flow run of `parts` trivial parts on the cluster at `address` → per part: wall ms and CPU ms by role."""
    from prefect import flow
    from scale import cpu_between, cpu_by_pid

    from nextdetail.pipeline.artifacts import Artifact
    from nextdetail.pipeline.parts import fan_out
    from nextdetail.pipeline.runtime import dask_task_runner
    from nextdetail.pipeline.tasks import stage_task
    from nextdetail.storage.fs import Store

    @stage_task(name="small_part")
    def small_part(artifact: Artifact) -> tuple[dict[str, Any], list[str]]:
        artifact.store.write_bytes("part.bin", b"x" * 1024)
        return {"bytes": 1024}, ["part.bin"]

    runner = dask_task_runner(address)
    if as_task_runs:
        runner = type("TaskRunParts", (type(runner),), {"submit_part": None})(address=address)

    @flow(task_runner=runner, persist_result=False)
    def fan(where: str) -> int:
        _, ran, _ = fan_out(small_part, [(i, (Artifact("bench", f"p{i}", Store(f"{where}/p{i}")),))
                                         for i in range(parts)], desc="bench", unit="part", progress=False)
        return len(ran)

    settle()
    before = cpu_by_pid()
    t0 = time.perf_counter()
    assert fan(str(root / f"{time.time_ns()}")) == parts
    wall = time.perf_counter() - t0
    settle()  # the server records task runs from its queue after the flow has returned: counted here
    spent = cpu_between(before, cpu_by_pid())
    ms = 1000 / parts
    out = {"wall_ms": round(wall * ms, 1), **{f"{r}_cpu_ms": round(spent.get(role, 0.0) * ms, 1)
                                               for r, role in ROLES.items()}}
    out["cpu_ms"] = round(sum(out[f"{r}_cpu_ms"] for r in ROLES), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from nextdetail.pipeline.runtime import configure_environment

    work = Path(tempfile.mkdtemp(prefix="nextdetail-parts-"))
    configure_environment(work)  # before Prefect is imported
    from helpers import external_dask

    from nextdetail.pipeline.runtime import prefect_api

    runs: dict[str, list[dict[str, float]]] = {"task_runs": [], "dask_tasks": []}
    with prefect_api(), external_dask(("w0", [])) as address:
        for as_task_runs in (True, False):  # warm-up: imports, the worker's first flow context
            measure(address, args.parts, as_task_runs, work)
        for attempt in range(args.repeat):
            for way in (("task_runs", "dask_tasks") if attempt % 2 == 0 else ("dask_tasks", "task_runs")):
                runs[way].append(measure(address, args.parts, way == "task_runs", work))
    out: dict[str, Any] = {"benchmark": "part_overhead", "parts": args.parts, "repeat": args.repeat}
    for way, measured in runs.items():
        out[way] = {k: round(statistics.median(m[k] for m in measured), 1) for k in measured[0]}
        out[f"{way}_cpu_ms_runs"] = [m["cpu_ms"] for m in measured]
    figure, baseline = out["dask_tasks"]["cpu_ms"], out["task_runs"]["cpu_ms"]
    out.update(figure=figure, baseline=baseline, ratio=round(figure / baseline, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
