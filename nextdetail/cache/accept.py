"""`nextdetail cache accept STAGE`: a person vouches that a code change does not change a stage's result (DVC's
`dvc commit`, Dagster's `code_version` bumped by hand the other way round).

The stage's current identity is recorded as an alias of the artifact its closest earlier record names, without
recomputing: a new lineage record (the current identity, the current code, the same artifact and result) that
says who accepted it, when, and which code files differ. Only a code difference can be accepted: when the settings
slice, the upstream outputs or the outside inputs differ from every earlier record, it is refused in one line —
that is a different computation. Works wherever lineage lives (a local root or a bucket). Reads records and
markers only: no torch, no Prefect.
"""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

from nextdetail.cache.status import branch_status
from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.pipeline.code import CODE_RULE
from nextdetail.pipeline.result import UP_TO_DATE
from nextdetail.storage.hashing import canonical_json
from nextdetail.storage.lineage import Lineage, recorded_artifact


def _same(a: Any, b: Any) -> bool:
    return canonical_json(a) == canonical_json(b)


def _same_outputs(recorded: dict[str, str] | None, current: dict[str, str]) -> bool:
    """Whether a record's upstream outputs are the current ones: the same content where both carry a content hash
    (`stage:sha` now, `identity:sha` in records written before early cutoff), else the same identity."""
    recorded = recorded or {}
    if set(recorded) != set(current):
        return False
    return all(a == b or (":" in a and ":" in b and a.rsplit(":", 1)[1] == b.rsplit(":", 1)[1])
               for a, b in ((str(recorded[u]), str(current[u])) for u in current))


def accept(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """Record `stage`'s current identity under `cfg` as an alias of the artifact of its closest earlier record
    that differs only in code; returns the new record. UserError (one line) when there is nothing to accept or
    more than code changed."""
    st = branch_status({cfg.ar.model: cfg})[cfg.ar.model][stage]
    if st.state == UP_TO_DATE:
        raise UserError(f"cache accept {stage}: already up to date ({st.identity[:12]}); nothing to accept")
    if st.key is None:
        raise UserError(f"cache accept {stage}: an upstream stage is not up to date ({'; '.join(st.reasons[:2])}); "
                        "accept or run it first")
    lineage = Lineage.of(cfg)
    key = st.key
    candidates = [r for r in lineage.records(stage) if recorded_artifact(r, lineage.roots)]
    same = [r for r in candidates if _same(r.get("settings"), key.settings)
            and _same_outputs(r.get("upstream"), key.upstream) and _same(r.get("inputs"), key.inputs)]
    if not same:
        why = "no complete earlier artifact of this stage" if not candidates else \
            "its settings, upstream outputs or inputs differ from every earlier build"
        raise UserError(f"cache accept {stage}: refused — {why}; only a code change can be accepted (see "
                        f"`nextdetail status`), so run the stage: `nextdetail run --until {stage}`")
    base = same[0]  # newest first
    changed = sorted(f for f in set(key.code) | set(base.get("code", {})) if key.code.get(f) != base["code"].get(f))
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    record = {**base, "identity": key.identity, "code": key.code, "settings": key.settings, "upstream": key.upstream,
              "inputs": key.inputs, "code_rule": CODE_RULE, "finished": time.time(),
              "accepted": {"from": base["identity"], "by": user, "host": socket.gethostname(), "at": time.time(),
                           "code_changed": changed}}
    lineage.write(record)
    return record
