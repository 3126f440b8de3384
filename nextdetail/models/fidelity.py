"""Image-quality metrics from extracted features, each computed by torch-fidelity's own function so the
protocol is the standard one (and our numbers equal `torch_fidelity.calculate_metrics` on the same sets):

  uint8 images (N, H, W, 3) ─▶ `extract` (batched, the extractor's FID and IS layers)
  ─▶ {"fid": (N, D) float32, "isc": (N, K) float32}
  ─▶ `statistics` (μ, Σ of the FID layer — what the reference cache stores, with the features for KID/PRC)
  ─▶ `compare`: FID (Fréchet distance of the two Gaussians), KID (polynomial-kernel MMD over subsets),
     precision / recall (k-NN manifolds), and IS of the generated set alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def extract(model: Any, batches: Iterable[np.ndarray], layers: tuple[str, str], device: str = "cpu",
            progress: bool = False, desc: str = "features") -> dict[str, np.ndarray]:
    """Features of uint8 image batches (B, H, W, 3): {"fid": (N, D), "isc": (N, K)} from `layers` =
    (FID layer, IS layer) of `model` (a torch-fidelity feature extractor built for exactly those layers)."""
    from tqdm import tqdm

    if list(model.features_list) != list(layers):
        raise ValueError(f"extractor provides {model.features_list}, asked for {layers}")
    out: dict[str, list[np.ndarray]] = {"fid": [], "isc": []}
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
        with torch.no_grad():
            fid_features, isc_features = model(x)
        out["fid"].append(fid_features.float().cpu().numpy())
        out["isc"].append(isc_features.float().cpu().numpy())
    if not out["fid"]:
        raise ValueError("no images to extract features from")
    return {k: np.concatenate(v) for k, v in out.items()}


def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """μ (float32) and Σ (float64) of (N, D) features, as torch-fidelity computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float32)))


def fid(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats_1, stats_2, False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, splits: int = 10, rng_seed: int = 2020) -> tuple[float, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    splits = min(splits, len(logits))
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=rng_seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def compare(fake: dict[str, np.ndarray], real_features: np.ndarray, real_stats: dict[str, np.ndarray],
            metrics: list[str], protocol: dict[str, Any]) -> dict[str, Any]:
    """Generated set `fake` ({"fid", "isc"} features) against the real set (its FID-layer features and their
    statistics). Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall",
    "f_score", "kid_subset_size"} for the `metrics` asked for."""
    out: dict[str, Any] = {}
    if "fid" in metrics:
        out["fid"] = fid(statistics(fake["fid"]), real_stats)
    if "isc" in metrics:
        out["isc_mean"], out["isc_std"] = inception_score(fake["isc"], protocol["isc_splits"], protocol["rng_seed"])
    f1 = torch.from_numpy(np.asarray(fake["fid"], dtype=np.float32))
    f2 = torch.from_numpy(np.asarray(real_features, dtype=np.float32))
    if "kid" in metrics:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        size = min(protocol["kid_subset_size"], len(f1), len(f2))  # torch-fidelity refuses a subset > a set
        kid = kid_features_to_metric(f1, f2, kid_subsets=protocol["kid_subsets"], kid_subset_size=size,
                                     rng_seed=protocol["rng_seed"], verbose=False)
        out.update(kid_mean=float(kid[KEY_METRIC_KID_MEAN]), kid_std=float(kid[KEY_METRIC_KID_STD]),
                   kid_subset_size=size)
    if "prc" in metrics:
        from torch_fidelity.metric_prc import (
            KEY_METRIC_F_SCORE,
            KEY_METRIC_PRECISION,
            KEY_METRIC_RECALL,
            prc_features_to_metric,
        )

        prc = prc_features_to_metric(f1, f2, prc_neighborhood=protocol["prc_neighborhood"], prc_batch_size=10000,
                                     save_cpu_ram=len(f1) * len(f2) > 1e8, verbose=False)
        out.update(precision=float(prc[KEY_METRIC_PRECISION]), recall=float(prc[KEY_METRIC_RECALL]),
                   f_score=float(prc[KEY_METRIC_F_SCORE]))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images (N, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def row_bands(images: np.ndarray, boundaries: Iterable[int] = (), width: int = 2) -> dict[str, float]:
    """Bands along rows and columns (issue 42): how far the mean colour of a row (column) strays from the
    interior's.

    `images` (N, H, W, 3) uint8, square. Each row's colour is its mean over samples and columns (R, G, B, 0–255);
    a row's deviation is its largest channel difference from the interior rows' median colour. Returned, the
    larger of rows and columns: the largest deviation among the `width` rows on each side of every boundary in
    `boundaries` (where patches meet: rows b − width … b + width − 1), among the first and last `width` rows
    ("edges"), and among the remaining interior rows ("interior": what image content alone gives, the
    yardstick). Raises when nothing is left for the interior."""
    boundaries = list(boundaries)
    out = {"boundary": 0.0, "edges": 0.0, "interior": 0.0}
    for along in (images, images.transpose(0, 2, 1, 3)):
        rows = along.astype(np.float64).mean(axis=(0, 2))  # (H, 3)
        H = rows.shape[0]
        near = {r for b in boundaries for r in range(b - width, b + width) if 0 <= r < H}
        edges = set(range(min(width, H))) | set(range(max(H - width, 0), H))
        interior = [r for r in range(H) if r not in near and r not in edges]
        if not interior:
            raise ValueError(f"{H} rows leave no interior beside the edges and boundaries {boundaries} (width {width})")
        deviation = np.abs(rows - np.median(rows[interior], axis=0)).max(axis=1)  # (H,)
        for name, rs in (("boundary", near), ("edges", edges), ("interior", interior)):
            if rs:
                out[name] = max(out[name], float(deviation[sorted(rs)].max()))
    return out
