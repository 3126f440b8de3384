"""The `shard` stage: a source dataset → webdataset tars + a Parquet manifest + a class map.

Data flow (all of it in this file):
  list_source() ─▶ plan_shards(): each item to shard sha256(key) mod S, one `ShardJob` per tar
              ─▶ write_shard (one cached Prefect task per tar, in parallel):
                   read → decode by content → RGB → resize/center-crop → encode → tar member;
                   bad files become manifest rows with status "skipped" and their reason
              ─▶ write_manifest (one cached task): concatenate the per-shard parts → manifest.parquet,
                   classes.json, drop tars that no longer belong to the plan

Artifact layout under ``<root>/shards/<source>-<res>-<settings id>/``::

    train-000000.tar …           samples: <key>.{jpg|png}, <key>.cls, <key>.json
    _parts/train-000000.parquet  manifest rows of that tar;   _parts/train-000000.json  its marker
    manifest.parquet  classes.json  _COMPLETE.json            the dataset and its marker

Identities: a tar's is hash(shard settings, its items' keys/paths/classes/fingerprints, code); the
dataset's is hash(all tar identities, class map). The directory is keyed by settings (and the source
location when fingerprints are stat-based), so appends rewrite tars in place and re-runs find them.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nextdetail.conf.environment import DataConfig
from nextdetail.conf.schema import ShardConfig
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import bytes_sha256, canonical_json, stable_hash
from nextdetail.storage.images import SkipImage, decode_image, encode_image, preprocess
from nextdetail.storage.manifest import read_table, rows_to_table, write_table
from nextdetail.storage.shards import ShardTarWriter, shard_count_for, shard_index_of, shard_name
from nextdetail.storage.sources import NOT_A_FILE, SYMLINK_LOOP, UNREADABLE, SourceListing, display_path

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


@dataclass(frozen=True)
class ShardItem:
    key: str
    relpath: str
    wnid: str | None
    class_index: int  # -1: not in the class map
    size: int  # -1: could not stat
    fingerprint: str  # stamp (stat mode) or sha256 of the bytes (content mode)


class ShardItems:
    """A shard's items, opaque on purpose: Prefect walks task arguments (several times per submit)
    looking for futures inside tuples and dataclasses; ~1k items per tar made that walk cost more
    CPU than the flow itself. This container is neither, so the walk stops here."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[ShardItem]) -> None:
        self._items = tuple(items)

    def __iter__(self) -> Iterator[ShardItem]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> ShardItem:
        return self._items[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardItems) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __getstate__(self) -> tuple[ShardItem, ...]:
        return self._items

    def __setstate__(self, state: tuple[ShardItem, ...]) -> None:
        self._items = state


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    items: ShardItems
    digest: str = ""  # stable hash of the items: what the tar's identity hashes

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def part(self) -> str:
        return f"_parts/{self.name.removesuffix('.tar')}"


def shard_dir_name(listing_url: str, data: DataConfig, cfg: ShardConfig) -> str:
    where = listing_url if cfg.fingerprint == "stat" else ""  # content fingerprints are portable
    tag = f"{listing_url.rstrip('/').rsplit('/', 1)[-1]}-{cfg.resolution or 'orig'}px"
    return f"{tag}-{stable_hash({'source': where, 'splits': data.splits, 'shard': cfg.model_dump()})[:12]}"


def plan_shards(
    listing: SourceListing, cfg: ShardConfig, store: Store, key: StageKey, fingerprints: dict[str, str] | None = None
) -> list[tuple[Artifact, ShardJob]]:
    """One (artifact, job) per tar, in split then index order; a tar's identity is the stage's recipe + its name
    and files (`key.part`), so adding files rewrites only the tars they land in."""
    class_index = {c: i for i, c in enumerate(listing.classes)}
    artifacts = []
    for split, items in listing.items.items():
        n_shards = (cfg.shard_count or {}).get(split) or shard_count_for(len(items), cfg.samples_per_shard)
        buckets: list[list[ShardItem]] = [[] for _ in range(n_shards)]
        for it in items:
            fp = fingerprints[it.relpath] if fingerprints else it.stamp
            item = ShardItem(it.key, it.relpath, it.wnid, class_index.get(it.wnid, -1) if it.wnid else -1, it.size, fp)
            buckets[shard_index_of(item.key, n_shards)].append(item)
        for index, bucket in enumerate(buckets):
            if not bucket:  # no tar for an empty bucket (a loader handed only it would find no samples)
                continue
            ordered = ShardItems(sorted(bucket, key=lambda x: (x.key, x.relpath)))
            job = ShardJob(split, index, ordered, stable_hash([list(vars(x).values()) for x in ordered]))
            identity = key.part({"name": job.name, "items": job.digest})
            lineage = {"stage_identity": key.identity, "recipe": key.recipe, "items": len(job.items)}
            artifacts.append((Artifact("shard", identity, store, f"{job.part}.json", lineage=lineage), job))
    return artifacts


