"""`nextdetail cache push | pull | verify`: moving complete artifacts between a storage root and a remote one
(a team bucket), and re-checking what a root holds.

Copying one artifact follows the token cache's publish protocol, so any root can be a team's shared one:
- only complete artifacts are sent (the source's marker names the identity and every file has its size);
- every file is streamed through sha256 once and checked at the destination — by the store's own checksum where
  it returns one (S3's ETag of a single-part upload is the MD5 of its bytes, computed in the same pass), else by
  reading it back; a file whose recorded sha256 (the source marker's) differs, or whose copy checks otherwise,
  stops the artifact before its marker;
- files move concurrently (`jobs` at a time, threads: s3fs runs them on its event loop), so a bucket is filled at
  its own speed, not one round trip per file;
- the destination marker is written last and create-only (a hard link locally, a conditional PUT on S3): an
  artifact already published there is never rewritten, and of two pushes racing on one bucket one publishes;
- it records the sha256 of every file it copied, so `verify` there checks every byte;
- a killed push resumes: files already at the destination with the source's sha256 are not sent again;
- the lineage record follows the artifact (its URLs naming the source root renamed to the destination root),
  so `status` and `run` at the destination find the stage up to date. A record of an artifact outside the
  source root (a token cache in a team bucket, `tokens.cache`) travels alone: the artifact is shared already.

What is sent: the stages the given configs would find up to date at the source (`status`, every branch), or
`--stage` ones among them; `--all` sends every complete recorded artifact. Reads listings, records, markers and
the files themselves: no torch, no Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.artifacts import check_listed, listed_files, withdraw
from nextdetail.stages import REGISTRY, STAGES
from nextdetail.storage.fs import TMP_MARK, OutsideRoot, Store, under
from nextdetail.storage.hashing import canonical_json
from nextdetail.storage.lineage import LINEAGE, Lineage, recorded_artifact
from nextdetail.storage.roots import Roots, relativize, rename_under

MARKER = "_COMPLETE.json"
JOBS = 16
"""Files in flight at once (`cache push/pull/verify --jobs`): enough to hide an object store's round trips."""
_SKIP = ("_LEASE.json",)  # a writer's heartbeat: not part of what it published


def at_root(cfg: PipelineConfig, root: str, options: dict[str, Any] | None) -> PipelineConfig:
    """`cfg` with another storage root (identities do not depend on where artifacts live)."""
    storage = cfg.storage.model_copy(update={"root": root, "options": dict(options or {})})
    return cfg.model_copy(update={"storage": storage})


@dataclass
class Sent:
    """What happened to one artifact."""

    stage: str
    identity: str
    url: str  # at the destination
    state: str  # copied | already there | record only (its artifact lies outside the source root)
    files: int = 0
    bytes: int = 0  # sent now (files the destination already had are not counted)

    def line(self) -> str:
        from nextdetail.cache.inventory import human

        return f"  {self.stage:<16} {self.identity[:12]:<12}  {self.state:<14} {self.files:>5} files " \
               f"{human(self.bytes):>9}  {self.url}"


@dataclass
class Plan:
    records: list[dict[str, Any]] = field(default_factory=list)  # the source's lineage records to send
    absent: list[str] = field(default_factory=list)  # "stage (model): state" of selected stages not at the source


def plan_transfer(src: dict[str, PipelineConfig], stages: Iterable[str] | None = None,
                  everything: bool = False) -> Plan:
    """The records to send from the branches' root `src` (each branch's config already at that root)."""
    from nextdetail.cache.status import branch_status
    from nextdetail.pipeline.result import NOT_NEEDED, UP_TO_DATE

    wanted = tuple(stages or STAGES)
    cfg = next(iter(src.values()))
    lineage = Lineage.of(cfg)
    plan, seen = Plan(), set()
    if everything:
        for stage in wanted:
            for record in lineage.records(stage):
                if recorded_artifact(record, lineage.roots):
                    plan.records.append(record)
        return plan
    for model, statuses in branch_status(src).items():
        for stage in wanted:
            st = statuses.get(stage)
            if st is None or st.state == NOT_NEEDED:
                continue
            if st.state != UP_TO_DATE:
                plan.absent.append(f"{stage} ({model}): {st.state}")
            elif st.identity not in seen:
                seen.add(st.identity)
                plan.records.append(st.record)
    return plan


