"""Step checkpoints of a training run under its artifact directory: `checkpoints/step-XXXXXXXX.pt`.

Each is one atomic write (temp + rename locally, one PUT on S3), so a reader never sees half of one and a
killed run resumes from the newest. Both training stages (tokenizer, transformer) use these.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from nextdetail.errors import UserError
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


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's content — each tensor's name, dtype, shape and bytes, in name order —
    independent of how or where the file holding it was written."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_torch(source: bytes | str | Path, where: str, map_location: str = "cpu") -> Any:
    """A torch file read as tensors and plain values only (`weights_only=True`): a file on a shared bucket can
    hand out weights, never code. Anything else is refused in one line naming the file and the fix."""
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "not plain data")
        raise UserError(f"{where}: refused: it holds more than tensors and plain values ({reason[:160]}), and "
                        "unpickling it could run code; it is an older nextdetail format or not ours — delete it and "
                        "re-run the stage that writes it") from None


def load_checkpoint(store: Store, rel: str) -> dict[str, Any]:
    return read_torch(store.read_bytes(rel), store.url(rel))


def read_released(setting: str, url: str, options: dict | None) -> dict[str, Any]:
    """A released weights file named by a setting (`tokenizer.pretrained`, `ar.pretrained`; path or URL), read as
    tensors and plain values only: a dict, or one line naming the setting, the file and what is wrong."""
    where = f"{setting}={url}"
    store, name = Store.of_file(url, options)
    if not store.exists(name):
        raise UserError(f"{where}: no such file; copy the weights there (nothing is downloaded) or fix the path")
    try:
        saved = read_torch(store.read_bytes(name), where)
    except UserError:
        raise
    except Exception as err:  # a truncated or foreign file: torch's reader says why
        raise UserError(f"{where}: not a readable torch file ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
                        "; copy it again (truncated?)") from None
    if not isinstance(saved, dict):
        raise UserError(f"{where}: holds a {type(saved).__name__}, not a state dict")
    return saved
