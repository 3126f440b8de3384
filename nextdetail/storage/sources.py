"""Source datasets: list an ImageNet-layout or class-folder dataset (local path or fsspec URL).

Layouts (detected per split):
- class folders: ``<root>/<split>/<class>/**/<file>`` (ImageNet's ``train/<wnid>/*.JPEG``);
- flat + labels: ``<root>/val/*.JPEG`` with ImageNet's ``LOC_val_solution.csv`` (in the root or the split);
- a root whose sub-folders are classes and that has none of the split folders is one ``train`` split.
Listing never reads file contents: each file's fingerprint is its (size, mtime) from the directory scan.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from nextdetail.errors import UserError
from nextdetail.storage.fs import Store

LABELS_CSV = "LOC_val_solution.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


@dataclass(frozen=True)
class SourceItem:
    split: str
    relpath: str  # posix path relative to the source root: what the manifest and the shard's json record
    wnid: str | None  # class folder name / wnid; None when the file lies outside any class
    size: int  # -1: could not stat (broken link, permission)
    stamp: str  # modification stamp: mtime in ns locally, ETag / LastModified on object stores

    @property
    def key(self) -> str:
        """webdataset sample key: the path without extension; dots and odd characters become '_'
        because webdataset splits a member name at the first dot of its basename."""
        stem = self.relpath.rsplit(".", 1)[0] if "." in self.relpath.rsplit("/", 1)[-1] else self.relpath
        return _UNSAFE.sub("_", stem)


@dataclass
class SourceListing:
    url: str  # canonical URL of the root (absolute local path or proto://bucket/prefix)
    items: dict[str, list[SourceItem]]  # split → items sorted by relpath
    classes: list[str]  # sorted class names: index = class index


def _walk_local(root: str, sub: str) -> list[tuple[str, int, str]]:
    """(relpath, size, mtime) of every non-directory under root/sub; size -1 when stat fails."""
    out: list[tuple[str, int, str]] = []
    stack = [sub]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for entry in it:
                erel = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=True):
                        stack.append(erel)
                        continue
                    st = entry.stat(follow_symlinks=True)
                    out.append((erel, st.st_size, str(st.st_mtime_ns)))
                except OSError:  # broken symlink, permission: listed, and skipped later with its reason
                    out.append((erel, -1, ""))
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


def list_source(url: str, splits: list[str], layout: str = "auto", storage_options: dict | None = None) -> SourceListing:
    """List every file of the requested splits with its class; the class map comes from the first split."""
    store = Store(url, storage_options)
    fs, root = store.fs, store.root
    if not _isdir(fs, root):
        raise UserError(f"data.source {url!r} is not a directory; point it at a class-folder or ImageNet dataset")
    split_dirs = {s: _isdir(fs, f"{root}/{s}") for s in splits}
    if layout == "imagenet" and not split_dirs.get("train", False):
        raise UserError(f"data.source {url!r} has no train/ folder; ImageNet layout is train/<wnid>/*.JPEG")
    if not any(split_dirs.values()):
        if splits[0] != "train" or len(splits) > 1:
            raise UserError(
                f"data.source {url!r} has no {'/'.join(splits)} folders; for a plain class-folder root set -o data.splits=[train]"
            )
        split_dirs = {"train": True}
        prefix = {"train": ""}
    else:
        missing = [s for s, ok in split_dirs.items() if not ok]
        if missing:
            raise UserError(
                f"data.source {url!r} has no {missing[0]}/ folder; add it or drop it: -o data.splits=[{','.join(s for s in splits if s not in missing)}]"
            )
        prefix = {s: s for s in splits}

    items: dict[str, list[SourceItem]] = {}
    classes: list[str] | None = None
    for split in split_dirs:
        files = _walk(fs, root, prefix[split])
        strip = len(prefix[split]) + 1 if prefix[split] else 0
        # Direct children that are directories are the classes of a class-folder split.
        class_dirs = sorted({f[0][strip:].split("/", 1)[0] for f in files if "/" in f[0][strip:]})
        labels = _read_val_labels(fs, root, split) if not class_dirs else None
        if classes is None:
            classes = class_dirs
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
        items[split] = sorted(split_items, key=lambda it: it.relpath)
    return SourceListing(store.url(), items, classes or [])

