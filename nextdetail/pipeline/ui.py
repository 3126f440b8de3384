"""What a pipeline run shows in the Prefect UI: run names and tags, small parameters, one node per stage, and
keyed artifacts with the pictures inside them (`prefect.artifacts`).

- **Runs**: a pipeline run is named `<preset> · <models> · <commit>` and tagged `preset:…`, `model:…`,
  `commit:…` and `set:<key>` for each setting that differs from the preset (`run_tags`); so are its stages' runs,
  not their task runs (a tagged task run costs a concurrency-slot call to the API: `runtime.untagged_threads`).
  Its parameters are the preset, the models, the stages and those settings — credentials masked
  (`pipeline_parameters`), never the resolved config. A stage's run is named `<stage> (<identity>)` and its
  parameters are its identity, its upstream outputs' identities and the `nextdetail lineage` command that prints
  the rest (`stage_parameters`); a stage the run reused is a run too, named `<stage> (reused <identity>)`, that
  did no work (`show_reused`).
- **Artifacts** (a key's latest version is what the Artifacts page shows; each flow run keeps its own):
  `nextdetail-<model>-<stage>` (markdown) after each stage — what it made, its pictures, where its files are;
  `nextdetail-<model>-report` (markdown) and `nextdetail-<model>-metrics` (table) after evaluate;
  `nextdetail-compare` (table) at the end — every evaluation under the root; `nextdetail-status` (table) at the
  end — what this run did to each stage (ran / reused / forced / not needed) and why.
- **Pictures** are inlined as `data:` images, downscaled to `PICTURE_SIDE` (both the V1 and the V2 UI render
  them; relative and `file://` links render in neither, and a teammate's browser could not open them anyway).
  No presigned links: one would carry the access key id into the Prefect database and be a bearer token there.
Publishing is best effort: a failure is logged as a warning and never fails the run.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable
from typing import Any

from nextdetail.conf.schema import PipelineConfig
from nextdetail.pipeline.result import StageResult
from nextdetail.storage.fs import Store

PICTURE = re.compile(r"(\S+\.png)\b")
MARKDOWN_PICTURE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
PICTURE_SIDE = 1024  # longest side of an inlined picture, pixels
PICTURE_READ_LIMIT = 64 << 20  # a picture file larger than this is linked, not read
DESCRIPTION_CHARS = 200
NUMBER_COLUMNS = ("fid", "isc_mean", "kid_mean", "precision", "recall", "rfid")
NUMBER_LABELS = {"fid": "FID", "isc_mean": "IS", "isc_std": "IS ±", "kid_mean": "KID", "kid_std": "KID ±",
                 "precision": "precision", "recall": "recall", "rfid": "rFID", "rec_psnr_db": "PSNR dB"}


def key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("nextdetail", *parts)).lower()).strip("-")


def _best_effort(publish: Callable[..., Any]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from prefect import get_run_logger

        try:
            publish(*args, **kwargs)
        except Exception as err:  # the UI is a view: a run never fails for it
            get_run_logger().warning("Prefect UI: could not publish %s: %s", publish.__name__, str(err)[:200])

    wrapper.__name__ = publish.__name__
    wrapper.__doc__ = publish.__doc__
    return wrapper


# ── runs: names, tags, parameters ─────────────────────────────────────────────────────────────────────────────


def commit() -> str:
    """The short git commit of the nextdetail source ("+" when it has uncommitted changes), or "nogit"."""
    from nextdetail.storage.lineage import environment

    git = environment()["git"]
    return (git["commit"][:7] + ("+" if git["dirty"] else "")) if git["commit"] else "nogit"


def overrides_of(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings in which `cfg` differs from its preset (`section.key` → value; credentials masked): what the
    user set on the command line or in a file."""
    from nextdetail.cache.status import flatten
    from nextdetail.conf import available_presets, load_config

    base = load_config(cfg.preset) if cfg.preset in available_presets() else PipelineConfig()
    mine, theirs = flatten(cfg.model_dump(mode="json")), flatten(base.model_dump(mode="json"))
    out = {}
    for k in sorted(set(mine) | set(theirs)):
        if k != "preset" and mine.get(k) != theirs.get(k):
            out[k] = "**********" if "options" in k or "credentials" in k else mine.get(k)
    return out


