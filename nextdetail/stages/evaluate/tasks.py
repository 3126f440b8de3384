"""The `evaluate` stage (and `nextdetail eval`): how good are the samples, measured the standard way.

Data flow (all in this file; reference statistics in `tasks/reference_stats.py`, metric code in
`models/fidelity.py`, extractors in `models/feature_extractor.py`):
  checkpoints of a train_ar run (transformer.pt, best.pt, or every kept step checkpoint)
  ─▶ per checkpoint, per class: `eval.samples_per_class` samples (`sample.tasks.generate_class`: one generator
     per class seeded from `eval.seed`; cfg / top-k / top-p from `sample.*`) ─▶ samples/<label>.tar
     (webdataset png + cls, for any other tool) and features, streamed class by class
  ─▶ FID, IS, KID, precision/recall against the cached reference statistics (torch-fidelity's functions)
  ─▶ metrics.json (every number with its extractor, sample count, reference identity, seeds, checkpoint),
     report.md (what was evaluated, the numbers, the pictures), grid.png + grids/ (per class: a real photo,
     then samples of the last checkpoint), curves.png (metrics vs. training step, ≥ 2 checkpoints)
The tokenizer's reconstruction FID and PSNR (`tokenizer_metrics`) are their own cached task: they depend
on the token cache and the held-out reference only, not on the transformer.

Identity: the stage's (pipeline/declaration.py): `eval.*` but how-it-runs fields, the sampling settings evaluation
uses, the upstream identities (with the weights' sha256), the inputs (a reference folder, Inception weights)
and the code its flow imports.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nextdetail.conf.schema import EvalConfig, SampleConfig
from nextdetail.errors import UserError
from nextdetail.models import torch_threads
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.stages.evaluate.reference_stats import RefHandle
from nextdetail.storage.fs import Store
from nextdetail.storage.labels import checkpoint_name

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey

GRID_PER_CLASS = 8
NOT_COMPARABLE = ("These numbers were computed with the offline extractor `{name}` (random convolutional features "
                  "generated from a fixed seed), not with Inception-v3. They rank models evaluated the same way, but "
                  "they are **not comparable with published FID, IS, KID or precision/recall** — for those, evaluate "
                  "with `-o eval.extractor=inception-v3-compat`.")


@dataclass(frozen=True)
class CheckpointRef:
    label: str  # "last", "best", "step 80", or the file's name
    url: str  # an exported transformer.pt / best.pt: architecture, classes, tokenizer (url + sha256)
    weights_url: str | None = None  # a step checkpoint whose weights replace the exported ones
    step: int | None = None


@dataclass(frozen=True)
class EvalInputs:
    checkpoints: tuple[CheckpointRef, ...]
    reference: RefHandle
    options: dict  # fsspec options of the checkpoints' storage
    what: dict  # for the report: dataset, train_ar url + identity, …
    class_photos: tuple[tuple[int, bytes], ...] = ()
    tokenizer_metrics: dict | None = None  # the tokenizer_metrics record's summary
    roots: tuple[str, ...] = ()  # where the checkpoints' tokenizer may be read (storage.root; `sample.load_models`)
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # on the cluster: (checkpoint label, its class groups' dirs)


def sampling_config(ecfg: EvalConfig, scfg: SampleConfig) -> SampleConfig:
    """How evaluation samples: sample.* guidance and truncation, eval's count, seed and device; no upscaling."""
    return scfg.model_copy(update={"per_class": ecfg.samples_per_class, "seed": ecfg.seed, "upscale": 1,
                                   "classes": None, "device": ecfg.device})


