"""The `shard` stage end to end: real Prefect server, Dask LocalCluster, webdataset tars, Parquet."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from helpers import make_config, run_cli, run_shard_stage, sigkill_when
from PIL import Image

from nextdetail.storage.shards import shard_index_of
from nextdetail.storage.sources import SourceItem


def _manifest(result) -> list[dict]:
    return pq.read_table(result.manifest_url).to_pylist()


def _tars(url: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(url).glob("*.tar"))}


@pytest.mark.integration
def test_dataloader_reads_exactly_the_manifest(tmp_path, embedded_source):
    result = run_shard_stage(make_config(tmp_path, embedded_source))
    rows = _manifest(result)
    assert len(rows) == 12 * 14 and all(r["status"] in ("written", "converted") for r in rows)
    for split in ("train", "val"):
        urls = sorted(str(p) for p in Path(result.url).glob(f"{split}-*.tar"))
        dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
                   .decode("pil").to_tuple("__key__", "cls", "png"))
        # spawn, as a training job with CUDA must: a forked child would inherit this process's Prefect threads
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        seen = {}
        for key, cls, image in loader:
            assert image.size == (32, 32) and image.mode == "RGB"
            seen[key] = int(cls)
        expected = {r["key"]: r["class_index"] for r in rows if r["split"] == split}
        assert seen == expected
    classes = json.loads((Path(result.url) / "classes.json").read_text())["classes"]
    assert classes == sorted(classes) and len(classes) == 12
    assert {r["wnid"] for r in rows if r["class_index"] == 3} == {classes[3]}
    # greyscale photos (brick, camera, grass, gravel) are converted, the rest written as they are
    assert {r["wnid"] for r in rows if r["status"] == "converted"} == {"brick", "camera", "grass", "gravel"}
    marker = json.loads((Path(result.url) / "_COMPLETE.json").read_text())
    assert marker["identity"] == result.identity and marker["summary"]["images"] == len(rows)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` × `height` (8-bit RGB) and that holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture()
def messy_source(tmp_path) -> Path:
    """A class-folder dataset with every bad-input kind real ImageNet and real folders have."""
    rng = np.random.default_rng(1)
    root = tmp_path / "messy"
    for split in ("train", "val"):
        for wnid in ("n001", "n002"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(arr))
    d = root / "train" / "n001"
    good = _jpeg(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).convert("CMYK").save(buf, format="JPEG")
    (d / "cmyk.JPEG").write_bytes(buf.getvalue())
    (d / "grey.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (50, 50), dtype=np.uint8)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(buf, format="PNG")
    (d / "png_named.JPEG").write_bytes(buf.getvalue())
    (d / "empty.JPEG").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "unreadable.JPEG").symlink_to(tmp_path / "does-not-exist.JPEG")
    (d / "small.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)))
    (d / "dup.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)))
    (d / "dup.png").write_bytes(buf.getvalue())  # same key as dup.JPEG
    (d / "b.jpeg").write_bytes(_jpeg(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)))
    (d / "b.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)))  # the extension's case only
    (d / "loop").symlink_to(".")  # a link back into its own folder
    (d / "up").symlink_to("..")  # … into the split folder
    (root / "train" / "n003").symlink_to(".")  # a "class" that is the split folder itself
    with open(d / "huge.JPEG", "wb") as f:  # 2 GB, sparse: must never be read
        f.truncate(2 << 30)
    (d / "bomb.png").write_bytes(_png_header(20000, 20000))  # 400 megapixels declared
    (root / "train" / "README").write_text("a stray file beside the class folders")
    (root / "val" / "n999").mkdir()
    (root / "val" / "n999" / "x.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)))
    return root


@pytest.mark.integration
def test_every_bad_input_ends_as_the_manifest_says(tmp_path, messy_source):
    result = run_shard_stage(make_config(tmp_path / "out", str(messy_source)))
    by_path = {r["source_path"]: r for r in _manifest(result)}
    expect = {
        "train/n001/truncated.JPEG": ("skipped", "truncated"),
        "train/n001/cmyk.JPEG": ("converted", "cmyk"),
        "train/n001/grey.JPEG": ("converted", "greyscale"),
        "train/n001/png_named.JPEG": ("converted", "content_is_png"),
        "train/n001/empty.JPEG": ("skipped", "empty_file"),
        "train/n001/notes.txt": ("skipped", "not_an_image"),
        "train/n001/unreadable.JPEG": ("skipped", "unreadable"),
        "train/n001/small.JPEG": ("converted", "upscaled"),
        "train/n001/dup.JPEG": ("written", ""),
        "train/n001/dup.png": ("written", ""),  # its key carries its whole name's hash: nothing real is skipped
        "train/n001/b.jpeg": ("written", ""),
        "train/n001/b.JPEG": ("written", ""),
        "train/n001/loop": ("skipped", "symlink_loop"),
        "train/n001/up": ("skipped", "symlink_loop"),
        "train/n003": ("skipped", "symlink_loop"),
        "train/n001/huge.JPEG": ("skipped", "too_large"),
        "train/n001/bomb.png": ("skipped", "too_large"),
        "train/README": ("skipped", "no_class"),
        "val/n999/x.JPEG": ("skipped", "unknown_class"),
    }
    for path, (status, reason) in expect.items():
        assert (by_path[path]["status"], by_path[path]["reason"]) == (status, reason), path
    assert len(by_path) == 12 + 19  # nothing dropped or repeated: 12 good files + 19 odd ones
    assert len({r["key"] for r in by_path.values()}) == len(by_path)  # keys never collide
    assert result.summary["status"] == {"written": 16, "converted": 4, "skipped": 11}
    # written samples are in the tars, skipped ones are not
    keys = set()
    for tar in Path(result.url).glob("*.tar"):
        keys |= {s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)}
    assert keys == {r["key"] for r in by_path.values() if r["status"] != "skipped"}
    # the summary counts what is on disk: tars written (a bucket of only skipped files writes none)
    assert sorted(result.shards_ran) == sorted(p.name for p in Path(result.url).glob("*.tar"))

    skipping = run_shard_stage(make_config(tmp_path / "out2", str(messy_source), "shard.small_images=skip"))
    small = next(r for r in _manifest(skipping) if r["source_path"] == "train/n001/small.JPEG")
    assert (small["status"], small["reason"]) == ("skipped", "too_small")


@pytest.mark.integration
def test_unchanged_rerun_does_no_work_and_deleted_artifacts_recompute(tmp_path, embedded_source):
    results = Path(os.environ["PREFECT_HOME"]) / "storage"
    kept = set(results.rglob("*")) if results.exists() else set()
    cfg = make_config(tmp_path, embedded_source)
    first = run_shard_stage(cfg)
    assert len(first.shards_ran) == len(_tars(first.url)) and first.manifest_work == "ran"
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(first.url).rglob("*") if p.is_file()}
    again = run_shard_stage(cfg)
    assert again.shards_ran == [] and again.manifest_work == "reused"
    assert sorted(again.shards_reused) == sorted(first.shards_ran)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in Path(first.url).rglob("*") if p.is_file()}

    # The completion marker is the truth: an artifact that is gone recomputes.
    victim = sorted(Path(first.url).glob("train-*.tar"))[1]
    victim.unlink()
    healed = run_shard_stage(cfg)
    assert healed.shards_ran == [victim.name] and healed.manifest_work == "reused"
    assert _tars(first.url)[victim.name] == hashlib.sha256(victim.read_bytes()).hexdigest()

    # The markers are the only cache: these runs kept nothing in Prefect's result storage (on a multi-host Dask
    # cluster that would be a local path per worker host).
    assert not (set(results.rglob("*")) if results.exists() else set()) - kept


@pytest.mark.integration
def test_append_rewrites_only_the_affected_shards(tmp_path, embedded_source):
    source = tmp_path / "source"
    shutil.copytree(embedded_source, source)
    cfg = make_config(tmp_path / "out", str(source))
    before = run_shard_stage(cfg)
    tars_before = _tars(before.url)
    new_files = ["train/coffee/coffee_new_1.png", "train/rocket/rocket_new_2.png"]
    for rel in new_files:
        shutil.copy(source / "train" / "astronaut" / "astronaut_00000.png", source / rel)
    after = run_shard_stage(cfg)
    n_train = sum(1 for n in tars_before if n.startswith("train-"))
    affected = {f"train-{shard_index_of(SourceItem('train', rel, None, 0, '').key, n_train):06d}.tar"
                for rel in new_files}
    assert set(after.shards_ran) == affected and len(affected) < n_train
    tars_after = _tars(after.url)
    assert {n for n in tars_after if tars_after[n] != tars_before[n]} == affected
    assert {r["source_path"] for r in _manifest(after)} >= set(new_files)
    assert after.identity != before.identity


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_shards(tmp_path, embedded_source):
    overrides = ["-o", "shard.samples_per_shard=4", "-o", "dask.n_workers=1"]
    cli = str(Path(sys.executable).parent / "nextdetail")

    def cmd(root):
        return [cli, "shard", "--no-progress", "-o", f"storage.root={root}", "-o", f"data.source={embedded_source}",
                *overrides]

    assert run_cli(cmd(tmp_path / "clean")).returncode == 0
    sigkill_when(cmd(tmp_path / "killed"), lambda: list((tmp_path / "killed").glob("shards/*/_parts/*.json")))
    killed_dir = next((tmp_path / "killed").glob("shards/*"))
    assert not (killed_dir / "_COMPLETE.json").exists(), "killed too late: the stage had finished"
    done = run_cli(cmd(tmp_path / "killed"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reused" in done.stdout
    clean_dir = next((tmp_path / "clean").glob("shards/*"))
    assert _tars(str(killed_dir)) == _tars(str(clean_dir))
    assert pq.read_table(killed_dir / "manifest.parquet").equals(pq.read_table(clean_dir / "manifest.parquet"))
    assert not [p for p in killed_dir.glob("*.tar") if p.name.startswith(".")]


@pytest.mark.integration
def test_imagenet_val_flat_with_labels_csv(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "imagenet"
    for wnid in ("n01440764", "n01443537"):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n01443537", "n01440764", "n09999999"], start=1):
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
        lines.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 30 30 {wnid} 3 4 20 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    result = run_shard_stage(make_config(tmp_path / "out", str(root), "data.layout=imagenet"))
    val = {r["key"]: (r["class_index"], r["status"]) for r in _manifest(result) if r["split"] == "val"}
    assert val == {"val/ILSVRC2012_val_00000001": (1, "written"), "val/ILSVRC2012_val_00000002": (0, "written"),
                   "val/ILSVRC2012_val_00000003": (-1, "skipped")}


@pytest.mark.integration
def test_missing_split_is_a_one_line_error(tmp_path):
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    from nextdetail.errors import UserError

    with pytest.raises(UserError, match=r"has no val/ folder; add it or drop it: -o data.splits=\[train\]"):
        run_shard_stage(make_config(tmp_path / "out", str(tmp_path / "ds")))


def test_the_walk_enters_each_folder_once_per_class_and_keys_never_collide(tmp_path):
    """Loops become one row each, a class that links to another is a class of its own (ImageFolder's rule), and
    every odd name — case-only extensions, dots, spaces, combined — gets its own key."""
    import itertools

    from nextdetail.storage.images import SkipImage, decode_image
    from nextdetail.storage.sources import SYMLINK_LOOP, list_source

    root = tmp_path / "src"
    a = root / "train" / "a"
    a.mkdir(parents=True)
    stems, exts = ["x", "X", "x.b", "x_b", "x b", "x-b"], ["jpeg", "JPEG", "jpg", "JPG", "png", "PNG"]
    names = [f"{s}.{e}" for s, e in itertools.product(stems, exts)]
    for name in names:
        (a / name).write_bytes(b"not decoded here")
    (a / "loop").symlink_to(".")
    (a / "deeper").mkdir()
    (a / "deeper" / "up").symlink_to("../..")  # the split folder
    (root / "train" / "b").symlink_to("a")  # a class of its own
    listing = list_source(str(root), ["train"])
    assert listing.classes == ["a", "b"]
    rows = {it.relpath: it for it in listing.items["train"]}
    assert {p for p, it in rows.items() if it.size == SYMLINK_LOOP} == {
        "train/a/loop", "train/a/deeper/up", "train/b/loop", "train/b/deeper/up"}
    assert {p for p in rows if p.startswith("train/b/") and rows[p].size >= 0} == {f"train/b/{n}" for n in names}
    keys = [it.key for it in rows.values()]
    assert len(keys) == len(set(keys)) == 2 * len(names) + 4
    # a header declaring too many pixels is refused before any pixel is decoded
    with pytest.raises(SkipImage, match="too_large"):
        decode_image(_png_header(20000, 20000), "bomb.png", max_pixels=89_478_485)
