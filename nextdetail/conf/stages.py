"""The pipeline's stages as data: what each one depends on (like a dvc.yaml, in one table).

A stage's identity is a content hash of exactly
- its **settings slice** (the config keys that change what it computes; how it runs — batch sizes, devices,
  thread counts, where caches live — is left out),
- the **identities of its upstream artifacts** (what the upstream stage's completion marker names),
- its **inputs** from outside the pipeline (the source dataset's listing; a reference folder; weights files),
- the **code it runs**: every file of the closure of `nextdetail` modules its entry modules import (its flow,
  and the modules of the chosen model family), with the non-Python files they load (conf/code.py).

This table is the only place a stage's dependencies are written. `stage_key` computes the identity;
`nextdetail status`, `nextdetail run`, the flows and tasks (every artifact a stage writes takes its identity
from the stage's key: `StageKey.identity`, `.artifact(part)`, `.part(part)`), lineage and the `--ckpt` paths
all use it, so what status calls up to date is what run skips. This module imports neither torch nor Prefect:
status answers in well under a second.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nextdetail.conf.code import code_fingerprint
from nextdetail.conf.schema import STAGES, PipelineConfig
from nextdetail.errors import UserError
from nextdetail.models import FAMILIES
from nextdetail.storage.hashing import canonical_json, stable_hash


@dataclass(frozen=True)
class StageSpec:
    name: str  # a verb: what the stage does
    directory: str  # a noun: what it writes, `<storage.root>/<directory>/…` (token caches: under tokens.cache)
    upstream: tuple[str, ...]
    settings: Callable[[PipelineConfig], dict[str, Any]]
    inputs: Callable[[PipelineConfig], dict[str, Any]] | None = None  # fingerprints of inputs from outside
    family: str | None = None  # "model" | "sampler": the chosen model family's module the stage also runs
    needed: Callable[[PipelineConfig], bool] | None = None  # False: the config uses nothing it makes (None: always)
    adopts: Callable[[PipelineConfig], str | None] | None = None  # a released file that stands in for the work

    def is_needed(self, cfg: PipelineConfig) -> bool:
        return self.needed is None or self.needed(cfg)

    def upstream_of(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The upstream stages this config reads: the declared ones but those it does not need (at order 0 the
        tokenizer reads images alone: no decomposition); none when it adopts a released file (`adopts`)."""
        if self.adopts is not None and self.adopts(cfg):
            return ()
        return tuple(u for u in self.upstream if SPECS[u].is_needed(cfg))

    @property
    def flow(self) -> str:
        """The module of the stage's flow (`run_<name>` runs it)."""
        return f"nextdetail.flows.{self.name}"

    def entries(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """The modules the stage starts from: its flow, and the model family's part it runs (`ar.model`)."""
        return (self.flow, getattr(FAMILIES[cfg.ar.model], self.family)) if self.family else (self.flow,)

    def code(self, cfg: PipelineConfig) -> dict[str, str]:
        """Every file the stage's code consists of → its sha256 (derived from the imports, conf/code.py)."""
        return code_fingerprint(self.entries(cfg))


def _shard_settings(cfg: PipelineConfig) -> dict[str, Any]:
    d = cfg.data
    data = {"source": d.source, "layout": d.layout, "splits": d.splits}
    if d.source == "embedded":
        data["embedded"] = d.embedded.model_dump()
    return {"data": data, "shard": cfg.shard.model_dump()}


def _source_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The source dataset: the embedded build's identity (a function of its settings and code), else the
    listing — every file's (path, size, mtime/ETag), or its sha256 with shard.fingerprint=content."""
    if cfg.data.source == "embedded":
        from nextdetail.storage.embedded import embedded_identity

        return {"source": {"embedded": embedded_identity(cfg.data.embedded)}}
    from nextdetail.storage.fs import Store
    from nextdetail.storage.sources import list_source

    listing = list_source(cfg.data.source, cfg.data.splits, cfg.data.layout, cfg.storage.options)
    files = [(it.relpath, it.wnid, it.size, it.stamp) for items in listing.items.values() for it in items]
    if cfg.shard.fingerprint == "content":
        store = Store(listing.url, cfg.storage.options, follow_links=True)
        files = [(rel, wnid, store.sha256(rel)) for rel, wnid, _, _ in files]
    return {"source": {"url": listing.url, "classes": listing.classes, "files": stable_hash(files),
                       "count": len(files)}}


def _path_fingerprint(url: str, options: dict[str, Any]) -> dict[str, Any]:
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


def _file_sha256(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """A weights file by its content: {url, sha256}, sha256 None when it is not there."""
    from nextdetail.storage.fs import Store

    folder, name = Store.of_file(url, options)
    return {"url": url, "sha256": folder.sha256(name)}


def _tokenizer_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Training: every `tokenizer.*` setting that changes the weights. Adopting a released file: the declared
    architecture alone (the file's sha256 is its input)."""
    if cfg.tokenizer.pretrained:
        from nextdetail.models.configs import TokenizerSpec

        return {"tokenizer": {"pretrained": True, "architecture": TokenizerSpec.from_config(cfg).to_dict()}}
    return {"tokenizer": cfg.tokenizer.identity_settings()}


def _tokenizer_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    t = cfg.tokenizer
    if t.pretrained:
        return {"pretrained": _file_sha256(t.pretrained, cfg.storage.options if "://" in t.pretrained else {})}
    return {}


def _ar_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Training: every `ar.*` setting that changes the weights. Adopting VAR's weights: the architecture alone."""
    a = cfg.ar
    if a.pretrained:
        return {"ar": {"pretrained": True, **{k: getattr(a, k) for k in sorted(a.ARCHITECTURE_FIELDS)}}}
    return {"ar": a.identity_settings()}


def _ar_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    a = cfg.ar
    return {"pretrained": _file_sha256(a.pretrained, cfg.storage.options if "://" in a.pretrained else {})} \
        if a.pretrained else {}


def _eval_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    e, out = cfg.eval, {}
    if "/" in e.reference or e.reference.endswith(".npz"):  # a folder or .npz outside the pipeline
        out["reference"] = _path_fingerprint(e.reference, cfg.storage.options if "://" in e.reference else {})
    if e.extractor == "inception-v3-compat" and e.inception_weights:
        out["inception_weights"] = _path_fingerprint(e.inception_weights, {})
    return out


def _eval_settings(cfg: PipelineConfig) -> dict[str, Any]:
    s = cfg.sample
    return {"eval": cfg.eval.identity_settings(), "ar.model": cfg.ar.model,
            "sample": {k: getattr(s, k) for k in s.evaluation_fields(cfg.ar.model)}}


SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("shard", "shards", (), _shard_settings, _source_inputs),
    StageSpec("decompose", "factors", ("shard",), lambda c: {"decompose": c.decompose.identity_settings()},
              needed=lambda c: c.tokenizer_order > 0),
    StageSpec("train_tokenizer", "tokenizer", ("shard", "decompose"), _tokenizer_settings, _tokenizer_inputs,
              adopts=lambda c: c.tokenizer.pretrained),
    StageSpec("tokenize", "tokens", ("shard", "decompose", "train_tokenizer"), lambda c: {"tokens": c.tokens.identity_settings()}),
    StageSpec("train_ar", "transformer", ("shard", "train_tokenizer", "tokenize"), _ar_settings, _ar_inputs,
              family="model"),
    StageSpec("sample", "samples", ("shard", "tokenize", "train_ar"),
              lambda c: {"ar.model": c.ar.model, "sample": c.sample.identity_settings(c.ar.model)}, family="sampler"),
    StageSpec("evaluate", "metrics", ("shard", "train_tokenizer", "tokenize", "train_ar"), _eval_settings, _eval_inputs,
              family="sampler"),
)}
assert tuple(SPECS) == STAGES


def downstream(stage: str) -> list[str]:
    """Every stage that depends on `stage`, directly or not, in pipeline order."""
    out: set[str] = {stage}
    for name in STAGES:
        if out.intersection(SPECS[name].upstream):
            out.add(name)
    return [s for s in STAGES if s in out and s != stage]


def upstream_closure(stage: str) -> list[str]:
    """Every stage `stage` depends on, directly or not, in pipeline order."""
    need, todo = set(), list(SPECS[stage].upstream)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(SPECS[s].upstream)
    return [s for s in STAGES if s in need]


def select_stages(until: str | None = None, only: str | None = None, force: Iterable[str] = ()) -> list[str]:
    """The stages a run visits: up to `until`, or `only` with what it depends on (read, not run). Every
    `force`d stage must be one this run builds: one line otherwise, before anything starts."""
    for flag, stage in (("--until", until), ("--only", only), *(("--force", f) for f in force)):
        if stage is not None and stage not in STAGES:
            raise UserError(f"{flag} {stage!r}: no such stage (stages: {', '.join(STAGES)})")
    if only is not None and until is not None:
        raise UserError(f"--only {only} and --until {until}: give one (--only runs one stage, --until a prefix)")
    stages = [*upstream_closure(only), only] if only is not None else list(
        STAGES[: STAGES.index(until) + 1] if until else STAGES)
    for f in force:
        if only is not None and f != only:
            raise UserError(f"--force {f} with --only {only}: --only builds {only} alone; force {f} in a run "
                            f"without --only (e.g. --until {only} --force {f})")
        if f not in stages:
            raise UserError(f"--force {f}: this run stops before {f} (--until {until}); drop --force {f} or "
                            "run further")
    return stages


@dataclass(frozen=True)
class StageKey:
    """Everything a stage's identity hashes, and the identities of what the stage writes."""

    stage: str
    settings: dict[str, Any]
    upstream: dict[str, str]  # upstream stage → its output identity (a training stage's: identity:weights sha256)
    inputs: dict[str, Any]
    code: dict[str, str]  # every file of the stage's code → sha256
    directory: str = field(default="", compare=False)  # where it writes (StageSpec.directory); not hashed

    def output(self, cfg: PipelineConfig, *parts: str) -> Any:
        """The `Store` the stage writes its artifacts under: `<storage.root>/<its directory>/<parts…>` (a method of
        the key the flows are handed, so they need not import this module: it stays out of their code)."""
        from nextdetail.storage.fs import Store

        return Store(cfg.storage.root, cfg.storage.options).sub(self.directory, *parts)

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
    spec = SPECS[stage]
    used = spec.upstream_of(cfg)
    missing = [u for u in used if u not in upstream]
    if missing:
        raise ValueError(f"{stage}: upstream identities missing for {missing}")
    if inputs is None:
        inputs = spec.inputs(cfg) if spec.inputs else {}
    return StageKey(stage, _as_json(spec.settings(cfg)), {u: upstream[u] for u in used}, _as_json(inputs),
                    spec.code(cfg), spec.directory)


def key_of(cfg: PipelineConfig, stage: str, results: dict[str, Any]) -> StageKey:
    """The key of `stage` given its upstream stages' results (anything with `.identity` and `.summary`)."""
    return stage_key(cfg, stage, {u: output_identity(u, results[u].identity, results[u].summary)
                                  for u in SPECS[stage].upstream_of(cfg)})


def files_key(cfg: PipelineConfig, stage: str, paths: list[str]) -> StageKey:
    """The key of `stage` run on files from outside the pipeline (`nextdetail eval --ckpt`): the stage's settings,
    inputs and code as declared (every model family's: a checkpoint says its own model), with the files' sha256
    where the upstream artifacts would be (None: the file is not there)."""
    from nextdetail.storage.fs import Store

    spec = SPECS[stage]
    files = {p: Store(p.rsplit("/", 1)[0], cfg.storage.options).sha256(p.rsplit("/", 1)[1]) for p in paths}
    entries = {e for model in FAMILIES for e in spec.entries(cfg.model_copy(update={"ar": cfg.ar.model_copy(
        update={"model": model})}))}
    return StageKey(stage, _as_json(spec.settings(cfg)), {"files": files},
                    _as_json(spec.inputs(cfg) if spec.inputs else {}), code_fingerprint(entries), spec.directory)


CONTENT_SHA256 = {"shard": "content_sha256", "decompose": "content_sha256", "train_tokenizer": "tokenizer_sha256",
                  "tokenize": "content_sha256", "train_ar": "weights_sha256"}
"""The summary key holding the sha256 of what a stage wrote that downstream reads: the shard tars, every factor
chunk, tokenizer.pt's bytes (spec + tensors only), every token array; for the transformer its tensors
(transformer.pt also records where its tokenizer lives, which differs by storage root and must not change what
downstream keys on)."""


def output_identity(stage: str, identity: str, summary: dict[str, Any]) -> str:
    """What downstream identities see of an artifact: the content hash of its bytes where the stage records one
    (`CONTENT_SHA256`) — early cutoff, as DVC, Bazel and Shake: an upstream rebuilt by changed code that writes the
    same bytes changes nothing after it, and bytes that differ under one identity (a retraining on another
    device, a re-shard) change everything after it — else its identity (sample, evaluate: nothing reads them)."""
    sha = summary.get(CONTENT_SHA256.get(stage, ""))
    return f"{stage}:{sha}" if sha else identity