def transfer(plan: Plan, src: PipelineConfig, dst: PipelineConfig, progress: bool = True,
             log: Callable[[str], None] = print, jobs: int = JOBS) -> list[Sent]:
    """Send every planned artifact (and its record) from `src`'s root to `dst`'s; then the run log's files the
    destination lacks (each run's own file: create-only by nature), so `cache ls` there knows when each was used."""
    src_roots, dst_roots = Roots.of(src), Roots.of(dst)
    src_root, dst_root = src_roots.main, dst_roots.main

    def rename(value: Any) -> Any:
        return rename_under(value, src_root.url(), dst_root.url())

    sent = []
    for record in plan.records:
        stage = record["stage"]
        url = record["artifact"]["url"]
        if not under(url, src_root.url()):
            out = Sent(stage, record["identity"], url, "record only")
        else:
            out = copy_artifact(stage, src_roots.store(url), dst_roots.store(rename(url)),
                                record["artifact"]["identity"], rename, progress, log, jobs)
        _send_record(Lineage(dst_roots), rename(record))
        log(out.line())
        sent.append(out)
    src_runs, dst_runs = src_root.sub(LINEAGE, "runs"), dst_root.sub(LINEAGE, "runs")
    have = set(dst_runs.listdir(""))
    for name in src_runs.listdir(""):
        if name.endswith(".parquet") and name not in have:
            dst_runs.write_bytes(name, src_runs.read_bytes(name))
    return sent


def copy_artifact(stage: str, src: Store, dst: Store, identity: str, rename: Callable[[Any], Any],
                  progress: bool = True, log: Callable[[str], None] = print, jobs: int = JOBS) -> Sent:
    """One complete artifact from `src` to `dst` (the protocol in this module's docstring), `jobs` files at a time.
    Every path comes from a listing or a marker of `src` and is checked to lie inside it (`listed_files`); a
    symbolic link is reported and not copied (nextdetail writes none)."""
    from tqdm.auto import tqdm

    marker = _read_json(src, MARKER)
    if marker is None or marker.get("identity") != identity:
        raise OSError(f"{src.url()}: its marker is gone or names another identity; run `nextdetail cache verify`")
    there = _read_json(dst, MARKER)
    if there is not None and there.get("identity") == identity:
        return Sent(stage, identity, dst.url(), "already there")
    recorded = marker.get("sha256", {})
    listed_files(src, MARKER, marker)
    links: list[str] = []
    files = _files_of(stage, src, marker, links)
    for rel in links:
        log(f"  {stage:<16} {identity[:12]:<12}  skipped {rel}: a symbolic link, not copied (nextdetail writes none)")
    sums, sent_bytes = {}, 0
    with tqdm(total=len(files), unit="file", desc=f"{stage} {identity[:12]}", disable=not progress,
              leave=False) as bar, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending = {pool.submit(copy_file, src, dst, rel, recorded.get(rel)) for rel in files}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    rel, digest, sent = future.result()  # the first failure stops the artifact before its marker
                    sums[rel] = digest
                    sent_bytes += sent
                    bar.update(1)
        finally:
            for future in pending:
                future.cancel()
    published = {**rename(marker), "sha256": {**recorded, **sums}}
    with contextlib.suppress(FileExistsError):  # another push of this identity published first: the same artifact
        dst.write_bytes_exclusive(MARKER, canonical_json(published).encode())
    return Sent(stage, identity, dst.url(), "copied", len(files), sent_bytes)


def copy_file(src: Store, dst: Store, rel: str, expected: str | None) -> tuple[str, str, int]:
    """`rel` from `src` to `dst`: (rel, its sha256, bytes sent — 0 when an identical copy was there already, e.g.
    from a killed push). Streamed once through sha256 (and MD5, for an object store's ETag); OSError when the
    source no longer has its recorded sha256 or the destination does not hold what was sent."""
    size = src.size(rel)
    if size is None:
        raise OSError(f"{src.url(rel)} vanished while being copied; run `nextdetail cache verify`")
    if dst.size(rel) == size:  # a killed copy's file, or one published before: keep it if it is the same
        have = dst.sha256(rel, limit=size)
        if have == (expected or src.sha256(rel)):
            return rel, have, 0
    digest, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with src.open(rel) as f, dst.atomic_writer(rel) as out:
        while block := f.read(1 << 22):
            digest.update(block)
            md5.update(block)
            out.write(block)
    sha = digest.hexdigest()
    if expected is not None and sha != expected:
        dst.remove(rel)
        raise OSError(f"{src.url(rel)}: its content no longer has the sha256 its marker records; nothing was "
                      "published — run `nextdetail cache verify` at the source")
    if not _landed(dst, rel, size, sha, md5.hexdigest()):
        raise OSError(f"{dst.url(rel)}: the copy does not hold what was sent; nothing was published — run the "
                      "command again")
    return rel, sha, size


def _landed(dst: Store, rel: str, size: int, sha: str, md5: str) -> bool:
    """Whether `dst` holds the bytes just sent: by its own checksum where it keeps one (an S3 ETag without a part
    count is the MD5 of the object), else by reading the copy back through sha256."""
    if not dst.is_local:
        with contextlib.suppress(Exception):
            dst.fs.invalidate_cache(dst.path(rel))
            info = dst.fs.info(dst.path(rel))
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            if etag and "-" not in etag:
                return etag == md5 and info.get("size") == size
    return dst.sha256(rel, limit=size) == sha


