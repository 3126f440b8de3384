"""What a storage root holds (`nextdetail cache ls`, `cache du`): every artifact its lineage records name — by
stage, with identity, size, when it was built and last used (the run log), which of the given configs
reference it, and whether it is still complete — plus the directories under a stage's output that no record
names (abandoned attempts, a killed run's partial output: what `cache gc` will remove) and the shared caches
beside them (the token cache's root, `tokens.cache`; the reference statistics, `eval.reference_cache`). Reads
listings, records and markers only: no torch, no Prefect.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import output_identity
from nextdetail.stages import REGISTRY, STAGES
from nextdetail.storage.fs import OutsideRoot, Store, under
from nextdetail.storage.lineage import Lineage, recorded_artifact
from nextdetail.storage.roots import Roots

COMPLETE, INCOMPLETE, UNRECORDED, SHARED = "complete", "incomplete", "unrecorded", "shared"


@dataclass
class Entry:
    stage: str
    identity: str  # the stage identity (the lineage record's name); "" for an unrecorded directory
    url: str
    bytes: int
    state: str  # complete | incomplete (its marker or a file is gone) | unrecorded (no lineage record names it) |
    # shared (a complete artifact with its own marker that stages share — the tokenizer's metrics —, no record)
    created: float | None = None  # when its record was written
    last_used: float | None = None  # the newest run-log row naming it
    referenced_by: tuple[str, ...] = ()  # the given configs' branches (model names) whose stage has this identity
    artifact_identity: str = ""  # what downstream records name it by (with its weights' sha256 for a model)
    upstream: tuple[str, ...] = ()  # the output identities its record was built from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tree_bytes(store: Store) -> int:
    """Bytes of the regular files under `store` (links not followed); 0 when it is gone or leads outside its root."""
    try:
        if store.is_local:
            return sum(os.path.getsize(store.path(rel)) for rel in store.find())
        return int(store.fs.du(store.path(""), total=True))
    except (FileNotFoundError, OutsideRoot):
        return 0


def inventory(branches: dict[str, PipelineConfig]) -> list[Entry]:
    """Every artifact under the first branch's storage root (and its token cache root), stage by stage."""
    from nextdetail.cache.status import branch_status

    cfg = next(iter(branches.values()))
    lineage = Lineage.of(cfg)
    referenced: dict[str, list[str]] = {}
    for model, statuses in branch_status(branches).items():
        for st in statuses.values():
            if st.identity is not None:
                referenced.setdefault(st.identity, []).append(model)
    last_used: dict[str, float] = {}
    for row in lineage.runs().select(["identity", "started"]).to_pylist():
        last_used[row["identity"]] = max(last_used.get(row["identity"], 0.0), row["started"] or 0.0)
    entries: list[Entry] = []
    for stage in STAGES:
        recorded_urls = set()
        for record in lineage.records(stage):
            url = record["artifact"]["url"]
            recorded_urls.add(url.rstrip("/"))
            state = COMPLETE if recorded_artifact(record, lineage.roots) else INCOMPLETE
            entries.append(Entry(stage, record["identity"], url, tree_bytes(lineage.artifact_store(record)), state,
                                 record.get("finished"), last_used.get(record["identity"]),
                                 tuple(referenced.get(record["identity"], ())),
                                 output_identity(stage, record["artifact"]["identity"],
                                                 record.get("result", {}).get("summary", {})),
                                 tuple(record.get("upstream", {}).values())))
        entries += _unrecorded(lineage.roots, cfg, stage, recorded_urls)
    return entries + _reference_statistics(lineage.roots, cfg)


def _reference_statistics(roots: Roots, cfg: PipelineConfig) -> list[Entry]:
    """The reference-statistics cache (`<eval.reference_cache or storage.root>/refstats/<identity>/`): shared by
    content, never named by a lineage record — listed under evaluate, kept by gc."""
    root = roots.store(cfg.eval.reference_cache or cfg.storage.root).sub("refstats")
    out = []
    for name in root.listdir(""):
        if root.is_link(name):  # never followed (nextdetail writes no links)
            continue
        child = root.sub(name)
        marker = _marker(child)
        out.append(Entry("evaluate", name, child.url(), tree_bytes(child), SHARED if marker else UNRECORDED,
                         _built(marker)))
    return out


