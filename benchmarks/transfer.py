"""Benchmark: `cache push` / `cache pull` of a root to an S3 server vs s3fs's own recursive put / get of the same
files, in one run.

The root is the tiny preset built up to decompose (shards + one Zarr chunk per image: a few thousand small files,
the shape that makes one-file-at-a-time copying slow). The S3 server is moto's, in its own process on 127.0.0.1.
Each contender copies into a fresh prefix; push/pull do what they always do (sha256 of every file, the destination
checked, markers and records written last). Figure: s3fs's time / ours (≥ 0.8 is the goal: within 25 % of the
store's own bulk copy); also files/s, and push with --jobs 1 (one file at a time, as before) for reference.

    python benchmarks/transfer.py [--root PATH] [--jobs 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "transfer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    raise RuntimeError("moto did not start")


def _build_root(root: Path) -> None:
    subprocess.run([str(Path(sys.executable).parent / "nextdetail"), "run", "--until", "decompose", "--no-progress",
                    "-o", f"storage.root={root}"], check=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="a built root (default: the tiny preset up to decompose, built here)")
    ap.add_argument("--jobs", type=int, default=16)
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")  # nothing leaves the machine
    root = Path(args.root) if args.root else OUT / "root"
    if args.root is None and not (root / "lineage" / "decompose").is_dir():
        _build_root(root)

    import s3fs

    from nextdetail.cache.transfer import at_root, plan_transfer, transfer
    from nextdetail.conf import load_config

    server, endpoint = _moto()
    try:
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        cfg = load_config("tiny", overrides=[f"storage.root={root}"], until="decompose")
        plan = plan_transfer({"cart": cfg}, ["shard", "decompose"])
        local_dirs = sorted({Path(r["artifact"]["url"]) for r in plan.records})
        files = [p for d in local_dirs for p in d.rglob("*") if p.is_file()]
        n_bytes = sum(p.stat().st_size for p in files)
        fs.invalidate_cache()

        t0 = time.perf_counter()
        for d in local_dirs:
            fs.put(str(d), f"bench/s3fs/{d.relative_to(root)}", recursive=True)
        s3fs_put = time.perf_counter() - t0
        t0 = time.perf_counter()
        for d in local_dirs:
            fs.get(f"bench/s3fs/{d.relative_to(root)}", str(OUT / "s3fs-get" / d.relative_to(root)), recursive=True)
        s3fs_get = time.perf_counter() - t0

        def push(prefix: str, jobs: int) -> tuple[float, int]:
            there = at_root(cfg, f"s3://bench/{prefix}", options)
            t = time.perf_counter()
            sent = transfer(plan, cfg, there, progress=False, log=lambda _: None, jobs=jobs)
            return time.perf_counter() - t, sum(s.files for s in sent)

        push_s, pushed = push("nd", args.jobs)
        push_1_s, _ = push("nd-one-at-a-time", 1)
        pulled_root = OUT / "pulled"
        shutil.rmtree(pulled_root, ignore_errors=True)
        there = at_root(cfg, "s3://bench/nd", options)
        back = plan_transfer({"cart": there}, ["shard", "decompose"])
        here = load_config("tiny", overrides=[f"storage.root={pulled_root}"], until="decompose")
        t0 = time.perf_counter()
        transfer(back, there, here, progress=False, log=lambda _: None, jobs=args.jobs)
        pull_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(OUT / "s3fs-get", ignore_errors=True)
    print(json.dumps({
        "benchmark": "transfer",
        "figure": "push_speed_vs_s3fs_put",
        "files": len(files), "bytes": n_bytes, "files_pushed": pushed, "jobs": args.jobs,
        "baseline": "s3fs.S3FileSystem.put(recursive=True) of the same directories, same server, same run",
        "s3fs_put_s": round(s3fs_put, 2), "push_s": round(push_s, 2), "ratio": round(s3fs_put / push_s, 3),
        "push_files_per_s": round(pushed / push_s, 1),
        "push_one_at_a_time_s": round(push_1_s, 2), "speedup_over_one_at_a_time": round(push_1_s / push_s, 2),
        "s3fs_get_s": round(s3fs_get, 2), "pull_s": round(pull_s, 2), "pull_ratio": round(s3fs_get / pull_s, 3),
        "pull_files_per_s": round(pushed / pull_s, 1),
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
