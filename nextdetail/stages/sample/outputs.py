"""The sample stage's outputs, written class by class as the classes are sampled: no step holds every class.

Per class (`write_classes`): images/<class>/<i>.png, grids/<class>.png (a real photo of it, then its samples),
hires/images/<class>/<i>.png (CART ×f), and its members of the webdataset tar. What the overview pictures and the
summary need of all classes is kept as they pass (`Overview`): the samples of the ≤ 16 classes grid.png shows
(`figures.grid_rows` of the class list, fixed by the list), the first ones' ×f pairs and heat maps, the ×f
images' row and column sums (the seam measure), NDP's FLOPs and tokens per image.

Two ways, the same bytes:
- one process: every class into the stage's directory, the tar streamed to samples.tar;
- on a cluster, one class group per task (`tasks.sample_group`): its classes' files straight into the stage's
  directory (disjoint by class: nothing to move afterwards), its tar and its `Overview` under parts/<group>/; the
  merge (`merge_groups`) joins the tars as bytes (`storage.tar_join`), adds the overviews in class order, and
  takes every file's sha256 from its group's marker.

At ImageNet's preset (1,000 classes × 50, ×2) one process held ≈ 88 GB of arrays before writing, and the merge
of a cluster run the same after reading every group's arrays back and re-encoding all 100,000 PNGs; now a class's
arrays live until its files are written, and the merge copies one group's tar at a time.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nextdetail.storage.fs import Store

if TYPE_CHECKING:
    from nextdetail.stages.sample.tasks import ClassResult

PAIRS = 2  # hires/grid.png: the first bilinear and CART ×f images of a class
HEAT = 4  # heatmap.png: the first samples of a class beside their refinement maps (`figures.refinement_grid`)


def class_stem(c: int, names: list[str]) -> str:
    return f"{c:04d}-{names[c]}"


def class_files(c: int, names: list[str], per_class: int, hires: bool) -> list[str]:
    """The files of class `c` under the stage's directory."""
    stem = class_stem(c, names)
    return [*(f"images/{stem}/{i:04d}.png" for i in range(per_class)), f"grids/{stem}.png",
            *(f"hires/images/{stem}/{i:04d}.png" for i in range(per_class if hires else 0))]


