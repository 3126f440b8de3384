"""A stage's declaration and identity — what every stage module (`stages/<name>/__init__.py`) declares once.

A stage's identity is a content hash of exactly
- its **settings slice** (the config keys that change what it computes; how it runs — batch sizes, devices,
  thread counts, where caches live — is left out),
- the **output identities of its upstream stages** (what each upstream's completion marker names; the content hash
  of its bytes where it records one: `Stage.content_sha256`),
- its **inputs** from outside the pipeline (the source dataset's listing; a reference folder; weights files),
- the **code it runs**: its package's flow and what that imports (`pipeline/code.py`), with the chosen model
  family's module where it declares one.

`stage_key` computes the identity; `nextdetail status`, `nextdetail run`, the flows and tasks (every artifact a
stage writes takes its identity from the stage's key: `StageKey.identity`, `.artifact(part)`, `.part(part)`),
lineage and the `--ckpt` paths all use it, so what status calls up to date is what run skips. This module imports
neither torch nor Prefect: status answers in well under a second.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.models import FAMILIES
from nextdetail.pipeline.code import code_fingerprint
from nextdetail.pipeline.result import StageResult
from nextdetail.pipeline.runtime import WorkerAsk
from nextdetail.storage.hashing import canonical_json, stable_hash


@dataclass(frozen=True)
class Stage:
    """One stage, as its module declares it: what it reads (upstream stages by name), where it writes, which
    settings and outside inputs its identity hashes, what it hands on (`result`), and how it differs from the
    others — nothing outside the stage tests a stage by its name.

    Its work is its package's `flow` module: `run(cfg, key, *, <upstream stage>=<its result>…, progress)`."""

    name: str  # a verb: what the stage does (its package's name)
    directory: str  # a noun: what it writes, `<its storage root>/<directory>/…`
    upstream: tuple[str, ...]  # the stages whose results its flow reads, by name
    settings: Callable[[PipelineConfig], dict[str, Any]]  # the settings slice its identity hashes
    result: type[StageResult]  # what it hands on, and how the CLI and the UI show it
    inputs: Callable[[PipelineConfig], dict[str, Any]] | None = None  # fingerprints of inputs from outside
    family: str | None = None  # "model" | "sampler": the chosen model family's module the stage also runs
    needed: Callable[[PipelineConfig], bool] | None = None  # False: the config uses nothing it makes (None: always)
    adopts: Callable[[PipelineConfig], str | None] | None = None  # a released file that stands in for the work
    dask: bool | Callable[[PipelineConfig], bool] = False  # its tasks run on the Dask cluster (its flow takes a
    #   `scheduler`); a function: for the configs it says so of (tokenize: when tokens.resources is set)
    resources: Callable[[PipelineConfig], tuple[str, dict[str, float] | None]] | None = None  # (setting, what its
    #   tasks ask the Dask workers for): checked against the cluster before any stage runs
    nodes: Callable[[PipelineConfig], tuple[str, int]] | None = None  # (setting, hosts its one task spans: a
    #   training on several nodes): as many distinct hosts with such workers, checked with `resources`
    content_sha256: str | None = None  # the summary key of the sha256 of what downstream reads (early cutoff)
    storage: Callable[[PipelineConfig], tuple[str, dict[str, Any]]] | None = None  # its root and options
    storage_setting: str = "storage.root"  # the setting that names its root (what a one-line error points at)
    verify: Callable[[PipelineConfig, Any], list[str]] | None = None  # (cfg, artifact Store) → damaged files: run
    #   before every reuse (None: the marker's sizes are the check)
    marker_lists_files: bool = False  # its artifact is what its marker lists (other writers' attempts live beside
    #   it); else every file under its directory
    command_help: str | None = None  # `nextdetail <stage>`'s one line in `nextdetail --help`
    command_description: str | None = None  # … and its `--help`

    def is_needed(self, cfg: PipelineConfig) -> bool:
        return self.needed is None or self.needed(cfg)

    def upstream_of(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The upstream stages this config reads: the declared ones but those it does not need (at order 0 the
        tokenizer reads images alone: no decomposition); none when it adopts a released file (`adopts`)."""
        from nextdetail.stages import REGISTRY

        if self.adopts is not None and self.adopts(cfg):
            return ()
        return tuple(u for u in self.upstream if REGISTRY[u].is_needed(cfg))

    def root(self, cfg: PipelineConfig) -> tuple[str, dict[str, Any]]:
        """(URL, fsspec options) of the root its artifacts live under (`storage`; default `storage.root`)."""
        return self.storage(cfg) if self.storage else (cfg.storage.root, dict(cfg.storage.options))

    @property
    def flow(self) -> str:
        """The module of the stage's flow."""
        return f"nextdetail.stages.{self.name}.flow"

    def entries(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The modules the stage starts from: its flow, and the model family's part it runs (`ar.model`)."""
        return (self.flow, getattr(FAMILIES[cfg.ar.model], self.family)) if self.family else (self.flow,)

    def code(self, cfg: PipelineConfig) -> dict[str, str]:
        """Every file the stage's code consists of → its sha256 (derived from the imports, pipeline/code.py)."""
        return code_fingerprint(self.entries(cfg))

    def run(self, cfg: PipelineConfig, key: StageKey, upstream: Mapping[str, StageResult], progress: bool,
            scheduler: Callable[[], str] | None = None) -> StageResult:
        """The stage's flow on its upstream results, each passed by its stage's name (a stage this config does not
        need as None); the flow module is imported only now (torch comes with it). `scheduler()`: the Dask
        scheduler of a Dask stage (None: a LocalCluster for this call)."""
        from nextdetail.pipeline.ui import present_stage_flow

        module = importlib.import_module(self.flow)
        present_stage_flow(module.stage_flow, self.name)  # its runs' names and parameters in the UI
        used = self.upstream_of(cfg)
        given = {u: upstream[u] if u in used else None for u in self.upstream}
        extra = {"scheduler": scheduler() if scheduler and self.uses_dask(cfg) else None} if self.dask else {}
        return module.run(cfg, key, progress=progress, **given, **extra)

    def uses_dask(self, cfg: PipelineConfig) -> bool:
        """Whether this config runs the stage's tasks on the Dask cluster (`dask`)."""
        return self.dask(cfg) if callable(self.dask) else self.dask

    def asks(self, cfg: PipelineConfig) -> WorkerAsk | None:
        """What its tasks ask the Dask workers for under this config (`resources` on `nodes` hosts), or None."""
        setting, wanted = self.resources(cfg) if self.resources else ("", None)
        nodes_setting, nodes = self.nodes(cfg) if self.nodes else (None, 1)
        if not wanted and nodes == 1:
            return None
        return WorkerAsk(setting, dict(wanted or {}), nodes, nodes_setting)

    def recorded(self, cfg: PipelineConfig, record: dict[str, Any]) -> StageResult:
        """The result a lineage record holds, as a run that skipped the stage hands it on."""
        return self.result(**record["result"]).up_to_date(cfg)


@dataclass(frozen=True)
class StageKey:
    """Everything a stage's identity hashes, and the identities of what the stage writes."""

    stage: str
    settings: dict[str, Any]
    upstream: dict[str, str]  # upstream stage → its output identity (a training stage's: identity:weights sha256)
    inputs: dict[str, Any]
    code: dict[str, str]  # every file of the stage's code → sha256
    directory: str = field(default="", compare=False)  # where it writes (Stage.directory); not hashed

    def output(self, cfg: PipelineConfig, *parts: str) -> Any:
        """The `Store` the stage writes its artifacts under: `<its root>/<its directory>/<parts…>` (`Stage.root`: the
        storage root, or where the stage declares its artifacts live; a method of the key the flows are handed)."""
        from nextdetail.stages import REGISTRY
        from nextdetail.storage.fs import Store

        return Store(*REGISTRY[self.stage].root(cfg)).sub(self.directory, *parts)

    @functools.cached_property
    def identity(self) -> str:
        return stable_hash({"stage": self.stage, "settings": self.settings, "upstream": self.upstream,
                            "inputs": self.inputs, "code": self.code})

    def artifact(self, part: Any) -> str:
        """An artifact inside the stage's output (a token-cache tar, …): the stage identity + its part key."""
        return stable_hash({"stage": self.identity, "part": part})

    @functools.cached_property
    def recipe(self) -> str:
        """What the stage does, whatever it is applied to: its settings and code (no upstream, no inputs)."""
        return stable_hash({"stage": self.stage, "settings": self.settings, "code": self.code})

    def part(self, part: Any) -> str:
        """A part content-addressed by its own inputs (a shard tar by its files, a decomposed tar by that tar's
        identity): the recipe + the part key. Adding k files to a source rewrites only the k parts they land in."""
        return stable_hash({"recipe": self.recipe, "part": part})

    def lineage(self) -> dict[str, Any]:
        return {"stage_identity": self.identity, "settings": self.settings, "upstream": self.upstream,
                "inputs": self.inputs, "code": self.code}


def _as_json(obj: Any) -> Any:
    return json.loads(canonical_json(obj))  # tuples → lists: equal to what records hold


def stage_key(cfg: PipelineConfig, stage: str, upstream: dict[str, str],
              inputs: dict[str, Any] | None = None) -> StageKey:
    """The key of `stage` under `cfg` given its upstream output identities (`inputs`: precomputed)."""
    from nextdetail.stages import REGISTRY

    spec = REGISTRY[stage]
    used = spec.upstream_of(cfg)
    missing = [u for u in used if u not in upstream]
    if missing:
        raise ValueError(f"{stage}: upstream identities missing for {missing}")
    if inputs is None:
        inputs = spec.inputs(cfg) if spec.inputs else {}
    return StageKey(stage, _as_json(spec.settings(cfg)), {u: upstream[u] for u in used}, _as_json(inputs),
                    spec.code(cfg), spec.directory)


def key_of(cfg: PipelineConfig, stage: str, results: Mapping[str, Any]) -> StageKey:
    """The key of `stage` given its upstream stages' results (anything with `.identity` and `.summary`)."""
    from nextdetail.stages import REGISTRY

    return stage_key(cfg, stage, {u: output_identity(u, results[u].identity, results[u].summary)
                                  for u in REGISTRY[stage].upstream_of(cfg)})


def files_key(cfg: PipelineConfig, stage: str, paths: list[str]) -> StageKey:
    """The key of `stage` run on files from outside the pipeline (`nextdetail eval --ckpt`): the stage's settings,
    inputs and code as declared (every model family's: a checkpoint says its own model), with the files' sha256
    where the upstream artifacts would be (None: the file is not there)."""
    from nextdetail.stages import REGISTRY
    from nextdetail.storage.fs import Store

    spec = REGISTRY[stage]
    files = {p: Store(p.rsplit("/", 1)[0], cfg.storage.options).sha256(p.rsplit("/", 1)[1]) for p in paths}
    entries = {e for model in FAMILIES for e in spec.entries(cfg.model_copy(update={"ar": cfg.ar.model_copy(
        update={"model": model})}))}
    return StageKey(stage, _as_json(spec.settings(cfg)), {"files": files},
                    _as_json(spec.inputs(cfg) if spec.inputs else {}), code_fingerprint(entries), spec.directory)


def output_identity(stage: str, identity: str, summary: dict[str, Any]) -> str:
    """What downstream identities see of an artifact: the content hash of its bytes where the stage records one
    (`Stage.content_sha256`) — early cutoff, as DVC, Bazel and Shake: an upstream rebuilt by changed code that writes the
    same bytes changes nothing after it, and bytes that differ under one identity (a retraining on another
    device, a re-shard) change everything after it — else its identity (sample, evaluate: nothing reads them)."""
    from nextdetail.stages import REGISTRY

    declared = REGISTRY[stage].content_sha256 if stage in REGISTRY else None
    sha = summary.get(declared) if declared else None
    return f"{stage}:{sha}" if sha else identity


def path_fingerprint(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """A file's or folder's (path, size, mtime) listing, hashed; `exists: False` when it is not there."""
    import fsspec

    from nextdetail.conf.secrets import reveal

    fs, path = fsspec.core.url_to_fs(url, **reveal(options))
    try:
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        return {"url": url, "exists": False}
    rows = sorted((p, int(i.get("size") or 0), str(i.get("mtime") or i.get("ETag") or i.get("LastModified") or ""))
                  for p, i in found.items())
    return {"url": url, "files": stable_hash(rows), "count": len(rows)}


def file_sha256(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """A weights file by its content: {url, sha256}, sha256 None when it is not there."""
    from nextdetail.storage.fs import Store

    folder, name = Store.of_file(url, options)
    return {"url": url, "sha256": folder.sha256(name)}
