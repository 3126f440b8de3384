"""Benchmark: the GPU stages on 1 and 2 Dask workers of this machine (issue 40) — what fanning out buys.

On a root built once (the tiny preset through train_ar, short trainings), each measurement runs one stage on an
external `dask scheduler` with N `dask worker --nthreads 1 --resources GPU=1` processes started here, their
imports (torch, the stage modules) done first as on a cluster that has served before (`workers_<n>_import_s`:
that cold start, ≈ 4 s, paid once per worker process):

- tokenize_*     `tokens.resources={GPU: 1}`: one task per tar (a fresh token cache each time) — images/s;
- evaluate_*     `eval.resources={GPU: 1}`: one task per class group and per reference tar, then the merge
                 (fresh outputs and reference statistics each time) — generated images/s over the whole stage;
- split_loop_*   the ceiling: the same tokenizer encoding loop on every image, in one process vs split in two
                 processes by hand (one torch thread each, no Prefect, no Dask): what two cores give a perfect split
                 (`<stage>_of_ceiling`: a stage's speedup over it);
- train_*        `ar.nodes=1` vs `ar.nodes=2` (one rank per worker, workers on 127.0.0.1 and 127.0.0.2, a c10d
                 rendezvous, gloo): tokens/s of the same global batches.

`speedup` = 1-worker seconds / 2-worker seconds; `ceiling` = split_loop's speedup; `<stage>_<n>_flow_cpu_s` = the CPU
the flow's own process spent orchestrating (Prefect task runs, planning, publishing), taken from the same two cores
here (on a cluster the CLI runs on a login node). The goal (issue 40): tokenize
and evaluate ≥ 1.7× on 2 cores. With a GPU lent, `PYTHONPATH=. python benchmarks/gpu.py` gives images/s per GPU.

    PYTHONPATH=. python benchmarks/scale.py [--root DIR] [-o key=value …]

Each stage (and the split loop) is timed `--repeat` times (default 3) and the fastest run counts, every run listed
beside it (`*_runs_s`, `ceiling_runs`): this machine's second core is shared, and one run's ceiling measured 1.71×,
the next 1.92×.

Prints one JSON line: figure = the smaller of tokenize's and evaluate's speedups, baseline = 1.7, ratio = figure /
baseline, and every number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

QUICK = ("tokenizer.steps=40", "tokenizer.checkpoint_every=40", "ar.steps=40", "ar.checkpoint_every=40",
         "ar.log_every=10", "eval.checkpoints=last", "eval.rfid=false", "sample.upscale=1")
TRAIN = ("ar.class_dropout=0", "ar.drop_path=0")


def config(root: Path, *overrides: str) -> Any:
    from nextdetail.conf import load_config

    return load_config("tiny", overrides=[f"storage.root={root}", *QUICK, *overrides])


def workers(n: int, distinct_hosts: bool = False) -> list[tuple[str, list[str]]]:
    hosts = [f"127.0.0.{i + 1}" if distinct_hosts else "127.0.0.1" for i in range(n)]
    return [(f"w{i}", ["--resources", "GPU=1", "--host", host]) for i, host in enumerate(hosts)]


ORCHESTRATION: dict[str, float] = {}  # CPU seconds of this (the flow's) process per stage, on the workers' cores


def run_stage_on(address: str, cfg: Any, stage: str, up: dict[str, Any]) -> tuple[Any, float]:
    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import prefect_api

    with prefect_api():
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = run_stage(cfg, stage, up, progress=False, scheduler=address)
        ORCHESTRATION[stage] = ORCHESTRATION.get(stage, 0.0) + time.process_time() - cpu0
        return result, time.perf_counter() - t0


STAGE_MODULES = ("torch", "nextdetail.stages.tokenize.tasks", "nextdetail.stages.evaluate.tasks",
                 "nextdetail.stages.train_ar.tasks", "nextdetail.stages.sample.tasks",
                 "nextdetail.models.feature_extractor", "scipy.linalg")  # the last two: evaluate's lazy imports
                 # (torch-fidelity, torchvision: 1.9 s, once per worker process, in its first feature task)


def warm_imports(address: str) -> float:
    """Import what the stages' tasks need on every worker, as a long-lived cluster has (a fresh worker process
    spends ≈ 4 s importing torch and the stage modules before its first task): the stages are then timed as they
    run on a cluster that has served before. Returns the seconds the imports took (the cold start)."""
    import importlib

    from distributed import Client

    with Client(address) as client:
        t0 = time.perf_counter()
        client.run(lambda: [importlib.import_module(m) for m in STAGE_MODULES] and None)
        return round(time.perf_counter() - t0, 2)


def _encode_share(args: tuple[dict, int, int]) -> float:
    """One process's share of the split loop: its images through the tokenizer, one torch thread."""
    import torch

    torch.set_num_threads(1)
    spec, rank, world = args
    from nextdetail.stages.tokenize.tasks import TokenInputs, encode_images, load_tokenizer
    from nextdetail.storage.fs import Store
    from nextdetail.storage.shards import read_tar_images

    inputs = TokenInputs(**spec["inputs"])
    model = load_tokenizer(inputs, "cpu")
    store = Store(inputs.shards_url)
    jobs = spec["jobs"][rank::world]
    images = [read_tar_images(store, tar, tuple(keys), "png") for tar, keys in jobs]
    t0 = time.perf_counter()
    for batch in images:
        encode_images(model, batch, None, ["none", "hflip"], 64, "cpu")
    return time.perf_counter() - t0


