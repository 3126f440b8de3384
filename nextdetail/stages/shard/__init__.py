"""The `shard` stage: a class-folder dataset (or the embedded one) → webdataset tars, a Parquet manifest
and classes.json. Its flow: `flow.py`; its tasks: `tasks.py`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import Stage
from nextdetail.pipeline.result import UP_TO_DATE, StageResult
from nextdetail.storage.hashing import stable_hash


def _shard_settings(cfg: PipelineConfig) -> dict[str, Any]:
    d = cfg.data
    data = {"source": d.source, "layout": d.layout, "splits": d.splits}
    if d.source == "embedded":
        data["embedded"] = d.embedded.model_dump()
    return {"data": data, "shard": cfg.shard.model_dump()}


def _source_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The source dataset: the embedded build's identity (a function of its settings and code), else the
    listing — every file's (path, size, mtime/ETag), or its sha256 with shard.fingerprint=content."""
    if cfg.data.source == "embedded":
        from nextdetail.storage.embedded import embedded_identity

        return {"source": {"embedded": embedded_identity(cfg.data.embedded)}}
    from nextdetail.storage.fs import Store
    from nextdetail.storage.sources import list_source

    listing = list_source(cfg.data.source, cfg.data.splits, cfg.data.layout, cfg.storage.options)
    files = [(it.relpath, it.wnid, it.size, it.stamp) for items in listing.items.values() for it in items]
    if cfg.shard.fingerprint == "content":
        store = Store(listing.url, cfg.storage.options, follow_links=True)
        files = [(rel, wnid, store.sha256(rel)) for rel, wnid, _, _ in files]
    return {"source": {"url": listing.url, "classes": listing.classes, "files": stable_hash(files),
                       "count": len(files)}}


@dataclass
class ShardResult(StageResult):  # url: the shard directory; identity: the dataset's (what downstream keys on)
    shards_ran: list[str] = field(default_factory=list)  # tars written by this run
    shards_reused: list[str] = field(default_factory=list)  # found complete (their marker says so)
    manifest_work: str = "ran"  # ran | reused | up to date (this run skipped the stage)
    tar_identities: dict[str, str] = field(default_factory=dict)  # tar with samples → "identity:tar sha256"

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/manifest.parquet"

    @staticmethod
    def describe(summary: dict) -> str:
        """One line: written / converted / skipped by reason."""
        st = summary["status"]
        parts = [f"{st.get('written', 0)} written", f"{st.get('converted', 0)} converted"]
        conv = {k.split(":", 1)[1]: v for k, v in summary["reasons"].items() if k.startswith("converted:")}
        if conv:
            parts[-1] += " (" + ", ".join(f"{k} {v}" for k, v in conv.items()) + ")"
        skipped = {k.split(":", 1)[1]: v for k, v in summary["reasons"].items() if k.startswith("skipped:")}
        parts.append(f"{st.get('skipped', 0)} skipped" + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""))
        line = f"shard: {summary['images']} images → " + ", ".join(parts)
        if summary.get("empty_classes"):
            empty = summary["empty_classes"]
            line += f"; {len(empty)} class folder(s) without images (still classes): {', '.join(empty[:5])}"
        if summary.get("retry"):
            line += f"; {summary['retry']} unreadable file(s) retried by the next run"
        return line

    def outputs(self) -> list[tuple[str, str]]:
        return [("shards", f"{self.url}/" + "  ".join(self.summary["patterns"].values())),
                ("manifest", self.manifest_url),
                ("classes", f"{self.url}/classes.json   ({self.summary['classes']} classes)")]

    def work_line(self) -> str:
        return (f"identity: {self.identity[:16]}   this run wrote {len(self.shards_ran)} tars, reused "
                f"{len(self.shards_reused)} ({self.seconds:.1f}s)")

    def up_to_date(self, cfg: Any) -> ShardResult:
        return replace(self, work=UP_TO_DATE, shards_ran=[], shards_reused=[], manifest_work=UP_TO_DATE, seconds=0.0)


STAGE = Stage("shard", "shards", (), _shard_settings, ShardResult, inputs=_source_inputs, dask=True,
              content_sha256="content_sha256",
              command_help="class folders / ImageNet / embedded → webdataset tars + Parquet manifest",
              command_description=("Run the shard stage alone: tars, manifest.parquet and classes.json under <storage.root>/shards/. "
                                   "Source: -o data.source=PATH|URL|embedded."))
