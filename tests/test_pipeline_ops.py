"""Pipeline operations: `status` says what is stale and why, `run` skips exactly what status calls up to date,
one knob re-runs only the stages it touches, `--only` / `--force` / `--dry-run`, lineage and the run log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, cli_config, make_config, stop_group

import nextdetail
from nextdetail.errors import UserError
from nextdetail.pipeline.run import run_pipeline
from nextdetail.stages import REGISTRY, STAGES, downstream
from nextdetail.storage.fs import Store
from nextdetail.storage.lineage import Lineage

ENV = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}


def _cli(args: list[str], pythonpath: str | None = None) -> tuple[str, dict]:
    """Run the CLI in a fresh interpreter; returns (stdout, {module family: imported?})."""
    code = ("import sys, json; from nextdetail.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'file': __import__('nextdetail').__file__, "
            "'torch': 'torch' in sys.modules, 'prefect': 'prefect' in sys.modules}))")
    env = {**ENV, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120,
                         cwd=pythonpath)  # `python -c` puts the working directory first on the path
    assert out.returncode == 0, out.stderr
    *body, last = out.stdout.strip().splitlines()
    return "\n".join(body), json.loads(last)


def _status(args: list[str], pythonpath: str | None = None) -> tuple[dict[str, dict], dict]:
    out, info = _cli(["status", "--json", *args], pythonpath)
    return {s["stage"]: s for s in json.loads(out)}, info


def _args(pipeline, *overrides: str) -> list[str]:
    root, cfg, _ = pipeline
    return cli_config(root, cfg.data.source, *FAST, *overrides)


@pytest.mark.e2e
def test_stage_code_is_derived_and_the_sampler_reaches_only_sample_and_evaluate(pipeline):
    """Each stage's code is the import closure of its flow (+ its model family's module): the task module it
    runs is in it, and the samplers reach only sample and evaluate (editing them retrains nothing)."""
    cfg = pipeline[1]
    for stage in STAGES:
        code = REGISTRY[stage].code(cfg)
        assert f"nextdetail/stages/{stage}/tasks.py" in code and f"nextdetail/stages/{stage}/flow.py" in code
        assert all(len(sha) == 64 for sha in code.values())
    assert [s for s in STAGES if "nextdetail/models/sampler.py" in REGISTRY[s].code(cfg)] == ["sample", "evaluate"]
    assert downstream("decompose") == ["train_tokenizer", "tokenize", "train_ar", "sample", "evaluate"]


@pytest.mark.e2e
def test_status_reads_markers_only_and_explains_what_changed(pipeline, tmp_path):
    statuses, info = _status(_args(pipeline))
    assert not info["torch"] and not info["prefect"]  # no torch, no Prefect on status's path
    assert {s: st["state"] for s, st in statuses.items()} == dict.fromkeys(STAGES, "up to date")
    results = pipeline[2]
    for stage in STAGES:  # the artifact status names is the one the run built
        assert statuses[stage]["artifact"]["identity"] == results[stage].identity
        assert statuses[stage]["artifact"]["url"] == results[stage].url

    statuses, _ = _status(_args(pipeline, "decompose.alpha=5"))
    assert statuses["shard"]["state"] == "up to date"
    assert statuses["decompose"]["state"] == "stale"
    assert statuses["decompose"]["reasons"] == ["setting decompose.alpha: 10.0 → 5.0"]
    for stage in downstream("decompose"):
        assert statuses[stage]["state"] == "stale"
        assert any(r.startswith("waits on upstream") for r in statuses[stage]["reasons"]), statuses[stage]

    # A runtime knob changes nothing.
    statuses, _ = _status(_args(pipeline, "decompose.batch_size=2", "ar.torch_threads=2", "sample.batch_size=3"))
    assert {st["state"] for st in statuses.values()} == {"up to date"}

    # The sampler's source edited (a copy of the package first on the path): only sampling and evaluation.
    copy = tmp_path / "src"
    shutil.copytree(Path(nextdetail.__file__).parent, copy / "nextdetail",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(copy / "nextdetail/models/sampler.py", "a") as f:
        f.write("\n_AN_EDIT = 1  # a statement: a comment alone changes no identity\n")
    statuses, info = _status(_args(pipeline), pythonpath=str(copy))
    assert info["file"].startswith(str(copy))
    assert [s for s in STAGES if statuses[s]["state"] != "up to date"] == ["sample", "evaluate"]
    assert statuses["sample"]["reasons"] == ["code changed: nextdetail/models/sampler.py"]

    # Deleted artifact: missing, and the dry run says it would run.
    out, _ = _cli(["run", "--dry-run", *_args(pipeline, "sample.seed=7")])
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ") and line.split()[0] in STAGES}
    assert "skip (up to date)" in lines["train_ar"] and "run (stale)" in lines["sample"]
    assert "setting sample.seed: 0 → 7" in out


@pytest.mark.e2e
def test_an_unchanged_run_does_nothing_without_prefect_and_logs_its_run(pipeline):
    """`nextdetail run` with every stage up to date: the same summary, one run-log row per stage, and neither Prefect
    nor torch imported (no server, no cluster: what `dvc repro` does with nothing to do)."""
    root = pipeline[0]
    out, info = _cli(["run", "--no-progress", *_args(pipeline)])
    assert not info["prefect"] and not info["torch"]
    for stage in STAGES:
        assert f"{stage}: up to date   {pipeline[2][stage].url}" in out
    log = Lineage(Store(str(root))).runs().to_pylist()
    rows = [r for r in log if r["run_id"] == log[-1]["run_id"]]
    assert [(r["stage"], r["work"]) for r in rows] == [(s, "up to date") for s in STAGES]
    assert f"run {rows[0]['run_id']}" in out
    out, info = _cli(["run", "--no-progress", *_args(pipeline, "sample.seed=11"), "--until", "train_ar"])
    assert not info["prefect"]  # a knob downstream of the selected stages changes nothing either


@pytest.mark.e2e
def test_cache_ls_lists_every_artifact_with_its_size_use_and_references_and_du_totals_them(own_pipeline, tmp_path):
    root, cfg, first = own_pipeline
    junk = Path(first["train_ar"].url).parent / "d2-killed-run"  # what a killed run leaves: no record names it
    junk.mkdir(parents=True)
    (junk / "checkpoint.pt").write_bytes(b"x" * 1000)
    out, info = _cli(["cache", "ls", "--json", *cli_config(root, cfg.data.source, *FAST)])
    assert not info["prefect"] and not info["torch"]
    entries = json.loads(out)
    ours = {first[stage].url: stage for stage in STAGES}  # the session root may hold other tests' artifacts too
    mine = {e["url"]: e for e in entries if e["url"] in ours}
    assert sorted(e["stage"] for e in mine.values()) == sorted(STAGES)
    for e in mine.values():
        assert e["state"] == "complete" and e["referenced_by"] == ["cart"] and e["bytes"] > 0, e
        assert e["identity"] and e["created"] and e["last_used"], e
    assert ("train_ar", str(junk), 1000) in [(e["stage"], e["url"], e["bytes"]) for e in entries
                                              if e["state"] == "unrecorded"]
    shared = [e for e in entries if e["state"] == "shared"]  # the tokenizer's metrics beside the evaluation
    assert "evaluate" in {e["stage"] for e in shared} and all(e["identity"] and e["created"] for e in shared)
    assert any("/refstats/" in e["url"] for e in shared)  # the reference statistics beside the stages
    out, _ = _cli(["cache", "ls", "--json", *cli_config(root, cfg.data.source, *FAST, "sample.seed=5")])
    unreferenced = {e["stage"] for e in json.loads(out) if e["url"] in ours and not e["referenced_by"]}
    assert unreferenced == {"sample"}  # another sampling seed: the config no longer names those samples
    out, _ = _cli(["cache", "du", *cli_config(root, cfg.data.source, *FAST)])
    assert "total" in out and all(stage in out for stage in STAGES)
    bad = subprocess.run([str(Path(sys.executable).parent / "nextdetail"), "cache", "ls",
                          *cli_config(tmp_path / "nowhere", cfg.data.source, *FAST)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.e2e
def test_cache_gc_is_a_dry_run_by_default_and_keeps_what_configs_use_and_runs_in_progress(own_pipeline):
    """gc after another sampling seed: the dry run lists that sample (unreferenced by the current config) and an old
    leftover directory (both last written 2 h ago) and deletes nothing; `--keep-last 2` keeps both samples; `--yes`
    deletes exactly the listed ones — a directory written to a minute ago (a run may be writing it) stays — and the
    current config's status is unchanged: every stage up to date."""
    root, cfg, first = own_pipeline
    other = run_pipeline(make_config(root, cfg.data.source, *FAST, "sample.seed=5"), until="sample", progress=False)
    old_junk = Path(first["train_ar"].url).parent / "killed-long-ago"
    fresh_junk = Path(first["train_ar"].url).parent / "being-written"
    for d in (old_junk, fresh_junk):
        d.mkdir()
        (d / "step-00000002.pt").write_bytes(b"x" * 100)
    for path in [old_junk / "step-00000002.pt", *Path(other["sample"].url).rglob("*")]:  # both written 2 h ago
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    args = ["cache", "gc", "--json", *cli_config(root, cfg.data.source, *FAST)]
    out, info = _cli(args)
    assert not info["prefect"] and not info["torch"]
    plan = json.loads(out)
    assert sorted(e["url"] for e in plan["remove"]) == sorted([other["sample"].url, str(old_junk)])
    assert not plan["deleted"] and Path(other["sample"].url).is_dir() and old_junk.is_dir()
    kept, _ = _cli([*args, "--keep-last", "2"])
    assert [e["url"] for e in json.loads(kept)["remove"]] == [str(old_junk)]
    done, _ = _cli([*args, "--yes"])
    assert json.loads(done)["deleted"]
    assert not Path(other["sample"].url).exists() and not old_junk.exists() and fresh_junk.is_dir()
    assert not Lineage(Store(str(root))).read("sample", other.identities["sample"])
    statuses, _ = _status(cli_config(root, cfg.data.source, *FAST))
    assert {st["state"] for st in statuses.values()} == {"up to date"}