def _files_of(stage: str, store: Store, marker: dict[str, Any], links: list[str]) -> list[str]:
    """What an artifact consists of: where the stage says its marker lists its files (the token cache: readers trust nothing else:
    other writers' attempts live beside it); for every other stage, every regular file under its directory but
    the marker, temporaries and leases (part markers and step checkpoints included); links go to `links`."""
    if REGISTRY[stage].marker_lists_files:
        return sorted(marker["files"])
    return [rel for rel in store.find(links=links)
            if rel != MARKER and TMP_MARK not in rel.rsplit("/", 1)[-1] and rel.rsplit("/", 1)[-1] not in _SKIP]


def _send_record(lineage: Lineage, record: dict[str, Any]) -> None:
    """Create the record at the destination (the same for any writer of an identity: an existing one stays)."""
    data = canonical_json(relativize(record, lineage.roots.main.url())).encode()
    try:
        lineage.store.write_bytes_exclusive(f"{record['stage']}/{record['identity']}.json", data)
    except FileExistsError:
        return
    lineage.store.write_bytes(f"{record['stage']}/latest.json", data)


def _read_json(store: Store, rel: str) -> dict[str, Any] | None:
    store.refresh(rel)
    try:
        return json.loads(store.read_bytes(rel))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# ---- verify -------------------------------------------------------------------------------------------------

@dataclass
class Damage:
    stage: str
    identity: str
    url: str
    bad: list[str]  # "file: why"
    checked: int  # files whose sha256 (or, where none is recorded, size) was checked
    unhashed: int  # of those, files with no recorded sha256 (only their size was checked)
    withdrawn: bool = False


def verify(cfg: PipelineConfig, stages: Iterable[str] | None = None, progress: bool = True,
           jobs: int = JOBS) -> list[Damage]:
    """Every complete recorded artifact under the root, each file every marker in it lists (the stage's marker
    and its parts' markers) re-read, `jobs` at a time: sha256 where one is recorded, else size. One `Damage` per
    artifact (its `bad` empty when intact)."""
    from tqdm.auto import tqdm

    lineage = Lineage.of(cfg)
    records = [r for stage in (stages or STAGES) for r in lineage.records(stage)
               if recorded_artifact(r, lineage.roots, check_sizes=False)]
    out = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for record in tqdm(records, desc="verify", unit="artifact", disable=not progress, leave=False):
            stage, store = record["stage"], lineage.artifact_store(record)
            listed = [(rel, path, size, marker.get("sha256", {}).get(path))  # paths relative to the artifact
                      for rel, marker in _markers(stage, store) for path, size in (marker.get("files") or {}).items()]
            found = list(pool.map(_check_file, [store] * len(listed), *zip(*listed, strict=True))) if listed else []
            bad = [why for why in found if why]
            unhashed = sum(why.endswith(NOT_VOUCHED) for why in bad)
            out.append(Damage(stage, record["identity"], store.url(), bad, len(listed), unhashed))
    return out


NOT_VOUCHED = "no sha256 recorded (only its size could be checked); rebuild or re-push it with this version"


def _check_file(store: Store, marker: str, path: str, size: int, sha: str | None) -> str:
    """Why `path` (listed by `marker`) is damaged, or "" when it holds what the marker records."""
    try:  # a path out of the artifact, a link or a device: damage, never read
        check_listed(store, marker, path)
    except OutsideRoot as err:
        return f"{path}: {str(err).split(': ', 2)[-1]}"
    have = store.size(path)
    if have is None:
        return f"{path}: missing"
    if have != size:
        return f"{path}: {have} bytes, recorded {size}"
    if sha is None:
        return f"{path}: {NOT_VOUCHED}"
    if store.sha256(path, limit=size) != sha:  # read at most to the recorded size + 1: a device or growing file ends
        return f"{path}: sha256 differs from the recorded one"
    return ""


def _markers(stage: str, store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(path, content) of the artifact's own marker and its parts' markers (`_parts/*.json` of shard and
    decompose; the token cache's own marker lists every file of its published attempt with sha256)."""
    own = _read_json(store, MARKER)
    found = [(MARKER, own)] if own else []
    if not REGISTRY[stage].marker_lists_files:
        for name in store.listdir("_parts"):
            part = _read_json(store, f"_parts/{name}") if name.endswith(".json") else None
            if part and "files" in part:
                found.append((f"_parts/{name}", part))
    return found


def withdraw_damaged(cfg: PipelineConfig, damaged: list[Damage]) -> None:
    """Withdraw each damaged artifact: its marker moves aside with the reason, so nothing uses it and the next
    run rebuilds it (the token cache adopts the parts that still verify)."""
    roots = Roots.of(cfg)
    for d in damaged:
        if d.bad:
            withdraw(roots.store(d.url), MARKER, "cache verify: " + "; ".join(d.bad[:20]))
            d.withdrawn = True
