"""What a team sees in Prefect's UI, on real Prefect servers: the pictures of a run (in a real browser, headless
Chromium, in both the V1 and the V2 UI), one graph node per stage, small parameters, run names and tags — and a
served deployment whose interval schedule fires (`pytest -k browser`, `pytest -k schedule`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, chromium_path
from helpers import cli_config, start_prefect_server, stop_group

from nextdetail.stages import STAGES

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")
OURS = "[...document.images].filter(i => i.src.startsWith('data:image/png;base64,'))"  # the UI's own icons aside
IMAGES = f"JSON.stringify({OURS}.map(i => [i.complete, i.naturalWidth]))"


def _api(api: str, path: str, body: dict | None = None) -> Any:
    request = urllib.request.Request(f"{api}{path}", data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _children(api: str, flow_run_id: str) -> list[dict]:
    return _api(api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}},
                                           "sort": "START_TIME_ASC", "limit": 50})


def _pictures_load(browser: Browser, url: str, shot: Path, at_least: int) -> list[list]:
    """Open `url`; wait until at least `at_least` images are there and every one has loaded; screenshot."""
    browser.open(url)
    loaded = f"(() => {{ const i = {OURS}; return i.length >= {at_least} && " \
             "i.every(x => x.complete && x.naturalWidth > 0); })()"
    browser.wait_for(loaded, timeout=60)
    time.sleep(0.5)  # the last layout pass, for the screenshot
    browser.screenshot(shot)
    return json.loads(browser.evaluate(IMAGES))


@pytest.mark.e2e
@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_browser_shows_every_picture_and_one_node_per_stage(own_pipeline, prefect_server, tmp_path):
    """`run --force sample --force evaluate` on a built root, through the session's Prefect server: the run is
    named and tagged from its preset, model and commit, holds one subflow per stage (five reused, named so), its
    parameters are small and hold no resolved config; in headless Chromium the sample stage's artifact and the
    evaluation report show every picture (V1 and V2 UI) — screenshots under the test's tmp dir."""
    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.pipeline.ui import key

    root, cfg, _ = own_pipeline
    results = run_pipeline(cfg, force=["sample", "evaluate"], progress=False)
    assert [results.work[s] for s in STAGES] == ["up to date"] * 5 + ["ran", "ran"]

    api, ui = prefect_server, prefect_server.removesuffix("/api")
    runs = _api(api, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}},
                                           "sort": "START_TIME_DESC", "limit": 20})
    run = next(r for r in runs if r["parameters"].get("storage_root") == str(root))
    assert run["name"].startswith(f"{cfg.preset} · cart · ") and run["state_type"] == "COMPLETED"
    assert {f"preset:{cfg.preset}", "model:cart", "set:storage.root"} <= set(run["tags"])
    assert any(t.startswith("commit:") for t in run["tags"])
    assert set(run["parameters"]) == {"preset", "models", "stages", "force", "only", "settings", "storage_root"}
    assert run["parameters"]["force"] == ["sample", "evaluate"] and "sha256" not in json.dumps(run["parameters"])
    assert "tokenizer.steps" in run["parameters"]["settings"] and "tokenizer.ch_mult" not in run["parameters"]["settings"]
    assert len(json.dumps(run["parameters"])) < 4000  # the preset and what differs from it, not the config

    children = _children(api, run["id"])
    names = [c["name"] for c in children]
    assert [n.split(" ")[0] for n in names] == list(STAGES), names  # one node per stage, in order
    assert all("(reused " in n for n in names[:5]) and all("reused" not in n for n in names[5:])
    assert all(c["state_type"] == "COMPLETED" for c in children)
    sample_run = children[5]
    assert set(sample_run["parameters"]) == {"model", "identity", "upstream_outputs", "everything_else"}
    assert len(json.dumps(sample_run["parameters"])) < 1000
    graph = _api(api, f"/flow_runs/{run['id']}/graph-v2")  # what the run page draws
    nodes = [node for _, node in graph["nodes"]]
    assert sorted(n["label"].split(" / ")[0] for n in nodes if n["kind"] == "flow-run") == sorted(STAGES)

    artifacts = {a["key"]: a for a in _api(api, "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "CREATED_DESC", "limit": 50})}
    sample, report = artifacts[key("cart", "sample")], artifacts[key("cart", "report")]
    with Browser() as browser:
        for version, prefix in (("v1", ""), ("v2", "/v2")):
            for name, artifact, pictures in (("sample", sample, 2), ("report", report, 2)):  # grids; grid + curves
                images = _pictures_load(browser, f"{ui}{prefix}/artifacts/artifact/{artifact['id']}",
                                        tmp_path / f"{version}-{name}.png", pictures)
                assert len(images) >= pictures and all(done and width > 0 for done, width in images), (version, name)
        browser.open(f"{ui}/runs/flow-run/{run['id']}")
        browser.wait_for("document.body.innerText.includes('sample (')", timeout=60)
        browser.screenshot(tmp_path / "v1-run.png")
    for shot in ("v1-sample", "v1-report", "v2-sample", "v2-report", "v1-run"):
        assert (tmp_path / f"{shot}.png").stat().st_size > 10_000, shot  # a page, not a blank


@pytest.mark.integration
@pytest.mark.parametrize("where", ["threads", "dask"])
def test_run_tags_mark_the_flow_runs_and_no_task_run(where):
    """A stage's flow run under a pipeline run's tags carries them (what the UI filters runs by); its task runs,
    in this process's threads or on a Dask worker, carry none. Prefect's task engine takes a tag concurrency slot
    through the API for every tagged task run: a write transaction on the task's critical path, which a loaded
    CI machine once saw time out (503; issue 40). Fails with the tags left on."""
    from prefect import flow, tags, task
    from prefect.context import FlowRunContext, TaskRunContext

    from nextdetail.conf.environment import DaskConfig
    from nextdetail.pipeline.runtime import prefect_api, run_flow

    @task(persist_result=False)
    def task_run_tags() -> list[str]:
        return sorted(TaskRunContext.get().task_run.tags)  # the engine's concurrency slots are these

    @flow(persist_result=False)
    def stage() -> tuple[list[str], list[list[str]]]:
        return sorted(FlowRunContext.get().flow_run.tags), [f.result() for f in [task_run_tags.submit()
                                                                                  for _ in range(3)]]

    with prefect_api(), tags("preset:tiny", "model:cart"):
        flow_run_tags, task_runs_tags = run_flow(stage, DaskConfig(n_workers=1), where == "dask", None)
    assert flow_run_tags == ["model:cart", "preset:tiny"]
    assert task_runs_tags == [[], [], []]


@pytest.fixture()
def prefect_server_with_scheduler(tmp_path):
    """A `prefect server start` of its own with its services on (the session's runs without them), its
    scheduler looking every 5 s."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    proc, url = start_prefect_server(tmp_path / "server.log", services=True, env=env)
    yield url, tmp_path / "server.log"
    stop_group(proc)


@pytest.mark.integration
def test_a_served_deployment_fires_its_interval_schedule(prefect_server_with_scheduler, embedded_source, tmp_path):
    """`nextdetail serve --interval 10` against a real server with its scheduler: a scheduled (not triggered)
    run of the deployment is created, executes the pipeline and completes; the scheduler logs no error; Ctrl-C
    on serve says the server stopped, exit 130."""
    api, server_log = prefect_server_with_scheduler
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "WARNING"}
    root = tmp_path / "root"
    out = open(tmp_path / "serve.log", "w")  # noqa: SIM115 — a file, not a pipe nobody reads while it runs
    serve = subprocess.Popen([NEXTDETAIL, "serve", "--name", "every-10s", "--interval", "10", "--until", "shard",
                              *cli_config(root, embedded_source)], env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, text=True)
    try:
        deadline, done = time.time() + 420, None
        while done is None:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "no scheduled run completed; server log:\n" + server_log.read_text()[-3000:]
            runs = _api(api, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}},
                                                   "limit": 100})
            done = next((r for r in runs if r["auto_scheduled"] and r["deployment_id"]
                         and r["state_type"] == "COMPLETED"), None)
            time.sleep(2)
        assert [c["name"].split(" ")[0] for c in _children(api, done["id"])] == ["shard"]
        assert (root / "lineage" / "shard").is_dir()
    finally:
        rc = stop_group(serve, signal.SIGINT, timeout=60)
        out.close()
    text = (tmp_path / "serve.log").read_text()
    assert rc == 130 and "nextdetail: serve stopped" in text and "re-run the same command" not in text, text[-2000:]
    assert "InvalidRequestError" not in server_log.read_text()