def load_sampler(ref: CheckpointRef, options: dict, device: str, scfg: SampleConfig | None = None,
                 roots: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(CARTSampler or NDPSampler, the exported record) for a checkpoint; a step checkpoint's weights swapped in."""
    from nextdetail.stages.sample.tasks import load_models
    from nextdetail.storage.checkpoints import load_checkpoint

    sampler, record = load_models(ref.url, options, device, scfg, roots)
    if ref.weights_url is not None:
        parent, name = ref.weights_url.rsplit("/", 1)
        state = load_checkpoint(Store(parent, options), name)
        sampler.transformer.load_state_dict(state["model"])
        record = {**record, "step": int(state["step"])}
    return sampler, record


def _slug(label: str) -> str:
    return label.replace(" ", "-")


@dataclass
class ClassSamples:
    """What sampling some classes of one checkpoint gives its metrics, in class order."""

    fid: np.ndarray  # (n, D) features of the FID layer (also KID, precision/recall)
    isc: np.ndarray  # (n, K) logits of the IS layer
    firsts: dict[int, np.ndarray]  # class → its first GRID_PER_CLASS samples (the grids)
    flops: np.ndarray  # (n,) NDP: what each sample cost; empty for CART
    seconds: float  # sampling time

    @staticmethod
    def join(parts: list[ClassSamples]) -> ClassSamples:
        """Parts of disjoint class groups, in class order → one: features concatenated in that order (KID's
        random subsets index rows, so the order is part of the result)."""
        return ClassSamples(np.concatenate([p.fid for p in parts]), np.concatenate([p.isc for p in parts]),
                            {c: a for p in parts for c, a in p.firsts.items()},
                            np.concatenate([p.flops for p in parts]), sum(p.seconds for p in parts))


def sample_classes(sampler: Any, extractor: Any, layers: tuple[str, str], classes: list[int], scfg: SampleConfig,
                   ecfg: EvalConfig, writer: Any, progress: bool = False, desc: str = "evaluate") -> ClassSamples:
    """`classes` one after another: samples (streamed into `writer`, a ShardTarWriter) and their features. A class's
    samples depend only on the checkpoint, the settings and the class (`generate_class`'s per-class generator), so any
    grouping of classes gives the same rows."""
    from PIL import Image
    from tqdm import tqdm

    from nextdetail.figures import png_bytes
    from nextdetail.models import fidelity
    from nextdetail.stages.sample.tasks import generate_class

    feats: dict[str, list[np.ndarray]] = {"fid": [], "isc": []}
    firsts: dict[int, np.ndarray] = {}
    flops: list[float] = []
    seconds = 0.0
    for c in tqdm(classes, desc=desc, unit="class", disable=not progress, leave=False):
        t0 = time.perf_counter()
        generated = generate_class(sampler, c, scfg, scfg.device)
        images = generated.images  # (n, H, W, 3) uint8
        seconds += time.perf_counter() - t0
        flops.extend(generated.flops if generated.flops is not None else ())  # NDP: the compute each sample cost
        for i, a in enumerate(images):
            writer.write({"__key__": f"{c:04d}-{i:05d}", "png": png_bytes(Image.fromarray(a)), "cls": str(c)})
        out = fidelity.extract(extractor, [images[i : i + ecfg.batch_size] for i in range(0, len(images),
                               ecfg.batch_size)], layers, ecfg.device)
        feats["fid"].append(out["fid"])
        feats["isc"].append(out["isc"])
        firsts[c] = images[:GRID_PER_CLASS]
    return ClassSamples(np.concatenate(feats["fid"]), np.concatenate(feats["isc"]), firsts,
                        np.asarray(flops, dtype=np.float64), seconds)


METRIC_KEYS = ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall",
               "f_score")


@dataclass(frozen=True)
class SamplerFacts:
    """What a checkpoint's row reports of its sampler and record."""

    step: int
    names: list[str]  # the model's classes
    flops_per_image: float | None  # CART: fixed per image; NDP: None (per sample in ClassSamples.flops)
    dial_active: bool

    @staticmethod
    def of(sampler: Any, record: dict) -> SamplerFacts:
        return SamplerFacts(int(record["step"]), list(record["classes"]), getattr(sampler, "flops_per_image", None),
                            bool(getattr(sampler, "dial_active", False)))


def checkpoint_row(ref: CheckpointRef, facts: SamplerFacts, samples: ClassSamples, scfg: SampleConfig,
                   ecfg: EvalConfig, real: tuple[np.ndarray, dict], pool: Executor | None = None) -> dict[str, Any]:
    """One checkpoint's metrics, computed once from every class's features. With `pool`, KID's subsets (numpy:
    most of the time) run in it beside the others (on a cluster this merge is the stage's serial tail)."""
    from nextdetail.models import fidelity_merge

    fake = {"fid": samples.fid, "isc": samples.isc}
    metrics = fidelity_merge.compare(fake, real[0], real[1], list(ecfg.metrics), ecfg.protocol(), pool)
    metrics = {k: metrics[k] for k in METRIC_KEYS if k in metrics}  # the order `compare` gives them in
    n = len(samples.fid)
    row = {"label": ref.label, "step": facts.step, "checkpoint": ref.weights_url or ref.url, "samples": n,
           "sampling_images_per_s": round(n / max(samples.seconds, 1e-9), 2),
           **{k: _round(v) for k, v in metrics.items()}}
    if len(samples.flops):
        row.update(budget=scfg.budget, estimator=scfg.estimator,
                   gflops_per_image=round(float(np.mean(samples.flops)) / 1e9, 6))
    else:
        row["gflops_per_image"] = round((facts.flops_per_image or 0.0) / 1e9, 6)
        if facts.dial_active:
            row.update(detail_budget=scfg.detail_budget, detail_patch=scfg.detail_patch)
    return row


