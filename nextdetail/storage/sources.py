"""Source datasets: list an ImageNet-layout or class-folder dataset (local path or fsspec URL).

Layouts (detected per split):
- class folders: ``<root>/<split>/<class>/**/<file>`` (ImageNet's ``train/<wnid>/*.JPEG``);
- flat + labels: ``<root>/val/*.JPEG`` with ImageNet's ``LOC_val_solution.csv`` (in the root or the split);
- a root whose sub-folders are classes and that has none of the split folders is one ``train`` split.
Listing never reads file contents: each file's fingerprint is its (size, mtime) from the directory scan.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import stat
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from nextdetail.errors import UserError, storage_problem
from nextdetail.storage.fs import Store

LABELS_CSV = "LOC_val_solution.csv"
UNREADABLE, NOT_A_FILE, SYMLINK_LOOP = -1, -2, -3  # SourceItem.size of what is not read (skipped, with a reason)
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


@dataclass(frozen=True)
class SourceItem:
    split: str
    relpath: str  # posix path relative to the source root: what the manifest and the shard's json record
    wnid: str | None  # class folder name / wnid; None when the file lies outside any class
    size: int  # UNREADABLE: could not stat or list (broken link, permission); NOT_A_FILE: a FIFO, socket, device;
    # SYMLINK_LOOP: a link into a directory this class's walk already entered (never entered twice)
    stamp: str  # modification stamp: mtime in ns locally, ETag / LastModified on object stores
    collides: bool = False  # another listed file maps to the same key: the whole name's hash tells them apart

    @property
    def key(self) -> str:
        """webdataset sample key: the path without extension; dots and odd characters become '_' because
        webdataset splits a member name at the first dot of its basename. Where that changed the name, 8 hex
        digits of the original's sha256 follow, so two files never share a key (`a.b.c.JPEG`, `a_b_c.JPEG`);
        where two names still meet (`b.jpeg`, `b.JPEG`: the extension's case) 8 hex digits of the whole name's."""
        stem = self.relpath.rsplit(".", 1)[0] if "." in self.relpath.rsplit("/", 1)[-1] else self.relpath
        safe = _UNSAFE.sub("_", stem)
        if safe != stem:
            safe += "_" + hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        if self.collides:
            safe += "_" + hashlib.sha256(self.relpath.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return safe


def display_path(relpath: str) -> str:
    """A path as text for manifests and logs: the bytes of a name that is not UTF-8 (old Samba/NFS copies)
    as \\xNN escapes; the file itself is still read by its real name."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class SourceListing:
    url: str  # canonical URL of the root (absolute local path or proto://bucket/prefix)
    items: dict[str, list[SourceItem]]  # split → items sorted by relpath
    classes: list[str]  # sorted class names: index = class index


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_local(root: str, sub: str) -> list[tuple[str, int, str]]:
    """(relpath, size, mtime) of every non-directory under root/sub; size -1 when stat fails. Symbolic links are
    followed at most once per real directory within each class folder's walk (the (st_dev, st_ino) of every
    directory entered; the root and the split folder count as entered): a link back into one is one row,
    SYMLINK_LOOP, so the walk is bounded by the real files, never repeats one, and a class folder that is a link to
    another class is a class of its own (as torchvision's ImageFolder treats it)."""
    out: list[tuple[str, int, str]] = []
    top = {_dir_id(root), _dir_id(os.path.join(root, sub))}
    stack: list[tuple[str, set[tuple[int, int]] | None]] = [(sub, None)]  # (folder, its class walk's entered ids)
    while stack:
        rel, entered = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:  # an unreadable directory: listed as one unreadable entry, never silently lost
            if not rel:
                raise
            out.append((rel, UNREADABLE, ""))
            continue
        for entry in entries:
            erel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    ident = _dir_id(entry.path)
                    walk = set(top) if entered is None else entered  # a folder of the split: a class, its own walk
                    if ident in walk:
                        out.append((erel, SYMLINK_LOOP, ""))
                        continue
                    walk.add(ident)
                    stack.append((erel, walk))
                    continue
                st = entry.stat(follow_symlinks=True)
                if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block forever
                    out.append((erel, NOT_A_FILE, ""))
                    continue
                out.append((erel, st.st_size, str(st.st_mtime_ns)))
            except OSError:  # broken symlink, permission: listed, and skipped later with its reason
                out.append((erel, UNREADABLE, ""))
    return out


def _walk(fs: fsspec.AbstractFileSystem, root: str, sub: str) -> list[tuple[str, int, str]]:
    if isinstance(fs, LocalFileSystem):
        return _walk_local(root, sub)
    out = []
    for path, info in fs.find(f"{root}/{sub}", detail=True).items():
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
        out.append((path[len(root) + 1 :], int(info.get("size") or 0), str(stamp)))
    return out


def _isdir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.isdir(path)
    except OSError:
        return False


def _read_val_labels(fs: fsspec.AbstractFileSystem, root: str, split: str) -> dict[str, str] | None:
    for where in (f"{root}/{split}/{LABELS_CSV}", f"{root}/{LABELS_CSV}"):
        if fs.exists(where):
            text = fs.cat_file(where).decode()
            labels = {}
            for row in csv.DictReader(io.StringIO(text)):
                pred = (row.get("PredictionString") or "").split()
                if row.get("ImageId") and pred:
                    labels[row["ImageId"]] = pred[0]
            return labels
    return None


def class_folders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The classes of a class-folder split: every sub-folder, whatever it holds (as torchvision's ImageFolder
    finds them), sorted — so an empty folder, or one holding only a README, is a class with no samples, and
    filling it later shifts no class index. Hidden folders (.git, .ipynb_checkpoints) are not classes (their
    files are skipped, reason hidden_folder). On an object store a folder exists only while it holds a file. A local
    link to a folder is a class of its own (ImageFolder follows it too)."""
    if isinstance(fs, LocalFileSystem):
        names = []
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):  # a broken link is no class
                if entry.is_dir(follow_symlinks=True):
                    names.append(entry.name)
    else:
        names = [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True)
                 if e.get("type") == "directory"]
    return sorted(name for name in names if not name.startswith("."))


def check_root(store: Store, url: str) -> None:
    """One line when the source root is not a readable directory: missing and not-a-directory differ."""
    try:
        exists = store.fs.exists(store.root)
        if not exists and not store.is_local:  # an object store answers "no" for a missing bucket too: ask it why
            store.fs.ls(store.root.split("/", 1)[0])
    except Exception as err:  # botocore's errors are not OSErrors
        line = storage_problem(err)
        if line is None and not isinstance(err, OSError):
            raise
        raise UserError(f"data.source {url!r}: {line or f'cannot be read ({err.strerror or err})'}; check the URL, "
                        "the storage options and permissions") from None
    if not exists:
        raise UserError(f"data.source {url!r} does not exist; point it at a class-folder or ImageNet dataset "
                        "(or -o data.source=embedded)")
    if not _isdir(store.fs, store.root):
        raise UserError(f"data.source {url!r} is a file, not a directory; point it at the dataset's folder")
    if store.is_local and not os.access(store.root, os.R_OK | os.X_OK):
        raise UserError(f"data.source {url!r}: permission denied; make it readable for this user")


def list_source(url: str, splits: list[str], layout: str = "auto", storage_options: dict | None = None) -> SourceListing:
    """List every file of the requested splits with its class; the class map comes from the first split."""
    store = Store(url, storage_options, follow_links=True)
    fs, root = store.fs, store.root
    check_root(store, url)
    prefix = split_prefixes(store, url, splits, layout)
    items: dict[str, list[SourceItem]] = {}
    classes: list[str] | None = None
    for split in prefix:
        files = _walk(fs, root, prefix[split])
        strip = len(prefix[split]) + 1 if prefix[split] else 0
        class_dirs = sorted({f[0][strip:].split("/", 1)[0] for f in files if "/" in f[0][strip:]})
        labels = _read_val_labels(fs, root, split) if not class_dirs else None
        if classes is None:
            classes = class_folders(fs, f"{root}/{prefix[split]}" if prefix[split] else root)
            if not classes:
                raise UserError(f"data.source {url!r}: split {split!r} has no class folders")
        split_items = []
        for relpath, size, stamp in files:
            inner = relpath[strip:]
            if inner.rsplit("/", 1)[-1] == LABELS_CSV:
                continue
            if "/" in inner:
                wnid = inner.split("/", 1)[0]
            elif labels is not None:
                wnid = labels.get(inner.rsplit(".", 1)[0])
            else:
                wnid = None  # a stray file beside the class folders: skipped and counted
            split_items.append(SourceItem(split, relpath, wnid, size, stamp))
        items[split] = _without_key_collisions(sorted(split_items, key=lambda it: it.relpath))
    return SourceListing(store.url(), items, classes or [])


def _without_key_collisions(items: list[SourceItem]) -> list[SourceItem]:
    """`items` with every file whose key another listed file shares marked `collides` (its key then carries its
    whole name's hash): no real file is ever skipped as a duplicate key."""
    import collections
    import dataclasses

    counts = collections.Counter(it.key for it in items)
    return [dataclasses.replace(it, collides=True) if counts[it.key] > 1 else it for it in items]


def split_prefixes(store: Store, url: str, splits: list[str], layout: str = "auto") -> dict[str, str]:
    """Each split's folder under the root ("" for a plain class-folder root), or one line saying what is
    missing. Reads directory entries only: cheap enough to check before anything starts."""
    fs, root = store.fs, store.root
    split_dirs = {s: _isdir(fs, f"{root}/{s}") for s in splits}
    if layout == "imagenet" and not split_dirs.get("train", False):
        raise UserError(f"data.source {url!r} has no train/ folder; ImageNet layout is train/<wnid>/*.JPEG")
    if not any(split_dirs.values()):
        if splits[0] != "train" or len(splits) > 1:
            raise UserError(
                f"data.source {url!r} has no {'/'.join(splits)} folders; for a plain class-folder root set -o data.splits=[train]"
            )
        prefix = {"train": ""}
    else:
        missing = [s for s, ok in split_dirs.items() if not ok]
        if missing:
            raise UserError(
                f"data.source {url!r} has no {missing[0]}/ folder; add it or drop it: -o data.splits=[{','.join(s for s in splits if s not in missing)}]"
            )
        prefix = {s: s for s in splits}
    for split in list(prefix)[1:]:  # a flat later split (ImageNet's val/) needs its labels file
        inner = fs.ls(f"{root}/{prefix[split]}", detail=True)
        flat = [e for e in inner if e.get("type") != "directory" and not str(e["name"]).endswith(LABELS_CSV)]
        if flat and not any(e.get("type") == "directory" for e in inner) and not any(
                fs.exists(w) for w in (f"{root}/{split}/{LABELS_CSV}", f"{root}/{LABELS_CSV}")):
            raise UserError(f"data.source {url!r}: {split}/ holds images but no class folders and no {LABELS_CSV} "
                            f"(ImageNet's labels of a flat {split}/); add the file, sort {split}/ into class folders, "
                            f"or drop it: -o data.splits=[{','.join(s for s in splits if s != split)}]")
    first = next(iter(prefix))
    try:
        entries = fs.ls(f"{root}/{prefix[first]}" if prefix[first] else root, detail=True)
    except OSError as err:
        raise UserError(f"data.source {url!r}: {first}/ cannot be read ({err.strerror or err})") from None
    if not any(e.get("type") == "directory" for e in entries):
        raise UserError(f"data.source {url!r}: split {first!r} has no class folders (<class>/<image> under "
                        f"{prefix[first] or 'the root'})")
    return prefix

