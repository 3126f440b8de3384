"""The front door: a wrong path, an unwritable root or an odd file ends in one clear line (exit 2) before
Prefect or Dask start, or becomes a manifest row with its reason — never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import FAST, cli_config, make_config, run_shard_stage

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


def _cli(args: list[str], tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as a new user starts it: no Prefect server given (it would start its own ephemeral one, with
    its home under tmp_path/prefect-home)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return subprocess.run([NEXTDETAIL, *args], capture_output=True, text=True, env=env, cwd=cwd or tmp_path,
                          timeout=120)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextdetail: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _missing(t: Path) -> str:
    return str(t / "nowhere")


def _a_file(t: Path) -> str:
    (t / "a-file.txt").write_text("x")
    return str(t / "a-file.txt")


def _no_class_folders(t: Path) -> str:
    (t / "flat").mkdir()
    (t / "flat" / "a.png").write_bytes(b"x")
    return str(t / "flat")


@pytest.mark.parametrize("make, words", [
    (_missing, ("does not exist",)),
    (_a_file, ("is a file, not a directory",)),
    (_no_class_folders, ("has no class folders",)),
    (lambda t: "foo://bucket/data", ("unknown storage protocol 'foo'",)),
])
def test_a_bad_source_is_one_line_before_anything_starts(tmp_path, make, words):
    source = make(tmp_path)
    proc = _cli(["shard", "-o", f"storage.root={tmp_path / 'root'}", "-o", f"data.source={source}",
                 "-o", "data.splits=[train]"], tmp_path)
    _one_line(proc, *words)
    assert not (tmp_path / "prefect-home").exists()  # Prefect never started


def test_a_flat_split_without_its_labels_file_is_one_line(tmp_path, embedded_source):
    source = tmp_path / "source"
    shutil.copytree(embedded_source, source)
    for f in (source / "val").rglob("*.png"):  # val/ flattened, as ImageNet ships it, but no LOC_val_solution.csv
        f.rename(source / "val" / f.name)
    for d in [d for d in (source / "val").iterdir() if d.is_dir()]:
        d.rmdir()
    proc = _cli(["shard", "-o", f"storage.root={tmp_path / 'root'}", "-o", f"data.source={source}"], tmp_path)
    _one_line(proc, "val/", "LOC_val_solution.csv")


def test_an_unwritable_storage_root_is_one_line(tmp_path, embedded_source):
    (tmp_path / "a-file").write_text("x")
    proc = _cli(["run", "-o", f"storage.root={tmp_path / 'a-file' / 'root'}", "-o", f"data.source={embedded_source}"],
                tmp_path)
    _one_line(proc, "storage.root", "is a file, not a folder")
    assert not (tmp_path / "prefect-home").exists()


def test_help_writes_nothing_and_stage_names_take_either_spelling(tmp_path):
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and not list(tmp_path.iterdir())
    root = tmp_path / "root"
    for spelling in ("train-tokenizer", "train_tokenizer"):
        proc = _cli(["run", "--dry-run", "--until", spelling, "-o", f"storage.root={root}"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "train_tokenizer" in proc.stdout and "tokenize " not in proc.stdout
    _one_line(_cli(["run", "--until", "bogus"], tmp_path), "--until 'bogus'", "train_tokenizer")


def test_team_commands_refuse_bad_arguments_and_unreachable_roots_in_one_line(tmp_path):
    """cache push / pull / verify and compare: a root that is not there, a destination that is a file, options
    that are not YAML, a stage that does not exist, a root with nothing evaluated — one line each, exit 2, and
    nothing is written."""
    (tmp_path / "a-file").write_text("x")
    root = tmp_path / "root"
    (root / "lineage").mkdir(parents=True)
    here = ["-o", f"storage.root={root}"]
    cases = [
        (["cache", "pull", "--from", str(tmp_path / "nowhere"), *here], ("--from", "no such directory")),
        (["cache", "push", "--to", str(tmp_path / "a-file" / "remote"), *here], ("--to", "is a file")),
        (["cache", "push", "--to", str(tmp_path / "remote"), "--remote-options", "{not: [yaml", *here],
         ("--remote-options", "not YAML")),
        (["cache", "push", "--to", str(tmp_path / "remote"), "--remote-options", "[1, 2]", *here],
         ("--remote-options", "a mapping")),
        (["cache", "push", "--to", str(tmp_path / "remote"), "--stage", "bogus", *here], ("--stage bogus",)),
        (["cache", "verify", "-o", f"storage.root={tmp_path / 'nowhere'}"], ("storage.root", "no such directory")),
        (["compare", *here], ("no complete evaluation",)),
        (["compare", "-o", f"storage.root={tmp_path / 'nowhere'}"], ("storage.root", "no such directory")),
    ]
    for args, words in cases:
        _one_line(_cli(args, tmp_path), *words)
    assert not (tmp_path / "remote").exists() and sorted(p.name for p in root.iterdir()) == ["lineage"]


def _bad_input_corpus(tmp_path: Path, embedded_source: str) -> tuple[Path, list[Path]]:
    """The embedded photos plus what real folders hold: a FIFO named like an image, an unreadable sub-folder
    and an unreadable file, a broken link, a text file, a truncated and an empty image, a name that is not
    UTF-8, an empty class folder, one holding only a README, a hidden folder, a stray file beside the classes,
    and a val/ split whose files are all bad (its bucket would be an empty tar). Returns (root, locked paths)."""
    source = tmp_path / "source"
    shutil.copytree(embedded_source, source)
    photo = next((source / "train" / "coffee").glob("*.png"))
    coffee, rocket = source / "train" / "coffee", source / "train" / "rocket"
    os.mkfifo(coffee / "pipe.JPEG")
    (rocket / "locked").mkdir()
    shutil.copy(photo, rocket / "locked" / "inside.png")
    shutil.copy(photo, coffee / "secret.png")
    (coffee / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    (coffee / "notes.txt").write_text("not an image")
    (coffee / "truncated.png").write_bytes(photo.read_bytes()[:200])
    (coffee / "empty.JPEG").write_bytes(b"")
    with open(os.path.join(os.fsencode(coffee), b"old_\xe9t\xe9.png"), "wb") as f:  # Latin-1 bytes
        f.write(photo.read_bytes())
    (source / "train" / "aaa_empty").mkdir()
    (source / "train" / "readme_only").mkdir()
    (source / "train" / "readme_only" / "README").write_text("to be filled")
    (source / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(photo, source / "train" / ".ipynb_checkpoints" / "copy.png")
    (source / "train" / "LICENSE").write_text("a stray file beside the class folders")
    shutil.rmtree(source / "val")
    (source / "val" / "coffee").mkdir(parents=True)
    (source / "val" / "coffee" / "broken.png").write_bytes(b"\x89PNG not really")
    return source, [rocket / "locked", coffee / "secret.png"]


def _source_paths(source: Path, locked_dir: Path) -> set[str]:
    from nextdetail.storage.sources import display_path

    found = set()
    for dirpath, dirs, files in (w for split in ("train", "val") for w in os.walk(source / split)):
        rel = os.path.relpath(dirpath, source).replace(os.sep, "/")
        if Path(dirpath) == locked_dir:  # one row for the folder that cannot be listed
            found.add(display_path(rel))
            dirs.clear()
            continue
        found |= {display_path(f"{rel}/{f}".removeprefix("./")) for f in files}
    return found


def _check_tars(shard_dir: Path) -> list[str]:
    """No tar without samples; the printed patterns name exactly the tars; their members are the manifest's
    written rows."""
    import webdataset as wds
    from braceexpand import braceexpand

    marker = json.loads((shard_dir / "_COMPLETE.json").read_text())
    rows = pq.read_table(shard_dir / "manifest.parquet").to_pylist()
    tars = sorted(p.name for p in shard_dir.glob("*.tar"))
    assert sorted(n for pattern in marker["summary"]["patterns"].values() for n in braceexpand(pattern)) == tars
    members = set()
    for tar in tars:
        keys = {s["__key__"] for s in wds.WebDataset(str(shard_dir / tar), shardshuffle=False, empty_check=False)}
        assert keys, f"{tar} has no samples"
        members |= {(tar, k) for k in keys}
    assert members == {(r["shard"], r["key"]) for r in rows if r["index_in_shard"] >= 0}
    return tars


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_bad_input_corpus_through_shard_and_status(tmp_path, embedded_source):
    """The corpus through the CLI's `shard` and `status` as an unprivileged user: exit 0 and no traceback; every
    file a tar member or a manifest row with its reason; no tar without samples and the printed pattern names
    exactly the tars; an empty folder and a README-only one are both classes. Then the locks are lifted: what
    could not be read is retried by the next run (status says so), the tar that changes gets a new content hash
    (what downstream keys on), the others stay, and the killed writer's temporary of the rewritten tar is gone."""
    source, locked = _bad_input_corpus(tmp_path, embedded_source)
    # root reads everything: without the two capabilities that let it, the locks hold as for any user
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    # many buckets (some empty); 64 px on the tiny preset: the tokenizer's schedule follows (patch_nums auto)
    args = cli_config(tmp_path / "out", str(source), "shard.samples_per_shard=1", "shard.resolution=64")
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}

    def cli(*cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*unprivileged, NEXTDETAIL, *cmd, *args], capture_output=True, text=True, env=env,
                              timeout=240)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc

    for path in locked:
        path.chmod(0)
    try:
        assert "missing" in cli("status").stdout
        first = cli("shard", "--no-progress")
        shard_dir = next((tmp_path / "out" / "shards").glob("*"))
        marker = json.loads((shard_dir / "_COMPLETE.json").read_text())
        rows = {r["source_path"]: r for r in pq.read_table(shard_dir / "manifest.parquet").to_pylist()}
        assert set(rows) == _source_paths(source, locked[0])  # every file accounted for
        assert not any(t.startswith("val-") for t in _check_tars(shard_dir))  # val/ has no sample: no tar
        retry_status = cli("status").stdout
        # The file's lock lifted (the folder's stays): no listing fingerprint changes, yet the re-run reads it.
        locked[1].chmod(0o644)
        parts = {p.stem: json.loads(p.read_text())["summary"] for p in (shard_dir / "_parts").glob("*.json")}
        secret_tar = rows["train/coffee/secret.png"]["shard"]
        stale_tmp, other_tmp = shard_dir / f".{secret_tar}.tmp-999999-deadbeef", shard_dir / ".x.tar.tmp-1-feedbeef"
        for tmp in (stale_tmp, other_tmp):  # what killed writers left, a minute ago
            tmp.write_bytes(b"half a tar")
            os.utime(tmp, (time.time() - 60, time.time() - 60))
        cli("shard", "--no-progress")
        _check_tars(shard_dir)
        final_status = cli("status").stdout
    finally:
        for path in locked:
            path.chmod(0o755)
    reason = {p: (r["status"], r["reason"]) for p, r in rows.items()}
    assert {p: reason[p] for p in (
        "train/coffee/pipe.JPEG", "train/rocket/locked", "train/coffee/secret.png", "train/coffee/gone.JPEG",
        "train/coffee/notes.txt", "train/coffee/truncated.png", "train/coffee/empty.JPEG",
        "train/.ipynb_checkpoints/copy.png", "train/readme_only/README", "train/LICENSE", "val/coffee/broken.png",
        "train/coffee/old_\\xe9t\\xe9.png")} == {
        "train/coffee/pipe.JPEG": ("skipped", "not_a_file"), "train/rocket/locked": ("skipped", "unreadable"),
        "train/coffee/secret.png": ("skipped", "unreadable"), "train/coffee/gone.JPEG": ("skipped", "unreadable"),
        "train/coffee/notes.txt": ("skipped", "not_an_image"), "train/coffee/truncated.png": ("skipped", "truncated"),
        "train/coffee/empty.JPEG": ("skipped", "empty_file"),
        "train/.ipynb_checkpoints/copy.png": ("skipped", "hidden_folder"),
        "train/readme_only/README": ("skipped", "not_an_image"), "train/LICENSE": ("skipped", "no_class"),
        "val/coffee/broken.png": ("skipped", "not_an_image"), "train/coffee/old_\\xe9t\\xe9.png": ("converted", "upscaled")}  # 40 px source, 64 px shards
    classes = json.loads((shard_dir / "classes.json").read_text())["classes"]
    assert classes[0] == "aaa_empty" and "readme_only" in classes and ".ipynb_checkpoints" not in classes
    assert marker["summary"]["empty_classes"] == ["aaa_empty", "readme_only"]
    assert "2 class folder(s) without images" in first.stderr + first.stdout
    assert marker["summary"]["retry"] == 1 and "could not be read" in retry_status  # secret.png
    after = {r["source_path"]: r for r in pq.read_table(shard_dir / "manifest.parquet").to_pylist()}
    assert after["train/coffee/secret.png"]["status"] == "converted"  # read now, and upscaled to 64 px
    assert after["train/rocket/locked"]["reason"] == "unreadable"  # still locked: no retry, its fix lists new files
    new_parts = {p.stem: json.loads(p.read_text())["summary"] for p in (shard_dir / "_parts").glob("*.json")}
    changed = {n for n in new_parts if new_parts[n]["tar_sha256"] != parts.get(n, {}).get("tar_sha256")}
    assert changed == {secret_tar.removesuffix(".tar")}
    new_marker = json.loads((shard_dir / "_COMPLETE.json").read_text())
    assert new_marker["identity"] == marker["identity"]  # the same listing and settings …
    assert new_marker["summary"]["content_sha256"] != marker["summary"]["content_sha256"]  # … other tars
    assert new_marker["summary"]["retry"] == 0 and "could not be read" not in final_status
    assert re.search(r"shard\s+up to date", final_status), final_status
    assert not stale_tmp.exists() and other_tmp.exists()