def split_loop(inputs: Any, jobs: list[tuple[str, list[str]]]) -> dict[str, float]:
    """The encoding loop without a framework: one process, then two processes each doing every other tar."""
    from dataclasses import asdict

    spec = {"inputs": {**asdict(inputs), "factors_url": None}, "jobs": jobs}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = max(pool.map(_encode_share, [(spec, 0, 1)]))
    with ctx.Pool(2) as pool:
        two = max(pool.map(_encode_share, [(spec, r, 2) for r in range(2)]))
    return {"split_loop_1_s": round(one, 2), "split_loop_2_s": round(two, 2), "ceiling": round(one / two, 2)}


def record(out: dict[str, Any], name: str, seconds: float, flow_cpu: float, images: int) -> None:
    """One timed run of a stage: every run in `<name>_runs_s`; `<name>_s` (and its images/s, flow CPU) the fastest."""
    runs = out.setdefault(f"{name}_runs_s", [])
    runs.append(round(seconds, 2))
    if runs[-1] <= min(runs):
        out[f"{name}_s"], out[f"{name}_images_per_s"] = round(seconds, 2), round(images / seconds, 1)
        out[f"{name}_flow_cpu_s"] = round(flow_cpu, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each stage and of the split loop; the "
                        "fastest counts (this machine's second core is shared: one run's ceiling was 1.71×, the "
                        "next 1.92×)")
    args = parser.parse_args()
    import tempfile

    from nextdetail.pipeline.runtime import configure_environment

    work = Path(tempfile.mkdtemp(prefix="nextdetail-scale-"))
    configure_environment(work)  # before Prefect is imported: its chatter stays off the terminal
    from helpers import external_dask

    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.pipeline.runtime import prefect_api

    root = args.root or work / "root"
    base = config(root, "tokenizer.order=0", *args.overrides)  # order 0: tokenize reads no factors (decompose skipped)
    with prefect_api():
        t0 = time.perf_counter()
        up = run_pipeline(base, until="train_ar", progress=False)
    out: dict[str, Any] = {"benchmark": "scale", "cores": os.cpu_count(), "setup_s": round(time.perf_counter() - t0, 1)}
    images = up["tokenize"].summary["images"]
    print(f"scale: root built in {out['setup_s']} s ({images} images)", file=sys.stderr)

    from nextdetail.stages.tokenize.flow import token_inputs

    inputs = token_inputs(base, up["shard"], None, up["train_tokenizer"])
    rows = up["tokenize"].open().index().select(["shard", "key"]).to_pylist()
    jobs: dict[str, list[str]] = {}
    for r in rows:
        jobs.setdefault(r["shard"], []).append(r["key"])
    loops = [split_loop(inputs, sorted(jobs.items())) for _ in range(args.repeat)]
    one, two = (min(loop[f"split_loop_{k}_s"] for loop in loops) for k in (1, 2))
    out.update(split_loop_1_s=one, split_loop_2_s=two, ceiling=round(one / two, 2),
               ceiling_runs=[loop["ceiling"] for loop in loops])

    for n in (1, 2):
        with external_dask(*workers(n)) as address:
            out[f"workers_{n}_import_s"] = warm_imports(address)
            for attempt in range(args.repeat):  # a fresh token cache and fresh evaluation outputs each time
                cfg = config(root, "tokenizer.order=0", *args.overrides, f"dask.address={address}",
                             "tokens.resources={GPU: 1}", f"tokens.cache={work / f'tokens-{n}-{attempt}'}")
                result, seconds = run_stage_on(address, cfg, "tokenize", {k: up[k] for k in (
                    "shard", "train_tokenizer")} | {"decompose": None})
                assert result.summary["content_sha256"] == up["tokenize"].summary["content_sha256"]
                record(out, f"tokenize_{n}", seconds, ORCHESTRATION.pop("tokenize"), images)

                cfg = config(root, "tokenizer.order=0", *args.overrides, f"dask.address={address}",
                             "eval.resources={GPU: 1}", "eval.classes_per_task=1",
                             f"eval.reference_cache={work / f'refstats-{n}-{attempt}'}")
                evaluated, seconds = run_stage_on(address, cfg, "evaluate", {k: up[k] for k in (
                    "shard", "train_tokenizer", "tokenize", "train_ar")})
                shutil.rmtree(evaluated.url)  # the next attempt evaluates again (same identity)
                record(out, f"evaluate_{n}", seconds, ORCHESTRATION.pop("evaluate"), evaluated.summary["samples"])
            print(f"scale: {n} worker(s): tokenize {out[f'tokenize_{n}_runs_s']} s, evaluate "
                  f"{out[f'evaluate_{n}_runs_s']} s", file=sys.stderr)
    for stage in ("tokenize", "evaluate"):
        out[f"{stage}_speedup"] = round(out[f"{stage}_1_s"] / out[f"{stage}_2_s"], 2)
        out[f"{stage}_of_ceiling"] = round(out[f"{stage}_speedup"] / out["ceiling"], 2)

    for nodes in (1, 2):
        with external_dask(*workers(nodes, distinct_hosts=True)) as address:
            warm_imports(address)
            cfg = config(root, "tokenizer.order=0", *args.overrides, *TRAIN, f"dask.address={address}",
                         "ar.resources={GPU: 1}", f"ar.nodes={nodes}", "ar.torch_threads=1")
            trained, seconds = run_stage_on(address, cfg, "train_ar", {k: up[k] for k in (
                "shard", "train_tokenizer", "tokenize")})
            shutil.rmtree(trained.url)
            out[f"train_{nodes}_nodes_s"] = round(seconds, 2)
            out[f"train_{nodes}_nodes_tokens_per_s"] = trained.summary["tokens_per_s"]
    out["train_speedup"] = round(out["train_2_nodes_tokens_per_s"] / out["train_1_nodes_tokens_per_s"], 2)

    figure = min(out["tokenize_speedup"], out["evaluate_speedup"])  # the goal is for both
    out.update(figure=figure, baseline=1.7, ratio=round(figure / 1.7, 3))
    print(json.dumps(out))
    if args.root is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
