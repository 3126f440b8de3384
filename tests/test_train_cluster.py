"""train_ar where the GPUs are: on a Dask worker offering `ar.resources`, and across `ar.nodes` hosts' workers under
torchrun (gloo on CPU; a worker started with `--resources GPU=1` stands in for a GPU machine, `--host 127.0.0.2` for
a second host). Also the settings, the preflight and the JSON job the ranks read."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BIN, FAST, cli_config, external_dask, make_config

from nextdetail.errors import UserError

TWO_HOSTS = (("a", ["--resources", "GPU=1"]), ("b", ["--resources", "GPU=1", "--host", "127.0.0.2"]))
UP = {"shard": "s" * 64, "train_tokenizer": "t" * 64, "tokenize": "k" * 64}  # upstream identities (units)


# ---- settings, identity, the job (units) --------------------------------------------------------------------

MALLOC_PROBE = """
import ctypes, json, os, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
def mmapped():  # whether a 1 MiB allocation is mmap'ed (then unmapped on free) rather than taken from the heap
    before = libc.mallinfo2().hblks
    p = libc.malloc(1 << 20)
    n = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(p))
    return n
first = mmapped()
if sys.argv[1] == "restore":
    from nextdetail.pipeline.runtime import restore_malloc
    restore_malloc()