@pytest.mark.integration
def test_the_embedded_default_on_an_s3_endpoint_with_options(s3_endpoint, monkeypatch):
    """The README's team set-up with the default data: the embedded build is written to the bucket and read
    back through the same endpoint options (a dead proxy catches any request sent elsewhere)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    options = f"storage.options={{client_kwargs: {{endpoint_url: '{s3_endpoint}'}}}}"
    cfg = make_config("s3://team-bucket/nd", "embedded", options,
                      "data.embedded={per_class: 3, val_per_class: 1, image_size: 40}")
    result = run_shard_stage(cfg)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    rows = pq.read_table(io.BytesIO(fs.cat_file(result.manifest_url))).to_pylist()
    assert len(rows) == 12 * 4 and all(r["status"] in ("written", "converted") for r in rows)


@pytest.mark.integration
def test_names_that_sanitise_alike_or_are_not_utf8_are_all_written_under_distinct_keys(tmp_path, embedded_source):
    source = tmp_path / "source"
    shutil.copytree(embedded_source, source)
    photo = next((source / "train" / "coffee").glob("*.png")).read_bytes()
    names = ["a.b.c.png", "a_b_c.png", "café.png", "cafe\u0301.png"]
    for name in names:
        (source / "train" / "coffee" / name).write_bytes(photo)
    odd = os.path.join(os.fsencode(source / "train" / "coffee"), b"bad_\xff\xfe.png")
    with open(odd, "wb") as f:
        f.write(photo)
    cfg = make_config(tmp_path / "out", str(source))
    first = run_shard_stage(cfg)
    rows = {r["source_path"]: r for r in pq.read_table(Path(first.url) / "manifest.parquet").to_pylist()}
    ours = [rows[f"train/coffee/{n}"] for n in [*names, "bad_\\xff\\xfe.png"]]
    assert all(r["status"] == "written" for r in ours), [(r["source_path"], r["reason"]) for r in ours]
    assert len({r["key"] for r in ours}) == len(ours) and all("." not in r["key"] for r in ours)
    assert rows["train/coffee/a_b_c.png"]["key"] == "train/coffee/a_b_c"  # a clean name keeps its key
    again = run_shard_stage(cfg)  # stable across runs
    assert {r["key"] for r in pq.read_table(Path(again.url) / "manifest.parquet").to_pylist()} == {r["key"] for r in
                                                                                                   rows.values()}


def _ours(prefect_home: Path) -> list[str]:
    """Processes still running with this test's PREFECT_HOME: the ephemeral server, Dask workers, ranks."""
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get("PREFECT_HOME") == str(prefect_home):
                left.append(" ".join(p.info["cmdline"] or [])[:120])
    return left