def run_tags(branches: dict[str, PipelineConfig]) -> list[str]:
    first = next(iter(branches.values()))
    keys = sorted({k for cfg in branches.values() for k in overrides_of(cfg)})
    return [f"preset:{first.preset}", *(f"model:{m}" for m in branches), f"commit:{commit()}",
            *(f"set:{k}" for k in keys)]


def run_name(branches: dict[str, PipelineConfig]) -> str:
    first = next(iter(branches.values()))
    return f"{first.preset} · {'+'.join(branches)} · {commit()}"


def pipeline_parameters(branches: dict[str, PipelineConfig], stages: list[str], force: list[str],
                        only: str | None) -> dict[str, Any]:
    """What a pipeline run's Parameters tab shows: small, and never a credential."""
    first = next(iter(branches.values()))
    settings = {m: overrides_of(cfg) for m, cfg in branches.items()}
    shared = {k: v for k, v in next(iter(settings.values())).items() if all(s.get(k) == v for s in settings.values())}
    return {"preset": first.preset, "models": list(branches), "stages": stages, "force": force, "only": only,
            "settings": shared, **({"settings_by_model": {m: {k: v for k, v in s.items() if k not in shared}
                                                         for m, s in settings.items()}} if len(branches) > 1 else {}),
            "storage_root": first.storage.root}


def named_pipeline(flow: Any, branches: dict[str, PipelineConfig], stages: list[str], force: list[str],
                   only: str | None) -> Any:
    """`flow` (the pipeline flow) as this run shows it: its name, and its parameters as `pipeline_parameters`."""
    named = flow.with_options(flow_run_name=run_name(branches))
    shown = pipeline_parameters(branches, stages, force, only)
    named.serialize_parameters = lambda parameters: shown
    return named


def stage_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """What a stage run's Parameters tab shows: its identity, its upstream outputs, where the rest is."""
    cfg, stage_key = parameters.get("cfg"), parameters.get("key")
    identity = getattr(stage_key, "identity", "") or ""
    upstream = {name: value.identity[:12] for name, value in parameters.items() if isinstance(value, StageResult)}
    return {"model": getattr(getattr(cfg, "ar", None), "model", None), "identity": identity[:12],
            "upstream_outputs": upstream, "everything_else": f"nextdetail lineage {identity[:12]}"}


def present_stage_flow(flow: Any, stage: str) -> Any:
    """A stage's flow as its runs show in the UI: named `<stage> (<identity>)`, with `stage_parameters`.
    Set on the flow object, not in its module, so that how a run looks never enters a stage's code identity."""
    if getattr(flow, "_nextdetail_presented", False):
        return flow
    flow.flow_run_name = f"{stage} ({{key.identity:.8}})"
    flow.serialize_parameters = stage_parameters
    copy = flow.with_options  # the Dask stages run a copy with their task runner: it looks the same
    flow.with_options = lambda **options: present_stage_flow(copy(**options), stage)
    flow._nextdetail_presented = True
    return flow


@_best_effort
def show_reused(stage: str, identity: str, url: str) -> None:
    """A completed run that did no work, in the run's graph where the stage would be."""
    from prefect import flow

    @flow(name=stage, flow_run_name=f"{stage} (reused {identity[:8]})", persist_result=False, log_prints=False,
          validate_parameters=False)
    def reused(identity: str, output: str) -> str:
        return output

    reused(identity[:12], url)


# ── pictures ──────────────────────────────────────────────────────────────────────────────────────────────────


