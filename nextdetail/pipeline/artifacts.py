"""`Artifact`: a stage output named by its identity, complete when its completion marker says so.

An artifact is complete when its JSON completion marker (written last, atomically) carries its identity and
every file the marker lists still has its recorded size. Nothing here imports Prefect or torch: `nextdetail
status` reads markers through this class too.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import nextdetail
from nextdetail.storage.fs import OutsideRoot, Store, relative_path
from nextdetail.storage.hashing import canonical_json

MARKER_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """A stage output under `store`: its files plus the completion marker `marker` (relative paths)."""

    stage: str
    identity: str
    store: Store
    marker: str = "_COMPLETE.json"
    lineage: dict[str, Any] = field(default_factory=dict, compare=False)  # settings, upstream, code
    checksums: bool = True  # the marker also records each file's sha256 (`verify()`, `nextdetail cache verify`)
    exclusive: bool = False  # publish only if no marker exists yet (concurrent writers: one wins)

    def read_marker(self) -> dict[str, Any] | None:
        """The marker if it exists and names this identity; None otherwise (missing, other, torn)."""
        try:
            record = json.loads(self.store.read_bytes(self.marker))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if record.get("identity") == self.identity else None

    def completed(self) -> dict[str, Any] | None:
        """The marker if the artifact is complete: identity matches, every listed file has its size, and nothing
        was left out for a reason a re-run can fix (summary `retry`: files that could not be read)."""
        record = self.read_marker()
        if record is None or record.get("summary", {}).get("retry"):  # built around inputs that could not be read
            return None
        for rel, size in listed_files(self.store, self.marker, record).items():
            if self.store.size(rel) != size:
                return None
        return record

    def verify(self, record: dict[str, Any]) -> list[str]:
        """Files of a complete artifact whose content no longer has its recorded sha256 (reads them all, each at
        most to its recorded size + 1 byte)."""
        sizes = listed_files(self.store, self.marker, record)
        return [rel for rel, digest in record.get("sha256", {}).items()
                if self.store.sha256(rel, limit=sizes.get(rel)) != digest]

    def publish(self, summary: dict[str, Any], files: list[str] | dict[str, str], started: float) -> dict[str, Any]:
        """Write the completion marker last: from here on readers may use the artifact. `files` may map
        each file to its sha256 when the writer knows it (else it is read back). With `exclusive`,
        FileExistsError means another writer published first."""
        record = {
            "identity": self.identity,
            "stage": self.stage,
            "marker_version": MARKER_VERSION,
            "files": {rel: self.store.size(rel) for rel in files},
            "summary": summary,
            "lineage": {
                **self.lineage,
                "nextdetail": nextdetail.__version__,
                "python": platform.python_version(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": started,
                "seconds": round(time.time() - started, 3),
            },
        }
        missing = [rel for rel, size in record["files"].items() if size is None]
        if missing:
            raise RuntimeError(f"{self.stage}: refusing to publish, files missing: {missing}")
        if self.checksums:
            known = files if isinstance(files, dict) else {}
            record["sha256"] = {rel: known.get(rel) or self.store.sha256(rel) for rel in files}
        data = canonical_json(record).encode()
        # What killed writers of these files left behind (untouched since this build began) goes with the resume.
        self.store.clean_temporaries_of([*files, self.marker], before=started)
        if self.exclusive:
            self.store.write_bytes_exclusive(self.marker, data)
        else:
            self.store.write_bytes(self.marker, data)
        return record


def listed_files(store: Store, marker: str, record: dict[str, Any]) -> dict[str, int]:
    """The files a marker lists (path → size), each checked to lie inside the artifact as written: a path that is
    absolute, not normalized, climbs out with `..`, or leads out through a link (or to a device) is damage —
    OutsideRoot naming the marker and the path; nothing is read."""
    files = record.get("files", {})
    if not isinstance(files, dict):
        raise OutsideRoot(f"{store.url(marker)}: its file list is not a mapping; not written by nextdetail")
    for rel in (*files, *record.get("sha256", {})):
        check_listed(store, marker, rel)
    return files


def check_listed(store: Store, marker: str, rel: Any) -> None:
    """OutsideRoot (naming the marker) unless `rel`, a path marker `marker` lists, is a plain relative path that
    stays inside `store` and names no link out of it, no device, no FIFO."""
    try:
        if not isinstance(rel, str) or relative_path(rel) != rel:
            raise OutsideRoot(f"{rel!r}: not a plain path inside the artifact (absolute, '..' or not normalized)")
        store.checked(rel, file=True)
    except OutsideRoot as err:
        raise OutsideRoot(f"{store.url(marker)} lists {rel!r}: {str(err).split(': ', 1)[-1]}") from None


def withdraw(store: Store, marker: str, reason: str) -> None:
    """Withdraw a published artifact found broken: its marker moves to `_INVALID-<time>.json` (with why), so no
    reader uses it and the next writer rebuilds it (adopting what still verifies)."""
    try:
        record = json.loads(store.read_bytes(marker))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        record = {}
    store.write_bytes(f"_INVALID-{int(time.time() * 1000)}.json",
                      canonical_json({"reason": reason, "marker": record}).encode())
    store.remove(marker)
