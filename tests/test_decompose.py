"""The `decompose` stage end to end: shard tars → Dask → Ambrosio–Tortorelli → Zarr v3, cached per tar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import external_dask, make_config, run_cli, sigkill_when
from PIL import Image

from nextdetail.models.mumford_shah import decompose
from nextdetail.storage import factors
from nextdetail.storage.factors import read_index
from nextdetail.storage.fs import Store
from nextdetail.storage.shards import read_tar_images

BIN = Path(sys.executable).parent


def _run(cfg, scheduler: str | None = None):
    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import dask_cluster, prefect_api

    with prefect_api(), dask_cluster(**cfg.dask.model_dump()) as address:
        shards = run_stage(cfg, "shard", progress=False, scheduler=scheduler or address)
        return shards, run_stage(cfg, "decompose", {"shard": shards}, progress=False, scheduler=scheduler or address)


def _in_memory(cfg, shards, index_rows, split):
    """The same images decomposed in this process, in index order: (N, order, 3, H, W) float32."""
    from nextdetail.models.mumford_shah import ATConfig
    store = Store(shards.url)
    by_tar: dict[str, list[str]] = {}
    for r in index_rows:
        if r["split"] == split:
            by_tar.setdefault(r["shard"], []).append(r["key"])
    out = []
    for tar, keys in by_tar.items():
        images = read_tar_images(store, tar, tuple(keys), cfg.shard.image_format)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        out.append(decompose(x, cfg.decompose.order, ATConfig.from_settings(cfg.decompose)).permute(1, 0, 2, 3, 4))
    return torch.cat(out).numpy()


@pytest.mark.integration
def test_factors_in_zarr_match_in_memory_and_reruns_touch_only_what_changed(tmp_path, embedded_source):
    cfg = make_config(tmp_path, embedded_source, "decompose.batch_size=8", "decompose.dtype=float32")
    shards, first = _run(cfg)
    assert first.tars_ran and not first.tars_reused
    index = read_index(Store(first.url))
    rows = index.to_pylist()
    written = {r["key"] for r in pq.read_table(shards.manifest_url).to_pylist() if r["index_in_shard"] >= 0}
    assert {r["key"] for r in rows} == written and len(rows) == len(written)

    # Reopened lazily as one dask array per split, it equals the in-memory result.
    lazy = factors.open_lazy(Store(first.url), index, "train")
    assert lazy.shape == (12 * 12, 3, 3, 32, 32) and lazy.chunks[0][0] == 1  # one image per chunk
    np.testing.assert_allclose(lazy.compute(), _in_memory(cfg, shards, rows, "train"), atol=1e-5)
    group = factors.open_group(Store(first.url))
    assert group.metadata.consolidated_metadata is not None  # consolidated once complete
    first_array = group[factors.array_path("train", first.tars_ran[0])]
    assert first_array.compressors[0].cname.value == "zstd"

    # Unchanged re-run: nothing decomposed again.
    _, again = _run(cfg)
    assert again.tars_ran == [] and again.identity == first.identity
    assert sorted(again.tars_reused) == sorted(first.tars_ran)

    # A changed α re-runs decompose (into its own directory) but not shard; the first stays complete.
    shards2, other = _run(make_config(tmp_path, embedded_source, "decompose.batch_size=8", "decompose.dtype=float32",
                                      "decompose.alpha=4"))
    assert shards2.shards_ran == [] and shards2.identity == shards.identity
    assert sorted(other.tars_ran) == sorted(first.tars_ran) and other.url != first.url
    assert json.loads((Path(first.url) / "_COMPLETE.json").read_text())["identity"] == first.identity
    less_smooth = factors.open_lazy(Store(other.url), read_index(Store(other.url)), "train")[:, 0].compute()
    assert np.abs(np.diff(less_smooth, axis=-1)).mean() > np.abs(np.diff(lazy[:, 0].compute(), axis=-1)).mean()

    # A batch size is how, not what: same identity, nothing re-runs.
    _, rebatched = _run(make_config(tmp_path, embedded_source, "decompose.batch_size=4", "decompose.dtype=float32"))
    assert rebatched.identity == first.identity and rebatched.tars_ran == []


@pytest.mark.integration
def test_a_task_killed_mid_write_is_redone_and_never_counted(tmp_path, embedded_source):
    cfg = make_config(tmp_path, embedded_source)
    _, first = _run(cfg)
    root = Path(first.url)
    victim = sorted(first.tars_ran)[0]
    stem = victim.removesuffix(".tar")
    before = factors.open_group(Store(first.url))[factors.array_path("train", victim)][:]
    # What a kill leaves behind: no marker, a torn chunk, a stale dataset marker.
    (root / "_parts" / f"{stem}.json").unlink()
    chunk = next(p for p in (root / "factors.zarr" / "train" / stem).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:7])
    _, again = _run(cfg)
    assert again.tars_ran == [victim] and again.identity == first.identity
    after = factors.open_group(Store(first.url))[factors.array_path("train", victim)][:]
    np.testing.assert_array_equal(after, before)


@pytest.mark.integration
def test_uses_an_external_dask_scheduler_when_configured(tmp_path, embedded_source):
    from distributed import Client

    with external_dask(("external", [])) as address:
        with Client(address, timeout=60) as client:
            worker_pids = set(client.run(os.getpid).values())
        cfg = make_config(tmp_path, embedded_source, f"dask.address={address}")
        _, result = _run(cfg)
        assert result.tars_ran
        pids = {json.loads(p.read_text())["lineage"]["pid"] for p in (Path(result.url) / "_parts").glob("*.json")}
        assert pids <= worker_pids, (pids, worker_pids)


@pytest.mark.integration
def test_show_decomposition_writes_a_strip_per_key(tmp_path, embedded_source):
    from nextdetail.cli import main

    root = tmp_path / "data"
    args = ["-o", f"storage.root={root}", "-o", f"data.source={embedded_source}", "-o", "shard.samples_per_shard=64",
            "--no-progress"]
    assert main(["decompose", *args]) == 0
    dec_dir = next((root / "factors").glob("*/*/"))
    keys = [r["key"] for r in read_index(Store(str(dec_dir))).to_pylist()[:2]]
    out = tmp_path / "figs"
    assert main(["show", "decomposition", *keys, "--out", str(out), *args]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:  # 7 panels (I, B1..B3, D1..D3) of 32 px enlarged 4×, side by side
        assert im.width > 7 * 128 and im.height > 128
    assert main(["show", "decomposition", "no/such/key", "--out", str(out), *args]) == 2


@pytest.mark.parametrize("override", ["decompose.alpha=-1", "decompose.chunk_images=0"])
def test_bad_decompose_settings_are_one_line_errors(override):
    from nextdetail.conf import load_config
    from nextdetail.errors import UserError

    with pytest.raises(UserError) as err:
        load_config("tiny", overrides=[override])
    assert "\n" not in str(err.value) and "decompose" in str(err.value)


@pytest.mark.integration
def test_sigkilled_run_resumes_to_the_same_factors(tmp_path, embedded_source):
    def cmd(root):
        return [str(BIN / "nextdetail"), "decompose", "--no-progress", "-o", f"storage.root={root}",
                "-o", f"data.source={embedded_source}", "-o", "shard.samples_per_shard=16", "-o", "dask.n_workers=1"]

    assert run_cli(cmd(tmp_path / "clean")).returncode == 0
    sigkill_when(cmd(tmp_path / "killed"), lambda: list((tmp_path / "killed").glob("factors/*/*/_parts/*.json")))
    killed = next((tmp_path / "killed").glob("factors/*/*"))
    assert not (killed / "_COMPLETE.json").exists(), "killed too late: the stage had finished"
    done = run_cli(cmd(tmp_path / "killed"))
    assert done.returncode == 0, done.stderr[-2000:]
    clean = next((tmp_path / "clean").glob("factors/*/*"))
    assert killed.name == clean.name
    a, b = factors.open_group(Store(str(killed))), factors.open_group(Store(str(clean)))
    index = read_index(Store(str(clean))).to_pylist()
    assert read_index(Store(str(killed))).to_pylist() == index
    for split, tar in {(r["split"], r["shard"]) for r in index}:
        np.testing.assert_array_equal(a[factors.array_path(split, tar)][:], b[factors.array_path(split, tar)][:])


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_a_quantized_factor_store_round_trips_within_half_a_level_and_writes_the_same_bytes_twice(tmp_path, dtype):
    """Smooth RGB factors (and a few values outside [0, 1]) through `quantize` and a quantized array (each RGB plane
    a lossless WebP/PNG image): read back within half a level in [0, 1], clipped outside with the error reported,
    and two writes of the same values give the same one object (the tar's shard), byte for byte."""
    import hashlib

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:32] / 32
    values = np.stack([np.stack([0.5 + 0.4 * np.sin(6 * xx + k + c) * np.cos(4 * yy) for c in range(3)])
                       for k in range(2)])[None].repeat(3, axis=0) + rng.normal(0, 0.01, size=(3, 2, 3, 24, 32))
    values[0, 0, 0, 0, :3] = (-0.2, 1.3, 0.5)  # what the solver may overshoot: clipped, and reported
    levels = factors.LEVELS[dtype]
    digests = []
    for run in range(2):
        store = Store(str(tmp_path / f"run{run}"))
        factors.create_groups(store, ["train"])
        factors.create_array(store, "train", "train-000000.tar", 3, (2, 3, 24, 32), dtype, 1)
        stored, error = factors.quantize(values, dtype)
        factors.write_whole(store, "train", "train-000000.tar", stored)
        back = factors.read(factors.open_array(store, factors.open_group(store), "train", "train-000000.tar"))
        inside = (values >= 0) & (values <= 1)
        assert back.dtype == np.float32 and back.shape == values.shape
        assert np.abs(back - values)[inside].max() <= 0.5 / levels + 1e-6
        assert back[0, 0, 0, 0, 0] == 0.0 and back[0, 0, 0, 0, 1] == 1.0  # clipped into [0, 1]
        assert error == pytest.approx(0.3, abs=1e-6)  # the largest error: 1.3 stored as 1.0
        chunks = sorted((tmp_path / f"run{run}" / "factors.zarr" / "train" / "train-000000" / "c").rglob("*"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in chunks if p.is_file()])
        meta = json.loads((tmp_path / f"run{run}" / "factors.zarr/train/train-000000/zarr.json").read_text())
        (shard,) = meta["codecs"]  # one shard of inner chunks, each a lossless image per plane
        assert shard["name"] == "sharding_indexed"
        assert shard["configuration"]["codecs"] == [{"name": "nextdetail.lossless_image",
                                                     "configuration": {"format": factors.IMAGE_FORMAT[dtype]}}]
        assert factors.read(factors.open_array(store, factors.open_group(store), "train", "train-000000.tar"),
                            1).shape == (2, 3, 24, 32)  # one image read out of the shard by itself
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # the tar's one object, the same bytes twice
    plain, plain_error = factors.quantize(values, "float16")
    assert plain.dtype == np.float16 and plain_error < 1e-3


