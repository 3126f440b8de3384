"""Identities a team can trust: code fingerprints derived from imports (never under what a stage loads), edits
that invalidate exactly the stages that run the edited code, downstream keyed on weights, and no code
executed from storage."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, config_overrides, make_config, run_cli

import nextdetail
from nextdetail.conf import STAGES
from nextdetail.conf.code import code_fingerprint, modules_of
from nextdetail.conf.stages import SPECS
from nextdetail.errors import UserError
from nextdetail.flows.pipeline import run_pipeline
from nextdetail.flows.runtime import prefect_api

PACKAGE = Path(nextdetail.__file__).parent

# Run in a fresh interpreter: the stage's upstream results and key are built, every nextdetail module is then
# dropped from sys.modules, and the stage's flow is imported and run: what it loads is exactly its own code.
TRACE = r"""
import dataclasses, importlib, json, sys
job = json.load(open(sys.argv[1]))
from nextdetail.conf import load_config
from nextdetail.conf.stages import SPECS, key_of
from nextdetail.stages import results as R
stage = job["stage"]
cfg = load_config("tiny", overrides=job["overrides"])
upstream = {u: getattr(R, cls)(**fields) for u, (cls, fields) in job["upstream"].items()}
key = key_of(cfg, stage, upstream)
fingerprint = sorted(SPECS[stage].code(cfg))
from nextdetail.flows.runtime import prefect_api  # the harness's, not the stage's
for name in [m for m in sys.modules if m == "nextdetail" or m.startswith("nextdetail.")]:
    del sys.modules[name]
runner = getattr(importlib.import_module(f"nextdetail.flows.{stage}"), f"run_{stage}")
with prefect_api():
    result = runner(cfg, key, *[upstream[u] for u in SPECS[stage].upstream], progress=False)
loaded = sorted(m for m in sys.modules if m == "nextdetail" or m.startswith("nextdetail."))
json.dump({"loaded": loaded, "fingerprint": fingerprint, "work": getattr(result, "work", None)},
          open(sys.argv[2], "w"))
"""


def test_each_stage_loads_only_code_its_fingerprint_holds(pipeline, tmp_path):
    """Each stage's flow, run for real (into a fresh root, on the session pipeline's upstream artifacts) in a
    subprocess: every nextdetail module it loads is in the fingerprint derived from its imports."""
    _, cfg, results = pipeline
    for stage in STAGES:
        out = tmp_path / stage
        job = {"stage": stage, "overrides": config_overrides(out, cfg.data.source, *FAST),
               "upstream": {u: (type(results[u]).__name__, dataclasses.asdict(results[u]))
                            for u in SPECS[stage].upstream}}
        (tmp_path / f"{stage}.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-c", TRACE, str(tmp_path / f"{stage}.json"), str(out) + ".out"],
                              capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        traced = json.loads(Path(str(out) + ".out").read_text())
        derived = modules_of(dict.fromkeys(traced["fingerprint"]))
        missing = set(traced["loaded"]) - derived
        assert not missing, f"{stage} ran code its identity does not hash: {sorted(missing)}"
        assert f"nextdetail.flows.{stage}" in traced["loaded"]
    fp = {s: set(code_fingerprint(SPECS[s].entries(cfg))) for s in STAGES}
    assert "nextdetail/models/_at_cpu.cpp" in fp["decompose"]  # the compiled solver's source is code too
    assert all("nextdetail/models/_at_cpu.cpp" not in fp[s] for s in STAGES if s != "decompose")
    assert "nextdetail/models/quadtree.py" in fp["train_tokenizer"]  # truncation training
    assert all("nextdetail/models/sampler.py" not in fp[s] for s in ("train_tokenizer", "tokenize", "train_ar"))


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the nextdetail package (the code a teammate edits); PYTHONPATH=<returned> runs it."""
    where = tmp_path / "src"
    shutil.copytree(PACKAGE, where / "nextdetail", ignore=shutil.ignore_patterns("__pycache__"))
    return where


FINGERPRINTS = r"""
import json, sys
import nextdetail
from nextdetail.conf import load_branches
from nextdetail.conf.stages import SPECS
from nextdetail.storage.hashing import stable_hash
branches = load_branches("tiny", None, [], ["cart", "ndp"])
print(json.dumps({"package": nextdetail.__file__, "code": {m: {s: stable_hash(SPECS[s].code(c)) for s in SPECS}
                                                            for m, c in branches.items()}}))
"""


def _fingerprints(src: Path | None) -> dict:
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    # cwd: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", FINGERPRINTS], capture_output=True, text=True, env=env, check=True,
                         cwd=src.parent if src else None)
    found = json.loads(out.stdout)
    assert Path(found["package"]).parent == (src / "nextdetail" if src else PACKAGE)
    return found["code"]


def _changed(before: dict, after: dict) -> dict[str, list[str]]:
    return {m: [s for s in STAGES if before[m][s] != after[m][s]] for m in before}


@pytest.mark.fast
def test_an_edit_invalidates_exactly_the_stages_that_run_the_edited_file(tmp_path):
    src = _copy_package(tmp_path)
    before = _fingerprints(src)
    assert before == _fingerprints(None)  # the copy is the same code

    figures = src / "nextdetail" / "figures.py"
    figures.write_text(figures.read_text() + "\n# a comment\n")
    after = _fingerprints(src)
    users = ["train_tokenizer", "tokenize", "train_ar", "sample", "evaluate"]  # they draw PNGs; shard, decompose don't
    assert _changed(before, after) == {"cart": users, "ndp": users}

    figures.write_text(figures.read_text().removesuffix("\n# a comment\n"))
    sampler = src / "nextdetail" / "models" / "ndp_sampler.py"
    sampler.write_text(sampler.read_text() + "\n# a comment\n")
    assert _changed(before, _fingerprints(src)) == {"cart": [], "ndp": ["sample", "evaluate"]}