def _gone_within(prefect_home: Path, seconds: float) -> list[str]:
    deadline = time.time() + seconds
    while (left := _ours(prefect_home)) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage, ready", [
    ("shard", "shards/*/*.tar"),
    ("train_tokenizer", "tokenizer/*/*/checkpoints/step-*.pt"),
])
@pytest.mark.e2e
def test_ctrl_c_stops_the_work_in_seconds_in_one_line_and_the_rerun_resumes(tmp_path, embedded_source, stage, ready):
    """SIGINT to the CLI's process group (a terminal's Ctrl-C) mid-stage, the CLI starting its own Prefect
    server and Dask cluster: exit 130 (a hang past 30 s fails the test), one line, no process of the run left; the re-run builds
    what an uninterrupted run builds."""
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="WARNING")
    cmd = [NEXTDETAIL, "run", "--until", stage, "--no-progress", *cli_config(root, embedded_source, *FAST)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 400
    while next(root.glob(ready), None) is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # stopping takes seconds; a hang raises TimeoutExpired
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("nextdetail:")] == [
        "nextdetail: interrupted — re-run the same command to resume"]
    assert not _gone_within(tmp_path / "prefect-home", 10)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stderr[-2000:]
    reference = tmp_path / "reference"
    clean = subprocess.run([NEXTDETAIL, "run", "--until", stage, "--no-progress",
                            *cli_config(reference, embedded_source, *FAST)], env=env, capture_output=True, text=True,
                           timeout=500)
    assert clean.returncode == 0, clean.stderr[-2000:]
    if stage == "shard":
        digest = lambda base: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                               for p in base.glob("shards/*/*.tar")}
    else:
        digest = lambda base: {p.name: _weights(p) for p in base.glob("tokenizer/*/*/tokenizer.pt")}  # noqa: E731
    assert digest(root) == digest(reference) and digest(root)