@pytest.mark.e2e
def test_unchanged_run_skips_every_stage_and_one_knob_reruns_only_its_stage(pipeline):
    root, cfg, first = pipeline
    again = run_pipeline(cfg, progress=False)
    assert again.work == dict.fromkeys(STAGES, "up to date")
    for stage in STAGES:  # rebuilt from the lineage record: what the first run returned
        assert (again[stage].url, again[stage].identity, again[stage].summary) == \
            (first[stage].url, first[stage].identity, first[stage].summary)

    knob = make_config(root, cfg.data.source, *FAST, "sample.seed=3")
    changed = run_pipeline(knob, until="sample", progress=False)
    assert changed.work == {**dict.fromkeys(STAGES[:-2], "up to date"), "sample": "ran"}
    assert changed["sample"].identity != first["sample"].identity

    # --only: the stage alone, its upstream read from lineage; refused while an upstream is stale.
    only = run_pipeline(knob, only="sample", progress=False)
    assert list(only) == list(STAGES[:-1]) and set(only.work.values()) == {"up to date"}
    with pytest.raises(UserError, match="upstream stage decompose is not up to date"):
        run_pipeline(make_config(root, cfg.data.source, *FAST, "decompose.alpha=5"), only="train_tokenizer",
                     progress=False)

    # The run log holds one row per stage per run; lineage records name what each artifact came from.
    lineage = Lineage(Store(str(root)))
    log = lineage.runs().to_pylist()
    assert {r["run_id"] for r in log} >= {first.run_id, again.run_id, changed.run_id}
    assert [r["work"] for r in log if r["run_id"] == again.run_id] == ["up to date"] * len(STAGES)
    record = lineage.read("decompose", again.identities["decompose"])
    assert record["settings"]["decompose"]["alpha"] == cfg.decompose.alpha
    assert record["upstream"] == {"shard": f"shard:{first['shard'].summary['content_sha256']}"}  # its bytes
    assert record["packages"]["torch"] and record["host"] and "nextdetail/models/mumford_shah.py" in record["code"]


