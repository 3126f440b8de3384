"""Team operations on a real bucket (moto's S3 server): push a root's artifacts, build on the bucket while `cache gc`
runs there, pull only the token cache into a newcomer's empty root, and `cache verify` a damaged copy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import FAST, cli_config, make_config, objects_per_array

from nextdetail.cache.inventory import apply_gc, inventory, plan_gc
from nextdetail.cache.transfer import at_root
from nextdetail.pipeline.run import run_pipeline
from nextdetail.stages import STAGES
from nextdetail.storage.fs import Store
from nextdetail.storage.lineage import Lineage
from nextdetail.storage.tokens import TokenCache

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


def _nd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NEXTDETAIL, *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PREFECT_LOGGING_LEVEL": "WARNING"})


def _artifacts(api: str, where: dict) -> list[dict]:
    """Artifacts from the Prefect server's REST API (`POST /artifacts/filter`), newest first."""
    body = json.dumps({"artifacts": where, "sort": "CREATED_DESC", "limit": 200, "offset": 0}).encode()
    request = urllib.request.Request(f"{api}/artifacts/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _data(artifact: dict) -> list:
    """A table artifact's rows (the API returns them as a JSON string)."""
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


def _files(store: Store) -> dict[str, str]:
    """sha256 of every file under an artifact (its marker left out: the copy's names the copy)."""
    return {rel: store.sha256(rel) for rel in (p[len(store.root) + 1:] for p in store.fs.find(store.path("")))
            if not rel.endswith("_COMPLETE.json")}


@pytest.mark.e2e
def test_push_build_on_the_bucket_during_gc_pull_the_token_cache_alone_and_verify(pipeline, s3_endpoint, tmp_path):
    """1. push shards, factors and tokenizer to s3://team-bucket/nd: every file arrives with its sha256, the records
    follow (status on the bucket: up to date), a second push sends nothing. 2. tokenize runs on the bucket while
    `cache gc --yes` runs there: the attempt being written is left alone and the cache publishes and verifies;
    `cache ls`, `du` and `verify` on the bucket see the four artifacts, every file with a sha256; the rest of the
    pipeline pushed after them makes every stage up to date there, and `compare` reads and draws on the bucket.
    3. a newcomer pulls `--stage tokenize` into an empty root: the token cache and its record only; `run --until
    tokenize` there rebuilds the rest and encodes nothing. 4. a flipped byte in that copy: `cache verify` finds it
    (exit 1), `--withdraw` moves the marker aside and status calls the stage missing."""
    root, cfg, first = pipeline
    remote, options = "s3://team-bucket/nd", {"client_kwargs": {"endpoint_url": s3_endpoint}}
    opts = json.dumps(options)
    here = cli_config(root, cfg.data.source, *FAST)
    push = ["cache", "push", "--to", remote, "--remote-options", opts, "--no-progress",
            "--stage", "shard", "--stage", "decompose", "--stage", "train_tokenizer", *here]
    out = _nd(*push)
    assert out.returncode == 0, out.stderr
    assert "3 copied" in out.stdout, out.stdout
    bucket = at_root(cfg, remote, options)
    for stage in ("shard", "decompose", "train_tokenizer"):
        there = Store(first[stage].url.replace(str(root), remote), options)
        assert _files(there) == _files(Store(first[stage].url)), stage
        record = Lineage(Store(remote, options)).read(stage, first.identities[stage])
        assert record["artifact"]["url"] == there.url()
    again = _nd(*push)
    assert again.returncode == 0 and "0 copied (0 B sent), 3 already there" in again.stdout, again.stdout
    on_bucket = cli_config(root, cfg.data.source, *FAST, f"storage.root={remote}", f"storage.options={opts}")
    status = json.loads(_nd("status", "--json", *on_bucket).stdout)
    assert [s["state"] for s in status][:3] == ["up to date"] * 3 and status[3]["state"] == "missing"

    # 2. gc on the bucket while its token cache is being written
    watcher, seen = Store(remote, options), {}

    def collect_while_encoding() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            watcher.refresh("tokens")
            parts = [p for p in watcher.find("tokens") if "/_parts/" in p]
            if parts:
                seen["attempt_files"] = set(watcher.find("tokens"))
                removals, _ = plan_gc(bucket, inventory({"cart": bucket}))
                apply_gc(bucket, removals, log=lambda _: None)
                seen["removed"] = [r.entry.url for r in removals]
                seen["after"] = set(watcher.find("tokens"))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=collect_while_encoding, daemon=True)
    thread.start()
    built = run_pipeline(bucket, until="tokenize", progress=False)
    thread.join(timeout=60)
    assert "removed" in seen, "gc never ran while the attempt was being written"
    assert not any("/tokens" in url for url in seen["removed"]), seen["removed"]
    assert seen["attempt_files"] <= seen["after"]  # nothing of the attempt was deleted under the writer
    assert [built.work[s] for s in ("shard", "decompose", "train_tokenizer", "tokenize")] == \
        ["up to date"] * 3 + ["ran"]
    assert built.identities["tokenize"] == first.identities["tokenize"]
    assert TokenCache(built["tokenize"].url, options, str(tmp_path / "mirror")).verify() == []
    # objects per tar, not per image, on the bucket: the factors pushed, the tokens written there
    from nextdetail.storage.factors import read_index

    for zarr_dir, url, index in (
            ("factors.zarr", built["decompose"].url, read_index(Store(built["decompose"].url, options))),
            ("tokens.zarr", built["tokenize"].url, TokenCache(built["tokenize"].url, options,
                                                              str(tmp_path / "mirror")).index())):
        tars = {f"{r['split']}/{r['shard'].removesuffix('.tar')}" for r in index.to_pylist()}
        rel = url.removeprefix(remote).strip("/")
        watcher.refresh(rel)
        assert objects_per_array(watcher.find(rel), zarr_dir) == dict.fromkeys(tars, 1), zarr_dir
    listed = json.loads(_nd("cache", "ls", "--json", *on_bucket).stdout)
    assert sorted(e["stage"] for e in listed if e["state"] == "complete") == \
        ["decompose", "shard", "tokenize", "train_tokenizer"]
    assert "total" in _nd("cache", "du", *on_bucket).stdout
    checked = _nd("cache", "verify", "--no-progress", *on_bucket)
    assert checked.returncode == 0 and "4 artifact(s)" in checked.stdout and "(0 by size only" in checked.stdout, \
        checked.stdout + checked.stderr  # every file pushed or built there has its sha256 recorded

    # the rest of the session's pipeline joins it there: the bucket's root now compares and draws like a local one
    rest = _nd("cache", "push", "--to", remote, "--remote-options", opts, "--no-progress", "--stage", "train_ar",
               "--stage", "sample", "--stage", "evaluate", *here)
    assert rest.returncode == 0 and "3 copied" in rest.stdout, rest.stdout + rest.stderr
    status = json.loads(_nd("status", "--json", *on_bucket).stdout)
    assert {s["state"] for s in status} == {"up to date"}, status
    compared = _nd("compare", "--format", "json", *on_bucket)
    assert compared.returncode == 0, compared.stderr
    assert [r["evaluate"] for r in json.loads(compared.stdout)] == [first.identities["evaluate"][:12]]
    assert Store(remote, options).read_bytes("reports/compare.png")[:4] == b"\x89PNG"

    # 3. a newcomer takes the token cache alone
    newcomer = tmp_path / "newcomer"
    mine = cli_config(newcomer, cfg.data.source, *FAST)
    pulled = _nd("cache", "pull", "--from", remote, "--remote-options", opts, "--stage", "tokenize", "--no-progress",
                 *mine)
    assert pulled.returncode == 0 and "1 copied" in pulled.stdout, pulled.stdout + pulled.stderr
    assert sorted(p.name for p in newcomer.iterdir()) == ["lineage", "tokens"]
    assert sorted(p.name for p in (newcomer / "lineage").iterdir()) == ["runs", "tokenize"]
    theirs = make_config(newcomer, cfg.data.source, *FAST)
    run = run_pipeline(theirs, until="tokenize", progress=False)
    assert run.work["tokenize"] == "up to date" and run.work["train_tokenizer"] == "ran"  # nothing encoded
    assert run["tokenize"].url.startswith(str(newcomer))

    # 4. a damaged copy
    chunk = next(p for p in (newcomer / "tokens").rglob("c/0/0/0"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))  # same size: only a sha256 tells
    check = _nd("cache", "verify", "--no-progress", *mine)
    assert check.returncode == 1 and "DAMAGED tokenize" in check.stdout and chunk.name in check.stdout, check.stdout
    withdrawn = _nd("cache", "verify", "--withdraw", "--no-progress", *mine)
    assert withdrawn.returncode == 1 and "withdrawn" in withdrawn.stdout
    states = {s["stage"]: s["state"] for s in json.loads(_nd("status", "--json", *mine).stdout)}
    assert states["tokenize"] == "missing" and states["train_tokenizer"] == "up to date"
    assert _nd("cache", "verify", "--no-progress", *mine).returncode == 0  # what is left is intact


