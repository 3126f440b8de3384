"""Benchmark: evaluate's merge gathering the class groups' sample tars into samples/<label>.tar (issue 40).

Before (up to session 29): every member of every group's tar parsed, read and written again through a
`ShardTarWriter`, sample by sample, on the merge's main thread. Now (`evaluate.tasks.gather_samples_tar`): each
group's members copied as bytes (only the headers are parsed, to find where its end of archive starts), then one
end of archive. Both give the same bytes (asserted here); the merge runs the copy in a thread beside the metrics.

Groups of `--per-group` samples with payloads of `--payload-kb` (tiny: 12 groups of 50 PNGs of 32 px, ≈ 3 KB each;
ImageNet at 256 px: PNGs of ≈ 134 KB, 16 classes × 50 samples a group), written to a temporary directory; each
way timed `--repeat` times, the fastest counts.

    PYTHONPATH=. python benchmarks/gather_tars.py [--groups 12] [--per-group 50] [--payload-kb 3] [--repeat 5]

Prints one JSON line: figure = seconds now, baseline = seconds before, ratio = figure / baseline, and MB/s.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path


def write_groups(root: Path, groups: int, per_group: int, payload: int) -> list[str]:
    """`groups` directories, each with the samples.tar a class group's task writes (png + cls per sample)."""
    import numpy as np

    from nextdetail.storage.shards import ShardTarWriter

    rng = np.random.default_rng(0)
    urls = []
    for g in range(groups):
        path = root / "parts" / f"{g:04d}"
        path.mkdir(parents=True)
        with open(path / "samples.tar", "wb") as f:
            writer = ShardTarWriter(f)
            for i in range(per_group):
                writer.write({"__key__": f"{g:04d}-{i:05d}", "png": rng.bytes(payload), "cls": str(g)})
            writer.close()
        urls.append(str(path))
    return urls


def rewrite_members(out: Path, groups: list[str]) -> None:
    """The merge's way before: every member parsed, read and written again, sample by sample."""
    from nextdetail.storage.shards import ShardTarWriter

    with open(out, "wb") as f:
        writer = ShardTarWriter(f)
        for url in groups:
            with tarfile.open(fileobj=io.BytesIO(Path(url, "samples.tar").read_bytes())) as tar:
                sample: dict = {}
                for member in tar:
                    stem, ext = member.name.split(".", 1)
                    if sample and sample["__key__"] != stem:
                        writer.write(sample)
                        sample = {}
                    sample.setdefault("__key__", stem)
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    sample[ext] = data.decode() if ext == "cls" else data
                if sample:
                    writer.write(sample)
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--per-group", type=int, default=50)
    parser.add_argument("--payload-kb", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from nextdetail.stages.evaluate.tasks import CheckpointRef, gather_samples_tar
    from nextdetail.storage.fs import Store

    with tempfile.TemporaryDirectory(prefix="nextdetail-gather-") as tmp:
        root = Path(tmp)
        groups = write_groups(root, args.groups, args.per_group, int(args.payload_kb * 1024))
        before, now = root / "before.tar", Store(str(root / "now"))
        seconds: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.repeat):  # interleaved: the machine's drift falls on both alike
            t0 = time.perf_counter()
            rewrite_members(before, groups)
            seconds["before"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rel = gather_samples_tar(now, CheckpointRef("last", "unused"), groups, {})
            seconds["now"].append(time.perf_counter() - t0)
        gathered = Path(now.url(rel)).read_bytes()
        assert gathered == before.read_bytes(), "the gathered tar differs from the rewritten one"
        megabytes = len(gathered) / 1e6
    old, new = min(seconds["before"]), min(seconds["now"])
    print(json.dumps({"benchmark": "gather_tars", "groups": args.groups, "per_group": args.per_group,
                      "payload_kb": args.payload_kb, "tar_mb": round(megabytes, 1),
                      "before_s": round(old, 4), "now_s": round(new, 4),
                      "before_mb_per_s": round(megabytes / old, 1), "now_mb_per_s": round(megabytes / new, 1),
                      "figure": round(new, 4), "baseline": round(old, 4), "ratio": round(new / old, 3)}))


if __name__ == "__main__":
    main()
