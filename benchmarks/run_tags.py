"""Benchmark: what the run's tags cost a task run (issue 40).

`nextdetail run` tags its runs (`preset:…`, `model:…`, `commit:…`); for every task run carrying tags, Prefect's task
engine asks the API for a tag concurrency slot. Since session 27 task runs are created untagged
(`runtime.untagged_threads`, and the Dask runner likewise). Here `--tasks` trivial task runs go, one after another,
through a stage's task runner under the run's tags, each way in its own process with its own ephemeral Prefect
server, `--repeat` interleaved pairs:

- baseline  task runs tagged as before (the task carries the run's tags itself, so the runners keep them);
- figure    task runs untagged, as the pipeline runs them now.

For both the in-process runner (`where=threads`) and one external `dask worker` (`where=dask`): wall ms per task run
and the Prefect server's CPU ms per task run (medians).

    PYTHONPATH=. python benchmarks/run_tags.py [--tasks N] [--repeat N]

Prints one JSON line: figure = wall ms per task run in threads untagged, baseline = tagged, ratio = figure / baseline
(lower is better); the Dask and server numbers beside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE = r'''
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from nextdetail.pipeline.runtime import configure_environment
configure_environment(Path(tempfile.mkdtemp()))
import psutil
from helpers import external_dask
from prefect import flow, tags, task
from prefect.task_runners import ThreadPoolTaskRunner
from nextdetail.pipeline.runtime import dask_task_runner, prefect_api, untagged_threads

n, tagged, where = int(sys.argv[1]), sys.argv[2] == "tagged", sys.argv[3]
RUN_TAGS = ("preset:tiny", "model:cart", "commit:abc")

@task(persist_result=False)
def echo(i):
    return i

job = echo.with_options(tags=set(RUN_TAGS)) if tagged else echo
with prefect_api(), tags(*RUN_TAGS), external_dask(("w0", [])) as address:
    runner = dask_task_runner(address) if where == "dask" else untagged_threads(ThreadPoolTaskRunner(max_workers=1))

    @flow(task_runner=runner, persist_result=False)
    def many(k):
        return [job.submit(i).result() for i in range(k)]

    many(5)  # warm-up
    time.sleep(2)
    server = next(p for p in psutil.Process().children(recursive=True) if "--lifespan" in " ".join(p.cmdline()))
    cpu0, t0 = sum(server.cpu_times()[:2]), time.perf_counter()
    many(n)
    wall = time.perf_counter() - t0
    time.sleep(3)  # the server finishes recording
    server_ms = 1000 * (sum(server.cpu_times()[:2]) - cpu0) / n
    print("RESULT", json.dumps({"wall_ms": 1000 * wall / n, "server_cpu_ms": server_ms}))
'''


def once(tasks: int, tagged: bool, where: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own ephemeral server
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", ONE, str(tasks), "tagged" if tagged else "untagged", where,
                          str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"run_tags: a measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeat):
        for where in ("threads", "dask"):
            for tagged in (True, False):
                runs.setdefault(f"{where}_{'tagged' if tagged else 'untagged'}", []).append(once(args.tasks, tagged, where))
    out: dict[str, object] = {"benchmark": "run_tags", "cores": os.cpu_count(), "tasks": args.tasks}
    for name, rows in runs.items():
        for key in ("wall_ms", "server_cpu_ms"):
            out[f"{name}_{key}"] = round(statistics.median(r[key] for r in rows), 1)
            out[f"{name}_{key}_runs"] = [round(r[key], 1) for r in rows]
    figure, baseline = out["threads_untagged_wall_ms"], out["threads_tagged_wall_ms"]
    out.update(figure=figure, baseline=baseline, ratio=round(figure / baseline, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
