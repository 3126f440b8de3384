"""The `tokenize` stage and the token cache: real tokenizer, real Zarr, local and moto-S3 caches."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import BIN, cli_config, external_dask, make_config

from nextdetail.storage.fs import Store

FAST = ("tokenizer.ch=16", "tokenizer.num_res_blocks=1", "tokenizer.vocab_size=64", "tokenizer.z_channels=8",
        "tokenizer.batch_size=8", "tokenizer.steps=4", "tokenizer.checkpoint_every=4", "tokenizer.log_every=2",
        "tokenizer.torch_threads=1", "tokens.torch_threads=1")


def _pipeline(cfg, until: str = "tokenize"):
    from nextdetail.pipeline.run import run_pipeline

    return run_pipeline(cfg, until=until, progress=False)


def _tokenize(cfg, up):
    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import prefect_api

    with prefect_api():
        return run_stage(cfg, "tokenize", up, progress=False)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, embedded_source):
    root = tmp_path_factory.mktemp("tokenize")
    return root, _pipeline(make_config(root, embedded_source, *FAST), until="train_tokenizer")


@pytest.fixture(scope="module")
def published(upstream, embedded_source, tmp_path_factory):
    root, up = upstream
    cache_root = tmp_path_factory.mktemp("token-cache")
    cfg = make_config(root, embedded_source, *FAST, f"tokens.cache={cache_root}")
    return cfg, _tokenize(cfg, up)


class EncoderCalls:
    """Counts forward calls of the tokenizer's encoder (tokenize runs in this process)."""

    def __init__(self, monkeypatch) -> None:
        from nextdetail.models.vae import Encoder

        self.images, forward = 0, Encoder.forward

        def counted(module, x):
            self.images += len(x)
            return forward(module, x)

        monkeypatch.setattr(Encoder, "forward", counted)


@pytest.mark.e2e
def test_cache_holds_the_tokenizers_token_maps_with_their_layout(upstream, published):
    import zarr

    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.storage import factors
    from nextdetail.storage.factors import array_path, open_group
    from nextdetail.storage.shards import read_tar_images

    _, up = upstream
    _, result = published
    assert result.work == "ran" and result.summary["encoded_images"] == 12 * 14
    cache = result.open()
    # the layout in the group's attributes, readable by plain Zarr
    group = zarr.open_group(Path(result.url, result.summary["attempt"], "tokens.zarr"), mode="r")
    layout = group.attrs["tokens"]
    assert [(m["kind"], m["height"], m["factor"]) for m in layout["maps"]] == [
        ("base", 1, 3), ("base", 2, 3), ("base", 4, 3), ("base", 8, 3), ("detail", 8, 3), ("detail", 8, 2),
        ("detail", 8, 1)]
    assert layout["tokens_per_image"] == 1 + 4 + 16 + 64 * 4 and layout["variants"] == ["none", "hflip"]
    # keys and labels aligned with the shard manifest
    manifest = pq.read_table(up["shard"].manifest_url).to_pylist()
    written = {r["key"]: r["class_index"] for r in manifest if r["index_in_shard"] >= 0}
    index = cache.index().to_pylist()
    assert {r["key"]: r["class_index"] for r in index} == written
    # one tar's array equals Algorithm 1 on its images and factors, for both variants
    row = next(r for r in index if r["split"] == "train")
    tokens = cache.read("train", row["shard"])
    keys = [r["key"] for r in sorted((r for r in index if r["shard"] == row["shard"]), key=lambda r: r["row"])]
    assert tokens.shape == (len(keys), 2, layout["tokens_per_image"]) and tokens.dtype == np.uint16
    assert np.array_equal(group[f"train/{row['shard'].removesuffix('.tar')}"][...], tokens)  # = Zarr's read
    model = BaseDetailVQVAE.from_checkpoint(Path(up["train_tokenizer"].checkpoint_url).read_bytes())
    x = torch.from_numpy(read_tar_images(Store(up["shard"].url), row["shard"], tuple(keys), "png"))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    stored = open_group(Store(up["decompose"].url))[array_path("train", row["shard"])]
    b = torch.from_numpy(factors.read(stored)).transpose(0, 1)  # as stored (uint8) → [0, 1], as tokenize reads
    b = b * 2 - 1
    for v, (xv, bv) in enumerate([(x, b), (x.flip(-1), b.flip(-1))]):
        expect = torch.cat([m.flatten(1) for m in model.img_to_indices(xv, bv)], 1).numpy()
        assert np.array_equal(tokens[:, v].astype(np.int64), expect)
    from PIL import Image

    cache._fetch(f"{result.summary['attempt']}/preview.png")
    with Image.open(Path(result.url, result.summary["attempt"], "preview.png")) as im:
        assert im.width > 8 * 32 and im.height > 2 * 32  # 8 originals over their decoded cached tokens
    maps = cache.maps(tokens[:, 0])
    assert [m.shape[1:] for m in maps] == [(1, 1), (2, 2), (4, 4), (8, 8), (8, 8), (8, 8), (8, 8)]


