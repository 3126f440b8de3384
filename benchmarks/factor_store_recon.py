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
    import torch

    from nextdetail.models.tokenizer import load_tokenizer
    from nextdetail.stages.train_tokenizer.flow import train_data
    from nextdetail.storage.factor_loader import FactorBatches

    tok = results["train_tokenizer"]
    model = load_tokenizer(tok.checkpoint_url, cfg.storage.options, tok.summary["tokenizer_sha256"], "this benchmark")
    data = train_data(cfg, results["shard"], results.get("decompose"), split="val")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--stores", nargs="+", default=["float32", "uint8"])
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
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