def test_a_comment_in_the_compiled_solver_makes_decompose_stale_and_run_rebuilds_it(tmp_path, embedded_source):
    root = tmp_path / "root"
    cfg = make_config(root, embedded_source, *FAST)
    with prefect_api():
        first = run_pipeline(cfg, until="decompose", progress=False)
    src = _copy_package(tmp_path)
    cpp = src / "nextdetail" / "models" / "_at_cpu.cpp"
    cpp.write_text(cpp.read_text() + "\n// a comment\n")
    env = {**os.environ, "PYTHONPATH": str(src), "PREFECT_LOGGING_LEVEL": "WARNING"}
    base = [sys.executable, "-m", "nextdetail.cli"]
    args = ["--preset", "tiny", *[a for o in config_overrides(root, embedded_source, *FAST) for a in ("-o", o)]]
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, cwd=tmp_path)  # see above
    status = run([*base, "status", "--json", *args])
    assert status.returncode == 0, status.stderr
    states = {s["stage"]: s for s in json.loads(status.stdout)}
    assert states["shard"]["state"] == "up to date"
    assert states["decompose"]["state"] == "stale"
    assert states["decompose"]["reasons"] == ["code changed: nextdetail/models/_at_cpu.cpp"]
    rebuild = run([*base, "run", "--until", "decompose", "--no-progress", *args])
    assert rebuild.returncode == 0, rebuild.stderr[-3000:]
    again = run([*base, "status", "--json", *args])
    rebuilt = {s["stage"]: s for s in json.loads(again.stdout)}["decompose"]
    assert rebuilt["state"] == "up to date"
    assert rebuilt["identity"] != first.identities["decompose"]
    assert rebuilt["artifact"]["identity"] != first["decompose"].identity


def test_retrained_weights_under_the_same_identity_resample_and_reevaluate(tmp_path, embedded_source):
    """Two processes (torchrun, gloo) train the same identity to other float bits: sample and evaluate key on
    the weights' sha256, so they are rebuilt; a forced retrain to the same bytes leaves them up to date."""
    root = tmp_path / "root"
    cfg = make_config(root, embedded_source, *FAST)
    with prefect_api():
        first = run_pipeline(cfg, progress=False)
        same = run_pipeline(cfg, progress=False, force=["train_ar"])
        assert same.work["train_ar"] == "ran"
        assert same["train_ar"].summary["weights_sha256"] == first["train_ar"].summary["weights_sha256"]
        assert same.work["sample"] == same.work["evaluate"] == "up to date"
        two = make_config(root, embedded_source, *FAST, "ar.nproc=2")
        other = run_pipeline(two, progress=False, force=["train_ar"])
    assert other.identities["train_ar"] == first.identities["train_ar"]  # the process count is how it runs
    assert other["train_ar"].summary["weights_sha256"] != first["train_ar"].summary["weights_sha256"]
    for stage in ("sample", "evaluate"):
        assert other.work[stage] == "ran"
        assert other[stage].identity != first[stage].identity


class _Planted:
    """Unpickling this creates a file: what a tampered file on a shared bucket could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_pickle_is_refused_at_every_load_and_never_runs(tmp_path, pipeline):
    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.storage.checkpoints import load_checkpoint
    from nextdetail.storage.fs import Store
    from nextdetail.tasks.train_ar import load_transformer

    evidence = tmp_path / "ran-code"
    bad = tmp_path / "planted.pt"
    torch.save({"format": 1, "model": _Planted(evidence)}, bad)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(bad, tmp_path / "checkpoints" / "step-00000001.pt")
    loads = [lambda: BaseDetailVQVAE.from_checkpoint(bad.read_bytes(), where=str(bad)),
             lambda: load_transformer(str(bad)),
             lambda: load_checkpoint(Store(str(tmp_path)), "checkpoints/step-00000001.pt")]
    for load in loads:
        with pytest.raises(UserError) as err:
            load()
        assert "refused" in str(err.value) and "\n" not in str(err.value)
        assert not evidence.exists()
    # From the front door: one line, exit 2, nothing run.
    root, cfg, _ = pipeline
    proc = run_cli([str(Path(sys.executable).parent / "nextdetail"), "sample", "--ckpt", str(bad),
                    "--out", str(tmp_path / "out"), "--preset", "tiny", "-o", f"storage.root={root}",
                    "-o", f"data.source={cfg.data.source}"])
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr
    assert not evidence.exists()
    # What the pipeline wrote loads as tensors and plain values only.
    results = pipeline[2]
    for path in (Path(results["train_tokenizer"].url, "tokenizer.pt"), Path(results["train_ar"].url, "transformer.pt"),
                 *sorted(Path(results["train_ar"].url, "checkpoints").glob("step-*.pt"))):
        torch.load(path, weights_only=True)


@pytest.mark.fast
def test_prefect_dask_internals_the_task_runner_relies_on_are_there():
    """`runtime.dask_task_runner` overrides prefect-dask's submit (pure=False) and uses two private attributes;
    this pins them to the pinned prefect-dask, failing with the reason instead of deep in a run."""
    from importlib import metadata

    from prefect_dask import DaskTaskRunner

    version = metadata.version("prefect-dask")
    runner = DaskTaskRunner()
    assert hasattr(runner, "_started") and hasattr(runner, "_optimize_futures"), (
        f"prefect-dask {version} no longer has DaskTaskRunner._started/_optimize_futures: update "
        "nextdetail/flows/runtime.py:dask_task_runner to its new submit()")
