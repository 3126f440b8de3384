"""Benchmark: evaluate's merge — one checkpoint's metrics from gathered features (issue 40).

Tiny's sizes by default: `--fake` 600 generated against `--real` 2 400 real features of the `nextdetail-randconv-v1`
extractor's width (512), FID, IS, KID (100 subsets of 500) and precision/recall (k = 3), one numpy/torch thread per
core as on a Dask worker, `--repeat` times each way, interleaved:

- baseline  as the merge did before session 27: KID's subsets whole in one pool thread beside `fidelity.compare`'s
            FID, IS and precision/recall (which recomputes the real set's k-NN radii);
- figure    `fidelity_merge.compare`: KID's subsets over the cores, the real radii read from the reference
            statistics (`knn_radii`, computed once per reference; its time is printed apart).

Both give the same metrics (checked here). Synthetic features, so the numbers are timing only.

    PYTHONPATH=. python benchmarks/merge_metrics.py [--fake N] [--real N] [--repeat N]

Prints one JSON line: figure = median seconds of the merge's metrics now, baseline = before, ratio = figure / baseline
(lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # as Dask's nanny sets them
    os.environ.setdefault(_name, "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", type=int, default=600)
    parser.add_argument("--real", type=int, default=2400)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from nextdetail.models import fidelity, fidelity_merge

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    width = 512  # nextdetail-randconv-v1's features
    fake = {"fid": np.abs(rng.normal(size=(args.fake, width))).astype(np.float32),
            "isc": rng.normal(size=(args.fake, 1000)).astype(np.float32)}
    real = np.abs(rng.normal(size=(args.real, width))).astype(np.float32)
    stats = fidelity.statistics(real)
    protocol = {"isc_splits": 10, "kid_subsets": 100, "kid_subset_size": 500, "prc_neighborhood": 3, "rng_seed": 2020}
    t0 = time.perf_counter()
    with_knn = {**stats, "knn": fidelity_merge.knn_radii(real)}
    knn_s = time.perf_counter() - t0

    def before(pool: ThreadPoolExecutor) -> dict:
        kid = pool.submit(fidelity.compare, fake, real, stats, ["kid"], protocol)
        out = fidelity.compare(fake, real, stats, ["fid", "isc", "prc"], protocol)
        return {**out, **kid.result()}

    def now(pool: ThreadPoolExecutor) -> dict:
        return fidelity_merge.compare(fake, real, with_knn, ["fid", "isc", "kid", "prc"], protocol, pool)

    seconds: dict[str, list[float]] = {"before": [], "now": []}
    metrics: dict[str, dict] = {}
    with ThreadPoolExecutor(1 + (os.cpu_count() or 1)) as pool:
        for _ in range(args.repeat):
            for name, way in (("before", before), ("now", now)):
                t0 = time.perf_counter()
                metrics[name] = way(pool)
                seconds[name].append(round(time.perf_counter() - t0, 3))
    if metrics["before"] != metrics["now"]:
        raise SystemExit(f"the two ways differ: {metrics}")
    figure, baseline = statistics.median(seconds["now"]), statistics.median(seconds["before"])
    print(json.dumps({"benchmark": "merge_metrics", "cores": os.cpu_count(), "fake": args.fake, "real": args.real,
                      "before_runs_s": seconds["before"], "now_runs_s": seconds["now"],
                      "knn_radii_once_s": round(knn_s, 3), "same_metrics": True,
                      "figure": figure, "baseline": baseline, "ratio": round(figure / baseline, 3)}))


if __name__ == "__main__":
    main()
