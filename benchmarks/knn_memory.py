"""Benchmark: the real set's k-NN radii (`fidelity_merge.knn_radii`) one column batch at a time against a block's
whole row of distances (torch-fidelity's `calc_cdist_part`, as up to session 27) — peak memory, time, same bytes.

Each way runs in its own fresh process (spawned, two torch threads) on the same seeded features (default 40,000 ×
64, float32) and reports its peak resident memory growth (`ru_maxrss` after − before) and seconds; the two results
are compared byte for byte. At ImageNet with `eval.reference=train` a block's whole row is 10,000 × 1.28 M floats
(51 GB); a column batch stays 10,000 × 10,000 (400 MB).

    PYTHONPATH=. python benchmarks/knn_memory.py [--rows N] [--dim D]

Prints one JSON line: figure = the batched way's peak growth (MB), baseline = the whole-row way's, ratio = figure /
baseline, with both times and `identical`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from typing import Any


def _features(rows: int, dim: int) -> Any:
    import numpy as np

    return np.random.RandomState(0).randn(rows, dim).astype(np.float32)


def _whole_rows(features: Any) -> Any:
    """The radii as computed up to session 27: each block's whole `calc_cdist_part` row, then its topk."""
    import torch
    from torch_fidelity.metric_prc import calc_cdist_part

    from nextdetail.models.fidelity_merge import KNN_MOST, PRC_BATCH

    f = torch.from_numpy(features)
    return torch.cat([calc_cdist_part(block, f, PRC_BATCH).topk(KNN_MOST + 1, dim=1, largest=False).values[:, 1:]
                      for block in f.split(PRC_BATCH)]).numpy()


def _measure(way: str, rows: int, dim: int) -> tuple[float, float, bytes]:
    import resource
    import time

    import torch

    from nextdetail.models.fidelity_merge import knn_radii

    torch.set_num_threads(2)
    features = _features(rows, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    radii = knn_radii(features) if way == "batched" else _whole_rows(features)
    seconds = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return grown_mb, seconds, radii.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {"benchmark": "knn_memory", "rows": args.rows, "dim": args.dim}
    results = {}
    for way in ("whole_rows", "batched"):
        with ctx.Pool(1) as pool:
            results[way] = pool.apply(_measure, (way, args.rows, args.dim))
        out[f"{way}_peak_growth_mb"] = round(results[way][0])
        out[f"{way}_s"] = round(results[way][1], 2)
    out["identical"] = results["whole_rows"][2] == results["batched"][2]
    out.update(figure=out["batched_peak_growth_mb"], baseline=out["whole_rows_peak_growth_mb"],
               ratio=round(out["batched_peak_growth_mb"] / out["whole_rows_peak_growth_mb"], 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
