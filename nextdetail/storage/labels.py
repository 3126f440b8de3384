"""How an evaluated checkpoint is named in reports, metrics and summaries: one spelling for the evaluate task (its
report.md) and for `nextdetail` printing its result. Torch-free: status and the CLI import it."""

from __future__ import annotations

from typing import Any


def checkpoint_name(r: dict[str, Any]) -> str:
    """`step 12`, or `last (step 12)`: a metrics row's or the evaluate summary's checkpoint."""
    label = r["label"] if "label" in r else r["checkpoint"]
    return label if label.startswith("step ") else f"{label} (step {r['step']})"