print(json.dumps({"first": first, "then": [mmapped() for _ in range(3)], "env": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                  "child": os.popen("echo $MALLOC_TRIM_THRESHOLD_").read().strip()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.parametrize("restore", [False, True])
def test_a_dask_workers_malloc_trim_is_undone_for_the_stages_tasks(restore):
    """`dask worker` exports MALLOC_TRIM_THRESHOLD_=65536, which stops glibc from adapting its mmap threshold: every
    buffer over 128 KiB is mmap'ed and page-faulted afresh (the encoding loop 1.7× slower there, issue 40).
    `runtime.restore_malloc` (run before every task on a worker) brings large buffers back to the heap and drops the
    variable for the processes the worker starts."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = json.loads(subprocess.run([str(BIN / "python"), "-c", MALLOC_PROBE, "restore" if restore else "plain"],
                                    env=env, capture_output=True, text=True, check=True).stdout)
    assert out["first"] == 1  # glibc with the threshold set: mmap'ed
    if restore:
        assert out["then"] == [0, 0, 0] and out["env"] is None and out["child"] == ""
    else:
        assert out["then"] == [1, 1, 1] and out["env"] == out["child"] == "65536"


def test_the_readmes_worker_environment_is_the_quiet_dask_config():
    """README "Running on a cluster" exports what `runtime.QUIET_DASK` sets, and Dask reads those variables back as
    that config: the external workers the docs start are the LocalCluster's."""
    import re

    import dask.config

    from nextdetail.pipeline.runtime import QUIET_DASK, quiet_dask_environ

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    exported = re.search(r"^export (DASK_.*?)\n(?!  )", readme.replace("\\\n", ""), re.M | re.S)
    assert exported is not None, "README's cluster section exports no DASK_ variables"
    assert dict(v.split("=", 1) for v in exported.group(1).split()) == quiet_dask_environ()
    with dask.config.set(dask.config.collect_env(quiet_dask_environ())):
        assert {key: dask.config.get(key) for key in QUIET_DASK} == QUIET_DASK


@pytest.mark.integration
@pytest.mark.parametrize("cluster", ["local", "external"])
def test_every_dask_process_runs_the_quiet_bookkeeping(cluster):
    """The LocalCluster the pipeline starts and the external processes the tests start as README says: no
    profiler, and the event loop, memory and system monitors every 0.5 / 0.5 / 2 s in the scheduler, the nanny and
    the worker (by default 20 / 100 / 500 ms, with the profiler sampling every 10 ms: an idle 2-worker cluster took
    10.7 % of a core, 1.5 % so)."""
    from distributed import Client

    from nextdetail.pipeline.runtime import dask_cluster

    def _callback_ms(dask_worker=None, dask_scheduler=None) -> dict[str, float]:  # nested: sent by value
        server = dask_worker or dask_scheduler
        return {name: pc.callback_time for name, pc in server.periodic_callbacks.items()}

    cm = dask_cluster(None, 1, 1, "2GiB") if cluster == "local" else external_dask(("w", []))
    with cm as address, Client(address, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        seen = {"scheduler": client.run_on_scheduler(_callback_ms),
                "nanny": next(iter(client.run(_callback_ms, nanny=True).values())),
                "worker": next(iter(client.run(_callback_ms).values()))}
    for process, callbacks in seen.items():
        assert callbacks["tick"] == 500 and callbacks["monitor"] == 2000, (process, callbacks)
        assert "profile" not in callbacks, process
    assert seen["worker"]["memory_monitor"] == seen["nanny"]["memory_monitor"] == 500



def test_a_fan_outs_parts_go_to_dask_heaviest_first_and_after_an_earlier_fan_outs():
    """Dask ranks tasks sent within 100 ms of each other alike and then by key, so without a priority a stage's tars
    ran in random order and evaluate's class groups before its reference tars (`evaluate_classes-…` sorts first).
    `submit_parts` gives each part a priority below every earlier one (Dask runs higher first), the heaviest of a
    fan-out first, inside the caller's resource annotation; single tasks keep priority 0 and jump the queue."""
    import dask

    from nextdetail.pipeline.parts import submit_parts

    seen = []

    class Task:
        def submit(self, *args):
            seen.append((args[0], dask.get_annotations().get("priority"), dask.get_annotations().get("resources")))
            return object()

    with dask.annotate(resources={"GPU": 1}):
        futures = submit_parts(Task(), [("a", ("a", 1)), ("b", ("b", 3)), ("c", ("c", 2))], weight=lambda a: a[1])
    submit_parts(Task(), [("d", ("d",)), ("e", ("e",))])
    assert [name for name, _, _ in seen] == ["b", "c", "a", "d", "e"]
    priorities = [p for _, p, _ in seen]
    assert all(p < 0 for p in priorities) and priorities == sorted(priorities, reverse=True)
    assert len(set(priorities)) == 5 and [r for _, _, r in seen] == [{"GPU": 1}] * 3 + [None] * 2
    assert sorted(futures.values()) == ["a", "b", "c"]



@pytest.mark.integration
def test_a_clusters_parts_are_dask_tasks_that_retry_transient_failures_and_show_their_progress(tmp_path):
    """On the Dask task runner a fan-out's parts run as plain Dask tasks, outside any Prefect task run (each task
    run cost the server ≈ 35 ms of CPU, taken from the workers on a small machine; issue 40). What Prefect gave
    them stays: a transient failure (OSError) is retried on the worker after the task's delay and the flow logs
    it; bad data (ValueError) is not retried and fails the flow naming the part; the flow run gets a progress
    artifact at 100 %. Fails with parts as task runs (they see a task-run context) or without the retry."""
    import logging
    import urllib.request

    from prefect import flow
    from prefect.context import FlowRunContext, TaskRunContext

    from nextdetail.conf.environment import DaskConfig
    from nextdetail.pipeline.artifacts import Artifact
    from nextdetail.pipeline.parts import fan_out
    from nextdetail.pipeline.runtime import prefect_api, run_flow
    from nextdetail.pipeline.tasks import stage_task
    from nextdetail.storage.fs import Store

    @stage_task(name="flaky_part", retries=2, retry_delay_seconds=(0.2,))
    def flaky_part(artifact, failures: int, error: type) -> tuple[dict, list[str]]:
        tries = len(artifact.store.find()) + 1  # one file per try: the worker's earlier tries left theirs
        artifact.store.write_bytes(f"try-{tries}", b"")
        if tries <= failures:
            raise error(f"try {tries} failed")
        return {"tries": tries, "in_task_run": TaskRunContext.get() is not None}, []

    @flow(persist_result=False)
    def stage(parts: list[tuple[str, int, type]]) -> tuple[str, dict]:
        records, _, _ = fan_out(flaky_part, [(name, (Artifact("t", name, Store(str(tmp_path / name))), failures,
                                                     error)) for name, failures, error in parts],
                                desc="flaky", unit="part", progress=False)
        return str(FlowRunContext.get().flow_run.id), records

    warnings: list[str] = []

    class KeepWarnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    logger, handler = logging.getLogger("prefect.flow_runs"), KeepWarnings(logging.WARNING)
    logger.addHandler(handler)
    try:
        with prefect_api():
            flow_run_id, records = run_flow(stage, DaskConfig(n_workers=1), True, None,
                                            [("steady", 0, OSError), ("flaky", 1, OSError)])
            with pytest.raises(ValueError, match="try 1 failed") as failed:
                run_flow(stage, DaskConfig(n_workers=1), True, None, [("bad", 1, ValueError)])
            request = urllib.request.Request(f"{os.environ['PREFECT_API_URL']}/artifacts/filter", method="POST",
                                             data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}},
                                                              "limit": 10}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                shown = json.loads(response.read())
    finally:
        logger.removeHandler(handler)
    assert {name: (r["summary"]["tries"], r["summary"]["in_task_run"], r["work"]) for name, r in records.items()} == {
        "steady": (1, False, "ran"), "flaky": (2, False, "ran")}
    assert [w for w in warnings if "'flaky'" in w and "try 1 failed" in w and "retry 1/2" in w], warnings
    assert any("'bad'" in note for note in getattr(failed.value, "__notes__", [])), "the failure names no part"
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["try-1"]  # bad data: never retried
    assert [(a["type"], a["data"]) for a in shown] == [("progress", 100.0)], shown


TRAININGS = [("train_tokenizer", "tokenizer"), ("train_ar", "ar")]


@pytest.mark.parametrize("section", [s for _, s in TRAININGS])
@pytest.mark.parametrize("value", ["{GPU: 0}", "{GPU: -1}", "{GPU: x}", "{'a b': 1}", "[GPU]"])
def test_bad_training_resources_are_one_line_errors(value, section):
    from nextdetail.conf import load_config

    with pytest.raises(UserError) as err:
        load_config("tiny", overrides=[f"{section}.resources={value}"])
    assert "\n" not in str(err.value) and f"{section}.resources" in str(err.value)


@pytest.mark.parametrize(("stage", "s"), TRAININGS)
def test_nodes_times_processes_must_split_the_batch_and_several_nodes_need_a_cluster(stage, s):
    from nextdetail.conf import load_config

    cluster = "dask.address=tcp://127.0.0.1:8786"
    with pytest.raises(UserError) as err:
        load_config("tiny", overrides=[f"{s}.nodes=2", f"{s}.nproc=3", f"{s}.batch_size=16", cluster])
    line = str(err.value)
    assert "\n" not in line and f"{s}.batch_size=16" in line and f"{s}.nodes × {s}.nproc = 2 × 3" in line, line
    with pytest.raises(UserError) as err:
        load_config("tiny", overrides=[f"{s}.nodes=2", f"{s}.batch_size=16"])
    line = str(err.value)
    assert "\n" not in line and f"{s}.nodes=2" in line and "dask.address" in line, line
    cfg = load_config("tiny", overrides=[f"{s}.nodes=2", f"{s}.nproc=4", f"{s}.batch_size=16", cluster])
    assert (getattr(cfg, s).nodes, getattr(cfg, s).nproc) == (2, 4)
    assert getattr(load_config("tiny", overrides=[f"{s}.nodes=2", f"{s}.nproc=null", f"{s}.batch_size=15", cluster]),
                   s).nodes == 2
    # a command that stops before the training only warns
    early = load_config("tiny", overrides=[f"{s}.nodes=2", f"{s}.batch_size=15"], until="shard")
    assert any(f"{s}.nodes=2" in w for w in early.warnings())


@pytest.mark.parametrize(("name", "s"), TRAININGS)
def test_resources_and_nodes_say_where_a_training_runs_not_what_it_computes(name, s):
    from nextdetail.conf import load_config
    from nextdetail.pipeline.declaration import stage_key
    from nextdetail.stages import REGISTRY

    stage = REGISTRY[name]
    up = {k: UP[k] for k in stage.upstream if k in UP} | ({"decompose": "d" * 64} if "decompose" in stage.upstream
                                                           else {})
    plain = load_config("tiny")
    placed = load_config("tiny", overrides=[f"{s}.resources={{GPU: 1}}", f"{s}.nodes=2", f"{s}.batch_size=16",
                                            "dask.address=tcp://127.0.0.1:8786"])
    same_batch = load_config("tiny", overrides=[f"{s}.batch_size=16"])
    assert stage.settings(same_batch) == stage.settings(placed)
    assert stage_key(same_batch, name, up).identity == stage_key(placed, name, up).identity
    assert not stage.uses_dask(plain) and stage.asks(plain) is None
    assert stage.uses_dask(placed) and stage.uses_dask(load_config("tiny", overrides=[f"{s}.resources={{GPU: 1}}"]))
    ask = stage.asks(placed)
    assert (ask.setting, ask.resources, ask.nodes_setting, ask.nodes) == (f"{s}.resources", {"GPU": 1}, f"{s}.nodes", 2)


def test_the_training_job_is_json_without_the_secrets_and_rebuilds_the_training(tmp_path, monkeypatch):
    """The job file torchrun's ranks read: JSON (no pickle: nothing in it runs), the storage credentials not in it
    but in the environment the ranks inherit; read back, the same data and settings, the credentials SecretStr."""
    from pydantic import SecretStr

    from nextdetail.conf import load_config
    from nextdetail.models.tokenizer import TokenizerSpec
    from nextdetail.pipeline.torchrun import JOB_SECRETS_ENV, encode_job, read_job, write_job
    from nextdetail.pipeline.training import training_job, training_of_job
    from nextdetail.stages.train_ar.tasks import ARData, ARTraining
    from nextdetail.stages.train_tokenizer.tasks import TokenizerTraining
    from nextdetail.storage.factor_loader import TrainData
    from nextdetail.storage.fs import Store

    cfg = load_config("tiny", overrides=["storage.options={key: AKIA-ID-123, secret: s3cr3t-value-xyz}",
                                         "ar.resources={GPU: 1}"])
    options = cfg.storage.options
    assert isinstance(options["secret"], SecretStr)
    data = ARData("s3://bucket/tokens/abc", options, str(tmp_path / "mirror"), "i" * 64, "s3://bucket/t/tokenizer.pt",
                  "f" * 64, options, ("cat", "dog"))
    tok_data = TrainData("s3://bucket/shards", None, options, "png", "train", (("train-000000.tar", 32),))
    trainings = [ARTraining(data, cfg.ar), TokenizerTraining(tok_data, cfg.tokenizer, TokenizerSpec.from_config(cfg))]
    for training in trainings:
        text, secrets = encode_job(training_job(Store(str(tmp_path / "out"), options), training))
        assert "s3cr3t-value-xyz" not in text and "AKIA-ID-123" not in text and "**********" not in text
        assert set(secrets) == {"AKIA-ID-123", "s3cr3t-value-xyz"}
        json.loads(text)  # plain JSON
        path = write_job(str(tmp_path), text)
        monkeypatch.setenv(JOB_SECRETS_ENV, json.dumps(secrets))
        store, back = training_of_job(read_job(path))
        assert type(back) is type(training) and back.data == training.data and back.settings == training.settings
        assert back.data.options["secret"].get_secret_value() == "s3cr3t-value-xyz"
        assert store.url() == str(tmp_path / "out") and store.options["key"].get_secret_value() == "AKIA-ID-123"
    assert trainings[1].spec == back.spec
    with pytest.raises(ValueError):  # a job names a stage, never code
        training_of_job({"format": 1, "stage": "os.system", "store": {}, "training": {}})


def test_a_worker_elsewhere_is_picked_per_host_and_only_where_the_resources_are():
    from nextdetail.pipeline.torchrun import other_nodes

    workers = {"tcp://10.0.0.3:1": {"host": "10.0.0.3", "resources": {"GPU": 1}},
               "tcp://10.0.0.2:2": {"host": "10.0.0.2", "resources": {"GPU": 1}},
               "tcp://10.0.0.2:1": {"host": "10.0.0.2", "resources": {"GPU": 1}},
               "tcp://10.0.0.4:1": {"host": "10.0.0.4", "resources": {}},
               "tcp://10.0.0.1:1": {"host": "10.0.0.1", "resources": {"GPU": 1}}}
    assert other_nodes(workers, "10.0.0.1", {"GPU": 1}, 5) == [("tcp://10.0.0.2:1", "10.0.0.2"),
                                                               ("tcp://10.0.0.3:1", "10.0.0.3")]
    assert other_nodes(workers, "10.0.0.1", {}, 1) == [("tcp://10.0.0.2:1", "10.0.0.2")]


# ---- on a cluster (e2e) ----------------------------------------------------------------------------------------


KNOBS = (*FAST, "ar.class_dropout=0", "ar.drop_path=0", "ar.warmup_steps=1")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, embedded_source, prefect_server):
    """shard → tokenize on the tests' FAST knobs, once: (root, results)."""
    root = tmp_path_factory.mktemp("train-cluster")
    return root, _pipeline(make_config(root, embedded_source, *FAST), "tokenize")


@pytest.fixture(scope="module")
def two_hosts():
    """The scheduler address of an external Dask cluster with a `GPU=1` worker on 127.0.0.1 and one on 127.0.0.2."""
    with external_dask(*TWO_HOSTS) as address:
        yield address


def _pipeline(cfg, until: str = "train_ar"):
    from nextdetail.pipeline.run import run_pipeline

    return run_pipeline(cfg, until=until, progress=False)


def _workers(address: str) -> dict[str, tuple[str, int]]:
    """{worker name: (host, pid)} of the cluster at `address`."""
    from distributed import Client

    with Client(address, timeout=60) as client:
        pids = client.run(os.getpid)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        return {w["name"]: (w["host"], pids[addr]) for addr, w in workers.items()}


@pytest.mark.e2e
def test_every_epoch_serves_full_batches_on_every_rank(upstream):
    """Ranks' shares of an epoch vary with its shuffled tar groups; every epoch still serves epoch 0's number of
    full batches (a rank short of samples starts its own over: before, a later epoch's last batches were empty and
    the loss NaN)."""
    from nextdetail.storage.token_loader import TokenBatches

    _, up = upstream
    cache = up["tokenize"].open()
    ranks = [TokenBatches(cache, "train", 8, seed=0, rank=r, world=2) for r in (0, 1)]
    for epoch in range(12):
        for r in ranks:
            assert [len(t) for t, _ in r.epoch(epoch)] == [8] * r.batches_per_epoch, (epoch, r.rank)


@pytest.mark.e2e
def test_two_nodes_on_two_hosts_train_as_one_process_on_the_same_global_batches(upstream, two_hosts, embedded_source):
    """ar.nodes=2, ar.resources={GPU: 1}: the task runs on one GPU worker, which starts a torchrun agent on the other
    host's worker and one itself (c10d rendezvous); one rank each trains on its half of every global batch. One
    process stepping on the two halves put together ends with the same weights; the ranks ran under both workers
    (each rank's node as its launcher recorded it: the worker's host and process)."""
    from nextdetail.stages.train_ar.flow import ar_data
    from nextdetail.stages.train_ar.tasks import ARTraining, load_transformer
    from nextdetail.storage.token_loader import TokenBatches

    root, up = upstream
    knobs = (*KNOBS, "ar.steps=4")
    results = _pipeline(make_config(root, embedded_source, *knobs, f"dask.address={two_hosts}", "ar.nodes=2",
                                    "ar.resources={GPU: 1}"))
    result = results["train_ar"]
    assert result.work == "ran" and result.summary["processes"] == 2 and result.summary["steps"] == 4
    workers = _workers(two_hosts)
    assert sorted((n["host"], n["pid"]) for n in result.summary["nodes"]) == sorted(workers.values())

    cfg = make_config(root, embedded_source, *knobs)
    one = ARTraining(ar_data(cfg, up["shard"], up["train_tokenizer"], up["tokenize"]), cfg.ar)
    one.build(0, 1, torch.device("cpu"), log=lambda _: None)
    cache, half = one.data.open_cache(), cfg.ar.batch_size // 2
    ranks = [TokenBatches(cache, cfg.ar.split, half, cfg.ar.seed, rank=r, world=2) for r in (0, 1)]
    losses = []
    for step in range(4):
        e, b = divmod(step, ranks[0].batches_per_epoch)
        halves = [r[(e, b)] for r in ranks]
        losses.append(one.step(step, (torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])))["loss"])
    np.testing.assert_allclose([m["loss"] for m in _csv_rows(Path(result.url, "metrics.csv"))], losses, rtol=1e-4)
    model, record = load_transformer(str(Path(result.url, "transformer.pt")))
    assert record["step"] == 4 and losses[-1] != losses[0]
    mine = one.trainer.model.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, mine[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.e2e
def test_one_node_trains_on_the_worker_offering_the_resources(upstream, embedded_source):
    """ar.resources={GPU: 1}, one node: the training task goes to the GPU worker, not the plain one, and trains in
    that worker's process (the CLI's process needs no GPU)."""
    root, _ = upstream
    with external_dask(("gpu", ["--resources", "GPU=1"]), ("plain", [])) as address:
        results = _pipeline(make_config(root, embedded_source, *KNOBS, "ar.steps=3", f"dask.address={address}",
                                        "ar.resources={GPU: 1}"))
        workers = _workers(address)
    summary = results["train_ar"].summary
    assert results["train_ar"].work == "ran" and summary["processes"] == 1
    assert workers["gpu"] != workers["plain"]  # (host, pid): the same host, other processes
    assert [(n["host"], n["pid"]) for n in summary["nodes"]] == [workers["gpu"]]


@pytest.mark.e2e
def test_more_nodes_than_hosts_is_one_line_before_any_stage_runs(two_hosts, embedded_source, tmp_path):
    elsewhere = tmp_path / "root"
    out = subprocess.run([str(BIN / "nextdetail"), "train-ar", "--no-progress",
                          *cli_config(elsewhere, embedded_source, *FAST, f"dask.address={two_hosts}", "ar.nodes=3",
                                      "ar.batch_size=24", "ar.resources={GPU: 1}")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "train_ar: ar.nodes=3 needs workers on 3 distinct hosts" in out.stderr, \
        out.stderr
    assert "2 host(s)" in out.stderr and "127.0.0.2" in out.stderr, out.stderr
    assert not (elsewhere / "transformer").exists() and not (elsewhere / "shards").exists()  # nothing ran


@pytest.mark.e2e
def test_a_node_killed_mid_training_is_resumed_from_the_last_checkpoint(upstream, two_hosts, embedded_source):
    """SIGKILL the second host's worker while the two nodes train: its torchrun agent and rank die with it, node 0's
    group fails, Prefect retries the task once the worker's nanny has brought it back, and the retry resumes from the
    last checkpoint to the end."""
    root, _ = upstream
    steps = 200
    cfg = make_config(root, embedded_source, *FAST, f"ar.steps={steps}", "ar.checkpoint_every=10",
                      "ar.log_every=50", f"dask.address={two_hosts}", "ar.nodes=2", "ar.resources={GPU: 1}")
    _, victim = _workers(two_hosts)["b"]
    killed: list[int] = []

    def kill_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if _training_with_a_checkpoint(root):
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    killer.start()
    result = _pipeline(cfg)["train_ar"]
    killer.join(timeout=1)
    assert killed, "never killed"
    assert result.work == "ran" and result.summary["steps"] == steps
    assert 0 < result.summary["resumed_from"] < steps, result.summary
    metrics = _csv_rows(Path(result.url, "metrics.csv"))
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert victim not in {n["pid"] for n in result.summary["nodes"]}  # the retry ran on the restarted worker


def _training_with_a_checkpoint(root: Path) -> bool:
    """A training under `root` not finished yet (no marker) has written a step checkpoint."""
    return any(not (run / "_COMPLETE.json").exists() and any(run.glob("checkpoints/step-*.pt"))
               for run in (root / "transformer").glob("*/*"))


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.mark.e2e
def test_the_tokenizer_trains_on_two_hosts_as_torchrun_trains_it_on_one(two_hosts, embedded_source, tmp_path):
    """tokenizer.nodes=2, tokenizer.resources={GPU: 1}: train_tokenizer runs as train_ar does — one rank on each host's
    worker, a c10d rendezvous — and ends with the weights `tokenizer.nproc=2` gives on one machine (the same two
    ranks on the same halves of every global batch)."""
    from nextdetail.models.tokenizer import load_tokenizer

    knobs = (*FAST, "tokenizer.steps=3", "tokenizer.checkpoint_every=3")
    there = _pipeline(make_config(tmp_path / "nodes", embedded_source, *knobs, f"dask.address={two_hosts}",
                                  "tokenizer.nodes=2", "tokenizer.resources={GPU: 1}"), "train_tokenizer")
    here = _pipeline(make_config(tmp_path / "standalone", embedded_source, *knobs, "tokenizer.nproc=2"),
                     "train_tokenizer")
    summary = there["train_tokenizer"].summary
    assert there["train_tokenizer"].work == "ran" and summary["processes"] == 2
    assert sorted((n["host"], n["pid"]) for n in summary["nodes"]) == sorted(_workers(two_hosts).values())
    assert there["train_tokenizer"].identity == here["train_tokenizer"].identity
    mine, theirs = (load_tokenizer(r["train_tokenizer"].checkpoint_url, {}, r["train_tokenizer"].summary[
        "tokenizer_sha256"], "the test").state_dict() for r in (there, here))
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-6, msg=name)
