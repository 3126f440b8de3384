"""Step checkpoints of a training run under its artifact directory: `checkpoints/step-XXXXXXXX.pt`.

Each is one atomic write (temp + rename locally, one PUT on S3), so a reader never sees half of one and a
killed run resumes from the newest. Both training stages (tokenizer, transformer) use these.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from nextdetail.storage.fs import Store

CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}.pt"


def _steps(store: Store) -> list[str]:
    return sorted(n for n in store.listdir(CHECKPOINTS) if n.startswith("step-") and n.endswith(".pt"))


def latest_checkpoint(store: Store) -> str | None:
    names = _steps(store)
    return f"{CHECKPOINTS}/{names[-1]}" if names else None


def save_checkpoint(store: Store, step: int, state: dict[str, Any], keep: int = 2) -> None:
    """Write step `step`'s state; keep the newest `keep` step checkpoints."""
    write_torch(store, checkpoint_name(step), state)
    for old in _steps(store)[:-keep]:
        store.remove(f"{CHECKPOINTS}/{old}")


def write_torch(store: Store, rel: str, obj: Any) -> bytes:
    """torch.save `obj` to `rel` atomically; returns the bytes written (for their sha256)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    store.write_bytes(rel, buf.getvalue())
    return buf.getvalue()


def load_checkpoint(store: Store, rel: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(store.read_bytes(rel)), map_location="cpu", weights_only=False)
