"""`Store`: one storage root (a local path or an fsspec URL such as s3://bucket/prefix).

Containment (the one rule, here): a Store never reads, writes, lists or deletes outside its *boundary* — the root a
command was given (`storage.root`, a cache); a sub-store keeps its parent's boundary. A relative path (from a
record, a marker, an index) is normalized and a `..` that leaves the root is refused; on a local root a path whose
real location leaves the boundary (a symbolic link) is refused too, and only regular files are opened. Each refusal
is `OutsideRoot`, one line naming the path: nothing is touched. Records and markers are written by whoever can
write a shared bucket, so their paths are never trusted.

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
import posixpath
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from nextdetail.conf.secrets import reveal
from nextdetail.errors import UserError, storage_problem

TMP_MARK = ".tmp-"


class OutsideRoot(UserError):
    """A path that leaves the root it was named under (`..`, a symbolic link, a device or FIFO): damage, not read,
    written or deleted."""


def normalize_url(url: str) -> str:
    """`url` with `.`/`..` resolved and duplicate or trailing slashes removed (``proto://`` kept)."""
    proto, sep, path = str(url).partition("://") if "://" in str(url) else ("", "", str(url))
    norm = posixpath.normpath(path) if path else ""
    return f"{proto}{sep}{'' if norm == '.' else norm}"


def under(url: str, root: str) -> bool:
    """Whether `url` is `root` or lies below it, after both are normalized (`..` cannot climb out)."""
    url, root = normalize_url(url), normalize_url(root)
    return url == root or url.startswith(root.rstrip("/") + "/")


def relative_path(rel: str) -> str:
    """`rel` (a path inside a root, as a record or marker names it) normalized; OutsideRoot when it climbs out."""
    parts: list[str] = []
    for part in str(rel).replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise OutsideRoot(f"{rel}: climbs out of its root ('..'); not read, written or deleted — a record, "
                                  "marker or index naming it was not written by nextdetail")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _tmp_name(name: str) -> str:
    return f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Store:
    """A storage root with atomic writes. Paths passed to methods are relative to the root."""

    def __init__(self, root: str, options: dict[str, Any] | None = None, boundary: str | None = None,
                 follow_links: bool = False) -> None:
        try:
            self.fs, path = fsspec.core.url_to_fs(str(root), **reveal(options or {}))
        except OSError as err:  # a protocol that connects when it is built (ftp, sftp): its host, its endpoint
            raise UserError(f"{root}: {storage_problem(err) or f'cannot be reached ({err})'}") from None
        except (ValueError, ImportError) as err:  # "Protocol not known: foo", a protocol whose package is missing
            protocol = str(root).split("://", 1)[0] if "://" in str(root) else ""
            if not protocol or ("Protocol not known" not in str(err) and not isinstance(err, ImportError)):
                raise
            raise UserError(f"{root}: unknown storage protocol {protocol!r} ({str(err).splitlines()[0][:120]}); "
                            "give a local path or a URL such as s3://bucket/prefix") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if boundary is None:  # a root a command was given: its own boundary (a root that is a link is followed once)
            self.root = str(Path(path).resolve()) if self.is_local else path.rstrip("/")
            self.boundary = self.root
        else:  # a sub-store: never resolved, so a link inside the boundary cannot move it elsewhere
            self.root = os.path.normpath(os.path.abspath(path)) if self.is_local else normalize_url(path)
            self.boundary = boundary.split("://", 1)[1] if "://" in boundary else boundary
            if not under(self.root, self.boundary):
                raise OutsideRoot(f"{self.root}: lies outside {boundary}; not read, written or deleted")
        self._real_boundary = os.path.realpath(self.boundary) if self.is_local else self.boundary
        # An input the user pointed at (a source dataset, a reference folder) is read as they laid it out, links
        # included (`train/<class>` may link to another disk); the roots nextdetail writes and shares are contained.
        self.follow_links = follow_links
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
        except Exception as err:  # botocore's errors are not OSErrors
            line = storage_problem(err)
            if line is None:
                raise
            raise UserError(f"{what} {self.url()}: {line}") from None

    def __repr__(self) -> str:
        return f"Store({self.url()!r})"

    def __reduce__(self):  # picklable for Dask workers: rebuild from the URL (and the boundary it keeps)
        return (Store, (self.url(), self.options, None if self.boundary == self.root else self._boundary_url(),
                        self.follow_links))

    def _boundary_url(self) -> str:
        return self.boundary if self.is_local else f"{self.protocol}://{self.boundary}"

    def path(self, *parts: str) -> str:
        """The fsspec path of `parts` under the root (normalized; OutsideRoot if they climb out of it)."""
        rel = relative_path("/".join(p for p in parts if p))
        return "/".join([self.root, rel]) if rel else self.root

    def checked(self, rel: str = "", file: bool = False) -> str:
        """`path(rel)`, refused (OutsideRoot) on a local root when its real location leaves the boundary (a
        symbolic link on the way) or, with `file`, when it exists and is not a regular file (a device, a FIFO:
        reading one never ends)."""
        p = self.path(rel)
        if not self.is_local:
            return p
        real = os.path.realpath(p)
        if not self.follow_links and not under(real, self._real_boundary):
            raise OutsideRoot(f"{p}: leads outside {self.boundary} (a symbolic link to {real}); not read, written "
                              "or deleted — nextdetail writes no links")
        if file:
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:
                return p
            if stat.S_ISDIR(mode):  # what reading a folder always raised
                raise IsADirectoryError(errno.EISDIR, "a folder, not a file", p)
            if not stat.S_ISREG(mode):
                if self.follow_links:  # an input's odd entry: unreadable, as the listing already says
                    raise OSError(errno.EINVAL, "not a regular file (a device or FIFO): never opened", p)
                raise OutsideRoot(f"{p}: not a regular file (a device or FIFO); not read — nextdetail writes only "
                                  "regular files")
        return p

    def url(self, *parts: str) -> str:
        """A URL a user can paste: a plain path for local roots, ``proto://…`` otherwise."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def sub(self, *parts: str) -> Store:
        """The store of a folder under this root, with the same boundary."""
        return Store(self.url(*parts), self.options, boundary=self._boundary_url(), follow_links=self.follow_links)

    @staticmethod
    def of_file(url: str, options: dict | None = None) -> tuple[Store, str]:
        """(the Store of a file's folder, the file's name) for a path or URL to one file a setting names (released
        weights, a picture): the user's file, read where its links lead."""
        folder, _, name = url.rstrip("/").rpartition("/")
        return Store(folder or ".", options or {}, follow_links=True), name

    # -- reading ----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.checked(rel))

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings under `rel` (s3fs caches them; another writer may have changed them)."""
        if not self.is_local:
            self.fs.invalidate_cache(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.checked(rel, file=True))

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.size(self.checked(rel, file=True)))
        except FileNotFoundError:
            return None

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.checked(rel, file=True), mode)

    def sha256(self, rel: str, limit: int | None = None) -> str | None:
        """sha256 (hex) of a file, streamed; None if it is missing. With `limit` (the size a marker records) at
        most `limit` + 1 bytes are read: a file that grew, or a device that never ends, hashes as what it is not."""
        digest = hashlib.sha256()
        left = None if limit is None else limit + 1
        try:
            with self.open(rel) as f:
                while block := f.read(1 << 22 if left is None else min(1 << 22, left)):
                    digest.update(block)
                    if left is not None:
                        left -= len(block)
                        if left <= 0:
                            break
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def zarr_store(self, rel: str, read_only: bool = False) -> Any:
        """A Zarr v3 store over `rel`: LocalStore on disk, FsspecStore (with this root's options) elsewhere."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.checked(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url(rel), storage_options=reveal(self.options) or None,
                                                 read_only=read_only)

    def is_link(self, rel: str) -> bool:
        """Whether `rel` is a symbolic link (object stores have none)."""
        return self.is_local and os.path.islink(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`; empty if it does not exist."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.checked(rel), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_writer(self, rel: str) -> Iterator[IO[bytes]]:
        """Yield a local binary file; on success it becomes `rel` in one step, on error it vanishes."""
        final = self.checked(rel, file=True)
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
            final = Path(self.checked(rel, file=True))
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
        p = self.path(rel)
        if self.is_local and os.path.islink(p):  # the link itself goes, never what it points at
            self.checked(posixpath.dirname(relative_path(rel)))
            os.unlink(p)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.checked(rel, file=True))

    def remove_tree(self, rel: str) -> None:
        """Remove everything under `rel` (no error if it is already gone). Locally links are removed as links, never
        followed (`shutil.rmtree`), and a `rel` that leads outside the boundary is refused."""
        if self.is_local:
            import shutil

            p = self.path(rel)
            if os.path.islink(p):
                os.unlink(p)
                return
            self.checked(rel)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    def find(self, rel: str = "", links: list[str] | None = None) -> list[str]:
        """Every regular file under `rel`, as paths relative to the root, sorted. Locally symbolic links are never
        followed nor listed; with `links`, theirs are appended to it (for a caller that reports them)."""
        base = self.checked(rel).rstrip("/")
        prefix = self.root.rstrip("/") + "/"
        if self.is_local and not self.follow_links:
            found = []
            for folder, dirs, files in os.walk(base, followlinks=False):
                for name in [*dirs, *files]:
                    full = os.path.join(folder, name)
                    if os.path.islink(full):
                        if links is not None:
                            links.append(full[len(prefix):])
                    elif name in files and stat.S_ISREG(os.lstat(full).st_mode):
                        found.append(full[len(prefix):])
            return sorted(found)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
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
