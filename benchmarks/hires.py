"""Benchmark: CART's ×2 without retraining (CART §4.2.1, issue 42) — is it better than resizing?

On the preset's pipeline (built or reused under --root, through train_ar), per class `--per-class` samples at the
trained size, then five ×2 versions of the same samples:

- cart_x2             `CARTSampler.upscale`: overlapping patches, each cell's detail from the nearest patch centre,
                      the ×2 latent decoded in trained-size tiles cross-faded (`decode_in_tiles`), the sample's
                      colour below its resolution (`with_colour_of`);
- cart_x2_own_colour  the same without the colour step (`keep_colour=False`: the grey classes' red);
- cart_x2_whole       … and decoded whole, at twice the decoder's trained side (`tiles=False`: until session 24,
                      issue 42's frames and edge rows);
- cart_x2_tiled       patches edge to edge with φ per patch, decoded whole (`overlap=False`: as first written,
                      issue 42's seam);
- bilinear_x2    the trained-size sample resized bilinearly (Figure 6's left column).

(Names say x2; `--factor` changes the factor.) Each is scored by FID against the real train images resized ×2 bilinearly, with the evaluation's extractor
(`eval.extractor`; on `tiny` the offline random-feature one: it ranks, it is not comparable with published FID),
and by `fidelity.row_bands` (the largest deviation of a row's or column's mean colour from the interior's, 0–255,
where patches meet, at the edges, and among the interior rows: the yardstick).

    PYTHONPATH=. python benchmarks/hires.py [--preset tiny] [--root DIR] [--per-class 50] [-o key=value …]

Prints one JSON line: figure = cart_x2's FID, baseline = bilinear_x2's, ratio = figure / baseline (< 1: the
patch-wise details beat resizing), and every number.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from preset_root import arguments, built


def real_images(shards_url: str, options: dict, image_format: str, split: str = "train") -> np.ndarray:
    """Every image of `split` as uint8 (N, H, W, 3)."""
    from nextdetail.storage.fs import Store
    from nextdetail.storage.manifest import read_table, sample_index
    from nextdetail.storage.shards import read_tar_images

    store = Store(shards_url, options)
    by_tar: dict[str, list[str]] = {}
    for r in sample_index(read_table(store, "manifest.parquet")).to_pylist():
        if r["split"] == split:
            by_tar.setdefault(r["shard"], []).append(r["key"])
    return np.concatenate([read_tar_images(store, tar, tuple(keys), image_format) for tar, keys in sorted(by_tar.items())])


def resized(images: np.ndarray, factor: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from nextdetail.models.tokenizer import images_to_uint8

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return images_to_uint8(F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False).clamp(-1, 1))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--factor", type=int, default=2)
    args = parser.parse_args()
    cfg, results = built(args, until="train_ar")
    import torch

    from nextdetail.models import fidelity
    from nextdetail.models.feature_extractor import build_extractor
    from nextdetail.models.sampler import bilinear_upscale, seam_rows
    from nextdetail.models.tokenizer import images_to_uint8
    from nextdetail.stages.sample.tasks import load_models

    sampler, record = load_models(results["train_ar"].checkpoint_url, cfg.storage.options, "cpu", cfg.sample,
                                  roots=(cfg.storage.root,))
    if sampler.n_base == len(sampler.transformer.cfg.sides):
        sys.exit("hires: the model has no detail maps (tokenizer.order 0); the ×2 is only the upscaled base")
    extractor, info = build_extractor(cfg.eval.extractor, cfg.eval.inception_weights, cfg.eval.weights_cache)
    layers = (info.fid_layer, info.isc_layer)

    def stats(images: np.ndarray) -> dict[str, np.ndarray]:
        return fidelity.statistics(fidelity.extract(extractor, np.array_split(images, max(1, len(images) // 64)),
                                                    layers)["fid"])

    f = args.factor
    real = real_images(results["shard"].url, cfg.storage.options, cfg.shard.image_format)
    real_1x, real_big = stats(real), stats(resized(real, f))
    out: dict[str, Any] = {"benchmark": "hires", "preset": args.preset, "factor": f, "extractor": info.name,
                           "real_images": len(real), "per_class": args.per_class}
    variants = {"cart_x2": {}, "cart_x2_own_colour": {"keep_colour": False},
                "cart_x2_whole": {"tiles": False, "keep_colour": False},
                "cart_x2_tiled": {"overlap": False, "tiles": False, "keep_colour": False}}
    made: dict[str, list[np.ndarray]] = {"trained_size": [], **{name: [] for name in variants}, "bilinear_x2": []}
    seconds = dict.fromkeys(variants, 0.0)
    classes = range(len(record["classes"]))
    for c in classes:
        g = torch.Generator().manual_seed(cfg.sample.seed * 1_000_003 + c)
        for start in range(0, args.per_class, cfg.sample.batch_size):
            labels = torch.full((min(cfg.sample.batch_size, args.per_class - start),), c, dtype=torch.long)
            s = sampler.sample(labels, cfg.sample.cfg, cfg.sample.top_k, cfg.sample.top_p, g)
            made["trained_size"].append(images_to_uint8(s.images))
            made["bilinear_x2"].append(images_to_uint8(bilinear_upscale(s.images, f)))
            for name, how in variants.items():
                t0 = time.perf_counter()
                detail_g = torch.Generator().manual_seed(cfg.sample.seed * 1_000_003 + c + 7)  # the same seed for all
                big = sampler.upscale(labels, s.maps, f, cfg.sample.cfg, cfg.sample.top_k, cfg.sample.top_p, detail_g,
                                      **how)
                seconds[name] += time.perf_counter() - t0
                made[name].append(images_to_uint8(big))
        print(f"hires: class {c + 1}/{len(classes)}", file=sys.stderr)
    H, h = made["trained_size"][0].shape[1], sampler.latent_side
    old_seams = set(seam_rows(h, f, H // h, overlap=False))  # where edge-to-edge patches meet
    new_seams = sorted(old_seams | set(seam_rows(h, f, H // h)))  # … and where overlapping ones do
    seams = {"trained_size": [], "bilinear_x2": sorted(old_seams), "cart_x2_tiled": sorted(old_seams),
             "cart_x2": new_seams, "cart_x2_own_colour": new_seams, "cart_x2_whole": new_seams}
    for name, chunks in made.items():
        images = np.concatenate(chunks)
        reference = real_1x if name == "trained_size" else real_big
        out[f"{name}_fid"] = round(fidelity.fid(stats(images), reference), 3)
        bands = fidelity.row_bands(images, seams[name])
        out.update({f"{name}_band_{k}": round(v, 1) for k, v in bands.items()})
    for name, s in seconds.items():
        out[f"{name}_images_per_s"] = round(len(classes) * args.per_class / s, 2)
    out.update(figure=out["cart_x2_fid"], baseline=out["bilinear_x2_fid"],
               ratio=round(out["cart_x2_fid"] / out["bilinear_x2_fid"], 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
