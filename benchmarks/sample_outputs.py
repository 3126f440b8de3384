"""Benchmark: the sample stage writing its outputs (issue 40) — PNGs encoded on one thread vs one per core.

`outputs.write_classes` writes a class's files as it is sampled: in one process every class, on a cluster each
class group's (the merge, up to session 30, wrote every class after all groups had sampled: `sample_merge.py`). At
ImageNet's preset (50 samples per class, ×2) that is 50,000 PNGs of 256 px and 50,000 of 512 px, plus a grid per
class. Here `--classes` classes of `--per-class` textured images (smooth colour fields plus noise, so PNG
compresses them as it does photos rather than flat or random pixels) at `--side` px and ×2, written to a temporary
directory with the overview pictures by `write_classes(threads=1)` (the way before session 30) and
`write_classes()` (one thread per core), interleaved `--repeat` times; the fastest of each counts, and the files
are asserted identical.

    PYTHONPATH=. python benchmarks/sample_outputs.py [--classes 4] [--per-class 50] [--side 256] [--repeat 2]

Prints one JSON line: figure = seconds with every core, baseline = seconds on one thread, ratio = figure /
baseline, and milliseconds per image (a 256 px sample and its ×2 counted as two; grids and writes included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def textured(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """(n, side, side, 3) uint8: smooth colour fields with a little noise."""
    y, x = np.mgrid[0:side, 0:side] / side
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(2, 8, 3)
        field = np.stack([np.sin(a * x + b * y), np.cos(b * y + c), np.sin(c * x * y + a)], -1) * 100 + 128
        out[i] = (field + rng.normal(0, 8, field.shape)).clip(0, 255).astype(np.uint8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from nextdetail.stages.sample.outputs import Overview, overview_pictures, write_classes
    from nextdetail.stages.sample.tasks import ClassResult
    from nextdetail.storage.fs import Store

    rng = np.random.default_rng(0)
    classes = list(range(args.classes))
    results = [ClassResult(c, textured(rng, args.per_class, args.side), textured(rng, args.per_class, 2 * args.side),
                           textured(rng, args.per_class, 2 * args.side)) for c in classes]

    def write(store: Store, threads: int | None) -> dict[str, str]:
        overview = Overview.of(classes)
        files = write_classes(store, iter(results), names, {}, "samples.tar", overview, threads)
        for rel, (data, sha) in overview_pictures(overview, classes, names, {}, 2, None, threads).items():
            store.write_bytes(rel, data)
            files[rel] = sha
        return files

    names = [f"class{c}" for c in classes]
    seconds: dict[str, list[float]] = {"one_thread": [], "every_core": []}
    with tempfile.TemporaryDirectory(prefix="nextdetail-sample-outputs-") as tmp:
        written = {}
        for _ in range(args.repeat):  # interleaved: the machine's drift falls on both alike
            for way, threads in (("one_thread", 1), ("every_core", None)):
                out = Path(tmp, way)
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                written[way] = write(Store(str(out)), threads)
                seconds[way].append(time.perf_counter() - t0)
        assert written["one_thread"] == written["every_core"], "the files differ"
    images = 2 * args.classes * args.per_class
    old, new = min(seconds["one_thread"]), min(seconds["every_core"])
    print(json.dumps({"benchmark": "sample_outputs", "cores": os.cpu_count(), "classes": args.classes,
                      "per_class": args.per_class, "side": args.side, "images": images,
                      "one_thread_s": round(old, 3), "every_core_s": round(new, 3),
                      "one_thread_ms_per_image": round(1000 * old / images, 2),
                      "every_core_ms_per_image": round(1000 * new / images, 2),
                      "figure": round(new, 3), "baseline": round(old, 3), "ratio": round(new / old, 3)}))


if __name__ == "__main__":
    main()
