"""Benchmark: what re-running the pipeline costs when little or nothing changed (the DVC/Dagster comparison).

Each measurement is a fresh `nextdetail` process, as a user or a scheduler would start it, on a fresh
storage root and a fresh Prefect home (ephemeral server):

- full_s            `nextdetail run` of the whole pipeline from nothing;
- unchanged_s       the same command again: every stage up to date (best of 3);
- empty_flow_s      (best of 3) a process with the same set-up (the CLI's imports, the ephemeral Prefect server) that runs
                    an empty Prefect flow — the floor any Prefect-driven re-run pays;
- unchanged_overhead_s = unchanged_s − empty_flow_s   (goal ≤ 2 s; `dvc repro` with nothing to do: 0.95 s here);
- status_s          `nextdetail status` (goal ≤ 1 s; `dvc status` on a 7-stage pipeline: 1.2 s here);
- one_knob_s        `nextdetail run -o decompose.alpha=<other>`: decompose and what depends on it re-run
                    (`one_knob_trained_steps`: the training stages train every step again, resume nothing).

    python benchmarks/rerun.py [--preset tiny] [--root DIR] [-o key=value …]

Prints one JSON line (figure = unchanged_overhead_s, baseline = its 2 s goal, ratio = figure / baseline) with
the stages that ran in each run, read from the run log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EMPTY_FLOW = """
import nextdetail.cli
from nextdetail.flows.runtime import configure_environment, prefect_api
configure_environment()
from prefect import flow
import nextdetail.flows.pipeline

@flow(name="empty")
def empty():
    return None

with prefect_api():
    empty()
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"rerun benchmark: {' '.join(cmd[:3])}… failed:\n{out.stderr[-3000:]}")
    return round(seconds, 3)


def stages_ran(root: Path) -> list[str]:
    """The stages the newest run computed (not up to date), from the Parquet run log."""
    import pyarrow.parquet as pq

    newest = sorted((root / "lineage" / "runs").glob("*.parquet"))[-1]
    return [r["stage"] for r in pq.read_table(newest).to_pylist() if r["work"] != "up to date"]


def trained_steps(root: Path) -> dict[str, int]:
    """Steps each training stage of the newest run actually trained (steps − resumed_from, from its marker):
    a knob upstream of training must retrain from step 0, not resume another training's checkpoints."""
    import pyarrow.parquet as pq

    newest = sorted((root / "lineage" / "runs").glob("*.parquet"))[-1]
    out = {}
    for r in pq.read_table(newest).to_pylist():
        if r["stage"] in ("train_tokenizer", "train_ar") and r["work"] != "up to date":
            summary = json.loads((Path(r["url"]) / "_COMPLETE.json").read_text())["summary"]
            out[r["stage"]] = summary["steps"] - summary["resumed_from"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default="benchmarks/out/rerun", help="a fresh storage root (emptied first)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    root = Path(args.root).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the ephemeral server, as `make run` uses
    nd = [str(Path(sys.executable).parent / "nextdetail")]
    config = ["--preset", args.preset, "-o", f"storage.root={root / 'data'}",
              *[a for o in args.override for a in ("-o", o)]]

    from nextdetail.conf import load_config

    alpha = load_config(args.preset, overrides=args.override).decompose.alpha
    out: dict[str, object] = {"benchmark": "rerun", "preset": args.preset, "overrides": args.override}
    out["full_s"] = timed([*nd, "run", "--no-progress", *config], env)
    out["full_ran"] = stages_ran(root / "data")
    # Both sides of the overhead are processes of ~10 s on a shared 2-core machine: the best of 3 each.
    out["unchanged_s"] = min(timed([*nd, "run", "--no-progress", *config], env) for _ in range(3))
    out["unchanged_ran"] = stages_ran(root / "data")
    out["empty_flow_s"] = min(timed([sys.executable, "-c", EMPTY_FLOW], env) for _ in range(3))
    out["unchanged_overhead_s"] = round(out["unchanged_s"] - out["empty_flow_s"], 3)
    out["status_s"] = min(timed([*nd, "status", *config], env) for _ in range(3))
    knob = ["-o", f"decompose.alpha={alpha * 2:g}"]
    out["one_knob_status_s"] = timed([*nd, "status", *config, *knob], env)
    out["one_knob_s"] = timed([*nd, "run", "--no-progress", *config, *knob], env)
    out["one_knob_ran"] = stages_ran(root / "data")
    out["one_knob_trained_steps"] = trained_steps(root / "data")
    out.update(figure="unchanged_overhead_s", value=out["unchanged_overhead_s"], baseline=2.0,
               ratio=round(out["unchanged_overhead_s"] / 2.0, 3), status_goal_s=1.0,
               dvc_reference={"status_s": 1.2, "repro_noop_s": 0.95})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