def _weights(path: Path) -> str:
    import torch

    from nextdetail.storage.checkpoints import tensors_sha256

    return tensors_sha256(torch.load(path, weights_only=True)["model"])


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_sigkilled_cli_leaves_no_prefect_server_behind(tmp_path, embedded_source):
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen([NEXTDETAIL, "run", "--until", "shard", "--no-progress", *cli_config(root, embedded_source)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while next(root.glob("shards/*/*.tar"), None) is None:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert _ours(tmp_path / "prefect-home")  # the server and the Dask workers are running
    os.kill(proc.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 PID` does: its children are orphaned
    proc.wait()
    assert not _gone_within(tmp_path / "prefect-home", 10)


def test_a_section_check_names_the_key_not_the_whole_section(tmp_path):
    line = _one_line(_cli(["config", "-o", "shard.shard_count={train: 0}"], tmp_path), "shard.shard_count.train=0")
    assert "samples_per_shard" not in line  # the section's other values are not dumped


@pytest.mark.integration
@pytest.mark.parametrize("exif", ["apply", "ignore"])
def test_exif_orientation_is_a_setting_and_what_was_applied_is_in_the_manifest(tmp_path, embedded_source, exif):
    import tarfile

    from PIL import Image

    source = tmp_path / "source"
    shutil.copytree(embedded_source, source)
    phone = Image.new("RGB", (60, 40), (200, 30, 30))  # stored landscape; EXIF 6: shown rotated 90° clockwise
    tags = Image.Exif()
    tags[0x0112] = 6
    phone.save(source / "train" / "coffee" / "phone.jpg", format="JPEG", exif=tags)
    result = run_shard_stage(make_config(tmp_path / "out", str(source), "shard.resolution=null",
                                         "shard.preprocess=keep", f"shard.exif={exif}"))
    row = next(r for r in pq.read_table(Path(result.url) / "manifest.parquet").to_pylist()
               if r["source_path"] == "train/coffee/phone.jpg")
    with tarfile.open(Path(result.url) / row["shard"]) as tf:
        member = tf.getmember(f"{row['key']}.png")  # the tiny preset writes PNG
        written = Image.open(io.BytesIO(tf.extractfile(member).read()))
    if exif == "apply":
        assert written.size == (40, 60) and (row["status"], row["reason"]) == ("converted", "exif_orientation_6")
    else:
        assert written.size == (60, 40) and (row["status"], row["reason"]) == ("written", "")


@pytest.mark.integration
def test_a_source_that_cannot_be_reached_is_one_line_naming_why(tmp_path, s3_endpoint, s3_endpoint_with_auth):
    """Before Prefect starts: an unknown protocol, a host that does not resolve, an endpoint nobody answers on, a
    bucket that does not exist, credentials the store refuses — each one line naming the URL and the cause,
    exit 2."""
    dead = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                       "config_kwargs": {"retries": {"max_attempts": 1}}})
    moto = json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})
    refusing = json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint_with_auth}, "key": "not-issued",
                           "secret": "by-this-store"})
    cases = [
        (["-o", "data.source=nosuchproto://x/y"], "unknown storage protocol"),
        (["-o", "data.source=ftp://nextdetail-test.invalid/y"], "cannot resolve host"),
        (["-o", "data.source=s3://team-bucket/x", "-o", f"storage.options={dead}"], "endpoint unreachable"),
        (["-o", "data.source=s3://no-such-bucket/x", "-o", f"storage.options={moto}"], "bucket missing"),
        (["-o", "data.source=s3://team-bucket/x", "-o", f"storage.options={refusing}"], "access denied"),
    ]
    for overrides, why in cases:
        proc = _cli(["shard", "--preset", "tiny", "-o", f"storage.root={tmp_path / 'root'}", *overrides], tmp_path)
        line = _one_line(proc, why)
        assert overrides[1].split("=", 1)[1] in line and "by-this-store" not in line, line


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_ephemeral_servers_own_output_goes_to_its_log_not_the_terminal(tmp_path):
    """The server the CLI starts writes its errors (SQLite retries, …) to PREFECT_HOME/server.log: its stdout and
    stderr are that file, while the CLI's own stderr is the terminal again once the server is up."""
    script = (
        "import os, sys\n"
        "from nextdetail.pipeline.runtime import configure_environment\n"
        f"configure_environment({str(tmp_path)!r})\n"
        "import psutil\n"
        "from nextdetail.pipeline.runtime import prefect_api\n"
        "with prefect_api():\n"
        "    server = [p for p in psutil.Process().children(recursive=True) if 'uvicorn' in ' '.join(p.cmdline())]\n"
        "    print(os.readlink(f'/proc/{server[0].pid}/fd/1'), os.readlink(f'/proc/{server[0].pid}/fd/2'))\n"
        "    print('the CLI still writes here', file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = str(tmp_path / "prefect" / "server.log")
    assert proc.stdout.split() == [log, log]
    assert "the CLI still writes here" in proc.stderr