def sample_checkpoint(store: Store, ref: CheckpointRef, inputs: EvalInputs, extractor: Any, layers: tuple[str, str],
                      scfg: SampleConfig, ecfg: EvalConfig, progress: bool) -> tuple[SamplerFacts, ClassSamples]:
    """In this process: sample one checkpoint class by class (streamed into its tar and the feature extractor)."""
    from nextdetail.storage.shards import ShardTarWriter

    sampler, record = load_sampler(ref, inputs.options, scfg.device, scfg, inputs.roots)
    facts = SamplerFacts.of(sampler, record)
    with store.atomic_writer(f"samples/{_slug(ref.label)}.tar") as f:
        writer = ShardTarWriter(f)
        samples = sample_classes(sampler, extractor, layers, list(range(len(facts.names))), scfg, ecfg, writer,
                                 progress, desc=f"evaluate {ref.label}")
        writer.close()
    return facts, samples


# ---- on the cluster: class groups as tasks, then one merge --------------------------------------------------


def class_groups(num_classes: int, per_task: int) -> list[tuple[int, ...]]:
    """Consecutive groups of `per_task` classes: fixed by the class list, never by the number of workers."""
    return [tuple(range(s, min(s + per_task, num_classes))) for s in range(0, num_classes, per_task)]


_SAMPLERS: dict[str, tuple[Any, dict]] = {}  # one checkpoint's sampler per process (a Dask worker's too)
_LOAD_LOCK = threading.Lock()
LOADS = 0  # samplers this process loaded (the cluster test reads it on each worker)


def cached_sampler(ref: CheckpointRef, options: dict, roots: tuple[str, ...], scfg: SampleConfig
                   ) -> tuple[Any, dict]:
    """`load_sampler`, once per process for the same checkpoint and settings: a worker evaluates group after group."""
    global LOADS
    key = json.dumps([ref.url, ref.weights_url, scfg.model_dump_json(), roots])
    with _LOAD_LOCK:
        if key not in _SAMPLERS:
            _SAMPLERS.clear()
            _SAMPLERS[key] = load_sampler(ref, options, scfg.device, scfg, roots)
            LOADS += 1
        return _SAMPLERS[key]


def cached_extractor(ecfg: EvalConfig) -> tuple[Any, Any]:
    from nextdetail.stages.evaluate.reference_stats import cached_extractor as cached

    return cached(ecfg.extractor, ecfg.inception_weights, ecfg.weights_cache, ecfg.device)


def group_artifact(evaluation: Store, key: StageKey, ref: CheckpointRef, classes: tuple[int, ...]) -> Artifact:
    """One checkpoint's class group, inside the evaluation's directory (`evaluation_store`; `parts/`, removed once
    merged): a cached task, so a killed run keeps the groups it finished. Planned from the stage's key alone, so the
    groups can sample while the reference statistics are computed."""
    return Artifact("evaluate", key.artifact({"checkpoint": ref.label, "classes": [classes[0], classes[-1]]}),
                    evaluation.sub("parts", _slug(ref.label), f"{classes[0]:04d}-{classes[-1]:04d}"),
                    lineage={"part_of": key.identity})


