"""Reference statistics of real images for the `evaluate` stage: computed once, cached by content.

Data flow (all in this file; metric code in `models/fidelity.py`, extractors in `models/feature_extractor.py`):
  a reference — a split of the shard dataset, a folder of images, or an .npz reference batch (ADM's arr_0)
  ─▶ `ReferenceSpec.identity_parts()` (cheap: the shard dataset's identity, or the files' sha256)
  ─▶ `reference_stats` task: uint8 batches ─▶ extractor features ─▶ μ, Σ (FID layer) + the features (KID,
     precision/recall) and their k-NN radii (precision) + IS of the real images ─▶ one `stats-<attempt>.npz`
     (atomic) ─▶ `_COMPLETE.json` created only if absent (two writers: one wins, both then read the winner's
     file), sha256 recorded.

Identity = hash(the reference's content, max images, the extractor's name + weights sha256, code).
Location = `<eval.reference_cache or storage.root>/refstats/<identity>/`: the path is the identity, so a
team bucket holds each reference once and everyone reuses it (verified by sha256 before use).
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from nextdetail.errors import UserError
from nextdetail.pipeline.tasks import Artifact, build_artifact, stage_task
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256, stable_hash

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ReferenceSpec:
    """Where the real images are. kind: "split" (of a shard dataset), "folder" or "npz"."""

    kind: str
    url: str  # the shard dataset directory, the folder, or the .npz file
    options: dict
    split: str | None = None
    shards_identity: str | None = None
    image_format: str = "jpg"
    max_images: int | None = None

    @property
    def label(self) -> str:
        return f"{self.split} split of {self.url}" if self.kind == "split" else self.url

    def _store_and_name(self) -> tuple[Store, str]:
        parent, name = self.url.rstrip("/").rsplit("/", 1)
        return Store(parent, self.options), name

    def folder_files(self) -> list[str]:
        store = Store(self.url, self.options, follow_links=True)  # the user's folder, links and all
        files = sorted(f for f in store.find() if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise UserError(f"eval.reference={self.url}: no images ({', '.join(IMAGE_SUFFIXES)}) in that folder")
        return files[: self.max_images]

    def split_rows(self) -> list[tuple[str, str]]:
        """(shard tar, key) of the split's written images, the first `max_images` by key."""
        from nextdetail.storage.manifest import read_table

        table = read_table(Store(self.url, self.options), "manifest.parquet").to_pylist()
        rows = sorted((r["key"], r["shard"]) for r in table if r["split"] == self.split and r["status"] != "skipped")
        if not rows:
            splits = sorted({r["split"] for r in table})
            raise UserError(f"eval.reference={self.split}: no images of that split in {self.url} (splits: "
                            f"{', '.join(splits)}); or pass a folder of images / an .npz reference batch")
        return [(shard, key) for key, shard in rows[: self.max_images]]

    def identity_parts(self) -> dict[str, Any]:
        """What the statistics depend on. Folders and .npz files are hashed by content (portable: two
        machines with the same files name the same cache)."""
        if self.kind == "split":
            return {"kind": "split", "shards": self.shards_identity, "split": self.split, "max": self.max_images}
        if self.kind == "npz":
            store, name = self._store_and_name()
            digest = store.sha256(name)
            if digest is None:
                raise UserError(f"eval.reference={self.url}: no such file")
            return {"kind": "npz", "sha256": digest, "max": self.max_images}
        store = Store(self.url, self.options, follow_links=True)
        return {"kind": "folder", "max": self.max_images,
                "files": stable_hash([(f, store.sha256(f)) for f in self.folder_files()])}

    def tars(self) -> list[tuple[str, tuple[str, ...]]]:
        """A split's images by tar: (tar, keys), in the order `batches` reads them (the unit of a cluster task)."""
        by_tar: dict[str, list[str]] = {}
        for shard, key in self.split_rows():
            by_tar.setdefault(shard, []).append(key)
        return [(shard, tuple(keys)) for shard, keys in by_tar.items()]

    def tar_batches(self, shard: str, keys: tuple[str, ...], batch_size: int) -> Iterator[np.ndarray]:
        from nextdetail.storage.shards import read_tar_images

        images = read_tar_images(Store(self.url, self.options), shard, keys, self.image_format)
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches of the reference images (one size per batch; a split's never span two tars)."""
        if self.kind == "split":
            for shard, keys in self.tars():
                yield from self.tar_batches(shard, keys, batch_size)
        elif self.kind == "npz":
            store, name = self._store_and_name()
            with store.open(name) as f:
                arrays = np.load(io.BytesIO(f.read()))
                if "arr_0" not in arrays or arrays["arr_0"].dtype != np.uint8 or arrays["arr_0"].ndim != 4:
                    raise UserError(f"eval.reference={self.url}: expected an .npz with arr_0 = uint8 images (N, H, W, 3) "
                                    "(ADM's reference-batch format)")
                images = arrays["arr_0"][: self.max_images]
            for i in range(0, len(images), batch_size):
                yield images[i : i + batch_size]
        else:
            yield from _folder_batches(Store(self.url, self.options, follow_links=True), self.folder_files(), batch_size)


def _folder_batches(store: Store, files: list[str], batch_size: int) -> Iterator[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    batch: list[np.ndarray] = []
    for rel in files:
        try:
            with Image.open(io.BytesIO(store.read_bytes(rel))) as im:
                a = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{store.url(rel)}: not a readable image ({exc}); remove it from the reference folder") from None
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(a)
    if batch:
        yield np.stack(batch)


def reference_spec(source: str, shards_url: str, shards_identity: str, image_format: str, options: dict,
                   max_images: int | None) -> ReferenceSpec:
    """`eval.reference` → a spec: a path/URL (folder or .npz) or a split name of the shard dataset."""
    if "/" in source or source.endswith(".npz"):
        kind = "npz" if source.endswith(".npz") else "folder"
        if "://" not in source:
            from pathlib import Path

            path = Path(source).expanduser()
            if not path.exists():
                raise UserError(f"eval.reference={source}: no such file or folder; give a split name "
                                "(train, val) or a folder of images / an .npz reference batch")
            source = str(path.resolve())
        return ReferenceSpec(kind, source, options, max_images=max_images)
    return ReferenceSpec("split", shards_url, options, split=source, shards_identity=shards_identity,
                         image_format=image_format, max_images=max_images)


@dataclass(frozen=True)
class RefHandle:
    """A complete reference_stats artifact: its directory, fsspec options and marker record."""

    url: str
    options: dict
    record: dict

    @property
    def identity(self) -> str:
        return self.record["identity"]

    def load(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return load_reference(Store(self.url, self.options), self.record)

    def describe(self) -> dict[str, Any]:
        s = self.record["summary"]
        return {"identity": self.identity, "url": self.url, "source": s["source"], "images": s["images"],
                "real_isc_mean": s["isc_mean"], "real_isc_std": s["isc_std"]}


def plan_reference(root: Store, spec: ReferenceSpec, extractor: dict[str, str]) -> Artifact:
    """Under `root`/refstats/<identity>: one artifact per reference content × extractor, shared by every
    evaluation (`pipeline.code.shared_identity`)."""
    from nextdetail.pipeline.code import shared_identity

    parts = spec.identity_parts()
    identity, code = shared_identity(__name__, {"reference": parts, "extractor": extractor})
    lineage = {"code": code, "settings": {"reference": parts, "extractor": extractor}, "source": spec.label}
    return Artifact("reference_stats", identity, root.sub("refstats", identity), "_COMPLETE.json", lineage=lineage,
                    checksums=True, exclusive=True)


def compute_reference(artifact: Artifact, spec: ReferenceSpec, extractor: str, weights: str | None,
                      weights_cache: str, batch_size: int, device: str, progress: bool = False,
                      log: Any = print, parts: tuple[str, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Extract the reference's features (or gather them from `parts`, the tar groups' directories of a cluster run,
    in `spec.tars()` order); write `stats-<attempt>.npz`; returns (summary, {file: sha256})."""
    from nextdetail.models import fidelity
    from nextdetail.models.feature_extractor import build_extractor
    from nextdetail.models.fidelity_merge import knn_radii

    model, info = build_extractor(extractor, weights, weights_cache, device)
    log(f"reference statistics: {info.name} features of {spec.label} → {artifact.store.url()}")
    if parts:
        feats = {k: np.concatenate(v) for k, v in _part_features(parts, artifact.store.options).items()}
    else:
        feats = fidelity.extract(model, spec.batches(batch_size), (info.fid_layer, info.isc_layer), device, progress,
                                 desc="reference features")
    stats = fidelity.statistics(feats["fid"])
    isc_mean, isc_std = fidelity.inception_score(feats["isc"])
    buf = io.BytesIO()
    knn = knn_radii(feats["fid"])  # precision / recall's real-set radii: once here, not per checkpoint
    np.savez(buf, features=feats["fid"], mu=stats["mu"], sigma=stats["sigma"], knn=knn)
    rel = f"stats-{uuid.uuid4().hex[:12]}.npz"  # per attempt: a concurrent writer never replaces ours
    data = buf.getvalue()
    artifact.store.write_bytes(rel, data)
    summary = {"images": len(feats["fid"]), "feature_dim": int(feats["fid"].shape[1]), "extractor": info.name,
               "extractor_sha256": info.weights_sha256, "source": spec.label, "file": rel,
               "isc_mean": round(isc_mean, 4), "isc_std": round(isc_std, 4)}
    if parts:
        artifact.store.remove_tree("parts")  # gathered: the per-tar features are not kept
    return summary, {rel: bytes_sha256(data)}


@stage_task(name="reference_stats")
def reference_stats(artifact: Artifact, spec: ReferenceSpec, extractor: str, weights: str | None, weights_cache: str,
                    batch_size: int, device: str, progress: bool = False, parts: tuple[str, ...] = ()
                    ) -> tuple[dict, dict[str, str]]:
    from prefect import get_run_logger

    return compute_reference(artifact, spec, extractor, weights, weights_cache, batch_size, device, progress,
                             get_run_logger().info, parts)


# ---- on the cluster: one task per group of a split's tars, then one merge ----------------------------------

_EXTRACTORS: dict[tuple, tuple[Any, Any]] = {}
_EXTRACTORS_LOCK = threading.Lock()


def cached_extractor(extractor: str, weights: str | None, weights_cache: str, device: str) -> tuple[Any, Any]:
    """`build_extractor`, once per process (a Dask worker extracts tar after tar, group after group)."""
    from nextdetail.models.feature_extractor import build_extractor

    key = (extractor, weights, weights_cache, device)
    with _EXTRACTORS_LOCK:
        if key not in _EXTRACTORS:
            _EXTRACTORS.clear()
            _EXTRACTORS[key] = build_extractor(*key)
        return _EXTRACTORS[key]


# A cluster task extracts whole tars of at least this many images. Each task run cost the Prefect server ≈ 50 ms
# of CPU (its task-run recorder; benchmarks/reference_groups.py: 0.70 CPU-s for 14 fewer) plus the worker's and
# the flow's share, against ≈ 1.5 ms an image for tiny's extractor on one core: tiny's 16 tars of 150 images were
# 16 tasks of ≈ 0.25 s. (Parts are plain Dask tasks since, ≈ 10 ms each: benchmarks/part_overhead.py.) ImageNet's tars (≈ 1,250 images) stay one task each. (A comment, not a string after the
# assignment: such a string is code to the identities' normalization, `pipeline/code.py`.)
IMAGES_PER_TASK = 1000

TarGroup = tuple[tuple[str, tuple[str, ...]], ...]  # consecutive (tar, keys) of `ReferenceSpec.tars()`


def tar_groups(tars: list[tuple[str, tuple[str, ...]]], at_least: int | None = None) -> list[TarGroup]:
    """`tars` in order, cut into consecutive groups of ≈ equal images, ≈ `at_least` (default `IMAGES_PER_TASK`) or
    more each (a tar is never split; a tar's middle image decides its group): fixed by the reference, never by the
    number of workers."""
    total = sum(len(keys) for _, keys in tars)
    count = max(1, total // (at_least or IMAGES_PER_TASK))
    if count >= len(tars):
        return [(tar,) for tar in tars]
    groups: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
    before = 0
    for tar in tars:
        groups.setdefault(min(count - 1, count * (2 * before + len(tar[1])) // (2 * total)), []).append(tar)
        before += len(tar[1])
    return [tuple(group) for group in groups.values()]


def part_artifact(parent: Artifact, group: TarGroup) -> Artifact:
    """One group of tars' reference features, inside the statistics' directory (`parts/`, removed once
    gathered)."""
    shards = [shard for shard, _ in group]
    return Artifact("reference_stats", stable_hash({"reference": parent.identity, "tars": shards}),
                    parent.store.sub("parts", f"{shards[0].replace('/', '_')}+{len(shards)}"),
                    lineage={"part_of": parent.identity})


@stage_task(name="reference_features", retries=2)
def reference_features(artifact: Artifact, spec: ReferenceSpec, group: TarGroup, extractor: str,
                       weights: str | None, weights_cache: str, batch_size: int, device: str,
                       torch_threads: int | None) -> tuple[dict, list[str]]:
    """A group of tars' features on a worker, batched as `batches` batches them (a split's batches never span two
    tars, so the gathered features are one process's)."""
    from itertools import chain

    from nextdetail.models import fidelity
    from nextdetail.models import torch_threads as threads

    batches = chain.from_iterable(spec.tar_batches(shard, keys, batch_size) for shard, keys in group)
    with threads(torch_threads or 1):  # the workers share the machine's cores
        model, info = cached_extractor(extractor, weights, weights_cache, device)
        feats = fidelity.extract(model, batches, (info.fid_layer, info.isc_layer), device)
    buf = io.BytesIO()
    np.savez(buf, fid=feats["fid"], isc=feats["isc"])
    artifact.store.write_bytes("features.npz", buf.getvalue())
    return {"tars": [shard for shard, _ in group], "images": sum(len(keys) for _, keys in group)}, ["features.npz"]


def _part_features(parts: tuple[str, ...], options: dict) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {"fid": [], "isc": []}
    for url in parts:
        with np.load(io.BytesIO(Store(url, options).read_bytes("features.npz")), allow_pickle=False) as z:
            for k in out:
                out[k].append(z[k])
    return out


def ensure_reference(artifact: Artifact, spec: ReferenceSpec, extractor: str, weights: str | None,
                     weights_cache: str, batch_size: int, device: str, progress: bool = False,
                     log: Any = print) -> dict[str, Any]:
    """Outside Prefect (`nextdetail eval --ckpt`): the cached statistics if complete and intact, else computed."""
    withdraw_if_damaged(artifact, log)
    return build_artifact(artifact, compute_reference, spec, extractor, weights, weights_cache, batch_size, device,
                          progress, log)


def withdraw_if_damaged(artifact: Artifact, log: Any = print) -> bool:
    """A complete cache whose file no longer has its recorded sha256 is withdrawn (marker removed) so it is
    rebuilt; True if that happened."""
    record = artifact.completed()
    if record is None or not artifact.verify(record):
        return False
    log(f"reference statistics at {artifact.store.url()} are damaged (sha256 differs); rebuilding")
    artifact.store.remove(artifact.marker)
    return True


def load_reference(store: Store, record: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features (N, D) float32, {"mu", "sigma", "knn"}) of a complete reference artifact (knn: the features' k-NN
    radii, `fidelity_merge.knn_radii`); checks the sha256."""
    rel = record["summary"]["file"]
    data = store.read_bytes(rel)
    if bytes_sha256(data) != record["sha256"][rel]:
        raise OSError(f"{store.url(rel)} changed after it was verified; re-run to rebuild it")
    arrays = np.load(io.BytesIO(data))
    return arrays["features"], {"mu": arrays["mu"], "sigma": arrays["sigma"], "knn": arrays["knn"]}
