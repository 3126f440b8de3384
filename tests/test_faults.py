"""Faults, each with the real component started here: a Dask worker killed mid-stage, the S3 server gone during
a cache write, the pipeline process killed inside every stage, two pipelines racing on one storage root."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, cli_config, free_port, make_config, sigkill_when

from nextdetail.stages import STAGES
from nextdetail.storage import factors
from nextdetail.storage.fs import Store
from nextdetail.storage.lineage import Lineage

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}


def _assert_same_factors(a_url: str, b_url: str) -> None:
    """Every array of two decompositions equal, chunk for chunk (each chunk decodes: none torn)."""
    from nextdetail.storage.factors import read_index

    index = read_index(Store(b_url)).to_pylist()
    assert read_index(Store(a_url)).to_pylist() == index
    a, b = factors.open_group(Store(a_url)), factors.open_group(Store(b_url))
    for split, tar in {(r["split"], r["shard"]) for r in index}:
        np.testing.assert_array_equal(a[factors.array_path(split, tar)][:], b[factors.array_path(split, tar)][:])


@pytest.mark.e2e
def test_a_dask_worker_killed_mid_decompose_and_the_stage_still_completes(pipeline, tmp_path):
    """A LocalCluster started here; once the first tar is decomposed one worker process is SIGKILLed (its
    nanny restarts it, Dask re-runs its task elsewhere): the stage completes with every chunk valid and equal
    to an undisturbed decomposition."""
    from distributed import Client, LocalCluster

    _, cfg, reference = pipeline
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        run = make_config(tmp_path, cfg.data.source, *FAST, f"dask.address={cluster.scheduler_address}")
        cmd = [str(BIN / "nextdetail"), "run", "--until", "decompose", "--no-progress",
               *cli_config(tmp_path, cfg.data.source, *FAST, f"dask.address={cluster.scheduler_address}")]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not list(tmp_path.glob("factors/*/*/_parts/*.json")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        before = client.run(os.getpid)
        victim = sorted(before.values())[0]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()  # the killed process is gone, a new one serves
    assert run.decompose == cfg.decompose
    done = next(tmp_path.glob("factors/*/*"))
    assert (done / "_COMPLETE.json").exists()
    _assert_same_factors(str(done), reference["decompose"].url)


@pytest.mark.e2e
def test_s3_server_stopped_during_a_token_cache_write_is_retried_and_never_half_published(embedded_source,
                                                                                         tmp_path, monkeypatch):
    """moto's S3 server on a fixed port, stopped for 8 s while the token cache is written to it and started
    again: the write is retried (a task's or the stage's retry with back-off, after botocore's own), the published
    cache verifies file for file, and no reader ever saw a marker before every file was there.

    botocore's default (legacy, 5 attempts, random back-off up to 15 s in all) can outlast an outage of this
    length or not, by chance (CI once saw it absorbed): the store here allows botocore one retry, so the outage
    always reaches Prefect."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.storage.tokens import TokenCache

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("team-bucket")
    options = (f"tokens.cache_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}, "
               "config_kwargs: {retries: {max_attempts: 2, mode: standard}}}")
    cfg = make_config(tmp_path / "local", embedded_source, *FAST, "tokens.cache=s3://team-bucket/nd", options,
                      f"tokens.local_cache={tmp_path / 'mirror'}")
    events: dict[str, object] = {}

    def outage() -> None:
        nonlocal server
        watcher = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        while True:  # the first encoded tar is on S3: the cache is half written
            try:
                watcher.invalidate_cache()
                parts = [p for p in watcher.find("team-bucket/nd/tokens") if "/c/" in p]
            except Exception:
                parts = []
            if parts:
                break
            if events.get("done"):
                return
            time.sleep(0.05)
        markers_seen = watcher.exists("team-bucket/nd/tokens") and [p for p in watcher.find("team-bucket/nd/tokens")
                                                                    if p.endswith("/_COMPLETE.json")]
        events["marker_before_outage"] = bool(markers_seen)
        server.stop()
        events["stopped"] = time.time()
        time.sleep(8)  # longer than botocore's one retry: a task or the stage fails and is retried
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        events["restarted"] = time.time()

    retry_log: list[str] = []

    class KeepMessages(logging.Handler):  # Prefect logs each retry at INFO on its task-run logger
        def emit(self, record: logging.LogRecord) -> None:
            retry_log.append(record.getMessage())

    handler, loggers = KeepMessages(), [logging.getLogger(f"prefect.{n}") for n in ("task_runs", "flow_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        results = run_pipeline(cfg, until="tokenize", progress=False)
    finally:
        events["done"] = True
        thread.join(timeout=30)
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    try:
        assert "stopped" in events and "restarted" in events, "the outage never happened"
        assert events["marker_before_outage"] is False
        tokens = results["tokenize"]
        assert tokens.url.startswith("s3://team-bucket/nd/tokens/") and tokens.work == "ran"
        cache = TokenCache(tokens.url, cfg.tokens.cache_options, str(tmp_path / "reader"))
        assert cache.verify() == []  # every file the marker lists is there, with its sha256
        assert cache.index().num_rows == tokens.summary["images"]
        retries = [m for m in retry_log if "Retry 1/" in m or "retrying the stage" in m]
        assert retries, "no retry: the outage was absorbed below Prefect"  # a task's or the stage's retry
    finally:
        server.stop()


def _artifact_files(url: str) -> dict[str, str]:
    """sha256 of every data file of an artifact (markers and timing-bearing summaries left out)."""
    store = Store(url)
    skip = ("_COMPLETE.json", "summary.json", "metrics.json", "metrics.csv", "report.md", ".png")
    return {rel: store.sha256(rel) for rel in store.find() if not rel.endswith(skip) and "/attempts/" not in rel
            and "checkpoints/" not in rel and "_parts/" not in rel}


def _published_tokens(url: str) -> dict[str, str]:
    """The published token cache's files (sha256 as its marker lists them) by path inside its attempt; attempts
    abandoned by killed runs stay beside it until they are an hour old and are not part of the cache."""
    marker = json.loads(Path(url, "_COMPLETE.json").read_text())
    attempt = marker["summary"]["attempt"]
    return {rel.removeprefix(attempt + "/"): digest for rel, digest in marker["sha256"].items()
            if "_parts/" not in rel}  # per-tar markers carry their own timings


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [0])
def test_the_pipeline_killed_inside_every_stage_then_rerun_builds_what_an_uninterrupted_run_builds(
        pipeline, tmp_path, seed):
    """For each stage in turn, `nextdetail run` is started and SIGKILLed at a random moment inside that stage
    (after its upstream is recorded); a final run completes. Every stage then has the identity of the
    undisturbed session pipeline, and the data artifacts are byte-identical to it."""
    _, cfg, reference = pipeline
    rng = random.Random(seed)
    cmd = [str(BIN / "nextdetail"), "run", "--no-progress", *cli_config(tmp_path, cfg.data.source, *FAST)]
    lineage = tmp_path / "lineage"
    outputs = {"shard": "shards/*/*.tar", "decompose": "factors/*/*/factors.zarr", "train_tokenizer": "tokenizer/*/*",
               "tokenize": "tokens/*/attempts", "train_ar": "transformer/*/*", "sample": "samples/*/*/*", "evaluate": "metrics/*/*"}
    killed_in = []
    for stage in STAGES:
        if (lineage / stage / "latest.json").exists():
            continue  # an earlier kill came too late for this stage: it had finished
        delay, seen = rng.uniform(0.0, 1.0), {}

        def ready(stage=stage, delay=delay, seen=seen) -> bool:  # the stage has written something, then a while
            if "t" not in seen and next(tmp_path.glob(outputs[stage]), None) is not None:
                seen["t"] = time.time()
            return "t" in seen and time.time() - seen["t"] >= delay

        sigkill_when(cmd, ready)
        killed_in.append((stage, round(delay, 2)))
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(killed_in) >= 5, killed_in
    records = {stage: Lineage(Store(str(tmp_path))).latest(stage) for stage in STAGES}
    for stage in STAGES:
        assert records[stage]["artifact"]["identity"] == reference[stage].identity, (stage, killed_in)
    for stage in ("shard", "sample"):
        got = _artifact_files(records[stage]["artifact"]["url"])
        want = _artifact_files(reference[stage].url)
        assert got == want, (stage, killed_in, sorted(set(got.items()) ^ set(want.items()))[:4])
    _assert_same_factors(records["decompose"]["artifact"]["url"], reference["decompose"].url)
    assert _published_tokens(records["tokenize"]["artifact"]["url"]) == _published_tokens(reference["tokenize"].url)


@pytest.mark.e2e
def test_two_pipelines_started_at_once_on_one_storage_root_both_finish_with_one_copy_of_each_artifact(
        pipeline, tmp_path):
    _, cfg, reference = pipeline
    cmd = [str(BIN / "nextdetail"), "run", "--until", "train_ar", "--no-progress",
           *cli_config(tmp_path, cfg.data.source, *FAST)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    lineage = Lineage(Store(str(tmp_path)))
    for stage in STAGES[:5]:
        assert lineage.latest(stage)["artifact"]["identity"] == reference[stage].identity
    layout = {"shard": "shards/*", "decompose": "factors/*/*", "train_tokenizer": "tokenizer/*/*",
              "tokenize": "tokens/*", "train_ar": "transformer/*/*"}
    for stage, pattern in layout.items():
        dirs = [p for p in tmp_path.glob(pattern) if p.is_dir()]
        assert len(dirs) == 1, (stage, dirs)
        assert json.loads((dirs[0] / "_COMPLETE.json").read_text())["identity"] == reference[stage].identity
    attempts = list((tmp_path / "tokens").glob("*/attempts/*"))
    assert len(attempts) == 1, attempts  # the loser's attempt was discarded
    assert _artifact_files(str(next(tmp_path.glob("shards/*")))) == _artifact_files(reference["shard"].url)


def _killed_worker() -> Exception:
    from distributed.scheduler import KilledWorker  # what distributed raises when a task's workers keep dying

    return KilledWorker("write_factors-1", None, 3)


def _comm_closed() -> Exception:
    from distributed.comm.core import CommClosedError

    return CommClosedError("in <TCP (closed)>: Stream is closed")


@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionResetError("peer reset"), True), (TimeoutError("slow"), True), (_killed_worker(), True),
    (_comm_closed(), True),
    (ChildProcessError("torchrun exited with 1"), True), (FileNotFoundError("listing lag"), True),
    (PermissionError("read-only bucket"), False), (IsADirectoryError("x"), False), (ValueError("bad value"), False),
    (KeyError("missing column"), False),
])
def test_only_io_and_infrastructure_failures_are_retried(exc, transient):
    from nextdetail.errors import UserError
    from nextdetail.pipeline.tasks import is_transient

    assert is_transient(exc) is transient
    assert is_transient(UserError("bad config")) is False