@stage_task(name="evaluate_classes", retries=2)
def evaluate_classes(artifact: Artifact, ref: CheckpointRef, classes: tuple[int, ...], options: dict,
                     roots: tuple[str, ...], ecfg: EvalConfig, scfg: SampleConfig) -> tuple[dict, list[str]]:
    """A group of classes of one checkpoint on a worker (`options`, `roots`: as `EvalInputs`'): samples.tar (as
    the merged tar's members) and features.npz (features, first samples, FLOPs: arrays only); the sampler and
    extractor loaded once per worker."""
    import io
    import os

    from nextdetail.storage.shards import ShardTarWriter

    with torch_threads(ecfg.torch_threads or 1):  # the workers share the machine's cores
        sampler, record = cached_sampler(ref, options, roots, scfg)
        extractor, info = cached_extractor(ecfg)
        with artifact.store.atomic_writer("samples.tar") as f:
            writer = ShardTarWriter(f)
            samples = sample_classes(sampler, extractor, (info.fid_layer, info.isc_layer), list(classes), scfg, ecfg,
                                     writer)
            writer.close()
    buf = io.BytesIO()
    np.savez(buf, fid=samples.fid, isc=samples.isc, flops=samples.flops, classes=np.asarray(classes),
             firsts=np.stack([samples.firsts[c] for c in classes]))
    artifact.store.write_bytes("features.npz", buf.getvalue())
    facts = SamplerFacts.of(sampler, record)
    summary = {"checkpoint": ref.label, "classes": list(classes), "samples": len(samples.fid),
               "seconds": samples.seconds, "step": facts.step, "names": facts.names,
               "flops_per_image": facts.flops_per_image, "dial_active": facts.dial_active, "pid": os.getpid()}
    return summary, ["samples.tar", "features.npz"]


def gather_features(ref: CheckpointRef, groups: list[str], options: dict) -> tuple[SamplerFacts, ClassSamples]:
    """The class groups of one checkpoint (their directories, in class order) → the sampler's facts and the joined
    features: arrays only, what the metrics need."""
    import io

    parts, facts = [], None
    for url in groups:
        part = Store(url, options)
        summary = json.loads(part.read_bytes("_COMPLETE.json"))["summary"]
        facts = facts or SamplerFacts(summary["step"], summary["names"], summary["flops_per_image"],
                                      summary["dial_active"])
        with np.load(io.BytesIO(part.read_bytes("features.npz")), allow_pickle=False) as z:
            parts.append(ClassSamples(z["fid"], z["isc"], dict(zip(z["classes"].tolist(), z["firsts"], strict=True)),
                                      z["flops"], summary["seconds"]))
    if facts is None:
        raise ValueError(f"evaluate: no class groups to gather for checkpoint {ref.label}")
    return facts, ClassSamples.join(parts)


def gather_samples_tar(store: Store, ref: CheckpointRef, groups: list[str], options: dict) -> str:
    """The class groups' samples.tar (in class order) → samples/<label>.tar, the bytes one process streams
    (`storage.tar_join`). Returns the tar's path under `store`."""
    from nextdetail.storage.tar_join import join_tars

    rel = f"samples/{_slug(ref.label)}.tar"
    with store.atomic_writer(rel) as f:
        join_tars(f, ((Store(url, options).read_bytes("samples.tar"), f"{url}/samples.tar") for url in groups))
    return rel


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


def class_grids(firsts: dict[int, np.ndarray], names: list[str], class_photos: tuple[tuple[int, bytes], ...]
                ) -> dict[str, bytes]:
    """The grids' PNGs: one per class (`grids/<class>-<name>.png`) and all classes (`grid.png`; at most 16, evenly spread: `figures.grid_rows`), a real photo of
    each class beside its samples."""
    from nextdetail.figures import class_grid, png_bytes
    from nextdetail.stages.sample.tasks import decode_references

    photos = decode_references(class_photos)
    grid_rows = [(names[c], photos.get(c), imgs) for c, imgs in firsts.items()]
    out = {f"grids/{c:04d}-{names[c]}.png": png_bytes(class_grid([row])) for c, row in zip(firsts, grid_rows,
                                                                                             strict=True)}
    return {**out, "grid.png": png_bytes(class_grid(grid_rows))}


