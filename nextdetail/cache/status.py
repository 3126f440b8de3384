"""`nextdetail status`: each stage up to date, stale (and why) or missing — from identities and markers only.

For each stage in order: its identity is computed from the config, its upstream artifacts' identities and
its code (pipeline/declaration.py); the lineage record of that identity names the artifact, whose completion marker
must still carry it with every listed file at its size. No Prefect, no torch, no data read but listings and
small JSON files (run additionally checks the token cache's sha256, `tokens.verify`).

- up to date: a record for this identity exists and its artifact's marker names it (`run` skips the stage);
- stale: the stage was built before, but not with this identity — the reasons compare the current settings,
  upstream identities, inputs and code with the closest earlier record of the stage (fewest differences);
- missing: never built under this storage root, or its recorded artifact is gone;
- not needed: nothing this config runs reads it (`Stage.needed`: decompose at tokenizer order 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.code import CODE_RULE
from nextdetail.pipeline.declaration import StageKey, output_identity, stage_key
from nextdetail.pipeline.result import NOT_NEEDED, UP_TO_DATE
from nextdetail.stages import REGISTRY, STAGES
from nextdetail.storage.hashing import canonical_json
from nextdetail.storage.lineage import Lineage, recorded_artifact

STALE, MISSING = "stale", "missing"  # beside UP_TO_DATE (a run skips the stage)


@dataclass
class StageStatus:
    stage: str
    state: str  # up to date | stale | missing | not needed
    reasons: list[str] = field(default_factory=list)
    identity: str | None = None  # the stage identity under the current config (None: upstream not up to date)
    record: dict[str, Any] | None = None  # the lineage record of that identity, if any
    model: str | None = None  # the branch (ar.model) this status is of
    shared_with: str | None = None  # an earlier branch whose stage has this identity: one artifact for both
    key: StageKey | None = field(default=None, repr=False)  # what the identity hashes (None: upstream not up to date)

    @property
    def artifact(self) -> dict[str, Any] | None:
        return self.record["artifact"] if self.record else None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.model, "state": self.state, "reasons": self.reasons,
                "identity": self.identity, "artifact": self.artifact, "shared_with": self.shared_with}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as `section.key` → value."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) or len(v) < 40 else v[:12] + "…"
    return s if len(s) <= 60 else s[:57] + "..."


def explain(current: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """What differs between the current key parts and the last record: settings, upstream, inputs, code."""
    reasons = []
    now, then = flatten(current.get("settings", {})), flatten(last.get("settings", {}))
    for k in sorted(set(now) | set(then)):
        if now.get(k, "<unset>") != then.get(k, "<unset>"):
            reasons.append(f"setting {k}: {_short(then.get(k, '<unset>'))} → {_short(now.get(k, '<unset>'))}")
    for u, ident in current.get("upstream", {}).items():
        before = last.get("upstream", {}).get(u)
        if before != ident:
            was, now = str(before).split(":", 1), str(ident).split(":", 1)
            if len(now) == 2 and was[-1] == now[1]:  # the same bytes, recorded before early cutoff
                reasons.append(f"upstream {u}: the same output, recorded by an older version (`nextdetail cache "
                               "accept` adopts this stage's artifact)")
            elif len(now) == 2:  # keyed on the upstream's bytes (early cutoff): they came out different
                reasons.append(f"upstream {u}'s output changed: {was[-1][:12]} → {now[1][:12]}")
            else:
                reasons.append(f"upstream {u} changed: {str(before)[:12]} → {str(ident)[:12]}")
    now_in, then_in = flatten(current.get("inputs", {})), flatten(last.get("inputs", {}))
    for k in sorted(set(now_in) | set(then_in)):
        if now_in.get(k) != then_in.get(k):
            reasons.append(f"input {k}: {_short(then_in.get(k))} → {_short(now_in.get(k))}")
    code_now, code_then = current.get("code", {}), last.get("code", {})
    changed = sorted(m for m in set(code_now) | set(code_then) if code_now.get(m) != code_then.get(m))
    if changed and last.get("code_rule") != CODE_RULE:  # hashed another way: file-by-file differences mean nothing
        reasons.append("code: recorded by an older nextdetail, whose code identity hashed every imported file's "
                       "bytes (if nothing that computes changed: `nextdetail cache accept " + str(last.get("stage"))
                       + "`)")
    elif changed:
        reasons.append("code changed: " + ", ".join(changed))
    return reasons


def stage_status(cfg: PipelineConfig, stage: str, upstream: dict[str, StageStatus], lineage: Lineage) -> StageStatus:
    spec = REGISTRY[stage]
    if not spec.is_needed(cfg):
        return StageStatus(stage, NOT_NEEDED, ["nothing this config runs reads it (tokenizer order 0: no factors)"])
    used = spec.upstream_of(cfg)
    not_ready = [u for u in used if upstream[u].state != UP_TO_DATE]
    last = lineage.latest(stage)
    if not_ready:  # early cutoff: this stage runs only if the upstream's rebuilt output differs
        reasons = [f"waits on upstream {u}'s output ({upstream[u].state}): runs only if it comes out different"
                   for u in not_ready]
        if last is not None:  # what else will change, as far as the config and code tell
            current = {"settings": json.loads(canonical_json(spec.settings(cfg))), "code": spec.code(cfg)}
            reasons += [r for r in explain(current, last) if not r.startswith("upstream")]
        return StageStatus(stage, STALE if last else MISSING, reasons)
    key: StageKey = stage_key(cfg, stage, {u: output_identity(u, upstream[u].artifact["identity"],
                                                              upstream[u].record["result"]["summary"])
                                           for u in used})
    identity = key.identity
    record = lineage.read(stage, identity)
    if record is not None:
        if recorded_artifact(record, lineage.roots):
            return StageStatus(stage, UP_TO_DATE, [], identity, record, key=key)
        retry = record["result"].get("summary", {}).get("retry")
        if retry and recorded_artifact(record, lineage.roots, check_sizes=False):
            return StageStatus(stage, STALE, [f"{retry} input file(s) could not be read when it was built: run "
                                              "retries them (and rebuilds what follows only if they now read)"],
                               identity, record, key=key)
        return StageStatus(stage, MISSING, [f"its artifact is gone or incomplete: {record['artifact']['url']}"],
                           identity, record, key=key)
    if last is None:
        return StageStatus(stage, MISSING, ["never built under this storage root"], identity, key=key)
    current = {"settings": key.settings, "upstream": key.upstream, "inputs": key.inputs, "code": key.code}
    # Against the closest earlier build (the fewest differences; the newest on ties): what made it stale.
    candidates = [last, *lineage.records(stage)]
    reasons = min((explain(current, r) for r in candidates), key=len)
    return StageStatus(stage, STALE, reasons or ["identity changed"], identity, key=key)


def pipeline_status(cfg: PipelineConfig, stages: tuple[str, ...] = STAGES) -> dict[str, StageStatus]:
    """The status of `stages` (and of the stages they depend on) under `cfg`."""
    return branch_status({cfg.ar.model: cfg}, stages)[cfg.ar.model]


def branch_status(branches: dict[str, PipelineConfig],
                  stages: tuple[str, ...] = STAGES) -> dict[str, dict[str, StageStatus]]:
    """The status of every branch (one config per model, `conf.load_branches`); a stage whose identity an
    earlier branch has is marked `shared_with` it (one artifact, built once)."""
    out: dict[str, dict[str, StageStatus]] = {}
    seen: dict[str, str] = {}
    for model, cfg in branches.items():
        lineage = Lineage.of(cfg)
        statuses: dict[str, StageStatus] = {}
        for stage in STAGES:
            st = statuses[stage] = stage_status(cfg, stage, statuses, lineage)
            st.model = model
            if st.identity is not None:
                st.shared_with = seen.get(st.identity)
                seen.setdefault(st.identity, model)
            if stage == stages[-1]:
                break
        out[model] = statuses
    return out


def format_status(branches: dict[str, PipelineConfig], statuses: dict[str, dict[str, StageStatus]],
                  verbose: bool = False) -> str:
    cfg = next(iter(branches.values()))
    lines = [f"nextdetail status (preset {cfg.preset}) — storage root {cfg.storage.root}"]
    width = max(len(s) for by_stage in statuses.values() for s in by_stage)
    for model, by_stage in statuses.items():
        if len(statuses) > 1:
            lines.append(f"  model {model}:")
        for st in by_stage.values():
            ident = (st.identity or "")[:12] or "-" * 12
            where = st.artifact["url"] if st.state == UP_TO_DATE and st.artifact else ""
            if st.state == UP_TO_DATE and (st.record or {}).get("accepted"):  # an alias a person vouched for
                a = st.record["accepted"]
                where += f"  (accepted from {a['from'][:8]} by {a.get('by') or '?'})"
            if st.shared_with:
                where = f"(the same artifact as model {st.shared_with}'s)"
            lines.append(f"  {st.stage:<{width}}  {st.state:<10}  {ident}  {where}".rstrip())
            for reason in st.reasons if (verbose or st.state not in (UP_TO_DATE, NOT_NEEDED)) and not st.shared_with \
                    else ():
                lines.append(f"  {'':<{width}}    {reason}")
    return "\n".join(lines)


def explain_stage(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What `stage`'s identity hashes under `cfg` (`nextdetail status --explain`), the way dvc.yaml lists a
    stage's deps: the settings slice, each upstream identity (a training stage's with its weights' sha256), the
    outside inputs, and every code file with its sha256."""
    statuses = pipeline_status(cfg, STAGES[: STAGES.index(stage) + 1])
    st, spec = statuses[stage], REGISTRY[stage]
    key = st.key
    upstream = {}
    for u in spec.upstream_of(cfg):
        if key is not None:
            identity, _, weights = key.upstream[u].partition(":")
            upstream[u] = {"identity": identity, **({"weights_sha256": weights} if weights else {})}
        else:
            upstream[u] = {"identity": None, "state": statuses[u].state}
    return {"stage": stage, "state": st.state, "identity": st.identity, "model": cfg.ar.model,
            "settings": key.settings if key else json.loads(canonical_json(spec.settings(cfg))),
            "upstream": upstream, "inputs": key.inputs if key else None,
            "entries": list(spec.entries(cfg)), "code": key.code if key else spec.code(cfg)}


