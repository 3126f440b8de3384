"""What tests share: starting and stopping real servers, the small configs every test builds on, running the CLI
(imported by the tests as `helpers`; the fixtures themselves are in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(log_path: Path, services: bool = False,
                         env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port, in its own process group, its UI on and pointed at its API; returns
    once /health answers: (process, API URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**(env or os.environ), "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": url}  # the browser test's pages
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 *([] if services else ["--no-services"])], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_group(proc)
            raise RuntimeError(f"prefect server did not start; see {log_path}")
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Send `sig` to `proc`'s process group and wait; SIGKILL the group if it outlives `timeout`. Its exit code,
    None when it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        return None


# A whole pipeline in about a minute: tiny models, few steps (the shared `pipeline` fixture and its variants).
FAST = ("tokenizer.ch=16", "tokenizer.num_res_blocks=1", "tokenizer.vocab_size=64", "tokenizer.z_channels=8",
        "tokenizer.batch_size=8", "tokenizer.steps=30", "tokenizer.checkpoint_every=30", "tokenizer.log_every=10",
        "tokenizer.torch_threads=1", "tokens.torch_threads=1",
        "ar.depth=2", "ar.width=64", "ar.batch_size=16", "ar.steps=12", "ar.warmup_steps=2", "ar.checkpoint_every=4",
        "ar.log_every=4", "ar.val_batches=1", "ar.torch_threads=1",
        "sample.per_class=2", "sample.classes=[0,5]", "sample.batch_size=4",
        "eval.samples_per_class=3", "eval.checkpoints=all")


def config_overrides(root: Path | str, source: str, *overrides: str) -> list[str]:
    """The overrides of `make_config` (for the CLI: each after an -o)."""
    return [f"storage.root={root}", f"data.source={source}", "shard.samples_per_shard=32", "dask.n_workers=2",
            *overrides]


def make_config(root: Path | str, source: str, *overrides: str):
    from nextdetail.conf import load_config

    return load_config("tiny", overrides=config_overrides(root, source, *overrides))


def cli_config(root: Path | str, source: str, *overrides: str) -> list[str]:
    """`--preset tiny -o …` arguments that give the same config as `make_config(root, source, *overrides)`."""
    return ["--preset", "tiny", *[a for o in config_overrides(root, source, *overrides) for a in ("-o", o)]]


def run_shard_stage(cfg):
    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import prefect_api

    with prefect_api():
        return run_stage(cfg, "shard", progress=False)


def sigkill_when(cmd: list[str], ready, timeout: float = 300.0) -> None:
    """Start `cmd` (a CLI run) in its own process group, SIGKILL the whole group as soon as `ready()`
    holds (e.g. a first part or checkpoint exists), and wait: a run killed mid-stage."""
    import signal

    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` to the end (warnings-only Prefect logs); returns its completed process."""
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def objects_per_array(paths: list[str], zarr_dir: str) -> dict[str, int]:
    """Chunk objects (files under `<array>/c/`) per Zarr array among `paths` (a listing of a local folder or a
    bucket), keyed by the array's path relative to `zarr_dir`; metadata (`zarr.json`) left out."""
    counts: dict[str, int] = {}
    for path in paths:
        rel = str(path).split(zarr_dir.rstrip("/") + "/", 1)[-1]
        if "/c/" in rel:
            array = rel.split("/c/", 1)[0]
            counts[array] = counts.get(array, 0) + 1
    return counts


@contextlib.contextmanager
def external_dask(*workers: tuple[str, list[str]]):
    """An external `dask scheduler` on 127.0.0.1 and one `dask worker` process per (name, extra args) — e.g.
    ("gpu", ["--resources", "GPU=1"]) — each with one thread; yields the scheduler's address once every worker has
    joined, and ends them all."""
    from distributed import Client

    from nextdetail.pipeline.runtime import quiet_dask_environ

    address = f"tcp://127.0.0.1:{free_port()}"
    # started as README "Running on a cluster" says (Dask's bookkeeping quieted); a variable already set wins
    quiet = {"env": {**quiet_dask_environ(), **os.environ},
             "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                               address.rsplit(":", 1)[1], "--no-dashboard"], **quiet)]
    try:
        for name, extra in workers:
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                           "--no-dashboard", "--name", name, *extra], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(workers), timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