def _split(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    return parent, name


def inline_picture(store: Store, name: str, alt: str) -> str:
    """Markdown for the picture `name` under `store`: the image itself, a downscaled PNG as a `data:` URL."""
    from PIL import Image

    size = store.size(name)
    if size is None or size > PICTURE_READ_LIMIT:
        raise ValueError(f"{name}: {'missing' if size is None else f'{size} bytes, over {PICTURE_READ_LIMIT}'}")
    data = store.read_bytes(name)
    image = Image.open(io.BytesIO(data))
    image.load()
    if max(image.size) > PICTURE_SIDE:
        scale = PICTURE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    # No presigned link to the full-size file: it would carry the access key id and be a bearer token for days,
    # stored in the Prefect database — credentials stay in the process. The file's URL is in the table below.
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def _store_of(roots: Any, url: str) -> tuple[Store, str]:
    parent, name = _split(url)
    return roots.store(parent), name


def _local_roots(roots: Any) -> list[tuple[str, str]]:
    """(path, label) of each local root: this machine's paths, which mean nothing on a teammate's."""
    return [(s.url().rstrip("/"), "<storage.root>" if i == 0 else "<cache>")
            for i, s in enumerate(roots.stores) if s.is_local]


def shown_path(roots: Any, url: str) -> str:
    """`url` as a teammate can read it: under a local root, relative to it (`<storage.root>/…`)."""
    for root, label in _local_roots(roots):
        if url == root or url.startswith(root + "/"):
            return label + url[len(root):]
    return url


# ── artifacts ─────────────────────────────────────────────────────────────────────────────────────────────────


def describe(stage: str, text: str) -> str:
    """An artifact's description: without the stage's name in front, cut at a word boundary."""
    text = text.removeprefix(f"{stage}: ").strip()
    if len(text) <= DESCRIPTION_CHARS:
        return text
    return text[:DESCRIPTION_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + " …"


@_best_effort
def publish_stage(cfg: PipelineConfig, model: str, stage: str, result: StageResult, work: str) -> None:
    """One stage's markdown: what it made, what this run did, its pictures, where its files are."""
    from prefect.artifacts import create_markdown_artifact

    from nextdetail.storage.roots import Roots

    roots = Roots.of(cfg)
    line = describe(stage, result.line())
    lines = [f"## {stage} · {model} · {work}", "", line, "", f"identity `{result.identity[:16]}` · {work}"
             + (f" in {result.seconds:.1f} s" if result.seconds else ""), ""]
    pictures, files = [], []
    for what, where in result.outputs():
        for url in PICTURE.findall(where):
            pictures.append((what, url))
        files.append((what, " ".join(shown_path(roots, w) for w in where.split(" "))))
    for what, url in pictures:
        title = url[len(result.url.rstrip("/")) + 1:] if url.startswith(result.url.rstrip("/") + "/") else _split(url)[1]
        try:
            store, name = _store_of(roots, url)
            lines += [f"### {title}", "", inline_picture(store, name, f"{what}: {title}"), ""]
        except Exception as err:  # a missing picture is a line, not a failed artifact
            lines += [f"### {_split(url)[1]}", "", f"(not shown: {type(err).__name__}: {str(err)[:120]})", ""]
    lines += ["| output | where |", "|---|---|", *(f"| {what} | {where} |" for what, where in files)]
    create_markdown_artifact("\n".join(lines), key=key(model, stage), description=line and describe(stage, line))


def report_markdown(store: Store, roots: Any, report: str = "report.md") -> str:
    """A markdown report (evaluate's report.md) with its pictures inlined and the root's paths shown relative."""
    text = store.read_bytes(report).decode()

    def picture(m: re.Match) -> str:
        alt, ref = m.group(1), m.group(2)
        if "://" in ref or ref.startswith("/"):
            return m.group(0)
        try:
            return inline_picture(store, ref, alt)
        except Exception as err:
            return f"({alt}: not shown: {type(err).__name__})"

    text = MARKDOWN_PICTURE.sub(picture, text)
    for root, label in _local_roots(roots):
        text = text.replace(root, label)
    return text


def short_label(label: Any) -> Any:
    """`…/checkpoints/step-00000004.pt` → `step-00000004`: a checkpoint's name without where it lies."""
    if not isinstance(label, str):
        return label
    return label.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pt")


def metrics_rows(metrics: dict[str, Any], roots: Any) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint: the numbers first, short labels, then the details."""
    rows = []
    for row in metrics.get("checkpoints", []):
        flat = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
        label = flat.pop("label", None)
        out: dict[str, Any] = {"checkpoint": short_label(label), "step": flat.pop("step", None)}
        for k in (*NUMBER_COLUMNS, "isc_std", "kid_std", "rec_psnr_db"):
            if k in flat:
                value = flat.pop(k)
                out[NUMBER_LABELS[k]] = round(value, 4) if isinstance(value, float) else value
        for k, v in flat.items():
            out[k] = shown_path(roots, v) if isinstance(v, str) and "/" in v else v
        if label != out["checkpoint"]:
            out["label"] = shown_path(roots, label) if isinstance(label, str) else label
        rows.append(out)
    return rows


@_best_effort
def publish_report(cfg: PipelineConfig, model: str, stage: str, result: StageResult) -> None:
    """A stage's report (`StageResult.REPORT`, evaluate's: markdown with its pictures inlined) and its numbers per
    checkpoint (a table); nothing for a stage without one."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from nextdetail.storage.roots import Roots

    if result.REPORT is None:
        return
    report, numbers = result.REPORT
    roots = Roots.of(cfg)
    store = roots.store(result.url)
    create_markdown_artifact(report_markdown(store, roots, report), key=key(model, "report"),
                             description=describe(stage, result.line()))
    rows = metrics_rows(json.loads(store.read_bytes(numbers)), roots)
    create_table_artifact(rows, key=key(model, "metrics"),
                          description=f"{len(rows)} checkpoint{'s' * (len(rows) != 1)}: FID, IS, KID, precision, recall")


def comparison_rows(rows: list[dict[str, Any]], cols: list[str]) -> list[dict[str, Any]]:
    """`nextdetail compare`'s rows for a table: the numbers first, ISO dates, short labels."""
    out = []
    for r in rows:
        row = {"model": r.get("model"), "evaluate": r.get("evaluate"), "checkpoint": short_label(r.get("checkpoint"))}
        row.update({NUMBER_LABELS.get(k, k): (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
                    for k in NUMBER_COLUMNS})
        for c in cols:
            if c in row or c in NUMBER_COLUMNS:
                continue
            v = r.get(c)
            if c == "finished" and isinstance(v, (int, float)):
                v = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v))
            row[c] = round(v, 4) if isinstance(v, float) else v
        out.append(row)
    return out


