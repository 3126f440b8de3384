"""Benchmark: the sample stage's merge on a cluster (issue 40) — what is left for it once class groups write their
own classes.

Before (session 30's merge, rebuilt here): each class group saved its arrays as one uncompressed result.npz; the
merge read every group's arrays into memory and wrote every class's PNGs, grid and tar members itself (on every
core, `outputs.write_classes`), then the overview pictures. Now (`outputs.merge_groups`): each group has written
its classes' files in place, its tar and its overview (the ≤ 16 shown classes, the ×f sums) under parts/; the
merge joins the tars as bytes and draws the overview pictures.

Workload: `--classes` classes of `--per-class` textured images at `--side` px and ×2 (as `sample_outputs.py`),
one class per group; the groups' own work is done untimed (on a cluster it runs on the workers, in parallel).
Each way runs `--repeat` times, interleaved; the fastest counts. Peak memory: the most bytes numpy and Python held
at once during the merge (tracemalloc), against what the arrays alone weigh. The merged files are asserted equal.

    PYTHONPATH=. python benchmarks/sample_merge.py [--classes 20] [--per-class 20] [--side 256] [--repeat 2]

Prints one JSON line: figure = the merge's seconds now, baseline = before, ratio = figure / baseline, and the
peak megabytes of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from sample_outputs import textured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20, help="more than 16: grid.png shows 16")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from nextdetail.figures import grid_rows
    from nextdetail.stages.sample.outputs import Overview, merge_groups, overview_pictures, write_classes
    from nextdetail.stages.sample.tasks import ClassResult, group_part
    from nextdetail.storage.fs import Store

    rng = np.random.default_rng(0)
    classes = list(range(args.classes))
    names = [f"class{c}" for c in classes]
    results = [ClassResult(c, textured(rng, args.per_class, args.side), textured(rng, args.per_class, 2 * args.side),
                           textured(rng, args.per_class, 2 * args.side)) for c in classes]
    array_mb = sum(a.nbytes for r in results for a in (r.images, r.hires, r.bilinear)) / 2**20
    shown = set(grid_rows(classes))

    def pictures(store: Store, overview: Overview, files: dict[str, str]) -> dict[str, str]:
        for rel, (data, sha) in overview_pictures(overview, classes, names, {}, 2, None).items():
            store.write_bytes(rel, data)
            files[rel] = sha
        return files

    def before(store: Store) -> tuple[float, float, dict[str, str]]:
        for r in results:  # the groups: their arrays, as session 30's `sample_group` saved them
            buf = io.BytesIO()
            np.savez(buf, classes=np.asarray([r.c]), **{f"{k}_{r.c}": getattr(r, k) for k in ("images", "hires",
                                                                                            "bilinear")})
            store.write_bytes(f"parts/{r.c:04d}/result.npz", buf.getvalue())

        def merge() -> dict[str, str]:
            held = []
            for c in classes:  # every group's arrays read back, then every class written here
                with np.load(io.BytesIO(store.read_bytes(f"parts/{c:04d}/result.npz"))) as z:
                    held.append(ClassResult(c, *(z[f"{k}_{c}"] for k in ("images", "hires", "bilinear"))))
            overview = Overview.of(classes)
            files = write_classes(store, iter(held), names, {}, "samples.tar", overview)
            store.remove_tree("parts")
            return pictures(store, overview, files)

        return timed(merge)

    def after(store: Store) -> tuple[float, float, dict[str, str]]:
        parts = []
        for r in results:  # the groups, on the workers: their classes in place, their tar and overview
            part, overview = group_part((r.c,)), Overview(frozenset({r.c} & shown))
            files = write_classes(store, iter([r]), names, {}, f"{part}/samples.tar", overview, 1)
            store.write_bytes(f"{part}/overview.npz", overview.to_bytes())
            store.write_bytes(f"{part}/_COMPLETE.json", json.dumps({"sha256": files}).encode())
            parts.append((part, (r.c,)))

        def merge() -> dict[str, str]:
            overview = Overview.of(classes)
            files = merge_groups(store, parts, names, args.per_class, True, overview)
            store.remove_tree("parts")
            return pictures(store, overview, files)

        return timed(merge)

    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    written: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="nextdetail-sample-merge-") as tmp:
        for _ in range(args.repeat):  # interleaved: the machine's drift falls on both alike
            for way, run in (("before", before), ("after", after)):
                out = Path(tmp, way)
                shutil.rmtree(out, ignore_errors=True)
                seconds, peak, written[way] = run(Store(str(out)))
                runs[way].append((seconds, peak))
    assert written["before"] == written["after"], "the merged files differ"
    old, new = min(runs["before"]), min(runs["after"])
    print(json.dumps({"benchmark": "sample_merge", "cores": os.cpu_count(), "classes": args.classes,
                      "per_class": args.per_class, "side": args.side, "files": len(written["after"]),
                      "arrays_mb": round(array_mb, 1),
                      "before_s": round(old[0], 3), "after_s": round(new[0], 3),
                      "before_peak_mb": round(old[1], 1), "after_peak_mb": round(new[1], 1),
                      "before_runs_s": [round(s, 3) for s, _ in runs["before"]],
                      "after_runs_s": [round(s, 3) for s, _ in runs["after"]],
                      "figure": round(new[0], 3), "baseline": round(old[0], 3), "ratio": round(new[0] / old[0], 3)}))


def timed(merge: Any) -> tuple[float, float, dict[str, str]]:
    """(seconds, peak MB traced, merge())."""
    tracemalloc.start()
    t0 = time.perf_counter()
    files = merge()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, files


if __name__ == "__main__":
    main()
