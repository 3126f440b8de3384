"""Content hashes: the identities of settings, inputs, code and artifacts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def bytes_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@cache
def module_hash(name: str) -> str:
    """sha256 of one module's source text (read once per process: a run hashes the code it loaded)."""
    spec = importlib.util.find_spec(name)  # imports the parent packages only, never the module itself
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"code_version: no module {name!r}")
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@cache
def code_version(*modules: str) -> str:
    """Hash of the source text of the named modules: the code version a stage's cache key depends on.

    Only the modules that implement a stage are listed, so editing unrelated code invalidates nothing.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + module_hash(name).encode() + b"\0")
    return digest.hexdigest()
