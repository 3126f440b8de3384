"""`storage.root` on S3: moto's S3 server started by the test on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import make_config, objects_per_array, run_shard_stage


@pytest.mark.integration
def test_shard_stage_writes_to_an_s3_root_and_reuses_it(s3_endpoint, embedded_source):
    options = f"storage.options={{client_kwargs: {{endpoint_url: '{s3_endpoint}'}}}}"
    cfg = make_config("s3://team-bucket/nd", embedded_source, options)
    first = run_shard_stage(cfg)
    assert first.url.startswith("s3://team-bucket/nd/shards/") and len(first.shards_ran) > 0
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.invalidate_cache()
    rows = pq.read_table(io.BytesIO(fs.cat_file(f"{first.manifest_url}"))).to_pylist()
    assert len(rows) == 12 * 14
    keys = set()
    for tar in fs.glob(first.url.removeprefix("s3://") + "/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(tar))) as tf:
            keys |= {n[: n.index(".", n.rfind("/"))] for n in tf.getnames()}
    assert keys == {r["key"] for r in rows}
    assert not [p for p in fs.find(first.url.removeprefix("s3://")) if ".tmp-" in p]  # uploads are all-or-nothing
    marker = json.loads(fs.cat_file(first.url.removeprefix("s3://") + "/_COMPLETE.json"))
    assert marker["identity"] == first.identity
    again = run_shard_stage(cfg)
    assert again.shards_ran == [] and again.identity == first.identity


@pytest.mark.integration
def test_decompose_stage_writes_zarr_to_s3_and_reads_it_back_lazily(s3_endpoint, embedded_source):
    from nextdetail.pipeline.run import run_stage
    from nextdetail.pipeline.runtime import dask_cluster, prefect_api
    from nextdetail.storage import factors
    from nextdetail.storage.factors import read_index
    from nextdetail.storage.fs import Store

    options = f"storage.options={{client_kwargs: {{endpoint_url: '{s3_endpoint}'}}}}"
    cfg = make_config("s3://team-bucket/nd", embedded_source, options)
    with prefect_api(), dask_cluster(**cfg.dask.model_dump()) as scheduler:
        shards = run_stage(cfg, "shard", progress=False, scheduler=scheduler)
        result = run_stage(cfg, "decompose", {"shard": shards}, progress=False, scheduler=scheduler)
        again = run_stage(cfg, "decompose", {"shard": shards}, progress=False, scheduler=scheduler)
    assert result.zarr_url.startswith("s3://team-bucket/nd/factors/") and result.tars_ran
    assert again.tars_ran == [] and again.identity == result.identity
    store = Store(result.url, cfg.storage.options)
    index = read_index(store)
    lazy = factors.open_lazy(store, index, "train")
    stored = lazy.compute()  # as stored (the preset's uint8); `factors.read` scales to [0, 1]
    assert stored.shape == (12 * 12, 3, 3, 32, 32) and stored.dtype == cfg.decompose.dtype
    values = factors.read(stored)
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    # one object per tar on the bucket (the tar's shard), not one per image
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    on_bucket = objects_per_array(fs.find(result.zarr_url.removeprefix("s3://")), "factors.zarr")
    tars = {f"{r['split']}/{r['shard'].removesuffix('.tar')}" for r in index.to_pylist()}
    assert on_bucket == dict.fromkeys(tars, 1) and len(index) > len(tars)


@pytest.mark.integration
def test_exclusive_create_lets_exactly_one_writer_publish(s3_endpoint, tmp_path):
    """The token cache's publish step: a create-only write (If-None-Match on S3, a hard link locally)."""
    import threading

    import pytest

    from nextdetail.storage.fs import Store

    for store in (Store("s3://team-bucket/x", {"client_kwargs": {"endpoint_url": s3_endpoint}}), Store(str(tmp_path))):
        won, lost = [], []

        def publish(i: int, store: Store = store, won: list = won, lost: list = lost) -> None:
            try:
                store.write_bytes_exclusive("_COMPLETE.json", f"writer {i}".encode())
                won.append(i)
            except FileExistsError:
                lost.append(i)

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 3, store
        assert store.read_bytes("_COMPLETE.json") == f"writer {won[0]}".encode()
        with pytest.raises(FileExistsError):
            store.write_bytes_exclusive("_COMPLETE.json", b"late")
        assert not [p for p in store.find() if ".tmp-" in p]