def _unrecorded(roots: Roots, cfg: PipelineConfig, stage: str, recorded: set[str]) -> list[Entry]:
    """The directories under a stage's output directory that no record names: walking down, a recorded artifact
    stops the walk, a directory holding one is entered, anything else is reported whole (and not entered). A
    symbolic link is neither entered nor reported: gc never reaches through one."""
    declared = REGISTRY[stage]
    out, todo = [], [roots.store(declared.root(cfg)[0]).sub(declared.directory)]
    while todo:
        store = todo.pop()
        for name in store.listdir(""):
            if store.is_link(name) or not store.fs.isdir(store.path(name)):
                continue
            child = store.sub(name)
            url = child.url().rstrip("/")
            if url in recorded:
                continue
            if any(r.startswith(url + "/") for r in recorded):
                todo.append(child)
                continue
            marker = _marker(child)
            out.append(Entry(stage, marker.get("identity", "") if marker else "", child.url(),
                             tree_bytes(child), SHARED if marker else UNRECORDED,
                             _built(marker)))
    return sorted(out, key=lambda e: e.url)


def _built(marker: dict[str, Any] | None) -> float | None:
    """When a marker's artifact was built (markers record their start and duration)."""
    lineage = (marker or {}).get("lineage", {})
    return lineage["started"] + lineage.get("seconds", 0.0) if "started" in lineage else None


def _marker(store: Store) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(store.read_bytes("_COMPLETE.json"))
    except (FileNotFoundError, ValueError, OutsideRoot):
        return None


def format_ls(entries: list[Entry]) -> str:
    lines = [f"  {'stage':<16} {'identity':<12}  {'size':>9}  {'built':<16}  {'last used':<16}  {'state':<10}  "
             f"{'referenced by':<13}  url"]
    for e in entries:
        lines.append(f"  {e.stage:<16} {e.identity[:12] or '-':<12}  {human(e.bytes):>9}  {_when(e.created):<16}  "
                     f"{_when(e.last_used):<16}  {e.state:<10}  {','.join(e.referenced_by) or '-':<13}  {e.url}")
    return "\n".join(lines)


def format_du(entries: list[Entry]) -> str:
    by_stage: dict[str, list[int]] = {}
    for e in entries:
        by_stage.setdefault(e.stage, [0, 0, 0])
        by_stage[e.stage][0] += e.bytes
        by_stage[e.stage][1] += 1
        by_stage[e.stage][2] += e.bytes if not e.referenced_by else 0
    lines = [f"  {'stage':<16} {'artifacts':>9}  {'size':>9}  {'unreferenced':>12}"]
    for stage, (size, n, loose) in by_stage.items():
        lines.append(f"  {stage:<16} {n:>9}  {human(size):>9}  {human(loose):>12}")
    total = sum(v[0] for v in by_stage.values())
    lines.append(f"  {'total':<16} {sum(v[1] for v in by_stage.values()):>9}  {human(total):>9}  "
                 f"{human(sum(v[2] for v in by_stage.values())):>12}")
    return "\n".join(lines)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


# ---- gc -----------------------------------------------------------------------------------------------------

IN_PROGRESS_S = 3600.0
"""Anything written to within this long may be a run in progress (a training's checkpoints, a token-cache attempt —
its lease is rewritten every part —, a rebuild inside a published cache): gc never removes it. The token cache's
own rule for abandoned attempts is the same hour."""


@dataclass
class Removal:
    entry: Entry
    reason: str


