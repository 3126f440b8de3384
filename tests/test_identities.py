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
from helpers import FAST, config_overrides, make_config, run_cli

import nextdetail
from nextdetail.errors import UserError
from nextdetail.pipeline.code import code_fingerprint, modules_of, outside_computation
from nextdetail.pipeline.run import run_pipeline
from nextdetail.pipeline.runtime import prefect_api
from nextdetail.stages import REGISTRY, STAGES

PACKAGE = Path(nextdetail.__file__).parent

# Run in a fresh interpreter: the stage's upstream results and key are built, every nextdetail module is then
# dropped from sys.modules, and the stage's flow is imported and run: what it loads is exactly its own code.
TRACE = r"""
import dataclasses, importlib, json, sys
job = json.load(open(sys.argv[1]))
from nextdetail.conf import load_config
from nextdetail.pipeline.declaration import key_of
from nextdetail.stages import REGISTRY
stage = job["stage"]
cfg = load_config("tiny", overrides=job["overrides"])
upstream = {u: REGISTRY[u].result(**fields) for u, fields in job["upstream"].items()}
key = key_of(cfg, stage, upstream)
fingerprint = sorted(REGISTRY[stage].code(cfg))
from nextdetail.pipeline.runtime import prefect_api  # the harness's, not the stage's
for name in [m for m in sys.modules if m == "nextdetail" or m.startswith("nextdetail.")]:
    del sys.modules[name]
runner = importlib.import_module(f"nextdetail.stages.{stage}.flow").run
with prefect_api():
    result = runner(cfg, key, progress=False, **{u: upstream[u] for u in REGISTRY[stage].upstream})
loaded = sorted(m for m in sys.modules if m == "nextdetail" or m.startswith("nextdetail."))
json.dump({"loaded": loaded, "fingerprint": fingerprint, "work": getattr(result, "work", None)},
          open(sys.argv[2], "w"))
"""


@pytest.mark.e2e
def test_each_stage_loads_only_code_its_fingerprint_holds(pipeline, tmp_path):
    """Each stage's flow, run for real (into a fresh root, on the session pipeline's upstream artifacts) in a
    subprocess: every nextdetail module it loads is in the fingerprint derived from its imports."""
    _, cfg, results = pipeline
    for stage in STAGES:
        out = tmp_path / stage
        job = {"stage": stage, "overrides": config_overrides(out, cfg.data.source, *FAST),
               "upstream": {u: dataclasses.asdict(results[u])
                            for u in REGISTRY[stage].upstream}}
        (tmp_path / f"{stage}.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-c", TRACE, str(tmp_path / f"{stage}.json"), str(out) + ".out"],
                              capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        traced = json.loads(Path(str(out) + ".out").read_text())
        derived = modules_of(dict.fromkeys(traced["fingerprint"]))
        # what only modules outside computation import (the settings classes' defaults, a result's label) reaches
        # the bytes through them alone: as settings values (the slice) or printing
        via_outside = _imported_by({m for m in traced["loaded"] if outside_computation(m)}, derived)
        missing = {m for m in set(traced["loaded"]) - derived - via_outside if not outside_computation(m)}
        assert not missing, f"{stage} ran code its identity does not hash: {sorted(missing)}"
        assert f"nextdetail.stages.{stage}.flow" in traced["loaded"]
    fp = {s: set(code_fingerprint(REGISTRY[s].entries(cfg))) for s in STAGES}
    assert "nextdetail/models/_at_cpu.cpp" in fp["decompose"]  # the compiled solver's source is code too
    assert all("nextdetail/models/_at_cpu.cpp" not in fp[s] for s in STAGES if s != "decompose")
    assert "nextdetail/models/quadtree.py" in fp["train_tokenizer"]  # truncation training
    assert all("nextdetail/models/sampler.py" not in fp[s] for s in ("train_tokenizer", "tokenize", "train_ar"))


