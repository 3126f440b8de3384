"""Step checkpoints of a training run under its artifact directory: `checkpoints/step-XXXXXXXX.pt`.

Each is one atomic write (temp + rename locally, one PUT on S3), so a reader never sees half of one and a
killed run resumes from the newest. Both training stages (tokenizer, transformer) use these.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import IO, Any

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


# What torch.save writes into its zip archive, every record under one top folder. A TorchScript archive adds
# code/ and constants.pkl (torch.load hands it to torch.jit.load: a traceback under weights_only, code without);
# any other record is not something torch.save wrote, so not something nextdetail wrote.
_SAVED_RECORDS = re.compile(r"data\.pkl|data/\d+|byteorder|version|\.format_version|\.storage_alignment"
                            r"|\.data/(serialization_id|version)")
NOT_OURS = "not written by nextdetail"
REWRITE = "delete it and re-run the stage that writes it"


def _foreign_records(f: IO[bytes]) -> str | None:
    """Why the zip archive `f` is not a torch.save file (TorchScript, extra records); None when it is one, or is
    no zip at all (then torch's own reader, weights-only too, decides)."""
    try:
        with zipfile.ZipFile(f) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        f.seek(0)
        return "not a readable torch file: a truncated or damaged zip archive" if f.read(4) == b"PK\x03\x04" else None
    finally:
        f.seek(0)
    records = [n.partition("/")[2] for n in names]
    if any(r.startswith("code/") or r == "constants.pkl" for r in records):
        return "a TorchScript archive: it holds code"
    if len({n.partition("/")[0] for n in names}) != 1:
        return "a zip archive whose records are not under one folder, as torch.save writes them"
    extra = [n for n, r in zip(names, records, strict=True) if not _SAVED_RECORDS.fullmatch(r)]
    if extra:
        return f"a zip archive with records torch.save does not write: {', '.join(extra[:3])}"
    if "data.pkl" not in records:
        return "a zip archive without data.pkl"
    return None


def read_torch(source: bytes | str | Path, where: str, map_location: str = "cpu", keys: tuple[str, ...] = (),
               not_ours: str = NOT_OURS, fix: str = REWRITE) -> Any:
    """A torch file read as tensors and plain values only (`weights_only=True`): a file on a shared bucket can
    hand out weights, never code. Anything else — TorchScript, a zip with other records, a truncated file, with
    `keys` anything but a dict holding them — is refused in one line: `<where>: <not_ours> (<why>); <fix>`."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
        why = _foreign_records(f)
        if why is not None:
            raise UserError(f"{where}: {not_ours} ({why}); {fix}")
        try:
            saved = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "not plain data")
            raise UserError(f"{where}: refused: it holds more than tensors and plain values ({reason[:160]}), and "
                            "unpickling it could run code; it is an older nextdetail format or not ours — delete it "
                            "and re-run the stage that writes it") from None
        except Exception as err:  # truncated or damaged: torch's reader says why, in many lines and types
            first = (str(err).splitlines() or [""])[0].split(". ")[0][:120]
            raise UserError(f"{where}: {not_ours} (not a readable torch file: {type(err).__name__}: {first}); "
                            f"{fix} (or copy it again: truncated?)") from None
    if keys and not (isinstance(saved, dict) and all(k in saved for k in keys)):
        what = (f"no {', '.join(repr(k) for k in keys if k not in saved)}" if isinstance(saved, dict)
                else f"a {type(saved).__name__}")
        raise UserError(f"{where}: {not_ours} ({what}: not the layout nextdetail writes); {fix}")
    return saved


def load_checkpoint(store: Store, rel: str) -> dict[str, Any]:
    """A step checkpoint (`save_checkpoint`): what training resumes from and evaluation swaps in."""
    return read_torch(store.read_bytes(rel), store.url(rel), keys=("step", "metrics", "model"))


def read_weights_file(source: bytes | str | Path, where: str) -> dict[str, Any]:
    """A weights file nextdetail did not write (released weights, LPIPS's), read as `read_torch` reads: its
    refusals say what the file should be instead of blaming a stage."""
    saved = read_torch(source, where, not_ours="not a weights file torch.save wrote",
                       fix="copy the released weights file (a state dict) there")
    if not isinstance(saved, dict):
        raise UserError(f"{where}: holds a {type(saved).__name__}, not a state dict")
    return saved


def read_released(setting: str, url: str, options: dict | None) -> dict[str, Any]:
    """A released weights file named by a setting (`tokenizer.pretrained`, `ar.pretrained`; path or URL), read as
    tensors and plain values only: a dict, or one line naming the setting, the file and what is wrong."""
    where = f"{setting}={url}"
    store, name = Store.of_file(url, options)
    if not store.exists(name):
        raise UserError(f"{where}: no such file; copy the weights there (nothing is downloaded) or fix the path")
    return read_weights_file(store.read_bytes(name), where)
