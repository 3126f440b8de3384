"""Benchmark: what re-running the pipeline costs when little or nothing changed (the DVC/Dagster comparison).

Each measurement is a fresh `nextdetail` process, as a user or a scheduler would start it, on a fresh
storage root and a fresh Prefect home (ephemeral server):

- full_s            `nextdetail run` of the whole pipeline from nothing;
- noop_run_s        the same command again, every stage up to date (best of 3): it answers from the lineage
                    records without starting Prefect or Dask (`cache/current.py`);
- status_s          `nextdetail status` (best of 3; `dvc status` on a 7-stage pipeline: 1.2 s here);
- noop_ratio        noop_run_s / status_s (goal ≤ 1.5, and noop_run_s ≤ 1 s; `dvc repro` with nothing to do:
                    0.95 s here, or measured when `dvc` is installed in this environment: dvc_repro_noop_s);
- empty_flow_s      (best of 3) a process that starts the ephemeral Prefect server and runs an empty flow: what
                    every re-run paid before the no-op path, and what a run with one stage to do still pays;
- one_knob_s        `nextdetail run -o decompose.alpha=<other>`: decompose and what depends on it re-run
                    (`one_knob_trained_steps`: the training stages train every step again, resume nothing).

- identity_churn    for each of the last `--churn N` commits (40), computed from each commit's own tree (`git
                    archive`, no run): the stages whose code identity changes against the commit before, under
                    today's rule (a module's normalized syntax tree; modules outside computation excluded) and
                    under the rule before it (every imported file's bytes) — `commits_all_changed` vs its
                    baseline, and the commits that changed no stage.

    python benchmarks/rerun.py [--preset tiny] [--root DIR] [-o key=value …]
    python benchmarks/rerun.py --churn-only [--churn 40]      # identity_churn alone (seconds, no pipeline)

Prints one JSON line (figure = noop_run_s, baseline = 1.5 × status_s, ratio = figure / baseline) with the
stages that ran in each run, read from the run log.
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
from nextdetail.pipeline.runtime import configure_environment, prefect_api
configure_environment()
from prefect import flow
import nextdetail.pipeline.run

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


def dvc_noop(where: Path, env: dict[str, str]) -> float | None:
    """`dvc repro` with nothing to do on a one-stage pipeline (best of 3), when `dvc` is installed here; else None."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if dvc is None:
        return None
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=where, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=where, check=True)
    (where / "dvc.yaml").write_text("stages:\n  touch:\n    cmd: echo done > out.txt\n    outs: [out.txt]\n")
    subprocess.run([dvc, "repro", "-q"], cwd=where, check=True, env=env)

    def once() -> float:
        t0 = time.perf_counter()
        subprocess.run([dvc, "repro", "-q"], cwd=where, check=True, env=env, capture_output=True)
        return time.perf_counter() - t0

    return round(min(once() for _ in range(3)), 3)


