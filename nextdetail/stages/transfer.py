"""`nextdetail cache push | pull | verify`: moving complete artifacts between a storage root and a remote one
(a team bucket), and re-checking what a root holds.

Copying one artifact follows the token cache's publish protocol, so any root can be a team's shared one:
- only complete artifacts are sent (the source's marker names the identity and every file has its size);
- every file is streamed through sha256 and read back at the destination; a file whose recorded sha256 (the
  source marker's) differs, or whose copy reads back otherwise, stops the artifact before its marker;
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
from dataclasses import dataclass, field
from typing import Any

from nextdetail.conf.schema import STAGES, PipelineConfig
from nextdetail.storage.artifacts import check_listed, listed_files, withdraw
from nextdetail.storage.fs import TMP_MARK, OutsideRoot, Store, under
from nextdetail.storage.hashing import canonical_json
from nextdetail.storage.lineage import LINEAGE, Lineage, recorded_artifact
from nextdetail.storage.roots import Roots, relativize, rename_under

MARKER = "_COMPLETE.json"
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
        from nextdetail.stages.inventory import human

        return f"  {self.stage:<16} {self.identity[:12]:<12}  {self.state:<14} {self.files:>5} files " \
               f"{human(self.bytes):>9}  {self.url}"


@dataclass
class Plan:
    records: list[dict[str, Any]] = field(default_factory=list)  # the source's lineage records to send
    absent: list[str] = field(default_factory=list)  # "stage (model): state" of selected stages not at the source


def plan_transfer(src: dict[str, PipelineConfig], stages: Iterable[str] | None = None,
                  everything: bool = False) -> Plan:
    """The records to send from the branches' root `src` (each branch's config already at that root)."""
    from nextdetail.stages.results import NOT_NEEDED, UP_TO_DATE
    from nextdetail.stages.status import branch_status

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
             log: Callable[[str], None] = print) -> list[Sent]:
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
                                record["artifact"]["identity"], rename, progress, log)
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
                  progress: bool = True, log: Callable[[str], None] = print) -> Sent:
    """One complete artifact from `src` to `dst` (the protocol in this module's docstring). Every path comes from
    a listing or a marker of `src` and is checked to lie inside it (`listed_files`); a symbolic link is reported
    and not copied (nextdetail writes none)."""
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
    total = sum(src.size(rel) or 0 for rel in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{stage} {identity[:12]}", disable=not progress,
              leave=False) as bar:
        for rel in files:
            size = src.size(rel)
            if size is None:
                raise OSError(f"{src.url(rel)} vanished while being copied; run `nextdetail cache verify`")
            expected = recorded.get(rel)
            if dst.size(rel) == size:  # a killed copy's file, or one published before: keep it if it is the same
                have = dst.sha256(rel, limit=size)
                if have == (expected or src.sha256(rel)):
                    sums[rel] = have
                    bar.update(size)
                    continue
            digest = hashlib.sha256()
            with src.open(rel) as f, dst.atomic_writer(rel) as out:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
            sums[rel] = digest.hexdigest()
            if expected is not None and sums[rel] != expected:
                dst.remove(rel)
                raise OSError(f"{src.url(rel)}: its content no longer has the sha256 its marker records; nothing "
                              "was published — run `nextdetail cache verify` at the source")
            if dst.sha256(rel, limit=size) != sums[rel]:
                raise OSError(f"{dst.url(rel)}: the copy reads back with another sha256; nothing was published — "
                              "run the command again")
            sent_bytes += size
    published = {**rename(marker), "sha256": {**recorded, **sums}}
    with contextlib.suppress(FileExistsError):  # another push of this identity published first: the same artifact
        dst.write_bytes_exclusive(MARKER, canonical_json(published).encode())
    return Sent(stage, identity, dst.url(), "copied", len(files), sent_bytes)


def _files_of(stage: str, store: Store, marker: dict[str, Any], links: list[str]) -> list[str]:
    """What an artifact consists of: for the token cache, what its marker lists (readers trust nothing else:
    other writers' attempts live beside it); for every other stage, every regular file under its directory but
    the marker, temporaries and leases (part markers and step checkpoints included); links go to `links`."""
    if stage == "tokenize":
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


def verify(cfg: PipelineConfig, stages: Iterable[str] | None = None, progress: bool = True) -> list[Damage]:
    """Every complete recorded artifact under the root, each file every marker in it lists (the stage's marker
    and its parts' markers) re-read: sha256 where one is recorded, else size. One `Damage` per artifact (its
    `bad` empty when intact)."""
    from tqdm.auto import tqdm

    lineage = Lineage.of(cfg)
    records = [r for stage in (stages or STAGES) for r in lineage.records(stage)
               if recorded_artifact(r, lineage.roots, check_sizes=False)]
    out = []
    for record in tqdm(records, desc="verify", unit="artifact", disable=not progress, leave=False):
        stage, store = record["stage"], lineage.artifact_store(record)
        bad, checked, unhashed = [], 0, 0
        for rel, marker in _markers(stage, store):  # every marker lists paths relative to the artifact directory
            sums = marker.get("sha256", {})
            for path, size in (marker.get("files") or {}).items():
                checked += 1
                try:  # a path out of the artifact, a link or a device: damage, never read
                    check_listed(store, rel, path)
                except OutsideRoot as err:
                    bad.append(f"{path}: {str(err).split(': ', 2)[-1]}")
                    continue
                have = store.size(path)
                if have is None:
                    bad.append(f"{path}: missing")
                elif have != size:
                    bad.append(f"{path}: {have} bytes, recorded {size}")
                elif path in sums:  # read at most to the recorded size + 1: a device or a growing file ends
                    if store.sha256(path, limit=size) != sums[path]:
                        bad.append(f"{path}: sha256 differs from the recorded one")
                else:
                    bad.append(f"{path}: no sha256 recorded (only its size could be checked); rebuild or re-push "
                               "it with this version")
                    unhashed += 1
        out.append(Damage(stage, record["identity"], store.url(), bad, checked, unhashed))
    return out


def _markers(stage: str, store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(path, content) of the artifact's own marker and its parts' markers (`_parts/*.json` of shard and
    decompose; the token cache's own marker lists every file of its published attempt with sha256)."""
    own = _read_json(store, MARKER)
    found = [(MARKER, own)] if own else []
    if stage != "tokenize":
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
