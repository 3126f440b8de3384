"""Benchmark: evaluate on 2 Dask workers with a split reference extracted one task per tar (as up to session 27)
against one task per group of tars (`reference_stats.tar_groups`, ≥ `IMAGES_PER_TASK` images each) — what fewer
task runs buy on this machine's 2 cores.

On a root built once (the tiny preset through train_ar, short trainings, as `benchmarks/scale.py` builds it), one
external `dask scheduler` with 2 `dask worker --nthreads 1 --resources GPU=1` processes (their imports done first)
runs the evaluate stage with `eval.resources={GPU: 1}`, `eval.classes_per_task=1` and fresh reference statistics
each time, alternately per tar (`IMAGES_PER_TASK` = 1: every tar its own group) and grouped (the default), every
other pair in the reverse order so that the machine's drift falls on both alike; the first pair warms up and is not
counted. Reported: each run's seconds and CPU seconds by process role (`scale.cpu_between`), and the medians.

    PYTHONPATH=. python benchmarks/reference_groups.py [--pairs N]

Prints one JSON line: figure = grouped median seconds, baseline = per-tar median seconds, ratio = figure / baseline
(below 1: faster), with the reference tasks each way and every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="counted pairs (after one warm-up pair)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nextdetail-refgroups-"))
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment(work)  # before Prefect is imported: its chatter stays off the terminal
    import scale
    from helpers import external_dask

    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.pipeline.runtime import prefect_api
    from nextdetail.stages.evaluate import reference_stats

    root = work / "root"
    base = scale.config(root, "tokenizer.order=0")
    with prefect_api():
        up = run_pipeline(base, until="train_ar", progress=False)
    spec = reference_stats.reference_spec(base.eval.reference, up["shard"].url, up["shard"].identity,
                                          base.shard.image_format, base.storage.options, base.eval.reference_max)
    tars = spec.tars()
    arms = {"per_tar": 1, "grouped": reference_stats.IMAGES_PER_TASK}
    out: dict[str, Any] = {"benchmark": "reference_groups", "reference_images": sum(len(k) for _, k in tars),
                           **{f"{arm}_tasks": len(reference_stats.tar_groups(tars, at_least))
                              for arm, at_least in arms.items()}}
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {arm: [] for arm in arms}
    upstream = {k: up[k] for k in ("shard", "train_tokenizer", "tokenize", "train_ar")}
    with external_dask(*scale.workers(2)) as address:
        scale.warm_imports(address)
        scale.warm_flow_imports(base)
        for pair in range(args.pairs + 1):
            order = list(arms) if pair % 2 == 0 else list(reversed(arms))
            for arm in order:
                reference_stats.IMAGES_PER_TASK = arms[arm]  # read by `tar_groups` when the flow plans
                cfg = scale.config(root, "tokenizer.order=0", f"dask.address={address}", "eval.resources={GPU: 1}",
                                   "eval.classes_per_task=1", f"eval.reference_cache={work / f'refstats-{arm}-{pair}'}")
                evaluated, seconds, cpu, _ = scale.run_stage_on(address, cfg, "evaluate", upstream)
                shutil.rmtree(evaluated.url)  # the next run evaluates again (same identity)
                if pair:
                    runs[arm].append((round(seconds, 2), cpu))
            print(f"reference_groups: pair {pair}/{args.pairs}", file=sys.stderr)
    reference_stats.IMAGES_PER_TASK = arms["grouped"]
    for arm, measured in runs.items():
        out[f"{arm}_runs_s"] = [s for s, _ in measured]
        out[f"{arm}_s"] = statistics.median(s for s, _ in measured)
        for role in ("prefect_server", "flow", "workers"):
            out[f"{arm}_{role}_cpu_s"] = round(statistics.median(c.get(role, 0.0) for _, c in measured), 2)
    out.update(figure=out["grouped_s"], baseline=out["per_tar_s"], ratio=round(out["grouped_s"] / out["per_tar_s"], 3))
    print(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