@pytest.mark.integration
def test_the_uint8_store_decomposes_what_float32_does_within_half_a_level_in_a_fraction_of_the_bytes(
        tmp_path, embedded_source):
    """The same tars decomposed into float32 and uint8 stores: what the readers get back (`factors.read`, as the
    tokenizer's loader and tokenize read it) agrees within half an 8-bit level, the error is in the summary, and
    the uint8 arrays take under a quarter of float32's bytes (float16 takes about half)."""

    sizes, decoded = {}, {}
    for dtype in ("float32", "uint8"):
        _, result = _run(make_config(tmp_path / dtype, embedded_source, f"decompose.dtype={dtype}"))
        store = Store(result.url)
        group = factors.open_group(store)
        rows = read_index(store).to_pylist()
        decoded[dtype] = np.concatenate([factors.read(factors.open_array(store, group, "train", tar))
                                         for tar in dict.fromkeys(r["shard"] for r in rows if r["split"] == "train")])
        sizes[dtype] = sum(p.stat().st_size for p in (Path(result.url) / "factors.zarr").rglob("*") if p.is_file())
        assert result.summary["storage_max_error"] <= (0.5 / 255 + 1e-6 if dtype == "uint8" else 0.0)
    assert np.abs(decoded["uint8"] - decoded["float32"]).max() <= 0.5 / 255 + 1e-6
    assert sizes["uint8"] < sizes["float32"] / 4, sizes


def test_a_fresh_process_consolidates_a_quantized_store(tmp_path):
    """write_index may land on a Dask worker that ran no factor task (one restarted after a kill): consolidating
    must register the image codec itself (CI once failed with 'Unknown codec: nextdetail.lossless_image')."""
    store = Store(str(tmp_path))
    factors.create_groups(store, ["train"])
    factors.create_array(store, "train", "train-000000.tar", 2, (1, 3, 4, 4), "uint8", 1)
    factors.write_whole(store, "train", "train-000000.tar", np.full((2, 1, 3, 4, 4), 7, dtype="uint8"))
    code = ("import sys; from nextdetail.storage import factors; from nextdetail.storage.fs import Store; "
            "factors.consolidate(Store(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "consolidated_metadata" in (tmp_path / "factors.zarr" / "zarr.json").read_text()