@pytest.mark.e2e
def test_force_rebuilds_a_stage_and_its_same_identity_keeps_downstream_up_to_date(own_pipeline):
    _, cfg, first = own_pipeline
    before = sorted(p.name for p in Path(first["shard"].url).glob("*.tar"))
    forced = run_pipeline(cfg, until="decompose", force=["shard"], progress=False)
    assert forced.work == {"shard": "ran", "decompose": "up to date"}
    assert sorted(forced["shard"].shards_ran) == sorted(first["shard"].tar_identities)  # every tar rewritten
    assert forced["shard"].identity == first["shard"].identity
    assert sorted(p.name for p in Path(forced["shard"].url).glob("*.tar")) == before

    out, _ = _cli(["lineage", "shard", *_args(own_pipeline)])
    assert f"identity: {forced.identities['shard']}" in out and "packages:" in out and "git:" in out
    assert out.count(" ran ") >= 2  # the first build and the forced one, from the run log


@pytest.mark.integration
def test_serve_registers_a_deployment_whose_runs_execute_the_pipeline(embedded_source, prefect_server, tmp_path):
    """`nextdetail serve` on the test's Prefect server: a triggered deployment run executes the pipeline
    (here its shard stage) and shows in Prefect as a completed flow run with the stage as a subflow."""
    import signal
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment

    root = tmp_path / "root"
    cmd = [str(Path(sys.executable).parent / "nextdetail"), "serve", "--name", "ops-test", "--until", "shard",
           *cli_config(root, embedded_source)]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 — a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name("nextdetail-scheduled/ops-test")
                    break
                except Exception:  # not registered yet
                    pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the deployment was never registered"
            time.sleep(1)
        run = run_deployment("nextdetail-scheduled/ops-test", timeout=300, poll_interval=2, as_subflow=False)
        assert run.state.is_completed(), run.state
        with get_client(sync_client=True) as client:  # each stage a subflow of the deployment's run itself
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])),
                sort=FlowRunSort.START_TIME_ASC, limit=10)
            flows = {client.read_flow(r.flow_id).name for r in children}
        assert flows == {"shard"} and all(r.state.is_completed() for r in children)
        assert [r.name[:7] for r in children] == ["shard ("] and run.name == "tiny · scheduled"
        assert {"preset:tiny", "model:cart"} <= set(children[0].tags)
    finally:
        stop_group(proc, signal.SIGINT)
        log.close()
    log = Lineage(Store(str(root))).runs().to_pylist()
    assert [(r["stage"], r["work"]) for r in log] == [("shard", "ran")]