def identity_churn(n: int = 40) -> dict[str, object]:
    """Per commit of the last `n` (oldest first): the stages (of either model branch) whose code identity differs
    from the commit before, under today's rule and under the bytes rule; computed from each commit's tree."""
    import tarfile
    import tempfile

    from nextdetail.conf import load_branches
    from nextdetail.pipeline.code import code_fingerprint
    from nextdetail.stages import REGISTRY
    from nextdetail.storage.hashing import stable_hash

    repo = Path(__file__).resolve().parents[1]
    log = subprocess.run(["git", "-C", str(repo), "log", f"-{n + 1}", "--format=%H%x09%s"], capture_output=True,
                         text=True, check=True).stdout.splitlines()[::-1]
    branches = load_branches("tiny", None, [], ["cart", "ndp"])
    entries = {(m, s): REGISTRY[s].entries(c) for m, c in branches.items() for s in REGISTRY}

    def identities(sha: str, where: Path) -> dict[str, dict[str, str | None]]:
        archive = subprocess.run(["git", "-C", str(repo), "archive", sha, "nextdetail"], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(where, filter="data")
        out: dict[str, dict[str, str | None]] = {}
        for rule in ("computation", "bytes"):
            out[rule] = {}
            for (model, stage), modules in entries.items():
                try:
                    out[rule][f"{model}:{stage}"] = stable_hash(code_fingerprint(modules, where / "nextdetail", rule))
                except ModuleNotFoundError:  # a stage module that commit did not have
                    out[rule][f"{model}:{stage}"] = None
        return out

    def changed(a: dict[str, str | None], b: dict[str, str | None]) -> list[str]:
        return [s for s in REGISTRY if any(a[f"{m}:{s}"] != b[f"{m}:{s}"] for m in branches)]

    rows, previous = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(log):
            sha, _, subject = line.partition("\t")
            now = identities(sha, Path(tmp) / str(i))
            if previous is not None:
                rows.append({"commit": sha[:7], "subject": subject[:80], "changed": changed(previous["computation"],
                             now["computation"]), "changed_bytes_rule": changed(previous["bytes"], now["bytes"])})
            previous = now
    every = len(REGISTRY)
    return {"commits": rows,
            "commits_all_changed": sum(len(r["changed"]) == every for r in rows),
            "commits_all_changed_bytes_rule": sum(len(r["changed_bytes_rule"]) == every for r in rows),
            "commits_none_changed": sum(not r["changed"] for r in rows),
            "commits_none_changed_bytes_rule": sum(not r["changed_bytes_rule"] for r in rows),
            "stage_changes": sum(len(r["changed"]) for r in rows),
            "stage_changes_bytes_rule": sum(len(r["changed_bytes_rule"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default="benchmarks/out/rerun", help="a fresh storage root (emptied first)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--churn", type=int, default=40, metavar="N", help="commits for identity_churn")
    parser.add_argument("--churn-only", action="store_true", help="print identity_churn alone")
    args = parser.parse_args()
    if args.churn_only:
        churn = identity_churn(args.churn)
        baseline = max(1, churn["stage_changes_bytes_rule"])
        print(json.dumps({"benchmark": "rerun", "figure": "identity_churn_stage_changes",
                          "value": churn["stage_changes"], "baseline": churn["stage_changes_bytes_rule"],
                          "ratio": round(churn["stage_changes"] / baseline, 3), "identity_churn": churn}))
        return

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
    # Processes of a fraction of a second on a shared 2-core machine: the best of 3 each.
    out["noop_run_s"] = min(timed([*nd, "run", "--no-progress", *config], env) for _ in range(3))
    out["noop_ran"] = stages_ran(root / "data")
    out["status_s"] = min(timed([*nd, "status", *config], env) for _ in range(3))
    out["noop_ratio"] = round(out["noop_run_s"] / out["status_s"], 3)
    out["empty_flow_s"] = min(timed([sys.executable, "-c", EMPTY_FLOW], env) for _ in range(3))
    out["dvc_repro_noop_s"] = dvc_noop(root / "dvc", env)
    knob = ["-o", f"decompose.alpha={alpha * 2:g}"]
    out["one_knob_status_s"] = timed([*nd, "status", *config, *knob], env)
    out["one_knob_s"] = timed([*nd, "run", "--no-progress", *config, *knob], env)
    out["one_knob_ran"] = stages_ran(root / "data")
    out["one_knob_trained_steps"] = trained_steps(root / "data")
    out["identity_churn"] = identity_churn(args.churn)
    baseline = round(1.5 * out["status_s"], 3)
    out.update(figure="noop_run_s", value=out["noop_run_s"], baseline=baseline,
               ratio=round(out["noop_run_s"] / baseline, 3), noop_goal_s=1.0, status_goal_s=1.0,
               dvc_reference={"status_s": 1.2, "repro_noop_s": out["dvc_repro_noop_s"] or 0.95,
                              "measured": out["dvc_repro_noop_s"] is not None})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