@pytest.mark.e2e
def test_compare_shows_what_differs_and_a_run_publishes_its_results_to_the_prefect_ui(pipeline, own_pipeline,
                                                                                    prefect_server, tmp_path):
    """A second evaluation (another evaluation seed) under the root: `nextdetail compare --only-changed` gives two
    rows whose only setting column is `eval.seed`, in md, csv and json, and draws FID vs GFLOPs. The run that
    made it went through the session's real Prefect server: its flow run carries the status table, a markdown per
    stage (sample's with its grid), evaluate's report (the file's text) and metrics, and the comparison table."""
    from nextdetail.pipeline.ui import key

    root, cfg, _ = own_pipeline
    first = pipeline[2]
    for record in (root / "lineage" / "evaluate").glob("*.json"):  # other tests' evaluations of the session root
        if record.stem not in (first.identities["evaluate"], "latest"):
            record.unlink()
    other = run_pipeline(make_config(root, cfg.data.source, *FAST, "eval.seed=5"), progress=False)
    assert other.work["sample"] == "up to date" and other.work["evaluate"] == "ran"
    args = cli_config(root, cfg.data.source, *FAST)
    out = _nd("compare", "--only-changed", "--format", "json", "--png", str(tmp_path / "compare.png"), *args)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["evaluate"] for r in rows] == [first.identities["evaluate"][:12], other.identities["evaluate"][:12]]
    settings = [c for c in rows[0] if "." in c]
    assert settings == ["eval.seed"] and [r["eval.seed"] for r in rows] == [0, 5]
    assert all(isinstance(r["fid"], float) and r["gflops_per_image"] > 0 and r["train_steps"] == 12 for r in rows)
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = _nd("compare", "--png", "-", *args).stdout
    assert md.startswith("| evaluate | model |") and "ar.depth" in md and md.count("\n| ") == 2  # two rows, all settings
    csv_out = _nd("compare", "--format", "csv", "--only-changed", "--png", "-", *args).stdout.splitlines()
    assert csv_out[0].endswith(",eval.seed") and len(csv_out) == 3

    mine = [a for a in _artifacts(prefect_server, {"key": {"any_": [key("compare")]}})
            if str(root) in (a["description"] or "")]
    assert mine, "no comparison table for this root in the Prefect API"
    compare = mine[0]  # the newest
    assert len(_data(compare)) == 2
    published = {a["key"]: a for a in _artifacts(prefect_server, {"flow_run_id": {"any_": [compare["flow_run_id"]]}})}
    stages = ("shard", "decompose", "train-tokenizer", "tokenize", "train-ar", "sample", "evaluate")
    assert {key("status"), key("compare"), key("cart", "report"), key("cart", "metrics"),
            *(key("cart", s) for s in stages)} <= set(published)
    status = {r["stage"]: r for r in _data(published[key("status")])}  # what this run did, and why
    assert [status[s]["did"] for s in STAGES] == ["reused"] * 6 + ["ran"] and "eval.seed" in status["evaluate"]["why"]
    sample_md = published[key("cart", "sample")]["data"]  # its pictures inside it, not links to this machine
    assert "](data:image/png;base64," in sample_md and "file://" not in sample_md and str(root) not in sample_md
    report_file = Path(other["evaluate"].url, "report.md").read_text()
    report = published[key("cart", "report")]["data"]
    assert "![samples](grid.png)" in report_file and "![samples](data:image/png;base64," in report
    assert str(root) not in report and all(h in report for h in report_file.splitlines() if h.startswith("#"))
    metrics = _data(published[key("cart", "metrics")])
    assert len(metrics) == 3 and list(metrics[0])[:3] == ["checkpoint", "step", "FID"]  # steps 4, 8, 12; FID first
    assert list(_data(compare)[0])[:4] == ["model", "evaluate", "checkpoint", "FID"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["finished"]) for r in _data(compare))