@_best_effort
def publish_comparison(cfg: PipelineConfig) -> None:
    """Every evaluation under the root, the settings that differ (as `nextdetail compare --only-changed`)."""
    from prefect.artifacts import create_table_artifact

    from nextdetail.cache.compare import columns, comparison

    rows = comparison(cfg)
    if rows:
        n = len(rows)
        create_table_artifact(comparison_rows(rows, columns(rows, only_changed=True)), key=key("compare"),
                              description=f"{n} evaluation{'s' * (n != 1)} under {cfg.storage.root}, oldest "
                                          "first; the settings that differ between them")


def status_before(branches: dict[str, PipelineConfig], stages: list[str]) -> dict[tuple[str, str], str]:
    """(model, stage) → why the stage was going to run, as `nextdetail status` says it (empty: up to date)."""
    from nextdetail.cache.status import branch_status

    try:
        return {(model, st.stage): (st.reasons[0][:200] + (f" (+{len(st.reasons) - 1} more)" if len(st.reasons) > 1
                                                             else "")) if st.reasons else ""
                for model, by_stage in branch_status(branches, tuple(stages)).items() for st in by_stage.values()}
    except Exception:  # the table loses its "why" column, the run goes on
        return {}


@_best_effort
def publish_run(branches: dict[str, PipelineConfig], results: dict[str, Any], force: list[str],
                why: dict[tuple[str, str], str]) -> None:
    """The end of a run: what it did to every stage of every branch (ran / reused / forced / not needed)."""
    from prefect.artifacts import create_table_artifact

    from nextdetail.pipeline.result import NOT_NEEDED, UP_TO_DATE
    from nextdetail.storage.roots import Roots

    roots = Roots.of(next(iter(branches.values())))
    rows = []
    for model, res in results.items():
        for stage, work in res.work.items():
            result = res.get(stage)
            did = ("forced" if stage in force and work != UP_TO_DATE else "reused" if work == UP_TO_DATE
                   else NOT_NEEDED if work == NOT_NEEDED else "shared" if stage in res.shared else "ran")
            rows.append({"stage": stage, "model": model, "did": did,
                         "identity": (res.identities.get(stage) or "")[:12],
                         "seconds": round(result.seconds, 1) if result is not None else None,
                         "why": "" if did in ("reused", NOT_NEEDED) else why.get((model, stage), ""),
                         "output": shown_path(roots, result.url) if result is not None else ""})
    ran = sum(r["did"] in ("ran", "forced") for r in rows)
    create_table_artifact(rows, key=key("status"), description=f"this run: {ran} stage run{'s' * (ran != 1)}, "
                          f"{sum(r['did'] == 'reused' for r in rows)} reused")
