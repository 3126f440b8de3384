"""`Store`: one storage root (a local path or an fsspec URL such as s3://bucket/prefix).

Every write is atomic from a reader's point of view: local files are written to a temporary name in
the same directory, fsynced and renamed; object stores publish an object only when its upload
completes (S3 PUT and multipart uploads are all-or-nothing), so a killed writer never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from nextdetail.conf.secrets import reveal
from nextdetail.errors import UserError, credentials_problem

TMP_MARK = ".tmp-"


def _tmp_name(name: str) -> str:
    return f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Store:
    """A storage root with atomic writes. Paths passed to methods are relative to the root."""

    def __init__(self, root: str, options: dict[str, Any] | None = None) -> None:
        try:
            self.fs, path = fsspec.core.url_to_fs(str(root), **reveal(options or {}))
        except (ValueError, ImportError) as err:  # "Protocol not known: foo", a protocol whose package is missing
            protocol = str(root).split("://", 1)[0] if "://" in str(root) else ""
            if not protocol or ("Protocol not known" not in str(err) and not isinstance(err, ImportError)):
                raise
            raise UserError(f"{root}: unknown storage protocol {protocol!r} ({str(err).splitlines()[0][:120]}); "
                            "give a local path or a URL such as s3://bucket/prefix") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.is_local else path.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = "file" if self.is_local else protocol[0] if isinstance(protocol, tuple) else protocol
        self.options = dict(options or {})  # credentials stay SecretStr (conf/secrets.py) but in fsspec's hands

    def check_writable(self, what: str) -> None:
        """One line (UserError) unless a file can be written and removed under the root; creates the root."""
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.is_local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.write_bytes(probe, b"")
            self.remove(probe)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{what} {self.url()}: a part of this path is a file, not a folder; choose another "
                            f"folder (-o {what}=…)") from None
        except PermissionError:
            raise UserError(f"{what} {self.url()}: not writable by this user; choose a folder you can write "
                            f"(-o {what}=…)") from None
        except OSError as err:
            raise UserError(f"{what} {self.url()}: cannot write there ({err.strerror or err}); choose another "
                            f"folder (-o {what}=…)") from None
        except Exception as err:  # botocore's credential errors are not OSErrors
            line = credentials_problem(err)
            if line is None:
                raise
            raise UserError(f"{what} {self.url()}: {line}") from None

    def __repr__(self) -> str:
        return f"Store({self.url()!r})"

    def __reduce__(self):  # picklable for Dask workers: rebuild from the URL
        return (Store, (self.url(), self.options))

    def path(self, *parts: str) -> str:
        """The fsspec path of `parts` under the root."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url(self, *parts: str) -> str:
        """A URL a user can paste: a plain path for local roots, ``proto://…`` otherwise."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def sub(self, *parts: str) -> Store:
        return Store(self.url(*parts), self.options)

    @staticmethod
    def of_file(url: str, options: dict | None = None) -> tuple[Store, str]:
        """(the Store of a file's folder, the file's name) for a path or URL to one file."""
        folder, _, name = url.rstrip("/").rpartition("/")
        return Store(folder or ".", options or {}), name

    # -- reading ----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings under `rel` (s3fs caches them; another writer may have changed them)."""
        if not self.is_local:
            self.fs.invalidate_cache(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.size(self.path(rel)))
        except FileNotFoundError:
            return None

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.path(rel), mode)

    def sha256(self, rel: str) -> str | None:
        """sha256 (hex) of a file, streamed; None if it is missing."""
        digest = hashlib.sha256()
        try:
            with self.open(rel) as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def zarr_store(self, rel: str, read_only: bool = False) -> Any:
        """A Zarr v3 store over `rel`: LocalStore on disk, FsspecStore (with this root's options) elsewhere."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url(rel), storage_options=reveal(self.options) or None,
                                                 read_only=read_only)

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`; empty if it does not exist."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_writer(self, rel: str) -> Iterator[IO[bytes]]:
        """Yield a local binary file; on success it becomes `rel` in one step, on error it vanishes."""
        final = self.path(rel)
        if self.is_local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            tmp = str(Path(final).parent / _tmp_name(Path(final).name))
        else:
            fd, tmp = tempfile.mkstemp(prefix="nextdetail-upload-")
            os.close(fd)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                if self.is_local:
                    os.fsync(f.fileno())
            if self.is_local:
                os.replace(tmp, final)
            else:
                self.fs.put_file(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically replace `rel` with `data`."""
        if self.is_local:
            with self.atomic_writer(rel) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def write_bytes_exclusive(self, rel: str, data: bytes) -> None:
        """Create `rel` with `data` only if it does not exist yet; FileExistsError if it does. Of two
        concurrent writers exactly one succeeds: a hard link of the complete temporary locally (link
        fails on an existing name), a conditional PUT (If-None-Match: *) on S3."""
        if self.is_local:
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / _tmp_name(final.name)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        if self.protocol not in ("s3", "s3a"):
            raise NotImplementedError(f"{self.url()}: exclusive create is implemented for local paths and S3 only")
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
        except FileExistsError:
            raise
        except OSError as err:  # some S3 implementations answer 412 without naming the condition
            if err.errno == errno.EINVAL and self.exists(rel):
                raise FileExistsError(self.url(rel)) from None
            raise

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        """Remove everything under `rel` (no error if it is already gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    def find(self, rel: str = "") -> list[str]:
        """Every file under `rel`, as paths relative to the root, sorted."""
        base = self.path(rel).rstrip("/")
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    def clean_temporaries_of(self, rels: list[str], before: float) -> int:
        """Remove the temporaries of files `rels` not modified since `before` (local directories only): what
        killed writers of the same files left. A live concurrent writer keeps its temporary's mtime fresh."""
        if not self.is_local:
            return 0
        names = collections.defaultdict(set)
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            names[parent].add(f".{name}{TMP_MARK}")
        removed = 0
        for parent, prefixes in names.items():
            try:
                entries = list(os.scandir(self.path(parent) if parent else self.root))
            except OSError:
                continue
            for entry in entries:
                if TMP_MARK in entry.name and entry.name.split(TMP_MARK, 1)[0] + TMP_MARK in prefixes:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < before:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    def clean_temporaries(self, rel: str, older_than_s: float = 3600.0) -> int:
        """Remove temporaries that killed writers left in local directory `rel` (object stores have none)."""
        if not self.is_local:
            return 0
        removed, now = 0, time.time()
        directory = Path(self.path(rel))
        for p in directory.glob(f".*{TMP_MARK}*") if directory.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
        return removed