def _imported_by(modules: set[str], stop: set[str]) -> set[str]:
    """Every nextdetail module the `modules` import, directly or through modules not in `stop` (compute code)."""
    from nextdetail.pipeline.code import _read_module

    seen, todo = set(), list(modules)
    while todo:
        for m in _read_module(todo.pop())[0]:
            parts = m.split(".")
            for name in (".".join(parts[: i + 1]) for i in range(1, len(parts))):  # importing a.b.c runs a.b too
                if name not in seen and name not in stop:
                    seen.add(name)
                    todo.append(name)
    return seen


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the nextdetail package (the code a teammate edits); PYTHONPATH=<returned> runs it."""
    where = tmp_path / "src"
    shutil.copytree(PACKAGE, where / "nextdetail", ignore=shutil.ignore_patterns("__pycache__"))
    return where


FINGERPRINTS = r"""
import json, sys
import nextdetail
from nextdetail.conf import load_branches
from nextdetail.stages import REGISTRY
from nextdetail.storage.hashing import stable_hash
branches = load_branches("tiny", None, [], ["cart", "ndp"])
print(json.dumps({"package": nextdetail.__file__, "code": {m: {s: stable_hash(REGISTRY[s].code(c)) for s in REGISTRY}
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


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _annotate_every_module(src: Path) -> None:
    """A comment appended to every module and every docstring reworded: what never changes a computation."""
    for path in (src / "nextdetail").rglob("*.py"):
        lines = path.read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.lstrip().startswith('"""') and (i == 0 or lines[i - 1].rstrip().endswith(":")):
                lines[i] = line.replace('"""', '"""Reworded. ', 1)
        path.write_text("".join(lines) + "\n# a comment appended by a teammate\n")


def test_comments_docstrings_and_modules_outside_computation_change_no_identity_and_code_does(tmp_path):
    src = _copy_package(tmp_path)
    before = _fingerprints(src)
    assert before == _fingerprints(None)  # the copy is the same code

    _annotate_every_module(src)
    _edit(src / "nextdetail" / "cli" / "cache.py", "what the storage root holds", "what a storage root holds")  # a help text
    _edit(src / "nextdetail" / "stages" / "shard" / "__init__.py", "images → ", "images -> ")  # a result's line
    _edit(src / "nextdetail" / "figures.py", "def ", "_A_FIGURE_CONSTANT = 1\n\n\ndef ")  # pictures: outside
    assert _changed(before, _fingerprints(src)) == {"cart": [], "ndp": []}

    sampler = src / "nextdetail" / "models" / "ndp_sampler.py"
    sampler.write_text(sampler.read_text() + "\n_A_NEW_CONSTANT = 1\n")  # what runs changed
    assert _changed(before, _fingerprints(src)) == {"cart": [], "ndp": ["sample", "evaluate"]}
    cpp = src / "nextdetail" / "models" / "_at_cpu.cpp"
    cpp.write_text(cpp.read_text() + "\n// a comment\n/* and another */\n")
    assert _changed(before, _fingerprints(src))["cart"] == []
    cpp.write_text(cpp.read_text() + "\nstatic int unused_constant = 1;\n")
    assert _changed(before, _fingerprints(src))["cart"] == list(STAGES[1:2])  # decompose alone


def _compute_modules() -> set[str]:
    """Every module in some stage's code, on both model branches of the tiny preset."""
    from nextdetail.conf import load_branches

    return {m for cfg in load_branches("tiny", None, [], ["cart", "ndp"]).values() for stage in REGISTRY.values()
            for m in modules_of(stage.code(cfg))}


def test_compute_code_imports_no_printing_status_cli_or_ui():
    """Every module in a stage's code (its flow and tasks, the models, storage, the machinery they use) imports
    nothing that only prints, schedules or shows — the CLI, the cache commands and status, the pipeline run, the
    Prefect UI: the code identity leaves those out by layout, so compute code must not depend on them."""
    from nextdetail.pipeline.code import _read_module

    forbidden = ("nextdetail.cli", "nextdetail.cache", "nextdetail.pipeline.run", "nextdetail.pipeline.ui")
    compute = _compute_modules()
    assert {"nextdetail.stages.tokenize.flow", "nextdetail.pipeline.training", "nextdetail.models.quant"} <= compute
    offenders = [f"{name} imports {m}" for name in sorted(compute) for m in _read_module(name)[0]
                 if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not offenders, offenders


def test_compute_code_documents_its_names_in_comments_not_in_strings_after_them():
    """A string statement after an assignment (an "attribute docstring") runs as a no-op, but the identities'
    normalization drops only a module's, class's or function's first-statement docstring, so such a string is code
    there: editing its words would re-key every stage that imports the module. Compute code holds none but the
    three below, which predate this test: turning them into comments re-keys the stages that import them (the
    trainings among them), so they stay until a re-key is acceptable anyway."""
    import ast

    from nextdetail.pipeline.code import _strip_docstrings, module_file

    known = {"nextdetail.models": 1, "nextdetail.models.transformer": 1, "nextdetail.storage.factors": 1}
    found = {}
    for name in sorted(_compute_modules()):
        path = module_file(name)
        if path is None or path.suffix != ".py":
            continue
        tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8")))
        strings = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Expr)
                   and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
        if strings:
            found[name] = len(strings)
    assert found == known, found


@pytest.mark.e2e
def test_a_refactor_reruns_one_stage_whose_identical_output_stops_the_cascade_and_a_constant_does_not(
        own_pipeline, s3_endpoint, tmp_path):
    """On a copy of the session's root, with a teammate's edited copy of the package: (1) comments and docstrings
    everywhere: every stage up to date, also for a second user reading the first one's bucket; (2) a local variable
    renamed in the Ambrosio–Tortorelli solver: decompose is stale and the rest wait on its output; `cache accept`
    makes it up to date without recomputing (refused under a settings change), and run rebuilds decompose alone —
    byte-identical factors, nothing after it runs; (3) a constant of the solver changed: decompose rebuilds with
    other factors and what follows is stale because its upstream output changed."""
    root, cfg, first = own_pipeline
    src = _copy_package(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(src), "PREFECT_LOGGING_LEVEL": "WARNING"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, cwd=tmp_path)  # see above
    base = [sys.executable, "-m", "nextdetail.cli"]
    args = ["--preset", "tiny", *[a for o in config_overrides(root, cfg.data.source, *FAST) for a in ("-o", o)]]

    def states(*extra: str, on: list[str] = args) -> dict[str, dict]:
        out = run([*base, "status", "--json", *on, *extra])
        assert out.returncode == 0, out.stderr
        return {s["stage"]: s for s in json.loads(out.stdout)}

    # (1) a docs-only change, here and through a bucket
    _annotate_every_module(src)
    assert {s["state"] for s in states().values()} == {"up to date"}
    remote, opts = "s3://team-bucket/nd", json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})
    pushed = run([*base, "cache", "push", "--to", remote, "--remote-options", opts, "--no-progress", *args],
                 env={**env, "PYTHONPATH": ""})  # the first user: the code as it was
    assert pushed.returncode == 0, pushed.stderr
    bucket = [*args, "-o", f"storage.root={remote}", "-o", f"storage.options={opts}"]
    assert {s["state"] for s in states(on=bucket).values()} == {"up to date"}  # the second user, docs edited

    # (2) a refactor of the solver: a local variable renamed
    solver = src / "nextdetail" / "models" / "mumford_shah.py"
    for old in ("current = images.float()", "_minimize(current, cfg)", "current = result.u", "bases.append(current)"):
        _edit(solver, old, old.replace("current", "level"))
    now = states()
    assert now["decompose"]["state"] == "stale"
    assert now["decompose"]["reasons"] == ["code changed: nextdetail/models/mumford_shah.py"]
    for stage in STAGES[2:]:
        assert now[stage]["state"] != "up to date" and any(r.startswith("waits on upstream")
                                                           for r in now[stage]["reasons"]), now[stage]
    refused = run([*base, "cache", "accept", "decompose", *args, "-o", "decompose.alpha=5"])
    assert refused.returncode == 2 and "only a code change can be accepted" in refused.stderr, refused.stderr
    accepted = run([*base, "cache", "accept", "decompose", *bucket])  # on the bucket
    assert accepted.returncode == 0 and "mumford_shah.py" in accepted.stdout, accepted.stderr
    assert {s["state"] for s in states(on=bucket).values()} == {"up to date"}
    rebuilt = run([*base, "run", "--no-progress", *args])
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    after = states()
    assert {s["state"] for s in after.values()} == {"up to date"}
    assert after["decompose"]["artifact"]["identity"] != first["decompose"].identity  # rebuilt, elsewhere
    for stage in STAGES[2:]:  # nothing after it ran: the same artifacts
        assert after[stage]["artifact"]["identity"] == first[stage].identity, stage
    old_dir, new_dir = Path(first["decompose"].url), Path(after["decompose"]["artifact"]["url"])
    chunks = sorted(p.relative_to(old_dir) for p in (old_dir / "factors.zarr").rglob("*") if p.is_file())
    assert chunks and all((old_dir / c).read_bytes() == (new_dir / c).read_bytes() for c in chunks)

    # (3) a constant the solver uses
    _edit(solver, "epsilons = [cfg.epsilon_at(k) for k", "epsilons = [1.5 * cfg.epsilon_at(k) for k")
    assert states()["decompose"]["state"] == "stale"
    again = run([*base, "run", "--no-progress", "--until", "decompose", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    final = states()
    assert final["decompose"]["state"] == "up to date"
    assert final["train_tokenizer"]["state"] == "stale"
    assert "upstream decompose's output changed" in final["train_tokenizer"]["reasons"][0], final["train_tokenizer"]


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_planted_pickle_is_refused_at_every_load_and_never_runs(tmp_path, pipeline):
    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.stages.train_ar.tasks import load_transformer
    from nextdetail.storage.checkpoints import load_checkpoint
    from nextdetail.storage.fs import Store

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