def _encode_sample(item: ShardItem, data: bytes, cfg: ShardConfig, row: dict[str, Any]) -> dict[str, bytes]:
    decoded = decode_image(data, item.relpath, cfg.exif, cfg.max_pixels)
    row.update(width=decoded.width, height=decoded.height)
    image = preprocess(decoded, cfg.resolution, cfg.preprocess, cfg.small_images)
    payload = encode_image(image, cfg.image_format, cfg.jpeg_quality)
    row.update(status="converted" if decoded.conversions else "written", reason=",".join(decoded.conversions))
    meta = {"source_path": display_path(item.relpath), "wnid": item.wnid, "original_size": [decoded.width, decoded.height],
            "source_format": decoded.format}
    return {"__key__": item.key, cfg.image_format: payload, "cls": str(item.class_index),
            "json": canonical_json(meta)}


@stage_task(name="write_shard")
def write_shard(
    artifact: Artifact, job: ShardJob, source_url: str, source_options: dict, cfg: ShardConfig
) -> tuple[dict, list[str]]:
    """Write one tar and its manifest part. Never raises on a bad input file: it becomes a row."""
    source = Store(source_url, source_options, follow_links=True)  # the user's dataset, links and all
    rows: list[dict[str, Any]] = []
    written = 0
    try:
        with artifact.store.atomic_writer(job.name) as f:
            writer = ShardTarWriter(f)
            retry = _write_samples(job, source, cfg, writer, rows)
            writer.close()
            written = sum(r["index_in_shard"] >= 0 for r in rows)
            if not written:
                raise _NoSamples  # the temporary goes: no tar without samples
    except _NoSamples:
        artifact.store.remove(job.name)  # an earlier run's tar of this name, when it had samples
    write_table(artifact.store, f"{job.part}.parquet", rows_to_table(rows))
    counts = collections.Counter(r["status"] for r in rows)
    reasons = collections.Counter(f"{r['status']}:{reason}" for r in rows if r["reason"]
                                  for reason in r["reason"].split(","))
    summary = {"shard": job.name, "samples": written, "status": dict(counts), "reasons": dict(reasons),
               "tar_sha256": writer.sha256 if written else None,
               # Listed files that could not be read are not a result (a chmod that fixes one changes no listing
               # fingerprint): the marker says so and the next run retries them.
               "retry": retry}
    return summary, [job.name, f"{job.part}.parquet"] if written else [f"{job.part}.parquet"]


class _NoSamples(Exception):
    pass


def _write_samples(job: ShardJob, source: Store, cfg: ShardConfig, writer: ShardTarWriter,
                   rows: list[dict[str, Any]]) -> int:
    """Each item of `job` → a tar member, or a manifest row saying why not. Returns how many listed files could
    not be read (a listing that failed — a broken link, an unreadable folder — changes once it is fixed)."""
    previous_key = None
    written = retry = 0
    for item in job.items:
        row = {"key": item.key, "split": job.split, "shard": job.name, "index_in_shard": -1,
               "class_index": item.class_index, "wnid": item.wnid, "source_path": display_path(item.relpath),
               "size": item.size, "width": -1, "height": -1, "content_hash": "", "status": "skipped", "reason": ""}
        try:
            if item.key == previous_key:
                raise SkipImage("duplicate_key", f"another file maps to key {item.key}")
            if item.size == NOT_A_FILE:
                raise SkipImage("not_a_file", "a FIFO, socket or device file: never opened")
            if item.size == SYMLINK_LOOP:
                raise SkipImage("symlink_loop", "a link back into a folder already walked: never entered twice")
            if item.size > cfg.max_file_bytes:  # sniffed from the listing: never read whole
                raise SkipImage("too_large", f"{item.size} bytes > shard.max_file_bytes={cfg.max_file_bytes}")
            if item.wnid is None:
                if item.size == UNREADABLE:
                    raise SkipImage("unreadable", "could not be listed or stat'ed")
                raise SkipImage("no_class", "file lies outside the class folders")
            if item.wnid.startswith("."):
                raise SkipImage("hidden_folder", f"{item.wnid!r} is hidden (.git, .ipynb_checkpoints): not a class")
            if item.class_index < 0:
                raise SkipImage("unknown_class", f"class {item.wnid!r} is not in the training split")
            try:
                data = source.read_bytes(item.relpath)
            except (OSError, ValueError) as err:  # unreadable, vanished, a directory named like a file
                retry += item.size != UNREADABLE
                raise SkipImage("unreadable", type(err).__name__) from None
            row.update(size=len(data), content_hash=bytes_sha256(data))
            writer.write(_encode_sample(item, data, cfg, row))
            row["index_in_shard"] = written
            written += 1
        except SkipImage as skip:
            row.update(status="skipped", reason=skip.reason)
        rows.append(row)
        previous_key = item.key
    return retry