@pytest.mark.e2e
def test_a_corrupted_cache_chunk_is_detected_and_rebuilt_and_downstream_stays_up_to_date(own_pipeline):
    _, cfg, first = own_pipeline
    marker = json.loads(Path(first["tokenize"].url, "_COMPLETE.json").read_text())
    chunk = Path(first["tokenize"].url, next(rel for rel in sorted(marker["sha256"]) if "/c/" in rel))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    chunk.write_bytes(bytes(data))
    again = run_pipeline(cfg, until="train_ar", progress=False)
    assert again.work == {**dict.fromkeys(STAGES[:3], "up to date"), "tokenize": "ran", "train_ar": "up to date"}
    assert again["tokenize"].work == "rebuilt" and again["tokenize"].identity == first["tokenize"].identity
    marker = json.loads(Path(first["tokenize"].url, "_COMPLETE.json").read_text())
    assert all(Store(first["tokenize"].url).sha256(rel) == digest for rel, digest in marker["sha256"].items())


def test_stage_selection_is_validated_before_anything_starts():
    from nextdetail.errors import UserError
    from nextdetail.stages import select_stages

    assert select_stages(until="decompose") == ["shard", "decompose"]
    assert select_stages(only="tokenize", force=["tokenize"]) == ["shard", "decompose", "train_tokenizer", "tokenize"]
    assert select_stages(force=["sample"])[-1] == "evaluate"
    for kwargs, words in [({"only": "train_ar", "force": ["decompose"]}, "--force decompose with --only train_ar"),
                          ({"until": "decompose", "force": ["train_ar"]}, "stops before train_ar"),
                          ({"until": "shard", "only": "decompose"}, "give one"),
                          ({"force": ["trian_ar"]}, "no such stage")]:
        with pytest.raises(UserError, match=words):
            select_stages(**kwargs)


@pytest.mark.e2e
def test_a_decomposition_knob_retrains_from_scratch_in_new_directories(own_pipeline):
    """Changing decompose.alpha gives the training stages new identities: they train from step 0 in their
    own directories — never resume the other decomposition's checkpoints — and the old artifacts stay. The same
    run (one retraining serves both checks) reads Algorithm 1 with one more map on the global residual
    (`tokenizer.residual=independent+global`) and ramps the guidance over the base maps only
    (`sample.cfg_schedule=base_maps`): tokenize, train_ar and sample take the extra map as any other."""
    root, cfg, first = own_pipeline
    knob = run_pipeline(make_config(root, cfg.data.source, *FAST, "decompose.alpha=20",
                                    "tokenizer.residual=independent+global", "sample.cfg_schedule=base_maps"),
                        until="sample", progress=False)
    assert knob.work == {"shard": "up to date", **dict.fromkeys(STAGES[1:6], "ran")}
    for stage in ("train_tokenizer", "train_ar"):
        assert knob[stage].identity != first[stage].identity and knob[stage].url != first[stage].url
        assert knob[stage].summary["resumed_from"] == 0, (stage, knob[stage].summary)
        assert Path(first[stage].url, "_COMPLETE.json").is_file()
    assert knob["train_tokenizer"].summary["tokenizer_sha256"] != first["train_tokenizer"].summary["tokenizer_sha256"]
    layout = knob["tokenize"].summary["layout"]
    assert [m["kind"] for m in layout["maps"]][-2:] == ["detail", "global"]
    assert knob["train_ar"].summary["token_maps"] == len(layout["maps"]) == len(cfg.tokenizer.patch_nums) + 3 + 1
    assert Path(knob["sample"].url, "grid.png").stat().st_size > 0 != first["train_tokenizer"].summary["tokenizer_sha256"]
