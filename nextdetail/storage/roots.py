"""The roots a command was given, and records that name artifacts relative to them (relocatable, as DVC's cache).

`Roots`: `storage.root` and the shared caches a config names (`tokens.cache`, `eval.reference_cache`). Every
artifact a record, marker or link names is opened through `Roots.store`, a sub-store bounded by the root it lies
under (`Store`'s containment rule): a URL outside every root is `OutsideRoot`, never a Store.

Records are written with every string under their root replaced by `@root/…` (`relativize`), and read back onto
the root they are read from (`place`): a root copied, moved, mounted elsewhere or pulled works where it is and
never reaches back to where it was built. A record written before this rule (absolute URLs) is read as relative
when its artifact lies under the recorded root (found from the stage's directory), else ignored with a warning.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from nextdetail.storage.fs import OutsideRoot, Store, normalize_url, relative_path, under

ROOT = "@root"  # how a record names the root it lives in


class Roots:
    """The storage roots one command may touch, each with its fsspec options; the first is `storage.root`."""

    def __init__(self, stores: Iterable[Store]) -> None:
        self.stores = tuple(stores)

    @classmethod
    def of(cls, cfg: Any) -> Roots:
        """`storage.root` and the caches `cfg` (a PipelineConfig) names, with their options."""
        from nextdetail.stages import REGISTRY

        stores = [Store(cfg.storage.root, cfg.storage.options)]
        for stage in REGISTRY.values():  # a stage whose artifacts live elsewhere (token caches: tokens.cache)
            url, options = stage.root(cfg)
            if url != cfg.storage.root and url not in (s.url() for s in stores):
                stores.append(Store(url, options))
        if cfg.eval.reference_cache:
            options = cfg.eval.reference_cache_options
            stores.append(Store(cfg.eval.reference_cache, cfg.storage.options if options is None else options))
        return cls(stores)

    @property
    def main(self) -> Store:
        return self.stores[0]

    def holds(self, url: str) -> bool:
        return any(under(url, s.url()) for s in self.stores)

    def store(self, url: str) -> Store:
        """The store of `url`, bounded by the root it lies under (the innermost: a cache inside the root is its own
        root, with its own options); OutsideRoot when it lies under none."""
        url = normalize_url(url)
        best = max((s for s in self.stores if under(url, s.url())), key=lambda s: len(s.url()), default=None)
        if best is None:
            raise OutsideRoot(f"{url}: outside the roots this command was given ({self.describe()}); not read, "
                              "written or deleted")
        rest = url[len(normalize_url(best.url())):].strip("/")
        return best.sub(rest) if rest else best

    def describe(self) -> str:
        return ", ".join(s.url() for s in self.stores)


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` (a JSON value) with `fn` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    return value


def rename_under(value: Any, src: str, dst: str) -> Any:
    """`value` (a JSON value) with every string that is `src` or a path under it renamed to lie under `dst`."""
    src, dst = src.rstrip("/"), dst.rstrip("/")
    return map_strings(value, lambda v: dst + v[len(src):] if v.startswith(src) and under(v, src) else v)


def relativize(record: dict[str, Any], root_url: str) -> dict[str, Any]:
    """A record as stored: every string naming its root, or a path under it, as `@root/…`."""
    return rename_under(record, root_url, ROOT)


def _names_root(v: str) -> bool:
    return v == ROOT or v.startswith(ROOT + "/")


def _uses_root(value: Any) -> bool:
    found: list[bool] = []
    map_strings(value, lambda v: found.append(_names_root(v)) or v)
    return any(found)


def _on_root(value: Any, root_url: str) -> Any:
    """`@root/…` strings as paths under `root_url` (OutsideRoot when one climbs out)."""
    def place_one(v: str) -> str:
        if not _names_root(v):
            return v
        rel = relative_path(v[len(ROOT):])
        return f"{root_url.rstrip('/')}/{rel}" if rel else root_url.rstrip("/")

    return map_strings(value, place_one)


_warned: set[str] = set()


def warn_once(line: str) -> None:
    """One warning line on stderr per distinct problem and process (status and run read a record many times)."""
    if line not in _warned:
        _warned.add(line)
        print(f"nextdetail: warning: {line}", file=sys.stderr)


def place(record: dict[str, Any], where: str, roots: Roots, directory: Callable[[str], str | None]) -> \
        dict[str, Any] | None:
    """A stored record (read from `where`) with its paths on `roots.main`; None, with a warning, when what it
    names lies outside the roots (a record of another root, or one planted to reach outside). `directory(stage)`:
    the stage's output directory, to find the recorded root of a record written with absolute URLs."""
    root_url = roots.main.url()
    try:
        if not _uses_root(record):
            record = _legacy(record, roots, directory)
        record = _on_root(record, root_url)
    except OutsideRoot as err:
        warn_once(f"{where}: ignored: {err}")
        return None
    if record is None:
        warn_once(f"{where}: ignored: it names an artifact outside the roots this command was given "
                  f"({roots.describe()}), written where it was built")
        return None
    for url in (record.get("artifact", {}).get("url"), (record.get("result") or {}).get("url")):
        if isinstance(url, str) and not roots.holds(url):
            warn_once(f"{where}: ignored: it names {url}, outside the roots this command was given "
                      f"({roots.describe()}); nothing there is read, written or deleted")
            return None
    return record


def _legacy(record: dict[str, Any], roots: Roots, directory: Callable[[str], str | None]) -> dict[str, Any] | None:
    """A record with absolute URLs (written before records were relative) as if relative: its recorded root is
    what precedes its stage's directory in the artifact's URL. Kept as is when the artifact lies in one of the
    roots already (this root, or a shared cache); None when no recorded root can be found."""
    url = (record.get("artifact") or {}).get("url")
    if not isinstance(url, str):
        return record
    if roots.holds(url):
        return record
    folder = directory(record.get("stage", ""))
    cut = url.rfind(f"/{folder}/") if folder else -1
    if cut <= 0:
        return None
    return rename_under(record, url[:cut], ROOT)