def plan_gc(cfg: PipelineConfig, entries: list[Entry], keep_last: int = 0, keep_newer_s: float | None = None,
            now: float | None = None) -> tuple[list[Removal], list[Entry]]:
    """(what to remove and why, what is kept) — keeping what the given configs reference, the newest `keep_last`
    complete artifacts per stage, those built within `keep_newer_s`, everything those were built from, every shared
    artifact, anything outside `storage.root` (a token cache in a team bucket other roots may point at), and anything
    written to within `IN_PROGRESS_S`."""
    now = time.time() if now is None else now
    roots = Roots.of(cfg)
    keep: set[int] = set()
    for i, e in enumerate(entries):
        if e.referenced_by or e.state == SHARED or not under(e.url, roots.main.url()):
            keep.add(i)
    for stage in STAGES:
        complete = sorted((i for i, e in enumerate(entries) if e.stage == stage and e.state == COMPLETE),
                          key=lambda i: -(entries[i].created or 0))
        keep.update(complete[:keep_last])
        if keep_newer_s is not None:
            keep.update(i for i in complete if (entries[i].created or 0) >= now - keep_newer_s)
    by_output = {e.artifact_identity: i for i, e in enumerate(entries) if e.artifact_identity}
    todo = list(keep)
    while todo:  # what a kept artifact was built from stays: its lineage must still resolve
        for up in entries[todo.pop()].upstream:
            j = by_output.get(up)
            if j is not None and j not in keep:
                keep.add(j)
                todo.append(j)
    removals, kept = [], []
    for i, e in enumerate(entries):
        if i in keep or now - _newest_write(roots.store(e.url)) < IN_PROGRESS_S:
            kept.append(e)  # used, or written to within the hour: a run may be writing it (a new attempt) right now
        elif e.state == COMPLETE:
            removals.append(Removal(e, "referenced by no given config"))
        elif e.state == INCOMPLETE:
            removals.append(Removal(e, "incomplete: its marker or files are gone"))
        else:
            removals.append(Removal(e, "no record names it; untouched for over an hour"))
    return removals, kept


def apply_gc(cfg: PipelineConfig, removals: list[Removal], log: Any = print) -> int:
    """Delete what `plan_gc` chose: the marker first (no reader takes a half-deleted artifact for complete), then
    the files, then the lineage record. Returns the bytes freed."""
    lineage = Lineage.of(cfg)
    root = lineage.roots.main
    freed = 0
    for r in removals:
        e = r.entry
        if not under(e.url, root.url()):  # plan_gc keeps these; a root's own files are all gc may delete
            continue
        store = lineage.roots.store(e.url)
        store.remove("_COMPLETE.json")
        store.remove_tree("")
        if e.identity and e.state != SHARED:
            lineage.store.remove(f"{e.stage}/{e.identity}.json")
        freed += e.bytes
        log(f"  removed {e.stage} {e.identity[:12] or '-'} {human(e.bytes)} {e.url}")
    return freed


def format_gc(removals: list[Removal], kept: list[Entry], dry_run: bool) -> str:
    lines = [f"  {'stage':<16} {'identity':<12}  {'size':>9}  why"]
    for r in removals:
        lines.append(f"  {r.entry.stage:<16} {r.entry.identity[:12] or '-':<12}  {human(r.entry.bytes):>9}  "
                     f"{r.reason}   {r.entry.url}")
    total = sum(r.entry.bytes for r in removals)
    verb = "would free" if dry_run else "freed"
    lines.append(f"  {len(removals)} to remove, {verb} {human(total)}; {len(kept)} kept"
                 + ("   (dry run: nothing deleted; --yes deletes)" if dry_run else ""))
    return "\n".join(lines)


def _newest_write(store: Store) -> float:
    """The newest modification time of any file under `store` (0 when it is empty or gone; links not followed)."""
    try:
        if store.is_local:
            return max((os.lstat(store.path(rel)).st_mtime for rel in store.find()), default=0.0)
        found = store.fs.find(store.path(""), detail=True)
    except (FileNotFoundError, OutsideRoot):
        return 0.0
    times = []
    for info in found.values():
        t = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        times.append(t.timestamp() if hasattr(t, "timestamp") else float(t or 0))
    return max(times, default=0.0)
