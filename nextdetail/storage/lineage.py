"""Lineage: a record per built stage identity, and the run log, both under ``<storage.root>/lineage/``.

    lineage/<stage>/<stage identity>.json   what was built: the artifact (identity, location), the settings
                                            slice, upstream identities, inputs, each code module's sha256,
                                            package versions, git commit, host, timings, the stage's result
    lineage/<stage>/latest.json            a copy of the last one written (status explains staleness against it)
    lineage/runs/<start>-<run id>.parquet  one row per stage per run: the append-only run log

Records are written atomically and are the same for any writer of the same identity (but for who and
when), so two runs racing on one bucket leave one valid record. They name what lies under their root as
`@root/…` and are read back onto the root they are read from (storage/roots.py): a copied or pulled root is
self-contained, and a record naming anything outside the roots a command was given is ignored with a warning.
Nothing here imports torch or Prefect.
"""

from __future__ import annotations

import functools
import getpass
import io
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from nextdetail.pipeline.artifacts import Artifact
from nextdetail.storage.fs import Store
from nextdetail.storage.hashing import canonical_json
from nextdetail.storage.roots import Roots, place, relativize

LINEAGE = "lineage"
PACKAGES = ("nextdetail", "torch", "torchvision", "prefect", "dask", "distributed", "zarr", "numpy", "pyarrow",
            "webdataset", "s3fs", "torch-fidelity")
RUN_LOG_COLUMNS = ("run_id", "started", "stage", "identity", "artifact_identity", "url", "work", "seconds",
                   "host", "user", "git_commit", "preset", "model")


def run_row(run_id: str, started: float, stage: str, model: str, identity: str, result: Any, work: str,
            preset: str | None) -> dict[str, Any]:
    """One stage's row of a run's log (`RUN_LOG_COLUMNS`): what this run did for it, and where its artifact is."""
    env = environment()
    return {"run_id": run_id, "started": started, "stage": stage, "model": model, "identity": identity,
            "artifact_identity": result.identity, "url": result.url, "work": work,
            "seconds": round(time.time() - started, 3), "host": env["host"], "user": env["user"],
            "git_commit": env["git"]["commit"], "preset": preset}


@functools.cache
def environment() -> dict[str, Any]:
    """Package versions, git commit of the nextdetail source (if a checkout), host and user: once per process."""
    from importlib import metadata

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    source = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "nextdetail"],
                                    capture_output=True, text=True, timeout=5, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    return {"packages": packages, "git": {"commit": commit, "dirty": dirty}, "host": socket.gethostname(),
            "user": user, "pid": os.getpid()}


def _stage_directory(stage: str) -> str | None:
    from nextdetail.stages import REGISTRY

    return REGISTRY[stage].directory if stage in REGISTRY else None


class Lineage:
    """The lineage records and run log under one storage root (`roots.main`; the others: caches it may name)."""

    def __init__(self, root: Store | Roots) -> None:
        self.roots = root if isinstance(root, Roots) else Roots([root])
        self.store = self.roots.main.sub(LINEAGE)

    @classmethod
    def of(cls, cfg: Any) -> Lineage:
        """The lineage of `cfg`'s storage root, its records read against the roots `cfg` names."""
        return cls(Roots.of(cfg))

    def artifact_store(self, record: dict[str, Any]) -> Store:
        """The store of the artifact a (placed) record names, bounded by its root."""
        return self.roots.store(record["artifact"]["url"])

    def read(self, stage: str, identity: str) -> dict[str, Any] | None:
        return self._read(f"{stage}/{identity}.json")

    def latest(self, stage: str) -> dict[str, Any] | None:
        return self._read(f"{stage}/latest.json")

    def _read(self, rel: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.store.read_bytes(rel))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
            return None
        if not isinstance(record, dict):
            return None
        return place(record, self.store.url(rel), self.roots, _stage_directory)

    def write(self, record: dict[str, Any]) -> None:
        data = canonical_json(relativize(record, self.roots.main.url())).encode()
        self.store.write_bytes(f"{record['stage']}/{record['identity']}.json", data)
        self.store.write_bytes(f"{record['stage']}/latest.json", data)

    def records(self, stage: str) -> list[dict[str, Any]]:
        """Every record of one stage (newest first)."""
        out = [self._read(f"{stage}/{name}") for name in self.store.listdir(stage)
               if name.endswith(".json") and name != "latest.json"]
        return sorted((r for r in out if r is not None), key=lambda r: -r.get("finished", 0))

    def all_records(self) -> list[dict[str, Any]]:
        """Every record (newest first)."""
        out = []
        for rel in self.store.find():
            if rel.endswith(".json") and not rel.endswith("/latest.json") and "/runs/" not in rel:
                record = self._read(rel[len(LINEAGE) + 1:] if rel.startswith(LINEAGE + "/") else rel)
                if record is not None:
                    out.append(record)
        return sorted(out, key=lambda r: -r.get("finished", 0))

    def append_run(self, run_id: str, started: float, rows: list[dict[str, Any]]) -> str:
        """Write this run's rows as one Parquet file of the run log; returns its URL."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{c: r.get(c) for c in RUN_LOG_COLUMNS} for r in rows], schema=run_log_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        rel = f"runs/{int(started * 1000):015d}-{run_id}.parquet"
        self.store.write_bytes(rel, buf.getvalue())
        return self.store.url(rel)

    def runs(self) -> Any:
        """The whole run log as one pyarrow Table (oldest run first)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(io.BytesIO(self.store.read_bytes(f"runs/{name}")))
                  for name in self.store.listdir("runs") if name.endswith(".parquet")]
        # Logs written before a column existed read it as null.
        return pa.concat_tables(tables, promote_options="default") if tables else run_log_schema().empty_table()


def run_log_schema() -> Any:  # built lazily: pyarrow stays off status's import path
    import pyarrow as pa

    return pa.schema([("run_id", pa.string()), ("started", pa.float64()), ("stage", pa.string()),
                      ("identity", pa.string()), ("artifact_identity", pa.string()), ("url", pa.string()),
                      ("work", pa.string()), ("seconds", pa.float64()), ("host", pa.string()), ("user", pa.string()),
                      ("git_commit", pa.string()), ("preset", pa.string()),
                      ("model", pa.string())])  # the models whose branch holds the artifact: "cart", "cart,ndp"


def recorded_artifact(record: dict[str, Any], roots: Roots, check_sizes: bool = True) -> bool:
    """Whether the artifact a (placed) record names is still complete: its marker names the recorded identity
    (and, with `check_sizes`, every file the marker lists has its size). A marker listing a path outside the
    artifact is damage: not complete (a warning says which)."""
    from nextdetail.storage.fs import OutsideRoot
    from nextdetail.storage.roots import warn_once

    a = record["artifact"]
    try:
        artifact = Artifact(record["stage"], a["identity"], roots.store(a["url"]), a.get("marker", "_COMPLETE.json"))
        return (artifact.completed() if check_sizes else artifact.read_marker()) is not None
    except OutsideRoot as err:
        warn_once(f"{a['url']}: damaged: {err}")
        return False