@dataclass
class Overview:
    """What the overview pictures and the summary need of every class (module docstring), added in class order."""

    shown: frozenset[int]  # the classes grid.png shows
    images: dict[int, np.ndarray] = field(default_factory=dict)  # shown: all its samples
    levels: dict[int, np.ndarray] = field(default_factory=dict)  # shown, NDP: the first HEAT refinement maps
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # shown, ×f: (bilinear, CART)
    hires_sums: tuple[np.ndarray, np.ndarray] | None = None  # ×f: int64 sums over samples and columns (rows)
    hires_count: int = 0  # and over samples and rows (columns); the samples summed
    flops: list[np.ndarray] = field(default_factory=list)  # NDP: per image, class by class
    tokens: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    hires_seconds: float = 0.0

    @classmethod
    def of(cls, classes: list[int]) -> Overview:
        from nextdetail.figures import grid_rows

        return cls(frozenset(grid_rows(list(classes))))

    def add(self, r: ClassResult) -> None:
        if r.c in self.shown:
            self.images[r.c] = r.images
            if r.levels is not None:
                self.levels[r.c] = r.levels[:HEAT]
            if r.hires is not None:
                self.pairs[r.c] = (r.bilinear[:PAIRS], r.hires[:PAIRS])
        if r.hires is not None:  # integer sums: exact in any grouping, so any grouping gives the same bands
            self._add_sums(r.hires.sum(axis=(0, 2), dtype=np.int64), r.hires.sum(axis=(0, 1), dtype=np.int64),
                           len(r.hires))
        if r.flops is not None:
            self.flops.append(r.flops)
            self.tokens.append(r.tokens)
        self.seconds += r.seconds
        self.hires_seconds += r.hires_seconds

    def _add_sums(self, rows: np.ndarray, cols: np.ndarray, count: int) -> None:
        if self.hires_sums is None:
            self.hires_sums = (rows, cols)
        else:
            self.hires_sums = (self.hires_sums[0] + rows, self.hires_sums[1] + cols)
        self.hires_count += count

    def to_bytes(self) -> bytes:
        """A class group's overview as one .npz (arrays only; read back with `add_bytes`)."""
        arrays: dict[str, np.ndarray] = {"seconds": np.asarray([self.seconds, self.hires_seconds])}
        for c, a in self.images.items():
            arrays[f"images_{c}"] = a
        for c, a in self.levels.items():
            arrays[f"levels_{c}"] = a
        for c, (a, b) in self.pairs.items():
            arrays[f"bilinear_{c}"], arrays[f"hires_{c}"] = a, b
        if self.hires_sums is not None:
            arrays.update(hires_rows=self.hires_sums[0], hires_cols=self.hires_sums[1],
                          hires_count=np.asarray(self.hires_count))
        if self.flops:
            arrays.update(flops=np.concatenate(self.flops), tokens=np.concatenate(self.tokens))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def add_bytes(self, data: bytes, classes: tuple[int, ...]) -> None:
        """Add a group's `to_bytes` (its `classes`, after every class before them)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for c in classes:
                if c in self.shown:
                    self.images[c] = z[f"images_{c}"]
                    if f"levels_{c}" in z:
                        self.levels[c] = z[f"levels_{c}"]
                    if f"hires_{c}" in z:
                        self.pairs[c] = (z[f"bilinear_{c}"], z[f"hires_{c}"])
            if "hires_rows" in z:
                self._add_sums(z["hires_rows"], z["hires_cols"], int(z["hires_count"]))
            if "flops" in z:
                self.flops.append(z["flops"])
                self.tokens.append(z["tokens"])
            seconds, hires_seconds = z["seconds"].tolist()
        self.seconds += seconds
        self.hires_seconds += hires_seconds

    def row_bands(self, boundaries: Iterable[int], width: int = 2) -> dict[str, float]:
        """`models.fidelity.row_bands` of every ×f image, from the sums: the same values (a row's mean colour there
        is its float64 sum over exact integers, divided once by the count, as here; the unit test asserts it).
        Not a change to `fidelity.py`: the shared reference statistics' identity includes that file, and teams'
        reference caches would be rebuilt for nothing."""
        rows, cols = self.hires_sums  # type: ignore[misc]
        boundaries = list(boundaries)
        out = {"boundary": 0.0, "edges": 0.0, "interior": 0.0}
        for sums, count in ((rows, self.hires_count * len(cols)), (cols, self.hires_count * len(rows))):
            means = sums.astype(np.float64) / count  # (H, 3)
            H = means.shape[0]
            near = {r for b in boundaries for r in range(b - width, b + width) if 0 <= r < H}
            edges = set(range(min(width, H))) | set(range(max(H - width, 0), H))
            interior = [r for r in range(H) if r not in near and r not in edges]
            if not interior:
                raise ValueError(f"{H} rows leave no interior beside the edges and boundaries {boundaries}")
            deviation = np.abs(means - np.median(means[interior], axis=0)).max(axis=1)  # (H,)
            for name, rs in (("boundary", near), ("edges", edges), ("interior", interior)):
                if rs:
                    out[name] = max(out[name], float(deviation[sorted(rs)].max()))
        return out


@dataclass
class EncodedClass:
    """A class's files as (bytes, sha256), encoded in a pool thread."""

    c: int
    images: list[tuple[bytes, str]]
    grid: tuple[bytes, str]
    hires: list[tuple[bytes, str]]


def encoded(img: Any) -> tuple[bytes, str]:
    """A PIL image → (its PNG, the PNG's sha256): the marker's hash comes from the writer, not from reading back."""
    from nextdetail.figures import png_bytes
    from nextdetail.storage.hashing import bytes_sha256

    data = png_bytes(img)
    return data, bytes_sha256(data)


def encode_class(r: ClassResult, name: str, reference: np.ndarray | None) -> EncodedClass:
    from PIL import Image

    from nextdetail.figures import class_grid

    return EncodedClass(r.c, [encoded(Image.fromarray(a)) for a in r.images],
                        encoded(class_grid([(name, reference, r.images)])),
                        [encoded(Image.fromarray(a)) for a in (r.hires if r.hires is not None else ())])