def _published(tmp_path: Path) -> tuple[Store, dict]:
    """A small published artifact (a marker with sizes and sha256 over three files)."""
    from nextdetail.pipeline.artifacts import Artifact

    src = Store(str(tmp_path / "src" / "transformer" / "m-1"))
    for i in range(3):
        src.write_bytes(f"checkpoints/step-{i}.pt", bytes([i]) * (1000 + i))
    record = Artifact("train_ar", "ident", src).publish({"steps": 3}, [f"checkpoints/step-{i}.pt" for i in range(3)],
                                                         time.time())
    return src, record


def test_a_killed_copy_resumes_and_a_damaged_source_never_publishes(tmp_path):
    """copy_artifact: files a killed copy left with the right sha256 are not sent again, the marker comes last and
    records every file's sha256; a source file that no longer has its recorded sha256 stops the copy before the
    marker (the destination stays unpublished); a published destination is never rewritten."""
    from nextdetail.cache.transfer import copy_artifact
    from nextdetail.storage.roots import rename_under

    src, _ = _published(tmp_path)
    dst = Store(str(tmp_path / "dst" / "transformer" / "m-1"))
    rename = lambda v: rename_under(v, str(tmp_path / "src"), str(tmp_path / "dst"))  # noqa: E731
    dst.write_bytes("checkpoints/step-0.pt", src.read_bytes("checkpoints/step-0.pt"))  # what a killed copy left
    dst.write_bytes("checkpoints/step-1.pt", b"\0" * 1001)  # same size, other bytes: sent again
    sent = copy_artifact("train_ar", src, dst, "ident", rename, progress=False)
    assert sent.state == "copied" and sent.bytes == 1001 + 1002
    marker = json.loads(dst.read_bytes("_COMPLETE.json"))
    assert marker["sha256"] == {rel: src.sha256(rel) for rel in marker["files"]} and len(marker["sha256"]) == 3
    assert copy_artifact("train_ar", src, dst, "ident", rename, progress=False).state == "already there"

    other = Store(str(tmp_path / "dst2" / "transformer" / "m-1"))
    src.write_bytes("checkpoints/step-2.pt", b"\1" * 1002)  # damaged at the source, size unchanged
    with pytest.raises(OSError, match="no longer has the sha256"):
        copy_artifact("train_ar", src, other, "ident", rename, progress=False)
    assert not other.exists("_COMPLETE.json") and not other.exists("checkpoints/step-2.pt")
