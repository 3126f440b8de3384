"""Test set-up: a real Prefect server (`prefect server start` on 127.0.0.1) shared by the session,
a temporary PREFECT_HOME, and small datasets built from the embedded photographs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

_WORK = Path(tempfile.mkdtemp(prefix="nextdetail-tests-"))
os.environ["PREFECT_HOME"] = str(_WORK / "prefect")
os.environ.pop("PREFECT_API_URL", None)
from nextdetail.flows.runtime import configure_environment  # noqa: E402

configure_environment(_WORK)
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fast: needs no pipeline, no Prefect server, no Dask (`make test-fast`)")


@pytest.fixture(autouse=True)
def _prefect_unless_fast(request: pytest.FixtureRequest) -> None:
    """Every test but the `fast` ones runs against the session's Prefect server (started on first need)."""
    if request.node.get_closest_marker("fast") is None:
        request.getfixturevalue("prefect_server")


def start_prefect_server(log_path: Path, services: bool = False,
                         env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free port, in its own process group, its UI on and pointed at its API; returns
    once /health answers: (process, API URL)."""
    port = _free_port()
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


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect API server for the whole session (no services); flows and Dask workers find it by env."""
    proc, url = start_prefect_server(_WORK / "prefect-server.log")
    os.environ["PREFECT_API_URL"] = url
    yield url
    stop_group(proc, timeout=20)


@pytest.fixture(scope="session")
def embedded_source(tmp_path_factory) -> str:
    """A small embedded dataset (12 classes × (12 train + 2 val), 40 px PNG), built once."""
    from nextdetail.conf.schema import EmbeddedConfig
    from nextdetail.storage.embedded import build_embedded
    from nextdetail.storage.fs import Store

    root = tmp_path_factory.mktemp("embedded")
    return build_embedded(Store(str(root)), EmbeddedConfig(per_class=12, val_per_class=2, image_size=40),
                          log=lambda _: None).url()


@pytest.fixture()
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), emptied, with one bucket `team-bucket`."""
    import s3fs
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: start each test from an empty S3.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("team-bucket")
    yield endpoint
    server.stop()


@pytest.fixture()
def s3_endpoint_with_auth(tmp_path):
    """A second moto S3 server, in its own process, that checks every request's credentials
    (INITIAL_NO_AUTH_ACTION_COUNT=0): keys it never issued are refused with 403, as a real bucket refuses them."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


# A whole pipeline in about a minute: tiny models, few steps (the shared `pipeline` fixture and its variants).
FAST = ("tokenizer.ch=16", "tokenizer.num_res_blocks=1", "tokenizer.vocab_size=64", "tokenizer.z_channels=8",
        "tokenizer.batch_size=8", "tokenizer.steps=30", "tokenizer.checkpoint_every=30", "tokenizer.log_every=10",
        "tokenizer.torch_threads=1", "tokens.torch_threads=1",
        "ar.depth=2", "ar.width=64", "ar.batch_size=16", "ar.steps=12", "ar.warmup_steps=2", "ar.checkpoint_every=4",
        "ar.log_every=4", "ar.val_batches=1", "ar.torch_threads=1",
        "sample.per_class=2", "sample.classes=[0,5]", "sample.batch_size=4",
        "eval.samples_per_class=3", "eval.checkpoints=all")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, embedded_source):
    """The whole tiny pipeline, shard → evaluate, on the small embedded dataset: (root, cfg, results)."""
    from nextdetail.flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cfg = make_config(root, embedded_source, *FAST)
    return root, cfg, run_pipeline(cfg, until="evaluate", progress=False)


@pytest.fixture
def own_pipeline(pipeline, tmp_path):
    """A copy of the session's pipeline root for a test that changes what is there (--force, a corrupted cache,
    another decomposition): a plain copy — records name artifacts relative to their root, so a run on the copy
    finds every stage up to date there and never reaches back — and the session's root stays as every other test
    expects, whatever the order. (root, cfg, results: each stage's result rebuilt from the copy's records, as an
    up-to-date run hands it on.)"""
    import shutil

    from nextdetail.stages.stage import TABLE
    from nextdetail.storage.lineage import Lineage

    root, cfg, results = pipeline
    copy = tmp_path / "pipeline"
    shutil.copytree(root, copy, symlinks=True)
    own = make_config(copy, cfg.data.source, *FAST)
    lineage = Lineage.of(own)
    rebuilt = {stage: TABLE[stage].recorded(own, lineage.read(stage, identity))
               for stage, identity in results.identities.items()}
    return copy, own, rebuilt


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
    from nextdetail.conf.stages import key_of
    from nextdetail.flows.runtime import prefect_api
    from nextdetail.flows.shard import run_shard

    with prefect_api():
        return run_shard(cfg, key_of(cfg, "shard", {}), progress=False)


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
