"""The code a stage runs, derived from its entry modules: the closure of the `nextdetail` modules they
import, plus the non-Python files that code loads — each with the sha256 of its bytes.

Nothing is listed by hand. The import statements are read from the source text, not executed, so
`nextdetail status` imports neither torch nor Prefect to compute a fingerprint:
- `import a.b`, `from a import b` (b a module or a name), relative imports, and imports inside functions
  all count (a lazy import is still code the stage may run: over-approximate, never under);
- importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too, so parent packages are included;
- a string constant naming a file next to the module (`Path(__file__).with_name("_at_cpu.cpp")`) is a data
  file the module loads: included with its bytes' sha256;
- imports under `if TYPE_CHECKING:` (annotations only) are not code that runs: skipped;
- `importlib.import_module(x)` with a computed name is not followed: such modules are named by the stage
  declaration itself (the model families in `nextdetail.models.FAMILIES`), the same names the code imports.

Third-party packages (torch, zarr, …) are not in the fingerprint; their versions go in the lineage record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from nextdetail.storage.hashing import canonical_json, stable_hash

PACKAGE = "nextdetail"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The source file of `nextdetail` module `name` (a package's `__init__.py`), or None if there is none."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _relpath(path: Path) -> str:
    return path.relative_to(PACKAGE_DIR.parent).as_posix()


@cache
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Import statements at any indentation (lazy imports count), parenthesised multi-line lists included; a match
# inside a docstring only adds a dependency (over-approximation, never under). A regex, not `ast`: 40× faster,
# and `status` reads every module of the package.
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([.\w]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n]+)|import[ \t]+([^\n]+))", re.M)
_TYPE_CHECKING = re.compile(r"^if (?:typing\.)?TYPE_CHECKING:[^\n]*\n(?:(?:[ \t]+[^\n]*)?\n)*", re.M)  # never runs
_FILE_NAME = re.compile(r"""["']([\w.-]+\.\w+)["']""")  # a string constant that looks like a file name


def _names(clause: str) -> list[str]:
    """`a.b as c, d` / `(x, y as z,  # comment\n w)` → the imported names."""
    clause = re.sub(r"#[^\n]*", "", clause).strip().strip("()")
    return [part.split()[0] for part in re.split(r"[,\n]", clause) if part.strip() and part.strip() != "\\"]


@cache
def _read_module(name: str) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """(the nextdetail modules `name` imports, the data files it names) — from its source, not by importing it."""
    path = module_file(name)
    assert path is not None, name
    source = _TYPE_CHECKING.sub("", path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    imported: set[str] = set()
    for base, what, plain in _IMPORT.findall(source):
        if plain:
            imported.update(_names(plain))
            continue
        if base.startswith("."):  # relative: from the module's package, up one more per extra dot
            level = len(base) - len(base.lstrip("."))
            base = ".".join([*package[: len(package) - (level - 1)], *([base.lstrip(".")] if base.strip(".") else [])])
        imported.add(base)
        imported.update(f"{base}.{n}" for n in _names(what) if n != "*")  # kept only where it is a module
    data = set()
    for file_name in set(_FILE_NAME.findall(source)):
        candidate = path.parent / file_name
        if not file_name.endswith(".py") and candidate.is_file():
            data.add(candidate)
    modules = {m for m in imported if module_file(m) is not None}
    return tuple(sorted(modules)), tuple(sorted(data))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _closure(entries: tuple[str, ...]) -> dict[str, str]:
    seen: set[str] = set()
    files: dict[str, str] = {}
    todo = [p for e in entries for p in _with_parents(e)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            raise ModuleNotFoundError(f"code fingerprint: no nextdetail module {name!r}")
        files[_relpath(path)] = _file_sha256(path)
        modules, data = _read_module(name)
        for d in data:
            files[_relpath(d)] = _file_sha256(d)
        todo.extend(p for m in modules for p in _with_parents(m) if p not in seen)
    return dict(sorted(files.items()))


def code_fingerprint(entries: Iterable[str]) -> dict[str, str]:
    """Every file the entry modules' code consists of (relative path → sha256): the nextdetail modules they
    import, directly or not, their parent packages, and the non-Python files they load. Read once per process
    (a run hashes the code it loaded)."""
    return dict(_closure(tuple(sorted(set(entries)))))


def modules_of(fingerprint: dict[str, str]) -> set[str]:
    """The module names of a fingerprint's Python files (for comparing with what a process imported)."""
    out = set()
    for rel in fingerprint:
        if rel.endswith(".py"):
            name = rel.removesuffix(".py").replace("/", ".")
            out.add(name.removesuffix(".__init__"))
    return out


SHARED: dict[str, tuple[str, ...]] = {
    "reference_stats": ("nextdetail.tasks.reference_stats",),
    "tokenizer_metrics": ("nextdetail.tasks.tokenizer_metrics",),
}
"""Artifacts that serve many stage identities and are content-addressed on their own (a team bucket holds each
once): the modules they run, whose derived code fingerprint is part of their identity."""


def shared_identity(name: str, part: Any) -> tuple[str, dict[str, str]]:
    """(the identity of shared artifact `name` with part key `part`, its code fingerprint)."""
    code = code_fingerprint(SHARED[name])
    return stable_hash({"shared": name, "part": json.loads(canonical_json(part)), "code": code}), code