@stage_task(name="write_manifest")
def write_manifest(
    artifact: Artifact, jobs: list[ShardJob], shard_summaries: list[dict], classes: list[str]
) -> tuple[dict, list[str]]:
    """Concatenate the parts into manifest.parquet, write classes.json, remove tars outside the plan."""
    import pyarrow as pa

    store = artifact.store
    table = pa.concat_tables([read_table(store, f"{job.part}.parquet") for job in jobs])
    write_table(store, "manifest.parquet", table)
    store.write_bytes("classes.json", json.dumps({"classes": classes}, indent=1).encode())
    # Tars (and their parts) of an earlier plan, e.g. before a split outgrew its shard count; a part whose
    # files were all skipped keeps its manifest part but has no tar.
    with_samples = {job.name for job, s in zip(jobs, shard_summaries, strict=True) if s["samples"]}
    planned = {"": {n.removesuffix(".tar") for n in with_samples}, "_parts": {j.name.removesuffix(".tar") for j in jobs}}
    splits = {job.split for job in jobs}
    for rel, suffixes in (("", (".tar",)), ("_parts", (".parquet", ".json"))):
        for name in store.listdir(rel):
            stem = name.split(".", 1)[0]
            if name.endswith(suffixes) and stem.rsplit("-", 1)[0] in splits and stem not in planned[rel]:
                store.remove(f"{rel}/{name}".lstrip("/"))
        store.clean_temporaries(rel)
    reasons: collections.Counter[str] = collections.Counter()
    for shard_summary in shard_summaries:
        reasons.update(shard_summary["reasons"])
    tars = collections.defaultdict(list)
    for job in jobs:
        if job.name in with_samples:
            tars[job.split].append(job.index)
    first = jobs[0].split if jobs else None
    counts = collections.Counter(r["class_index"] for r in table.select(["split", "index_in_shard", "class_index"])
                                 .to_pylist() if r["split"] == first and r["index_in_shard"] >= 0)
    summary = {
        "images": table.num_rows,
        "status": dict(collections.Counter(table.column("status").to_pylist())),
        "reasons": dict(sorted(reasons.items())),
        "classes": len(classes),
        "empty_classes": [c for i, c in enumerate(classes) if not counts[i]],  # folders with no image: still classes
        "shards": {split: len(ix) for split, ix in tars.items()},
        "patterns": {split: brace_pattern(split, ix) for split, ix in tars.items()},
        # What downstream stages key on besides the identity: the tars' bytes (a forced re-shard that reads a
        # file it could not read before changes them under the same identity).
        "content_sha256": stable_hash({"tars": {s["shard"]: s["tar_sha256"] for s in shard_summaries},
                                       "classes": classes}),
        "retry": sum(s.get("retry", 0) for s in shard_summaries),
        "url": store.url(),
    }
    return summary, ["manifest.parquet", "classes.json"]


def brace_pattern(split: str, indices: list[int]) -> str:
    """The tars of a split as one webdataset/braceexpand pattern: ``train-{000000..000007}.tar``; runs
    joined by commas when buckets without samples left gaps (``train-{{000000..000002},000005}.tar``)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [f"{a:06d}" if a == b else f"{{{a:06d}..{b:06d}}}" for a, b in runs]
    if len(parts) == 1:
        return f"{split}-{parts[0]}.tar"
    return f"{split}-{{{','.join(parts)}}}.tar"


def dataset_artifact(store: Store, key: StageKey, shards: list[Artifact]) -> Artifact:
    """The shard dataset (manifest, classes): the stage's identity."""
    return Artifact("shard", key.identity, store, "_COMPLETE.json", lineage={**key.lineage(), "tars": len(shards)})