@pytest.mark.e2e
def test_a_changed_tokens_setting_rebuilds_only_the_token_cache(upstream, published, embedded_source):
    root, up = upstream
    cfg, first = published
    again = _tokenize(cfg, up)
    assert again.work == "reused" and again.identity == first.identity
    # where the cache lives and how fast it is made do not change what it is
    same = _tokenize(make_config(root, embedded_source, *FAST, f"tokens.cache={cfg.tokens.cache}",
                                 "tokens.batch_size=5"), up)
    assert same.identity == first.identity and same.work == "reused"
    other = _tokenize(make_config(root, embedded_source, *FAST, f"tokens.cache={cfg.tokens.cache}",
                                  "tokens.variants=[none]"), up)
    assert other.identity != first.identity and other.work == "ran" and other.url != first.url
    assert other.open().read("val", "val-000000.tar").shape[1] == 1


@pytest.mark.e2e
def test_loader_serves_whole_chunks_deterministically_and_disjointly_per_rank(published):
    from nextdetail.storage.token_loader import TokenBatches, TokenDataset

    _, result = published
    cache = result.open()
    data = TokenDataset(cache, "train")
    assert len(data) == 12 * 12
    i = 37
    tokens, label = data[i]
    chunk = cache.read("train", data.tars[data.chunk_of[i]])
    assert torch.equal(tokens, torch.from_numpy(chunk[data.row_of[i]].astype(np.int64))) and label == data.labels[i]

    batches = TokenBatches(cache, "train", batch_size=8, seed=3, window=2)
    e0 = list(batches.epoch(0))
    assert len(e0) == len(data) // 8 and all(t.shape == (8, data.tokens_per_image) for t, _ in e0)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(e0, TokenBatches(cache, "train", 8, seed=3, window=2)
                                                          .epoch(0), strict=True))
    e1 = list(batches.epoch(1))
    assert not torch.equal(torch.cat([t for t, _ in e0]), torch.cat([t for t, _ in e1]))  # reshuffled per epoch
    # every served row is a stored row of the sample the plan names, in one of its variants
    samples, variants = batches.plan(0)
    assert len(set(samples.tolist())) == len(samples)  # no sample twice in an epoch
    for k in (0, 5, 17):
        s = samples[k]
        stored = data.chunk(int(data.chunk_of[s]))[data.row_of[s], variants[k]]
        assert torch.equal(e0[k // 8][0][k % 8], torch.from_numpy(stored.astype(np.int64)))
        assert e0[k // 8][1][k % 8] == data.labels[s]
    # loader processes give the same batches; resuming mid-epoch starts at the same batch
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(e0, batches.epoch(0, workers=2), strict=True))
    assert torch.equal(next(batches.epoch(0, start=5))[0], e0[5][0])
    # two ranks: disjoint samples and disjoint chunks, the same number of batches
    ranks = [TokenBatches(cache, "train", batch_size=8, seed=3, window=2, rank=r, world=2) for r in (0, 1)]
    plans = [r.plan(0)[0] for r in ranks]
    assert len(plans[0]) == len(plans[1]) > 0 and ranks[0].batches_per_epoch == ranks[1].batches_per_epoch
    assert not set(plans[0].tolist()) & set(plans[1].tolist())
    assert not set(data.chunk_of[plans[0]].tolist()) & set(data.chunk_of[plans[1]].tolist())


def _copy_cache(result, dest: Path) -> Path:
    target = dest / "tokens" / result.identity
    shutil.copytree(result.url, target)
    return target


@pytest.mark.e2e
def test_broken_or_unpublished_caches_are_detected_and_rebuilt(upstream, published, embedded_source, tmp_path,
                                                                monkeypatch):
    from nextdetail.errors import UserError
    from nextdetail.storage.tokens import TokenCache

    root, up = upstream
    _, first = published
    cfg = make_config(root, embedded_source, *FAST, f"tokens.cache={tmp_path}")
    cache_dir = _copy_cache(first, tmp_path)
    calls = EncoderCalls(monkeypatch)
    assert _tokenize(cfg, up).work == "reused" and calls.images == 0  # a copied cache is a cache
    reference = first.open().read("train", "train-000002.tar")

    # 1. a chunk deleted: missing file → rebuilt; only that tar is encoded again
    chunk = next(cache_dir.glob(f"{first.summary['attempt']}/tokens.zarr/train/train-000002/c/0/0/0"))
    chunk.unlink()
    rebuilt = _tokenize(cfg, up)
    n = len(reference)
    assert rebuilt.work == "rebuilt" and rebuilt.summary["encoded_images"] == n
    assert rebuilt.summary["copied_parts"] == first.summary["tars"] - 1
    assert calls.images == n * 2 * 4  # this tar's images × variants × (I, B_1, B_2, B_3)
    assert np.array_equal(rebuilt.open().read("train", "train-000002.tar"), reference)
    assert list(cache_dir.glob("_INVALID-*.json"))

    # 2. a chunk corrupted in place (same size): the sha256 check catches it (older attempts removed
    #    first, else the intact copy of that tar in the first attempt would be adopted)
    for old in (cache_dir / "attempts").iterdir():
        if f"attempts/{old.name}" != rebuilt.summary["attempt"]:
            shutil.rmtree(old)
    chunk = next(cache_dir.glob(f"{rebuilt.summary['attempt']}/tokens.zarr/train/train-000003/c/0/0/0"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    fixed = _tokenize(cfg, up)
    assert fixed.work == "rebuilt" and fixed.summary["copied_parts"] == first.summary["tars"] - 1
    assert fixed.summary["encoded_images"] == len(first.open().read("train", "train-000003.tar"))
    assert fixed.open().verify() == []

    # 3. no completion marker (a writer killed before publishing): never used as complete; a new
    #    attempt adopts the parts that verify instead of encoding them again
    (cache_dir / "_COMPLETE.json").unlink()
    with pytest.raises(UserError, match="no complete token cache"):
        TokenCache(str(cache_dir))
    calls.images = 0
    again = _tokenize(cfg, up)
    assert again.work == "ran" and again.summary["encoded_images"] == 0 and calls.images == 0
    assert again.summary["copied_parts"] == first.summary["tars"] and again.open().verify() == []


@pytest.mark.e2e
def test_two_writers_of_one_identity_leave_one_valid_cache(upstream, published, embedded_source, tmp_path):
    """Two attempts written side by side, then both publish: one wins, the other gets the winner's cache."""
    from nextdetail.models.quant import token_schedule
    from nextdetail.models.tokenizer import TokenizerSpec
    from nextdetail.pipeline.declaration import key_of
    from nextdetail.stages.tokenize.flow import token_inputs
    from nextdetail.stages.tokenize.tasks import encode_tokens, part_artifact, plan_tokens, publish_tokens
    from nextdetail.storage import tokens
    from nextdetail.storage.factors import read_index

    root, up = upstream
    cfg = make_config(root, embedded_source, *FAST, f"tokens.cache={tmp_path}")
    spec = TokenizerSpec.from_config(cfg)
    inputs = token_inputs(cfg, up["shard"], up["decompose"], up["train_tokenizer"])
    key = key_of(cfg, "tokenize", up)
    plan = plan_tokens(key.output(cfg), key, read_index(Store(up["decompose"].url)), inputs, cfg.tokens)
    layout = tokens.token_layout(token_schedule(spec.patch_nums, spec.order, spec.detail_depth, spec.latent_side),
                                 spec.order, spec.vocab_size, cfg.tokens.variants)
    writers = [tokens.Attempt.start(plan.cache) for _ in range(2)]
    parts: list[list] = [[], []]
    for w in writers:
        tokens.create_group(w, layout, plan.identity, ["train", "val"])
    for job in plan.jobs:  # interleaved, tar by tar
        for w, out in zip(writers, parts, strict=True):
            part = part_artifact(plan, w, job)
            out.append((part.marker, encode_tokens.fn(part, job, inputs, cfg.tokens, w)))
    won = publish_tokens.fn(plan.artifact, plan, writers[0], parts[0], layout, inputs)
    lost = publish_tokens.fn(plan.artifact, plan, writers[1], parts[1], layout, inputs)
    assert won["work"] == "ran" and lost["work"] == "reused"
    with pytest.raises(FileExistsError):  # a writer that checked just before the winner published
        plan.artifact.publish({"attempt": writers[1].rel}, [], 0.0)
    assert lost["summary"]["attempt"] == won["summary"]["attempt"] == writers[0].rel
    marker = json.loads((Path(plan.cache.root) / "_COMPLETE.json").read_text())
    assert all(rel.startswith(writers[0].rel + "/") for rel in marker["files"])  # never a mix
    assert tokens.TokenCache(plan.cache.url()).verify() == []


@pytest.mark.integration
def test_team_bucket_on_s3_user_b_gets_user_as_tokens_without_encoding(s3_endpoint, embedded_source, tmp_path,
                                                                       monkeypatch):
    """User A runs the pipeline with storage.root on S3 (moto) and publishes; user B, an empty local
    directory, runs the same pipeline: every stage is up to date by A's lineage records, the token cache is verified and
    pulled through B's local mirror, and the encoder never runs. A deleted chunk or marker on S3 is
    detected and rebuilt; two processes tokenizing at once leave one valid cache."""
    import s3fs

    from nextdetail.storage.tokens import TokenCache

    options = f"storage.options={{client_kwargs: {{endpoint_url: '{s3_endpoint}'}}}}"
    user_a = make_config("s3://team-bucket/nd", embedded_source, *FAST, options,
                         f"tokens.local_cache={tmp_path / 'a-mirror'}", "data.splits=[train]")
    a = _pipeline(user_a)["tokenize"]
    assert a.work == "ran" and a.url.startswith("s3://team-bucket/nd/tokens/")

    calls = EncoderCalls(monkeypatch)
    mirror = tmp_path / "b-mirror"
    user_b = user_a.model_copy(update={"tokens": user_a.tokens.model_copy(update={"local_cache": str(mirror)})})
    b = _pipeline(user_b)["tokenize"]
    assert b.work == "up to date" and b.identity == a.identity and calls.images == 0  # A's lineage is in the bucket
    assert len(list(mirror.rglob("c/0/0/0"))) == a.summary["tars"]  # pulled and verified on the way
    ta, tb = a.open(), b.open()
    for tar in {r["shard"] for r in tb.index().to_pylist()}:
        assert np.array_equal(ta.read("train", tar), tb.read("train", tar))

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket_dir = a.url.removeprefix("s3://")
    chunk = next(p for p in fs.find(bucket_dir) if p.endswith("/train-000001/c/0/0/0"))
    fs.rm(chunk)
    user_c = user_a.model_copy(update={"tokens": user_a.tokens.model_copy(update={"local_cache": str(tmp_path / "c")})})
    c = _pipeline(user_c)["tokenize"]
    assert c.work == "rebuilt" and c.summary["copied_parts"] == a.summary["tars"] - 1
    assert calls.images > 0 and c.open().verify() == []

    fs.rm(f"{bucket_dir}/_COMPLETE.json")
    with pytest.raises(Exception, match="no complete token cache"):
        TokenCache(a.url, user_a.storage.options, str(tmp_path / "d"))
    calls.images = 0
    d = _pipeline(user_c)["tokenize"]
    assert d.work == "ran" and calls.images == 0 and d.summary["copied_parts"] == a.summary["tars"]

    # two processes at once, each a whole `nextdetail tokenize` for a new identity
    import subprocess

    cmd = [str(Path(sys.executable).parent / "nextdetail"), "tokenize", "--no-progress", "-o", "tokens.variants=[hflip]"]
    for o in ("storage.root=s3://team-bucket/nd", f"data.source={embedded_source}", "shard.samples_per_shard=32",
              "dask.n_workers=1", *FAST, options, "data.splits=[train]"):
        cmd += ["-o", o]
    procs = [subprocess.Popen([*cmd, "-o", f"tokens.local_cache={tmp_path / f'w{i}'}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    fs.invalidate_cache()
    caches = [p for p in fs.ls("team-bucket/nd/tokens") if not p.endswith(a.identity)]
    assert len(caches) == 1, caches
    attempts = fs.ls(f"{caches[0]}/attempts")
    assert len(attempts) == 1, attempts  # the loser (if both wrote) removed its attempt
    url = "s3://" + caches[0]
    assert TokenCache(url, user_a.storage.options, str(tmp_path / "e")).verify() == []


@pytest.mark.e2e
def test_tokenize_on_the_workers_offering_its_resources_publishes_the_same_bytes(upstream, published, embedded_source,
                                                                                 tmp_path):
    """tokens.resources={GPU: 1} on an external `dask scheduler` with two workers, one started with `--resources
    GPU=1` (its CPU stands in for the GPU): every tar is encoded by that worker, which loads the tokenizer once, and
    the published cache is byte for byte the one-process run's (same identity, same content hash). Asking for what no
    worker offers (GPU=2) is one line and exit 2 before any stage runs."""
    import os
    import subprocess

    from distributed import Client

    root, up = upstream
    _, here = published
    with external_dask(("gpu", ["--resources", "GPU=1"]), ("plain", [])) as address:
        with Client(address, timeout=60) as client:
            names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            pids = client.run(os.getpid)
        gpu = next(addr for addr, name in names.items() if name == "gpu")

        cfg = make_config(root, embedded_source, *FAST, f"tokens.cache={tmp_path / 'cluster-cache'}",
                          f"dask.address={address}", "tokens.resources={GPU: 1}")
        result = _tokenize(cfg, up)
        assert result.work == "ran" and result.identity == here.identity
        assert result.summary["content_sha256"] == here.summary["content_sha256"]  # every array, index and layout
        markers = list(Path(result.url).glob("attempts/*/_parts/*.json"))
        assert len(markers) == result.summary["tars"]
        assert {json.loads(m.read_text())["lineage"]["pid"] for m in markers} == {pids[gpu]}
        with Client(address, timeout=60) as client:
            loads = client.run(lambda: getattr(sys.modules.get("nextdetail.stages.tokenize.tasks"), "LOADS", 0))
        # once on the GPU worker for every tar; the other may load it once for publishing's preview (a CPU task
        # that asks for nothing, so it runs wherever Dask puts it)
        assert loads[gpu] == 1 and sum(loads.values()) <= 2, loads

        elsewhere = tmp_path / "root"
        out = subprocess.run([str(BIN / "nextdetail"), "tokenize", "--no-progress",
                              *cli_config(elsewhere, embedded_source, *FAST, f"dask.address={address}",
                                          "tokens.resources={GPU: 2}")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.count("\n") == 1 and "tokenize: tokens.resources asks for GPU=2" in out.stderr, out.stderr
        assert not (elsewhere / "shards").exists()  # nothing ran


@pytest.mark.e2e
def test_a_worker_killed_mid_tokenize_the_stage_completes_and_the_cache_verifies(upstream, published, embedded_source,
                                                                               tmp_path):
    """Two `--resources GPU=1` workers (each under its nanny, as `dask worker` starts them); the first is SIGKILLed
    as soon as the first tar is done. Dask hands its tasks to the other (or to the restarted one), each tar is a
    cached task into the run's attempt, and the published cache verifies and is the one-process run's bytes."""
    import os
    import signal
    import threading
    import time

    from distributed import Client

    from nextdetail.storage.tokens import TokenCache

    root, up = upstream
    _, here = published
    cache = tmp_path / "killed-cache"
    with external_dask(("a", ["--resources", "GPU=1"]), ("b", ["--resources", "GPU=1"])) as address:
        with Client(address, timeout=60) as client:
            pids = {w["name"]: pid for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()
                    for a, pid in client.run(os.getpid).items() if a == addr}
        killed: list[int] = []

        def kill_after_first_tar() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not list(cache.glob("tokens/*/attempts/*/_parts/*.json")):
                time.sleep(0.05)
            os.kill(pids["a"], signal.SIGKILL)
            killed.append(pids["a"])

        killer = threading.Thread(target=kill_after_first_tar, daemon=True)
        killer.start()
        cfg = make_config(root, embedded_source, *FAST, f"tokens.cache={cache}", f"dask.address={address}",
                          "tokens.resources={GPU: 1}")
        result = _tokenize(cfg, up)
        killer.join(timeout=60)
    assert killed, "the worker was never killed"
    markers = [json.loads(m.read_text()) for m in Path(result.url).glob("attempts/*/_parts/*.json")]
    assert len(markers) == result.summary["tars"]  # every tar once, whoever encoded it
    assert result.work == "ran" and result.summary["content_sha256"] == here.summary["content_sha256"]
    assert TokenCache(result.url, {}, str(tmp_path / "mirror")).verify() == []  # every file has its sha256
