"""Test set-up: a real Prefect server (`prefect server start` on 127.0.0.1) shared by the session,
a temporary PREFECT_HOME, and small datasets built from the embedded photographs."""

from __future__ import annotations

import os
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
from helpers import FAST, free_port, make_config, start_prefect_server, stop_group  # noqa: E402

from nextdetail.pipeline.runtime import configure_environment  # noqa: E402

configure_environment(_WORK)
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: starts real parts — Prefect's server, a Dask cluster, moto's S3 "
                                       "server, Chromium (`make test`; unmarked tests are units: `make test-fast`)")
    config.addinivalue_line("markers", "e2e: runs pipelines — several stages or all of them (`make test`)")


@pytest.fixture(autouse=True)
def _prefect_for_real_parts(request: pytest.FixtureRequest) -> None:
    """An `integration` or `e2e` test runs against the session's Prefect server (started on first need); a unit
    test (unmarked) never starts one."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("e2e"):
        request.getfixturevalue("prefect_server")




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
    from nextdetail.conf.environment import EmbeddedConfig
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
    port = free_port()
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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, embedded_source):
    """The whole tiny pipeline, shard → evaluate, on the small embedded dataset: (root, cfg, results)."""
    from nextdetail.pipeline.run import run_pipeline

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

    from nextdetail.stages import REGISTRY
    from nextdetail.storage.lineage import Lineage

    root, cfg, results = pipeline
    copy = tmp_path / "pipeline"
    shutil.copytree(root, copy, symlinks=True)
    own = make_config(copy, cfg.data.source, *FAST)
    lineage = Lineage.of(own)
    rebuilt = {stage: REGISTRY[stage].recorded(own, lineage.read(stage, identity))
               for stage, identity in results.identities.items()}
    return copy, own, rebuilt