def format_explain(info: dict[str, Any]) -> str:
    ident = info["identity"] or "(not computable until its upstream stages are up to date)"
    lines = [f"{info['stage']} ({info['state']}, model {info['model']}): identity {ident}", "settings:"]
    lines += [f"  {k} = {v!r}" for k, v in flatten(info["settings"]).items()] or ["  (none)"]
    lines.append("upstream:")
    for u, up in info["upstream"].items():
        weights = f"  weights sha256 {up['weights_sha256']}" if up.get("weights_sha256") else ""
        lines.append(f"  {u}: {up['identity'] or up.get('state')}{weights}")
    if not info["upstream"]:
        lines.append("  (none)")
    lines.append("inputs:")
    if info["inputs"] is None:
        lines.append("  (computed once the upstream stages are up to date)")
    else:
        lines += [f"  {k} = {v!r}" for k, v in flatten(info["inputs"]).items()] or ["  (none)"]
    lines.append(f"code ({len(info['code'])} files, the imports of {', '.join(info['entries'])}):")
    lines += [f"  {sha}  {path}" for path, sha in info["code"].items()]
    return "\n".join(lines)


# ---- `nextdetail lineage ARTIFACT` ------------------------------------------------------------------

def find_records(cfg: PipelineConfig, query: str) -> list[dict[str, Any]]:
    """Lineage records matching `query`: a stage name (the current config's artifact, else the stage's
    latest, then its others), an identity prefix (stage or artifact identity) or an artifact URL/path."""
    from pathlib import Path

    from nextdetail.errors import UserError

    lineage = Lineage.of(cfg)
    if query in STAGES:
        current = pipeline_status(cfg, STAGES[: STAGES.index(query) + 1])[query].record
        first = current or lineage.latest(query)
        others = [r for r in lineage.all_records() if r["stage"] == query and r["identity"] != (first or {}).get("identity")]
        found = ([first] if first else []) + others
    else:
        path = query if "://" in query else str(Path(query).resolve())
        found = [r for r in lineage.all_records()
                 if r["identity"].startswith(query) or r["artifact"]["identity"].startswith(query)
                 or r["artifact"]["url"].rstrip("/") in (query.rstrip("/"), path.rstrip("/"))]
    if not found:
        raise UserError(f"no lineage record matches {query!r} under {lineage.store.url()}; give a stage name "
                        f"({', '.join(STAGES)}), an identity prefix or an artifact's URL")
    return found


def format_record(cfg: PipelineConfig, record: dict[str, Any]) -> str:
    """The record as readable YAML (the stage's result summary included), then the runs that touched it."""
    import datetime

    import yaml

    when = lambda t: datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")  # noqa: E731
    shown = {k: v for k, v in record.items() if k != "result"}
    shown["started"], shown["finished"] = when(record["started"]), when(record["finished"])
    shown["summary"] = record.get("result", {}).get("summary")
    text = f"# {record['stage']} {record['identity'][:12]}\n" + yaml.safe_dump(shown, sort_keys=False, width=110)
    runs = Lineage.of(cfg).runs()
    rows = [r for r in runs.to_pylist() if r["identity"] == record["identity"]]
    text += "runs:\n" + "".join(f"  - {when(r['started'])}  run {r['run_id']}  {r['work']}  {r['seconds']:.1f}s  "
                                f"{r['user']}@{r['host']}\n" for r in rows)
    return text
