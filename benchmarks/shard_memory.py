"""Benchmark: peak memory of `nextdetail shard` on a corpus of hostile files vs the same corpus without them.

The hostile files are what issue 35 found holding gigabytes or hanging: a symlink loop inside a class folder,
a link to the split folder beside it, a class folder that is a link to the split folder, a sparse 2 GB file
named `.JPEG` and a PNG whose header declares 400 megapixels. The walk must enter each real folder once and the
reader must refuse both large files from their size or header, so the peak should not move.

The CLI runs as a user starts it (its own ephemeral Prefect server, a Dask LocalCluster); every process of its
tree is sampled with psutil every 50 ms. Figure: the largest resident set of any one process (the walk happens
in the CLI's process, the reads in the workers); baseline: the same on the clean corpus, in the same run;
limit: 1 GiB. Prints one JSON line.

    python benchmarks/shard_memory.py [--classes 8] [--images-per-class 40]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

OUT = Path(__file__).resolve().parent / "out" / "shard_memory"
NEXTDETAIL = str(Path(sys.executable).parent / "nextdetail")
LIMIT_BYTES = 1 << 30


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` × `height` RGB pixels and that holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def build_corpus(root: Path, classes: int, per_class: int, hostile: bool) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            (folder / f"img_{i:04d}.JPEG").write_bytes(buf.getvalue())
    if hostile:
        first = root / "train" / "n00000000"
        (first / "loop").symlink_to(".")
        (first / "up").symlink_to("..")
        (root / "train" / "n99999999").symlink_to(".")
        with open(first / "huge.JPEG", "wb") as f:  # sparse: no disk, 2 GB to anyone who reads it whole
            f.truncate(2 << 30)
        (first / "bomb.png").write_bytes(_png_declaring(20000, 20000))
    return root


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, int, str, subprocess.CompletedProcess]:
    """Run `cmd`; (largest RSS of one process, largest RSS summed over the tree, that process's name, result)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top, top_sum, top_name = 0, 0, ""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in tree:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:3])
            except psutil.Error:
                continue
            total += rss
            if rss > top:
                top, top_name = rss, name
        top_sum = max(top_sum, total)
        time.sleep(0.05)
    out, err = proc.communicate()
    return top, top_sum, top_name, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict[str, dict]:
    runs = {}
    for kind in ("clean", "hostile"):
        source = build_corpus(OUT / kind / "source", args.classes, args.images_per_class, hostile=kind == "hostile")
        cmd = [NEXTDETAIL, "shard", "--preset", "tiny", "--no-progress", "-o", f"data.source={source}",
               "-o", f"storage.root={OUT / kind / 'root'}", "-o", "data.splits=[train]", "-o", "shard.resolution=64"]
        t0 = time.perf_counter()
        top, top_sum, name, done = peak_rss(cmd, env)
        if done.returncode != 0:
            raise SystemExit(f"shard failed on the {kind} corpus: {done.stderr.strip()[-2000:]}")
        runs[kind] = {"peak_process_bytes": top, "peak_process": name, "peak_tree_bytes": top_sum,
                      "wall_s": round(time.perf_counter() - t0, 1), "stderr_lines": len(done.stderr.splitlines())}
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--images-per-class", type=int, default=40)
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    env = {**os.environ, "PREFECT_HOME": str(OUT / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    try:
        runs = measure(args, env)
    finally:  # the hostile corpus holds symlink loops: nothing that walks the checkout (pip, an IDE) may meet them
        shutil.rmtree(OUT, ignore_errors=True)
    figure, baseline = runs["hostile"]["peak_process_bytes"], runs["clean"]["peak_process_bytes"]
    print(json.dumps({
        "benchmark": "shard_memory",
        "figure": "peak_process_mib_with_hostile_files",
        "value_mib": round(figure / 2**20, 1),
        "baseline": "the same corpus without the hostile files (same run)",
        "baseline_mib": round(baseline / 2**20, 1),
        "ratio": round(figure / baseline, 3),
        "limit_mib": LIMIT_BYTES >> 20,
        "under_limit": figure < LIMIT_BYTES,
        "images": args.classes * args.images_per_class,
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