def run_evaluation(store: Store, inputs: EvalInputs, ecfg: EvalConfig, scfg: SampleConfig,
                   log: Callable[[str], None] = print, progress: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Evaluate every checkpoint of `inputs`; write metrics.json, report.md and the pictures under `store`."""
    from nextdetail.figures import png_bytes

    if scfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("eval.device=cuda but no CUDA device is visible; use -o eval.device=cpu")
    extractor, info = cached_extractor(ecfg)  # a worker's merge reuses the one its class groups used
    if info.weights_sha256 != inputs.reference.record["summary"]["extractor_sha256"]:
        raise UserError(f"the reference statistics at {inputs.reference.url} were made with other {info.name} "
                        "weights; re-run so they are rebuilt with these")
    real = inputs.reference.load()
    groups = dict(inputs.groups)
    rows: list[dict[str, Any]] = []
    copying: Future[str] | None = None  # on the cluster: a checkpoint's groups' tars copied into one, beside the metrics
    with ThreadPoolExecutor(2 + (os.cpu_count() or 1)) as pool:  # the tar, the pictures, KID's subsets beside the rest
        for ref in inputs.checkpoints:
            log(f"evaluate: {ref.label}: {scfg.per_class} samples per class, cfg {scfg.cfg}, top-k {scfg.top_k}, "
                f"top-p {scfg.top_p}, seed {scfg.seed}")
            if ref.label in groups:  # sampled on the cluster: the groups' features, metrics computed once here
                if copying is not None:  # one copy at a time: the pool's threads stay free for KID
                    copying.result()
                copying = pool.submit(gather_samples_tar, store, ref, groups[ref.label], inputs.options)
                facts, samples = gather_features(ref, groups[ref.label], inputs.options)
            else:
                facts, samples = sample_checkpoint(store, ref, inputs, extractor, (info.fid_layer, info.isc_layer),
                                                   scfg, ecfg, progress)
            if ref is inputs.checkpoints[-1]:  # the grids show the last checkpoint
                pictures = pool.submit(class_grids, samples.firsts, facts.names, inputs.class_photos)
            rows.append(checkpoint_row(ref, facts, samples, scfg, ecfg, real, pool))
            log("evaluate: " + metrics_line(rows[-1]))
        if copying is not None:
            copying.result()
        files = [f"samples/{_slug(r['label'])}.tar" for r in rows]

        def put(rel: str, data: bytes) -> None:
            store.write_bytes(rel, data)
            files.append(rel)

        for rel, data in pictures.result().items():
            put(rel, data)
    if len(rows) > 1:
        from nextdetail.figures import metric_curves

        put("curves.png", png_bytes(metric_curves(rows, inputs.reference.describe()["real_isc_mean"])))
    result = {
        "what": inputs.what,
        "extractor": {"name": info.name, "weights": info.weights, "weights_sha256": info.weights_sha256,
                      "fid_layer": info.fid_layer, "isc_layer": info.isc_layer,
                      "comparable_with_published": info.comparable},
        "reference": inputs.reference.describe(),
        "sampling": {"samples_per_class": scfg.per_class, "classes": len(facts.names), "cfg": scfg.cfg, "top_k": scfg.top_k,
                     "top_p": scfg.top_p, "seed": scfg.seed, "class_seed": "seed · 1000003 + class"},
        "protocol": {**ecfg.protocol(), "metrics": list(ecfg.metrics)},
        "checkpoints": rows,
        "tokenizer": inputs.tokenizer_metrics,
    }
    put("metrics.json", json.dumps(result, indent=1).encode())
    put("report.md", report_markdown(result, has_curves=len(rows) > 1).encode())
    if groups:
        store.remove_tree("parts")  # merged: the groups' copies of the samples and features are not kept
    final = rows[-1]
    summary = {"checkpoint": final["label"], "step": final["step"], "samples": final["samples"],
               "extractor": info.name, "comparable": info.comparable,
               **{k: final[k] for k in ("fid", "isc_mean", "kid_mean", "precision", "recall", "gflops_per_image")
                  if k in final},
               "checkpoints": len(rows), "url": store.url(),
               "rfid": (inputs.tokenizer_metrics or {}).get("rfid"), "psnr": (inputs.tokenizer_metrics or {}).get("psnr")}
    return summary, files


def metrics_line(row: dict[str, Any]) -> str:
    parts = [f"FID {row['fid']:.3f}" if "fid" in row else None,
             f"IS {row['isc_mean']:.3f} ± {row['isc_std']:.3f}" if "isc_mean" in row else None,
             f"KID {row['kid_mean']:.5f} ± {row['kid_std']:.5f}" if "kid_mean" in row else None,
             f"precision {row['precision']:.3f} recall {row['recall']:.3f}" if "precision" in row else None]
    return f"{row['label']} (step {row['step']}, {row['samples']} samples): " + ", ".join(p for p in parts if p)


def report_markdown(result: dict[str, Any], has_curves: bool) -> str:
    """The report people read: what was evaluated, the numbers, the pictures, then how they were made."""
    w, ex, ref, smp, rows = result["what"], result["extractor"], result["reference"], result["sampling"], result["checkpoints"]
    final = rows[-1]
    n = final["samples"]
    lines = [f"# Evaluation of {w.get('model', 'the model')}", ""]
    lines += [f"**Evaluated**: the {checkpoint_name(final)} checkpoint of `{w.get('train_ar_url', final['checkpoint'])}`"
              + (f" on {w['dataset']}" if w.get("dataset") else "") + f"; {n} generated images "
              f"({smp['samples_per_class']} per class × {smp['classes']} classes) against {ref['images']} real images "
              f"({ref['source']}).", ""]
    if not ex["comparable_with_published"]:
        lines += ["> **Not comparable with published numbers.** " + NOT_COMPARABLE.format(name=ex["name"]), ""]
    headers = [("fid", "FID ↓"), ("isc_mean", "IS ↑"), ("kid_mean", "KID ↓"), ("precision", "precision ↑"),
               ("recall", "recall ↑")]
    present = [(k, h) for k, h in headers if k in final]
    lines += ["| checkpoint | step | " + " | ".join(h for _, h in present) + " |",
              "|---|---:|" + "---:|" * len(present)]
    for r in rows:
        cells = []
        for k, _ in present:
            if k == "isc_mean":
                cells.append(f"{r['isc_mean']:.3f} ± {r['isc_std']:.3f}")
            elif k == "kid_mean":
                cells.append(f"{r['kid_mean']:.5f} ± {r['kid_std']:.5f}")
            else:
                cells.append(f"{r[k]:.3f}")
        lines.append(f"| {r['label']} | {r['step']} | " + " | ".join(cells) + " |")
    lines += ["", f"Real images' own IS under this extractor: {ref['real_isc_mean']:.3f} ± {ref['real_isc_std']:.3f}."]
    tok = result.get("tokenizer")
    if tok:
        lines += [f"Tokenizer reconstruction on {tok['images']} held-out images ({tok['split']}): rFID "
                  f"{tok['rfid']:.3f}, PSNR {tok['psnr']:.2f} dB (a bound on what samples can look like)."]
    lines += ["", "## Samples", "", f"Per class: a real photo (framed), then samples of the {checkpoint_name(final)} checkpoint.",
              "", "![samples](grid.png)", ""]
    if has_curves:
        lines += ["## Metrics over training", "", "![curves](curves.png)", ""]
    lines += ["## How these numbers were made", "",
              f"- Extractor: `{ex['name']}` (weights {ex['weights']}, sha256 `{ex['weights_sha256'][:16]}…`; FID/KID/PRC "
              f"on `{ex['fid_layer']}`, IS on `{ex['isc_layer']}`), through torch-fidelity's metric functions.",
              f"- Reference statistics: `{ref['url']}` (identity `{ref['identity'][:16]}…`).",
              f"- Sampling: cfg {smp['cfg']} (VAR's ramp), top-k {smp['top_k']}, top-p {smp['top_p']}, seed {smp['seed']} "
              f"(class c uses {smp['class_seed']}).",
              f"- Protocol: {json.dumps(result['protocol'])}"
              + (f"; KID subsets of {final['kid_subset_size']}" if "kid_subset_size" in final else "") + ".",
              "- Generated images: `samples/<checkpoint>.tar` (webdataset png + cls); every number: `metrics.json`.", ""]
    return "\n".join(lines)


@stage_task(name="evaluate", retries=1)
def evaluate_stage(artifact: Artifact, inputs: EvalInputs, ecfg: EvalConfig, scfg: SampleConfig,
                   progress: bool = False) -> tuple[dict, list[str]]:
    from prefect import get_run_logger

    with torch_threads(ecfg.torch_threads):
        return run_evaluation(artifact.store, inputs, ecfg, scfg, get_run_logger().info, progress)


def evaluation_store(parent: Store, key: StageKey, ecfg: EvalConfig, subdir: bool = True) -> Store:
    """Where the evaluation goes: `parent`/<checkpoints>-<identity[:12]> (or `parent` itself)."""
    return parent.sub(f"{ecfg.checkpoints}-{key.identity[:12]}") if subdir else parent


def plan_evaluation(parent: Store, key: StageKey, inputs: EvalInputs, ecfg: EvalConfig, subdir: bool = True) -> Artifact:
    """The evaluation artifact: under `parent`/<checkpoints>-<identity[:12]> (or `parent` itself). Its identity is
    the stage's (the transformer's weights, the reference's content and the extractor are all in it); the
    reference statistics and tokenizer metrics it used are recorded beside."""
    store = evaluation_store(parent, key, ecfg, subdir)
    used = {"reference": inputs.reference.identity, "tokenizer_metrics": (inputs.tokenizer_metrics or {}).get("identity")}
    return Artifact("evaluate", key.identity, store, "_COMPLETE.json", lineage={**key.lineage(), "used": used})
