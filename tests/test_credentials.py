"""Credentials never leave the process: a team's set-up (the session's real `prefect server start`, moto's S3
server, the CLI) given bucket credentials every supported way, then every place a secret could end up searched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import s3fs
from helpers import FAST

from nextdetail.conf.secrets import is_secret_name, override_has_secret, reveal, wrap

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


def test_credential_names_are_recognised_and_revealed_only_on_request():
    options = wrap({"key": "k", "secret": "s", "anon": False, "client_kwargs": {
        "endpoint_url": "http://x", "aws_session_token": "t", "region_name": "eu"}})
    assert json.dumps(options, default=str).count("**********") == 3 and "eu" in json.dumps(options, default=str)
    assert reveal(options) == {"key": "k", "secret": "s", "anon": False, "client_kwargs": {
        "endpoint_url": "http://x", "aws_session_token": "t", "region_name": "eu"}}
    assert all(map(is_secret_name, ["key", "secret", "token", "password", "account_key", "aws_access_key_id"]))
    assert not any(map(is_secret_name, ["endpoint_url", "region_name", "anon", "use_ssl", "requester_pays"]))
    assert override_has_secret(["storage", "options", "secret"], "x")
    assert override_has_secret(["storage", "options"], {"client_kwargs": {"aws_secret_access_key": "x"}})
    assert not override_has_secret(["storage", "options", "client_kwargs", "endpoint_url"], "http://x")
    assert not override_has_secret(["sample", "seed"], 3)


def _secret() -> str:
    return "SeCrEt" + uuid.uuid4().hex


def _api_dump(api: str) -> str:
    """Everything the Prefect API lists (flow runs with their parameters, task runs, deployments, artifacts,
    logs, variables, block documents without secret values), as text."""
    out = []
    with httpx.Client(base_url=api, timeout=30) as client:
        for what in ("flows", "flow_runs", "task_runs", "deployments", "artifacts", "logs", "variables",
                     "block_documents", "work_pools", "concurrency_limits"):
            offset = 0
            while True:
                r = client.post(f"/{what}/filter", json={"limit": 200, "offset": offset})
                assert r.status_code == 200, (what, r.text[:300])
                page = r.json()
                out.append(f"[{what}] " + json.dumps(page))
                if len(page) < 200:
                    break
                offset += 200
    return "\n".join(out)


def _files_text(root: Path, skip: set[Path]) -> bytes:
    return b"\n".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p not in skip)


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_credentials_given_every_way_appear_nowhere(tmp_path, s3_endpoint, embedded_source, prefect_server):
    from prefect.blocks.system import Secret

    keys = {way: (_secret(), _secret()) for way in ("inline", "file", "block", "env")}
    endpoint = f"storage.options.client_kwargs.endpoint_url={s3_endpoint}"
    base = ["--preset", "tiny", "-o", "storage.root=s3://team-bucket/nd", "-o", endpoint,
            "-o", f"data.source={embedded_source}", "-o", "shard.samples_per_shard=32", "-o", "dask.n_workers=2",
            *[a for o in FAST for a in ("-o", o)]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only what each way gives
    env.update(PREFECT_LOGGING_LEVEL="WARNING", AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))
    outputs: list[str] = []

    def cli(*args: str, extra_env: dict | None = None, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([NEXTDETAIL, *args], capture_output=True, text=True, env={**env, **(extra_env or {})},
                              cwd=tmp_path, timeout=900)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc

    # 1. inline, the fsspec way: every stage. Nothing works without them (no AWS environment here).
    inline = ["-o", f"storage.options.key={keys['inline'][0]}", "-o", f"storage.options.secret={keys['inline'][1]}"]
    run = cli("run", "--no-progress", *base, *inline)
    assert "evaluate" in run.stdout
    config = cli("config", *base, *inline).stdout
    assert config.count("**********") == 2
    # 2. a credentials file; 3. a Prefect Secret block (what a deployment uses); 4. the environment.
    cred_file = tmp_path / "credentials.json"
    cred_file.write_text(json.dumps({"key": keys["file"][0], "secret": keys["file"][1]}))
    cli("run", "--no-progress", "--until", "shard", "--force", "shard", *base,
        "-o", f"storage.credentials_file={cred_file}")
    # A JSON string (a SecretStr): Prefect 3.8 obfuscates it in every API listing; a dict value it lists in clear.
    Secret(value=json.dumps({"key": keys["block"][0], "secret": keys["block"][1]})).save("team-bucket", overwrite=True)
    cli("run", "--no-progress", "--until", "shard", "--force", "shard", *base,  # on Dask workers, as decompose
        "-o", "storage.credentials_block=team-bucket")
    status = cli("status", *base, extra_env={"AWS_ACCESS_KEY_ID": keys["env"][0],
                                             "AWS_SECRET_ACCESS_KEY": keys["env"][1]})
    assert "up to date" in status.stdout
    no_creds = cli("status", *base, code=2)  # and without any: one line
    assert no_creds.stderr.startswith("nextdetail: ")

    # serve: credentials inline are refused (a deployment stores its parameters); with a block, the scheduled
    # run resolves them when it runs.
    refused = cli("serve", "--name", "cred-test", *base, *inline, code=2)
    assert "credentials_block" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    served = subprocess.Popen([NEXTDETAIL, "serve", "--name", "cred-test", "--until", "shard", *base,
                               "-o", "storage.credentials_block=team-bucket"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        from prefect.deployments import run_deployment

        deadline = time.time() + 120
        while True:  # the deployment appears once serve has registered it
            try:
                flow_run = run_deployment("nextdetail-scheduled/cred-test", timeout=600)
                break
            except Exception:
                assert time.time() < deadline and served.poll() is None, served.communicate()[1][-2000:]
                time.sleep(1)
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        os.killpg(served.pid, signal.SIGINT)
        out, err = served.communicate(timeout=60)
        outputs.append(out + err)

    # Now search: the Prefect server's database and API, the bucket, every local file the runs wrote (Prefect
    # homes, caches), and everything the CLI printed.
    db = Path(os.environ["PREFECT_HOME"])
    assert (db / "prefect.db").exists()
    places = {
        "prefect database": _files_text(db, set()),
        "prefect API": _api_dump(prefect_server).encode(),
        "bucket": b"\n".join(s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing",
                                               secret="testing").cat(
            [p for p in s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing",
                                          secret="testing").find("team-bucket")]).values()),
        "local files": _files_text(tmp_path, {cred_file}),
        "CLI output": "\n".join(outputs).encode(),
    }
    assert len(places["bucket"]) > 1_000_000 and b"nextdetail-scheduled" in places["prefect API"]
    hits = {(where, way): text[max(0, text.find(s.encode()) - 200):text.find(s.encode()) + 40]
            for where, text in places.items() for way, pair in keys.items() for s in pair if s.encode() in text}
    assert not hits, sorted(hits)
