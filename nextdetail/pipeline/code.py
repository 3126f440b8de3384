"""The code a stage computes with, derived from its entry modules: the closure of the `nextdetail` modules they
import, plus the non-Python files that code loads — each with the sha256 of what it *computes*, not its bytes.

What counts (issue 34; the anchors: DVC hashes the code files a stage declares, Bazel/Nix/Shake cut off early on
unchanged outputs, Dagster's `code_version`):
- a Python module by its normalized syntax tree (`ast.dump` of the parse, docstrings dropped): comments,
  docstrings and formatting never count, any change to what runs does (a renamed local variable included);
- a C++ source (the compiled solver) with its comments and whitespace runs removed;
- modules that cannot change an artifact's bytes are outside every stage's code by the package layout
  (`OUTSIDE_COMPUTATION`: the CLI, status/results/printing, the Prefect UI and runtime, pictures, the settings
  classes — settings enter an identity as values, the settings slice — and the error texts); the closure neither
  hashes them nor follows their imports. `tests/test_identities.py` traces the modules a stage's process really
  loads and fails on any that is neither in its code nor outside by this rule.

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

import ast
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


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of `nextdetail` module `name` (a package's `__init__.py`), or None if there is none.
    `package_dir`: another copy of the package (a commit's tree, `benchmarks/rerun.py identity_churn`)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _relpath(path: Path, package_dir: Path) -> str:
    return path.relative_to(package_dir.parent).as_posix()


CODE_RULE = "syntax-tree/1"
"""How a record's `code` was hashed (lineage records carry it): records of an older rule cannot be compared file by
file, so `status` says so instead of listing every file."""

OUTSIDE_COMPUTATION = ("nextdetail.cli", "nextdetail.cache", "nextdetail.conf", "nextdetail.errors",
                       "nextdetail.figures", "nextdetail.storage.lineage", "nextdetail.pipeline.declaration",
                       "nextdetail.pipeline.code", "nextdetail.pipeline.result", "nextdetail.pipeline.parts",
                       "nextdetail.pipeline.runtime", "nextdetail.pipeline.run", "nextdetail.pipeline.ui")
"""Modules (and packages: every module under them) that never change the bytes a stage writes: the command line,
what a root holds (status, cache commands), the settings classes (settings count as values), error texts,
pictures, lineage records, and of the machinery: declarations and identity rules, result types, how tasks are
run (parts, runtime), the pipeline run and the Prefect UI."""

DECLARATIONS = ("nextdetail", "nextdetail.pipeline", "nextdetail.stages")
"""Package `__init__`s outside computation, but not the modules under them: the root package (its version is
recorded in lineage), the machinery's index, the stage registry — and every stage package's `__init__`
(`stages/<name>/__init__.py`): its declaration (settings enter as values) and its result type (how it is shown)."""


def outside_computation(name: str) -> bool:
    """Whether module `name` is outside every stage's code: under `OUTSIDE_COMPUTATION`, one of `DECLARATIONS`,
    or a stage's declaration (`nextdetail.stages.<name>`). Its flow (`nextdetail.stages.<name>.flow`) and what
    that imports is the stage's code."""
    if name in DECLARATIONS or (name.startswith("nextdetail.stages.") and name.count(".") == 2):
        return True
    return any(name == o or name.startswith(o + ".") for o in OUTSIDE_COMPUTATION)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


_CPP_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def normalized_source(path: Path) -> bytes:
    """What of a code file computes: a Python module's syntax tree without docstrings (comments and layout never
    reach it), a C++ file without comments and with whitespace runs as one space, other files' bytes."""
    if path.suffix == ".py":
        tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        return ast.dump(tree, include_attributes=False).encode()
    if path.suffix in (".cpp", ".cc", ".h", ".cu"):
        return re.sub(r"\s+", " ", _CPP_COMMENT.sub(" ", path.read_text(encoding="utf-8"))).strip().encode()
    return path.read_bytes()


@cache
def _file_sha256(path: Path, rule: str = "computation") -> str:
    """sha256 of what `path` computes (`rule` "computation"), or of its bytes ("bytes": the rule before issue 34,
    kept as the churn benchmark's baseline)."""
    return hashlib.sha256(normalized_source(path) if rule == "computation" else path.read_bytes()).hexdigest()


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
def _read_module(name: str, package_dir: Path = PACKAGE_DIR) -> tuple[tuple[str, ...], tuple[Path, ...]]:
    """(the nextdetail modules `name` imports, the data files it names) — from its source, not by importing it."""
    path = module_file(name, package_dir)
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
    modules = {m for m in imported if module_file(m, package_dir) is not None}
    return tuple(sorted(modules)), tuple(sorted(data))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _closure(entries: tuple[str, ...], package_dir: Path = PACKAGE_DIR, rule: str = "computation") -> dict[str, str]:
    seen: set[str] = set()
    files: dict[str, str] = {}
    todo = [p for e in entries for p in _with_parents(e)]
    while todo:
        name = todo.pop()
        if name in seen or (rule == "computation" and outside_computation(name)):
            continue
        seen.add(name)
        path = module_file(name, package_dir)
        if path is None:
            raise ModuleNotFoundError(f"code fingerprint: no nextdetail module {name!r}")
        files[_relpath(path, package_dir)] = _file_sha256(path, rule)
        modules, data = _read_module(name, package_dir)
        for d in data:
            files[_relpath(d, package_dir)] = _file_sha256(d, rule)
        todo.extend(p for m in modules for p in _with_parents(m) if p not in seen)
    return dict(sorted(files.items()))


def code_fingerprint(entries: Iterable[str], package_dir: Path = PACKAGE_DIR,
                     rule: str = "computation") -> dict[str, str]:
    """Every file the entry modules' computation consists of (relative path → sha256 of its normalized source):
    the nextdetail modules they import, directly or not, their parent packages, and the non-Python files they
    load — but what lies outside computation (`OUTSIDE_COMPUTATION`). Read once per process. `rule="bytes"`:
    every imported file by its bytes (the rule before issue 34)."""
    return dict(_closure(tuple(sorted(set(entries))), package_dir, rule))


def modules_of(fingerprint: dict[str, str]) -> set[str]:
    """The module names of a fingerprint's Python files (for comparing with what a process imported)."""
    out = set()
    for rel in fingerprint:
        if rel.endswith(".py"):
            name = rel.removesuffix(".py").replace("/", ".")
            out.add(name.removesuffix(".__init__"))
    return out


def shared_identity(module: str, part: Any) -> tuple[str, dict[str, str]]:
    """(the identity, the code fingerprint) of an artifact that serves many stage identities and is
    content-addressed on its own (a team bucket holds each once: the reference statistics, the tokenizer's
    metrics), written by `module` (its `__name__`) with part key `part`: the module's code is part of it."""
    code = code_fingerprint((module,))
    name = module.rsplit(".", 1)[-1]
    return stable_hash({"shared": name, "part": json.loads(canonical_json(part)), "code": code}), code
