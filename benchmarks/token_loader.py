"""Benchmark: training tokens per second served from the token cache, against producing the same
tokens on the fly (decode image → Mumford–Shah decomposition → encode), one core each, one run.

Runs the tiny pipeline up to `tokenize` on the embedded dataset (32 px, order 3, 7 token maps,
277 tokens per image; the tokenizer trained only briefly: speed does not depend on its quality), then
- on the fly: N training images read from their tar, PNG-decoded, decomposed by the compiled
  Ambrosio–Tortorelli solver (order 3), encoded by the tokenizer (Algorithm 1), one variant;
- loader: `TokenBatches` over the local cache (block shuffle, whole chunks, int64 batches ready for
  the transformer), in the main process, for several epochs (chunks are decoded again every epoch:
  the window keeps only a few in memory, as it would for ImageNet);
- naive: the same cache read one random sample at a time through Zarr's indexing (what a plain
  `Dataset.__getitem__` over the array does): every read decompresses a whole chunk.
Prints one JSON line; `speedup_ratio` = loader / on the fly (goal ≥ 100), `loader_tokens_per_s_per_core`
(goal ≥ 20 M).

    python benchmarks/token_loader.py [--images 96] [--batch-size 256] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nextdetail.pipeline.runtime import configure_environment

OUT = Path(__file__).resolve().parent / "out" / "token_loader"


def main() -> None:
    from nextdetail.models.mumford_shah import ATConfig
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="images produced on the fly")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="least time spent serving from the cache")
    args = ap.parse_args()
    configure_environment(OUT / "work")

    import numpy as np
    import torch

    from nextdetail.conf import load_config
    from nextdetail.models.mumford_shah import decompose
    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.storage.fs import Store
    from nextdetail.storage.shards import read_tar_images
    from nextdetail.storage.token_loader import TokenBatches

    cfg = load_config("tiny", overrides=[f"storage.root={OUT / 'data'}", "tokenizer.steps=30",
                                         f"tokens.local_cache={OUT / 'mirror'}"])
    results = run_pipeline(cfg, until="tokenize", progress=False)
    tokens_result = results["tokenize"]
    cache = tokens_result.open()
    per_image = cache.tokens_per_image
    torch.set_num_threads(1)

    # -- on the fly: decode → decompose → encode, one core --------------------------------------
    index = cache.index().to_pylist()
    train = [r for r in index if r["split"] == "train"]
    by_tar: dict[str, list[str]] = {}
    for r in train[: args.images]:
        by_tar.setdefault(r["shard"], []).append(r["key"])
    model = BaseDetailVQVAE.from_checkpoint(Store(results["train_tokenizer"].url).read_bytes("tokenizer.pt"))
    solver = ATConfig.from_settings(cfg.decompose)
    shards = Store(results["shard"].url)

    def on_the_fly(tar: str, keys: list[str]) -> int:
        images = read_tar_images(shards, tar, tuple(keys), cfg.shard.image_format)  # decode
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (b, 3, H, W) in [0, 1]
        bases = decompose(x, cfg.decompose.order, solver)  # (n, b, 3, H, W)
        maps = model.img_to_indices(x * 2 - 1, bases * 2 - 1)
        return sum(m.numel() for m in maps)

    first = next(iter(by_tar.items()))
    on_the_fly(first[0], first[1][:4])  # warm-up: the compiled solver loads (or builds) once per process
    t0 = time.perf_counter()
    produced = sum(on_the_fly(tar, keys) for tar, keys in by_tar.items())
    fly_s = time.perf_counter() - t0
    assert produced == sum(len(k) for k in by_tar.values()) * per_image
    fly = produced / fly_s

    # -- the loader: whole chunks, block shuffle, one core ---------------------------------------
    batches = TokenBatches(cache, "train", batch_size=args.batch_size, seed=0, window=4)
    served, epochs = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or epochs < 2:
        for tokens, _labels in batches.epoch(epochs):
            served += tokens.numel()
        epochs += 1
    loader_s = time.perf_counter() - t0
    loader = served / loader_s

    # -- naive: one random sample per Zarr read ----------------------------------------------------
    import zarr

    from nextdetail.storage.tokens import ZARR

    group = zarr.open_group(cache.local.zarr_store(f"{cache.attempt}/{ZARR}", read_only=True), mode="r")
    arrays = [group[f"train/{t.removesuffix('.tar')}"] for t in batches.data.tars]
    rng = np.random.default_rng(0)
    naive_n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a = arrays[rng.integers(len(arrays))]
        row = a[int(rng.integers(a.shape[0])), 0]
        naive_n += row.size
    naive = naive_n / (time.perf_counter() - t0)

    print(json.dumps({
        "benchmark": "token_loader", "figure": "speedup_ratio", "speedup_ratio": round(loader / fly, 1),
        "loader_tokens_per_s_per_core": round(loader), "on_the_fly_tokens_per_s_per_core": round(fly),
        "naive_zarr_random_reads_tokens_per_s": round(naive),
        "baseline": "on the fly: PNG decode → Ambrosio–Tortorelli order 3 → tokenizer encode, one core",
        "goal": {"speedup_ratio": 100, "loader_tokens_per_s_per_core": 20_000_000},
        "tokens_per_image": per_image, "batch_size": args.batch_size, "epochs_served": epochs,
        "loader_images_per_s": round(loader / per_image), "on_the_fly_images_per_s": round(fly / per_image, 1),
        "on_the_fly_images": produced // per_image, "cache": tokens_result.url,
    }))


if __name__ == "__main__":
    main()
