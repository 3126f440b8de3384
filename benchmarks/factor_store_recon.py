"""Benchmark: does the 8-bit factor store change what the tokenizer learns? (issue 39)

The tiny pipeline up to train_tokenizer, the same seeds, once per factor store (`decompose.dtype`: the preset's
float32 — or float16 — against uint8, each RGB plane a lossless WebP), at the tiny resolution (32 px) and at 64 px
(`shard.resolution=64`, crops of the same photographs). For each trained tokenizer: its held-out reconstruction
error (MSE on the val split, images in [-1, 1], the factors read from its own store as tokenize reads them) and its
mean training error over the last logged steps. Every run writes its own root; the difference between stores is
set against the spread between training seeds, which is what "beyond noise" means here.

    python benchmarks/factor_store_recon.py [--resolutions 32 64] [--seeds 0 1] [--stores float32 uint8]

Prints one JSON line per tokenizer, then a summary line (figure: uint8 / reference held-out MSE per resolution).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "factor_store_recon"


def held_out_mse(cfg, results) -> float:
    """Mean squared reconstruction error of the trained tokenizer on the val split (images in [-1, 1])."""
    from nextdetail.models.tokenizer import load_tokenizer
    from nextdetail.stages.train_tokenizer.flow import train_data

    tok = results["train_tokenizer"]
    model = load_tokenizer(tok.checkpoint_url, cfg.storage.options, tok.summary["tokenizer_sha256"], "this benchmark")
    return reconstruction_mse(model, train_data(cfg, results["shard"], results.get("decompose"), split="val"))


def reconstruction_mse(model, data) -> float:
    """Mean squared error of `model`'s reconstructions of `data`'s images (in [-1, 1]), every image once."""
    import torch

    from nextdetail.storage.factor_loader import FactorBatches

    n_images = sum(n for _, n in data.tars)
    batches = FactorBatches(data, model.spec.order, 32, seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for step in range((n_images + 31) // 32):
            images, bases = batches.batch(step)
            recon = model.indices_to_img(model.img_to_indices(images, bases)).float()
            total += float(((recon - images.float()) ** 2).sum())
            count += images.numel()
    return total / count


def one(resolution: int, seed: int, store: str, threads: int) -> dict:
    from nextdetail.conf import load_config
    from nextdetail.pipeline.run import run_pipeline
    from nextdetail.pipeline.runtime import prefect_api

    root = OUT / f"r{resolution}-s{seed}-{store}"
    overrides = [f"storage.root={root}", f"decompose.dtype={store}", f"tokenizer.seed={seed}",
                 f"tokenizer.torch_threads={threads}"]
    if resolution != 32:
        overrides.append(f"shard.resolution={resolution}")
    cfg = load_config("tiny", overrides=overrides)
    t0 = time.time()
    with prefect_api():
        results = run_pipeline(cfg, until="train_tokenizer", progress=False)
    metrics = json.loads(Path(results["train_tokenizer"].url, "metrics.json").read_text())
    recs = [m["rec"] for m in metrics if m.get("rec") is not None][-5:]
    return {"resolution": resolution, "seed": seed, "store": store,
            "held_out_mse": held_out_mse(cfg, results),
            "train_rec_last5": statistics.fmean(recs) if recs else None,
            "storage_max_error": results["decompose"].summary.get("storage_max_error"),
            "factor_bytes": sum(p.stat().st_size for p in Path(results["decompose"].url, "factors.zarr").rglob("*")
                                if p.is_file()),
            "seconds": round(time.time() - t0, 1)}


def cross(resolution: int, seed: int, stores: list[str]) -> dict:
    """Tells training apart from evaluation: each store's trained tokenizer (already built by a plain run of this
    benchmark) reconstructs the val images with each store's factors. If the uint8 tokenizer's lower held-out
    error follows the factors it is given, the store changed the evaluation input; if it follows the tokenizer,
    training on the store changed what was learned. Also: how much of the float factors lies outside [0, 1]
    (what quantizing clips)."""
    import numpy as np

    from nextdetail.models.tokenizer import load_tokenizer
    from nextdetail.storage import factors
    from nextdetail.storage.factor_loader import TrainData, read_sample_index
    from nextdetail.storage.fs import Store

    def only(pattern: str, root: Path) -> Path:
        found = sorted(root.glob(pattern))
        if len(found) != 1:
            raise SystemExit(f"{root}: expected one {pattern}, found {len(found)}; run without --cross first")
        return found[0]

    roots = {s: OUT / f"r{resolution}-s{seed}-{s}" for s in stores}
    models, data = {}, {}
    for store, root in roots.items():
        tok = only("tokenizer/*/*/summary.json", root)
        models[store] = load_tokenizer(str(tok.parent / "tokenizer.pt"), {},
                                       json.loads(tok.read_text())["tokenizer_sha256"], "this benchmark")
        shards, decomposition = str(only("shards/*", root)), str(only("factors/*/*", root))
        counts: dict[str, int] = {}
        for row in read_sample_index(shards, decomposition, {}).to_pylist():
            if row["split"] == "val":
                counts[row["shard"]] = counts.get(row["shard"], 0) + 1
        data[store] = TrainData(shards, decomposition, {}, "png", "val", tuple(counts.items()))
    matrix = {f"{m}_tokenizer": {f"{d}_factors": round(reconstruction_mse(models[m], data[d]), 6) for d in stores}
              for m in stores}
    outside = {}
    for store in stores:
        if store in factors.LEVELS:
            continue
        store_ = Store(data[store].factors_url)
        values = np.asarray(factors.open_lazy(store_, factors.read_index(store_), "val").compute(), dtype=np.float32)
        outside[store] = {"fraction_outside_0_1": round(float(((values < 0) | (values > 1)).mean()), 6),
                          "min": round(float(values.min()), 5), "max": round(float(values.max()), 5)}
    return {"resolution": resolution, "seed": seed, "held_out_mse": matrix, "float_factors": outside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--stores", nargs="+", default=["float32", "uint8"])
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--cross", action="store_true",
                    help="on the roots a plain run built: every store's tokenizer on every store's val factors")
    args = ap.parse_args()
    if args.cross:
        for resolution in args.resolutions:
            for seed in args.seeds:
                print(json.dumps({"benchmark": "factor_store_recon", "figure": "cross_held_out_mse",
                                  **cross(resolution, seed, args.stores)}), flush=True)
        return
    from nextdetail.pipeline.runtime import configure_environment

    configure_environment()  # Prefect's home, quiet logs, the ephemeral server's settings (as the CLI does)
    rows = []
    for resolution in args.resolutions:
        for seed in args.seeds:
            for store in args.stores:
                row = one(resolution, seed, store, args.torch_threads)
                rows.append(row)
                print(json.dumps({"benchmark": "factor_store_recon", **row}), flush=True)
    reference, quantized = args.stores[0], args.stores[-1]
    summary = {}
    for resolution in args.resolutions:
        by = {s: [r["held_out_mse"] for r in rows if r["resolution"] == resolution and r["store"] == s]
              for s in args.stores}
        ref = statistics.fmean(by[reference])
        seed_spread = (max(by[reference]) - min(by[reference])) / ref if len(by[reference]) > 1 else None
        paired = [q / r for q, r in zip(by[quantized], by[reference], strict=True)]
        summary[str(resolution)] = {"reference_mse": ref, "quantized_mse": statistics.fmean(by[quantized]),
                                    "ratio_per_seed": [round(p, 4) for p in paired],
                                    "seed_spread_of_reference": None if seed_spread is None else round(seed_spread, 4)}
    print(json.dumps({"benchmark": "factor_store_recon", "figure": "held_out_mse_ratio", "baseline": reference,
                      "measured": quantized, "by_resolution": summary}))


if __name__ == "__main__":
    main()
