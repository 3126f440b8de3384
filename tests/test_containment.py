"""Nothing outside the roots (issue 33): what a teammate with write access to a shared root plants — paths in
markers and records, symbolic links, devices — is damage, reported in one line; no command reads, writes or
deletes outside the roots it was given, and a copied root never reaches back to the original.

The fast tests exercise the store layer's one rule (storage/fs.py, storage/roots.py); the others plant each case in
a copy of the session's tiny root and on moto's S3 server, and snapshot a sentinel directory before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, cli_config

from nextdetail.storage.fs import OutsideRoot, Store, normalize_url, relative_path, under
from nextdetail.storage.roots import ROOT, Roots, place, relativize

NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")


def _nd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI, bounded in time: a command that would hang fails the test instead."""
    return subprocess.run([NEXTDETAIL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links as links): what a command must leave exactly as it was."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            out[str(path)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(path)] = ("dir",)
    return out


def _sentinel(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "gcvictim").mkdir(parents=True)
    (outside / "gcvictim" / "keep.bin").write_bytes(b"k" * 100)
    (outside / "linked").mkdir()
    (outside / "linked" / "keep.bin").write_bytes(b"l" * 100)
    (outside / "secret.txt").write_text("a teammate's local file\n")
    return outside


# ---- the rule, unit by unit -----------------------------------------------------------------------------------

def test_relative_paths_that_climb_out_are_refused_and_urls_compare_normalized():
    assert relative_path("a/./b//c") == "a/b/c" and relative_path("a/../b") == "b"
    for bad in ("..", "../x", "a/../../x", "x/../../../outside/secret.txt"):
        with pytest.raises(OutsideRoot):
            relative_path(bad)
    assert normalize_url("s3://b/nd/shards/../../x") == "s3://b/x"
    assert under("/r/shards/x", "/r") and not under("/r/shards/../../o", "/r") and not under("/rr", "/r")
    assert under("s3://b/nd/t", "s3://b/nd") and not under("s3://b/nd/../t", "s3://b/nd")
    store = Store("/tmp/nd-root")
    with pytest.raises(OutsideRoot):
        store.path("a/../../b")
    with pytest.raises(OutsideRoot):
        store.sub("..")


def test_links_devices_and_growing_files_are_never_followed_or_read_past_their_size(tmp_path):
    outside = _sentinel(tmp_path)
    root = tmp_path / "root"
    (root / "art").mkdir(parents=True)
    (root / "art" / "real.bin").write_bytes(b"x" * 10)
    os.symlink(outside / "secret.txt", root / "art" / "notes.txt")
    os.symlink(outside / "linked", root / "art" / "dirlink")
    os.symlink("/dev/zero", root / "art" / "zero")
    before = _snapshot(outside)
    art = Store(str(root)).sub("art")
    for rel in ("notes.txt", "dirlink/keep.bin", "zero"):
        with pytest.raises(OutsideRoot):
            art.read_bytes(rel)
    with pytest.raises(OutsideRoot):
        art.write_bytes("dirlink/new.bin", b"no")
    links: list[str] = []
    assert art.find(links=links) == ["real.bin"] and sorted(links) == ["dirlink", "notes.txt", "zero"]
    # a sub-store named through a link keeps its parent's boundary: nothing under it is reachable
    with pytest.raises(OutsideRoot):
        art.sub("dirlink").listdir("")
    art.remove_tree("dirlink")  # the link goes, never what it points at
    art.sub("dirlink").remove_tree("")
    assert not (root / "art" / "dirlink").exists()
    # bounded reads: a recorded size caps what sha256 reads (a device inside the boundary cannot hang it)
    assert art.sha256("real.bin", limit=10) == hashlib.sha256(b"x" * 10).hexdigest()
    assert art.sha256("real.bin", limit=4) != hashlib.sha256(b"x" * 4).hexdigest()  # grew: hashes as another
    assert _snapshot(outside) == before


def test_records_are_relative_to_their_root_and_planted_ones_are_ignored(tmp_path, capsys):
    from nextdetail.stages import REGISTRY

    directory = lambda stage: REGISTRY[stage].directory if stage in REGISTRY else None  # noqa: E731
    root, copy = str(tmp_path / "root"), str(tmp_path / "copy")
    record = {"stage": "shard", "identity": "i", "artifact": {"identity": "a", "url": f"{root}/shards/ds"},
              "result": {"url": f"{root}/shards/ds", "summary": {"source": "/data/imagenet"}}}
    stored = relativize(record, root)
    assert stored["artifact"]["url"] == f"{ROOT}/shards/ds" and stored["result"]["summary"]["source"] == "/data/imagenet"
    placed = place(stored, "rec.json", Roots([Store(copy)]), directory)
    assert placed["artifact"]["url"] == f"{copy}/shards/ds" and placed["result"]["url"] == f"{copy}/shards/ds"
    # a record written before records were relative: read onto the root it is read from
    legacy = place(record, "old.json", Roots([Store(copy)]), directory)
    assert legacy["artifact"]["url"] == f"{copy}/shards/ds"
    planted = [
        {**record, "artifact": {"identity": "a", "url": f"{ROOT}/shards/../../outside/pv"}},
        {**record, "artifact": {"identity": "a", "url": f"{root}/shards/../../outside/pv"}},
        {**record, "artifact": {"identity": "a", "url": "s3://elsewhere/nd/tokens/x"}, "stage": "tokenize"},
        {**record, "result": {"url": f"{ROOT}/../elsewhere"}},
    ]
    for i, bad in enumerate(planted):
        assert place(bad, f"planted-{i}.json", Roots([Store(copy)]), directory) is None, bad
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == len(planted) and all(line.startswith("nextdetail: warning: planted-") for line in warned)
    # a shared cache the config names is a root of its own: a record naming it is kept as it is
    shared = {**record, "stage": "tokenize", "artifact": {"identity": "a", "url": "s3://team/nd/tokens/x"},
              "result": {"url": "s3://team/nd/tokens/x"}}
    roots = Roots([Store(copy), Store("s3://team/nd", {"anon": True})])
    assert place(shared, "t.json", roots, directory)["artifact"]["url"] == "s3://team/nd/tokens/x"
    assert roots.store("s3://team/nd/tokens/x").boundary == "team/nd"
    with pytest.raises(OutsideRoot):
        roots.store(str(tmp_path / "outside"))


# ---- the pipeline: a copied root, planted markers, records and links ------------------------------------------

@pytest.mark.e2e
def test_a_copied_root_works_where_it_is_and_never_touches_the_original(pipeline, tmp_path):
    """`cp -a root copy`: status on the copy finds every stage up to date *in the copy*, and `run --force sample`
    there rebuilds the copy's samples and leaves the original byte for byte as it was — also when the copy's
    records are of the older, absolute kind naming the original."""
    root, cfg, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    for path in (copy / "lineage").rglob("*.json"):  # records as an older version wrote them: absolute URLs
        path.write_text(path.read_text().replace(f'"{ROOT}', f'"{root}'))
    assert str(root) in (copy / "lineage" / "sample" / "latest.json").read_text()
    original = _snapshot(root)
    here = cli_config(copy, cfg.data.source, *FAST)
    status = json.loads(_nd("status", "--json", *here).stdout)
    assert {s["state"] for s in status} == {"up to date"}, status
    assert all(s["artifact"]["url"].startswith(str(copy)) for s in status), status
    forced = _nd("run", "--no-progress", "--force", "sample", "--until", "sample", *here, timeout=600)
    assert forced.returncode == 0, forced.stderr
    assert _snapshot(root) == original
    written = (copy / "lineage" / "sample" / "latest.json").read_text()  # rewritten by the forced run: relative
    assert f'"{ROOT}/samples/' in written and str(root) not in written and str(copy) not in written


@pytest.mark.e2e
def test_planted_markers_records_and_links_never_reach_outside_the_roots(pipeline, s3_endpoint, tmp_path):
    """On a copy of the session's root and on moto's S3 server: a marker listing `../…/outside/…`, a record whose
    URL climbs out, a symbolic link inside an artifact and one inside `shards/`, a same-size chunk change, a device
    listed in a marker. No command creates, changes or deletes anything outside its roots; each case is one line."""
    root, cfg, first = pipeline
    outside = _sentinel(tmp_path)
    work = tmp_path / "work"
    shutil.copytree(root, work, symlinks=True)
    remote, options = "s3://team-bucket/nd", {"client_kwargs": {"endpoint_url": s3_endpoint}}
    opts = json.dumps(options)
    here = cli_config(work, cfg.data.source, *FAST)
    bucket = Store(remote, options)
    before = _snapshot(outside)
    tok = work / Path(first["train_tokenizer"].url).relative_to(root)

    # 1. a link inside an artifact is reported, not copied
    os.symlink(outside / "secret.txt", tok / "notes.txt")
    pushed = _nd("cache", "push", "--to", remote, "--remote-options", opts, "--no-progress",
                 "--stage", "train_tokenizer", *here)
    assert pushed.returncode == 0, pushed.stderr
    assert "notes.txt: a symbolic link, not copied" in pushed.stdout, pushed.stdout
    assert not any(p.endswith("notes.txt") for p in bucket.find())

    # 2. a marker listing a file outside its artifact (true size and sha256): damage, nothing read or written
    marker_path = tok / "_COMPLETE.json"
    clean = marker_path.read_text()
    marker = json.loads(clean)
    climb = os.path.relpath(outside / "secret.txt", tok)
    secret = (outside / "secret.txt").read_bytes()
    marker["files"][climb] = len(secret)
    marker["sha256"][climb] = hashlib.sha256(secret).hexdigest()
    marker_path.write_text(json.dumps(marker))
    bucket.remove_tree("")
    refused = _nd("cache", "push", "--to", remote, "--remote-options", opts, "--no-progress",
                  "--stage", "train_tokenizer", *here)
    lines = [line for line in refused.stderr.splitlines() if "_COMPLETE.json" in line]
    assert len(lines) == 1 and "climbs out" in lines[0], refused.stdout + refused.stderr
    assert not any("outside" in p or "secret" in p for p in bucket.find()), bucket.find()
    marker_path.write_text(clean)

    # 3. pulling from a bucket whose marker and records were planted
    ok = _nd("cache", "push", "--to", remote, "--remote-options", opts, "--no-progress", "--stage", "shard",
             "--stage", "train_tokenizer", *here)
    assert ok.returncode == 0 and "2 copied" in ok.stdout, ok.stdout + ok.stderr
    tok_key = first["train_tokenizer"].url.replace(str(root), remote)
    there = Store(tok_key, options)
    planted = json.loads(there.read_bytes("_COMPLETE.json"))
    pulled_root = tmp_path / "pulled"
    target = os.path.relpath(outside / "new.txt", pulled_root / Path(tok_key[len(remote) + 1:]))
    planted["files"][target] = 5
    there.fs.pipe_file(f"{there.root}/_COMPLETE.json", json.dumps(planted).encode())  # a writer of the bucket
    bucket.fs.pipe_file(normalize_url(f"{there.root}/{target}"), b"owned")
    for i, url in enumerate((f"{ROOT}/shards/../../outside/pv", f"{remote}/shards/../../outside/pv")):
        record = json.loads(bucket.read_bytes(f"lineage/shard/{first.identities['shard']}.json"))
        record |= {"identity": f"{i}" * 64, "artifact": {**record["artifact"], "url": url}}
        bucket.write_bytes(f"lineage/shard/{i}{'0' * 63}.json", json.dumps(record).encode())
    mine = cli_config(pulled_root, cfg.data.source, *FAST)
    pulled = _nd("cache", "pull", "--from", remote, "--remote-options", opts, "--all", "--no-progress", *mine)
    assert pulled.returncode in (0, 2), pulled.stderr
    warned = [line for line in pulled.stderr.splitlines() if line.startswith("nextdetail:")]
    assert any("_COMPLETE.json" in line for line in warned), pulled.stderr
    assert sum("/shards/../../outside/pv" in line or "outside the roots" in line for line in warned) >= 2, warned
    assert not (outside / "new.txt").exists() and not (outside / "pv").exists()

    # 4. gc: a record naming a folder outside the root, a link inside shards/
    victim = {"stage": "shard", "identity": "d" * 64, "finished": 1.0,
              "artifact": {"identity": "e" * 64, "url": f"{work}/shards/../../outside/gcvictim"}, "result": {}}
    (work / "lineage" / "shard" / f"{'d' * 64}.json").write_text(json.dumps(victim))
    os.symlink(outside / "linked", work / "shards" / "evil")
    os.utime(work / "shards" / "evil", (1, 1), follow_symlinks=False)
    gc = _nd("cache", "gc", "--yes", *here)
    assert gc.returncode == 0, gc.stderr
    assert (work / "shards" / "evil").is_symlink() or not (work / "shards" / "evil").exists()

    # 5. verify reads every byte it vouches for: a same-size chunk change; a device listed in a marker
    factors = Path(first["decompose"].url.replace(str(root), str(work)))
    chunk = next(p for p in (factors / "factors.zarr").rglob("*") if p.is_file() and "/c/" in str(p))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    part = next((factors / "_parts").glob("*.json"))
    listed = json.loads(part.read_text())
    os.symlink("/dev/zero", factors / "zero")
    listed["files"]["zero"], listed["sha256"]["zero"] = 0, hashlib.sha256(b"").hexdigest()
    part.write_text(json.dumps(listed))
    checked = _nd("cache", "verify", "--no-progress", "--stage", "decompose", *here, timeout=120)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert chunk.name in checked.stdout and "zero" in checked.stdout, checked.stdout

    # 6. a run reading a token cache from the bucket whose marker lists a file outside the local mirror
    pushed = _nd("cache", "push", "--to", remote, "--remote-options", opts, "--no-progress", "--stage", "tokenize",
                 *cli_config(root, cfg.data.source, *FAST))
    assert pushed.returncode == 0 and "1 copied" in pushed.stdout, pushed.stdout + pushed.stderr
    cache = Store(f"{remote}/tokens/{first['tokenize'].identity}", options)
    mirror = tmp_path / "mirror"
    token_marker = json.loads(cache.read_bytes("_COMPLETE.json"))
    escape = os.path.relpath(outside / "from-bucket.bin", mirror / first["tokenize"].identity)
    token_marker["files"][escape], token_marker["sha256"][escape] = 5, hashlib.sha256(b"owned").hexdigest()
    cache.fs.pipe_file(f"{cache.root}/_COMPLETE.json", json.dumps(token_marker).encode())
    bucket.fs.pipe_file(normalize_url(f"{cache.root}/{escape}"), b"owned")
    fresh = tmp_path / "fresh"
    theirs = cli_config(fresh, cfg.data.source, *FAST, f"tokens.cache={remote}", f"tokens.cache_options={opts}",
                        f"tokens.local_cache={mirror}")
    pulled = _nd("cache", "pull", "--from", remote, "--remote-options", opts, "--no-progress", "--stage", "shard",
                 "--stage", "train_tokenizer", *theirs)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    ran = _nd("run", "--no-progress", "--until", "tokenize", *theirs, timeout=600)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and "_COMPLETE.json" in lines[0] and "climbs out" in lines[0], ran.stderr
    assert _snapshot(outside) == before


@pytest.mark.e2e
def test_foreign_checkpoint_and_mapping_secret_are_one_line(pipeline, tmp_path):
    """A TorchScript archive as `--ckpt` and a Prefect Secret block holding a mapping: one line each, exit 2."""
    import torch
    from prefect.blocks.system import Secret

    root, cfg, _ = pipeline
    scripted = tmp_path / "transformer.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    out = _nd("sample", "--ckpt", str(scripted), "--out", str(tmp_path / "s"), *cli_config(root, cfg.data.source))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not written by nextdetail" in out.stderr
    Secret(value={"key": "AKIA-mapping", "secret": "in-clear"}).save("mapping-block", overwrite=True)
    refused = _nd("status", *cli_config(root, cfg.data.source), "-o", "storage.credentials_block=mapping-block")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "JSON string" in refused.stderr
