"""`nextdetail compare`: every evaluated model under a storage root, side by side.

One row per evaluate lineage record whose artifact is complete: its numbers (FID, KID, IS, precision, recall, the
tokenizer's rFID), GFLOPs per image, the transformer's training steps and time, tokens per image, identities — and
the settings of every record it was built from (evaluate ← sample ← train_ar ← tokenize ← … ← shard), flattened
to `section.key`, so two rows show what differs between them (`--only-changed`, as `dvc exp show`). Also drawn:
FID against GFLOPs per image, one point per row. Reads lineage records only: no torch, no Prefect.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from nextdetail.cache.status import flatten
from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.declaration import output_identity
from nextdetail.storage.lineage import Lineage, recorded_artifact

NUMBERS = ("fid", "kid_mean", "isc_mean", "precision", "recall", "rfid")
COLUMNS = ("evaluate", "model", "preset", "checkpoint", *NUMBERS, "gflops_per_image", "tokens_per_image",
           "train_steps", "train_s", "finished")


def comparison(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per complete evaluation under `cfg.storage.root`, oldest first: `COLUMNS`, then the settings."""
    lineage = Lineage.of(cfg)
    rows = []
    for record in reversed(lineage.records("evaluate")):
        if not recorded_artifact(record, lineage.roots):
            continue
        closure = _closure(lineage, record)
        summary = record["result"]["summary"]
        ar = closure.get("train_ar", {})
        ar_summary = ar.get("result", {}).get("summary", {})
        row: dict[str, Any] = {
            "evaluate": record["identity"][:12], "model": record.get("model"), "preset": record.get("preset"),
            "checkpoint": summary.get("checkpoint"), **{k: summary.get(k) for k in NUMBERS},
            "gflops_per_image": summary.get("gflops_per_image"), "tokens_per_image": ar_summary.get("tokens_per_image"),
            "train_steps": ar_summary.get("steps"), "train_s": ar.get("seconds"), "finished": record.get("finished"),
        }
        settings: dict[str, Any] = {}
        for stage_record in closure.values():
            settings.update(flatten(stage_record.get("settings", {})))
        rows.append({**row, **{k: settings[k] for k in sorted(settings)}})
    return rows


def _closure(lineage: Lineage, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The records an artifact was built from, by stage (itself included), following the upstream outputs: a
    content hash (`stage:sha256`, early cutoff) names the newest record whose output it is; an older record's
    `identity[:sha256]` names that identity's record."""
    out, todo = {}, [record]
    while todo:
        r = todo.pop()
        if r["stage"] in out:
            continue
        out[r["stage"]] = r
        for stage, ident in r.get("upstream", {}).items():
            up = lineage.read(stage, str(ident).split(":", 1)[0]) or next(
                (c for c in lineage.records(stage) if output_identity(
                    stage, c["artifact"]["identity"], c.get("result", {}).get("summary", {})) == ident), None)
            if up is not None:
                todo.append(up)
    return out


def columns(rows: list[dict[str, Any]], only_changed: bool) -> list[str]:
    """`COLUMNS`, then every setting — or, with `only_changed`, the settings whose value differs between rows."""
    settings = sorted({k for r in rows for k in r} - set(COLUMNS))
    if only_changed:
        settings = [k for k in settings if len({json.dumps(r.get(k), sort_keys=True) for r in rows}) > 1]
    return [*COLUMNS, *settings]


def render(rows: list[dict[str, Any]], cols: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in cols} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c), c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _cell(v: Any, column: str) -> str:
    if v is None:
        return "-"
    if column == "finished":
        import time

        return time.strftime("%Y-%m-%d %H:%M", time.localtime(v))
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def scatter_png(rows: list[dict[str, Any]]) -> bytes:
    """FID against GFLOPs per image (`figures.fid_vs_gflops`) as PNG bytes."""
    from nextdetail.figures import fid_vs_gflops, png_bytes

    return png_bytes(fid_vs_gflops(rows))


def write_scatter(cfg: PipelineConfig, rows: list[dict[str, Any]], where: str | None = None) -> str:
    """Draw FID against GFLOPs per image (`scatter_png`) to `where` (a path or URL; default
    `<storage.root>/reports/compare.png`); returns where it went."""
    from nextdetail.storage.fs import Store

    picture = where or Store(cfg.storage.root, cfg.storage.options).url("reports", "compare.png")
    folder, name = Store.of_file(picture, cfg.storage.options if not where else None)
    folder.write_bytes(name, scatter_png(rows))
    return picture
