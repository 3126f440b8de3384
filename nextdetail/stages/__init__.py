"""The pipeline's stages: one package per stage, found here — nothing else lists them.

`stages/<name>/__init__.py` declares the stage (`STAGE`: upstream stages by name, output directory, settings slice,
outside inputs, what differs — `pipeline/declaration.py:Stage`) and its result type, with how it is shown;
`flow.py` beside it is its Prefect flow (`run`, and `stage_flow` the flow object), `tasks.py` its tasks. Adding a
stage is adding a package here and its settings section in `conf/schema.py`.

The pipeline order is derived from the declared upstream: a stage comes after everything it reads; of stages ready
together, the one reading fewer stages comes first, then by name (shard → decompose → train_tokenizer → tokenize →
train_ar → sample → evaluate). Importing this package imports every declaration, never a flow: no torch, no
Prefect.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nextdetail.errors import UserError

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import Stage

__all__ = ["REGISTRY", "STAGES", "downstream", "pipeline_order", "select_stages", "upstream_closure"]


@functools.cache
def _registry() -> dict[str, Stage]:
    declared: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
            if stage.name != info.name:
                raise AssertionError(f"stages/{info.name} declares a stage named {stage.name!r}")
            declared[stage.name] = stage
    return pipeline_order(declared)


def pipeline_order(declared: dict[str, Stage]) -> dict[str, Stage]:
    """The stages in pipeline order: each after everything it reads; of those ready together, the one reading
    fewer stages first, then by name. An upstream cycle or an unknown upstream stage is a bug: AssertionError."""
    ordered: dict[str, Stage] = {}
    while len(ordered) < len(declared):
        ready = [s for s in declared.values() if s.name not in ordered and set(s.upstream) <= set(ordered)]
        if not ready:
            raise AssertionError(f"stages {sorted(set(declared) - set(ordered))}: an upstream cycle or an unknown "
                                 "upstream stage")
        first = min(ready, key=lambda s: (len(s.upstream), s.name))
        ordered[first.name] = first
    return ordered


def __getattr__(name: str) -> Any:
    """`REGISTRY` (stage name → its declaration, in pipeline order) and `STAGES` (the names), built on first use:
    the declarations import `pipeline.declaration`, which looks stages up here."""
    if name == "REGISTRY":
        return _registry()
    if name == "STAGES":
        return tuple(_registry())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def downstream(stage: str) -> list[str]:
    """Every stage that depends on `stage`, directly or not, in pipeline order."""
    out: set[str] = {stage}
    for name, declared in _registry().items():
        if out.intersection(declared.upstream):
            out.add(name)
    return [s for s in _registry() if s in out and s != stage]


def upstream_closure(stage: str) -> list[str]:
    """Every stage `stage` depends on, directly or not, in pipeline order."""
    registry = _registry()
    need, todo = set(), list(registry[stage].upstream)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(registry[s].upstream)
    return [s for s in registry if s in need]


def select_stages(until: str | None = None, only: str | None = None, force: Iterable[str] = ()) -> list[str]:
    """The stages a run visits: up to `until`, or `only` with what it depends on (read, not run). Every
    `force`d stage must be one this run builds: one line otherwise, before anything starts."""
    names = tuple(_registry())
    for flag, stage in (("--until", until), ("--only", only), *(("--force", f) for f in force)):
        if stage is not None and stage not in names:
            raise UserError(f"{flag} {stage!r}: no such stage (stages: {', '.join(names)})")
    if only is not None and until is not None:
        raise UserError(f"--only {only} and --until {until}: give one (--only runs one stage, --until a prefix)")
    stages = [*upstream_closure(only), only] if only is not None else list(
        names[: names.index(until) + 1] if until else names)
    for f in force:
        if only is not None and f != only:
            raise UserError(f"--force {f} with --only {only}: --only builds {only} alone; force {f} in a run "
                            f"without --only (e.g. --until {only} --force {f})")
        if f not in stages:
            raise UserError(f"--force {f}: this run stops before {f} (--until {until}); drop --force {f} or "
                            "run further")
    return stages