def write_classes(store: Store, results: Iterable[ClassResult], names: list[str], references: dict[int, np.ndarray],
                  tar_rel: str, overview: Overview, threads: int | None = None) -> dict[str, str]:
    """Every class of `results` (sampled as this pulls them) → its files under `store` and its members in the tar
    at `tar_rel`, in class order; each class added to `overview`. Returns the files written with their sha256.

    The PNGs are encoded in `threads` threads (default: one per core; Pillow lets go of the GIL while it
    compresses) while the next class is sampled, at most a few classes ahead of the writes: the files and the tar
    are the bytes one thread writes."""
    from nextdetail.storage.shards import ShardTarWriter

    files: dict[str, str] = {}
    workers = threads or os.cpu_count() or 1

    def passing(results: Iterable[ClassResult]) -> Iterator[ClassResult]:
        for r in results:
            overview.add(r)
            yield r

    pool = ThreadPoolExecutor(workers)
    try:
        with store.atomic_writer(tar_rel) as f:
            tar = ShardTarWriter(f)
            for enc in _in_order(pool, lambda r: encode_class(r, names[r.c], references.get(r.c)), passing(results),
                                 2 * workers):
                stem = class_stem(enc.c, names)
                for i, (data, sha) in enumerate(enc.images):
                    files[_put(store, f"images/{stem}/{i:04d}.png", data)] = sha
                    tar.write({"__key__": f"{stem}-{i:04d}", "png": data, "cls": str(enc.c)})
                files[_put(store, f"grids/{stem}.png", enc.grid[0])] = enc.grid[1]
                for i, (data, sha) in enumerate(enc.hires):
                    files[_put(store, f"hires/images/{stem}/{i:04d}.png", data)] = sha
            tar.close()
        files[tar_rel] = tar.sha256
    finally:  # Ctrl-C: what is queued is dropped, only the classes being encoded finish
        pool.shutdown(wait=True, cancel_futures=True)
    return files


def _put(store: Store, rel: str, data: bytes) -> str:
    store.write_bytes(rel, data)
    return rel


def _in_order(pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """fn(item) for each item, computed in `pool` at most `ahead` items ahead of the consumer, yielded in order:
    what is encoded but not yet written stays bounded."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def merge_groups(store: Store, parts: list[tuple[str, tuple[int, ...]]], names: list[str], per_class: int,
                 hires: bool, overview: Overview) -> dict[str, str]:
    """The class groups (part directory under `store`, its classes; in class order), whose classes' files are
    already in place: their tars joined into samples.tar, their overviews added to `overview`. Returns every file
    with its sha256, as each group's marker records it (the names derived here, never taken from a record)."""
    import hashlib
    import json

    from nextdetail.storage.tar_join import join_tars

    files: dict[str, str] = {}
    for part, classes in parts:
        recorded = json.loads(store.read_bytes(f"{part}/_COMPLETE.json")).get("sha256", {})
        for c in classes:
            for rel in class_files(c, names, per_class, hires):
                if rel not in recorded:
                    raise RuntimeError(f"{store.url(part)}: its marker lacks {rel}; re-run the stage")
                files[rel] = recorded[rel]
        overview.add_bytes(store.read_bytes(f"{part}/overview.npz"), classes)
    digest = hashlib.sha256()
    with store.atomic_writer("samples.tar") as f:
        join_tars(f, ((store.read_bytes(f"{part}/samples.tar"), store.url(part, "samples.tar")) for part, _ in parts),
                  digest)
    files["samples.tar"] = digest.hexdigest()
    return files


def overview_pictures(overview: Overview, classes: list[int], names: list[str], references: dict[int, np.ndarray],
                      upscale: int, n_levels: int | None, threads: int | None = None) -> dict[str, tuple[bytes, str]]:
    """grid.png, and heatmap.png (NDP) or hires/grid.png (CART ×f), drawn at once → {file: (PNG, sha256)}. Each
    picture gets a row per class, as `figures` expects to choose its ≤ 16 from; only the shown rows (the same
    `grid_rows`) carry arrays."""
    from nextdetail.figures import class_grid, pair_grid, refinement_grid

    todo: dict[str, Callable[[], Any]] = {"grid.png": lambda: class_grid(
        [(names[c], references.get(c), overview.images.get(c)) for c in classes])}
    if overview.levels:
        todo["heatmap.png"] = lambda: refinement_grid(
            [(names[c], overview.images.get(c), overview.levels.get(c)) for c in classes], n_levels)
    if overview.pairs:
        todo["hires/grid.png"] = lambda: pair_grid(
            [(names[c], *overview.pairs.get(c, (None, None))) for c in classes],
            (f"bilinear x{upscale}", f"CART x{upscale}"))
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        futures = {rel: pool.submit(lambda draw: encoded(draw()), draw) for rel, draw in todo.items()}
        return {rel: fut.result() for rel, fut in futures.items()}
