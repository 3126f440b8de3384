"""The `sample` stage (and `nextdetail sample --ckpt …`): a trained transformer → class-conditional
samples people can look at and the evaluation can read.

Data flow (all in this file; the sampling itself in `models/sampler.py`):
  transformer.pt (or best.pt) + the tokenizer.pt it names (sha256 checked)
  ─▶ `generate`: per class `per_class` samples in batches; CFG ramped over the maps (VAR), top-k/top-p;
     one torch.Generator seeded `seed` per class, so a class's samples do not depend on which other
     classes were asked for
  ─▶ images/<class index>-<class>/<i>.png, grids/<class index>-<class>.png (a real photo of the class
     first, then its samples), grid.png (one row per class, at most 16 evenly spread: `figures.grid_rows`), samples.tar (webdataset: png, cls)
  ─▶ NDP (kind ndp): the budgeted sampler (`models/ndp_sampler.py`: budget, estimator, refine_per_step);
     heatmap.png — every sample beside the map of how deep each patch was refined — and the FLOPs and
     tokens per image in summary.json
  ─▶ CART with upscale = f > 1: hires/grid.png — per class, the bilinear ×f baseline beside CART's
     upscaled base + patch-wise detail (§4.2.1), and hires/images/…
  ─▶ summary.json (images/s, forward passes per image, settings), _COMPLETE.json

Identity: the stage's (pipeline/declaration.py): `sample.*` but batch size/device, the train_ar identity with the
sha256 of the transformer's weights, and the code its flow imports (the model family's sampler).
"""

from __future__ import annotations

import io
import json
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nextdetail.conf.schema import SampleConfig
from nextdetail.errors import UserError
from nextdetail.models import torch_threads
from nextdetail.models.tokenizer import images_to_uint8 as to_uint8
from nextdetail.pipeline.tasks import Artifact, stage_task
from nextdetail.storage.fs import Store, under

if TYPE_CHECKING:
    from nextdetail.pipeline.declaration import StageKey


@dataclass(frozen=True)
class SampleInputs:
    checkpoint_url: str  # transformer.pt or best.pt of a train_ar run
    options: dict
    references: tuple[tuple[int, bytes], ...] = ()  # (class index, a real image PNG/JPEG of it) for the grids
    roots: tuple[str, ...] = ()  # where the checkpoint's tokenizer may be read (storage.root); see load_models
    groups: tuple[str, ...] = ()  # on the cluster: the class groups' directories (`sample_group`), in class order


# Where a root can have been before it was copied, moved or pulled (`nextdetail cache push|pull`): a recorded
# tokenizer URL of one of these may be rebased onto this run's roots. Any other (http, ftp, …) is never used.
STORAGE_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _protocol_and_url(url: str) -> tuple[str | None, str]:
    """(protocol, `url` normalized by `posixpath.normpath`: `..` resolved, so it cannot climb out of a root);
    "file" for an absolute local path, None for a relative one or a chained URL (`a::b`), which name no place."""
    url = url.removeprefix("file://")
    if "::" in url or not ("://" in url or url.startswith("/")):
        return None, url
    if "://" not in url:
        return "file", posixpath.normpath(url)
    protocol, rest = url.split("://", 1)
    return protocol.lower(), f"{protocol.lower()}://{posixpath.normpath(rest)}"


def checkpoint_root(checkpoint_url: str) -> str | None:
    """The storage root a checkpoint lies in by the stage layout (`<root>/transformer/<dataset>/<run>/<file>`)."""
    parts = checkpoint_url.rstrip("/").rsplit("/", 4)
    return parts[0] if len(parts) == 5 and parts[1] == "transformer" and parts[0] else None


def tokenizer_url(checkpoint_url: str, recorded: str, roots: tuple[str, ...], options: dict) -> str:
    """The tokenizer a transformer checkpoint names (`recorded`, from its record) as a path or URL under one of
    `roots`: a record is only as trusted as whoever can write the bucket, so nothing outside the roots is read.
    One under no root but in a root's layout (`…/tokenizer/…`: its root copied, moved or pulled) is rebased onto
    each root in turn and the first that holds the file used; the caller's sha256 check guards the content.
    Anything else (http, ftp, a path elsewhere) is one line naming the checkpoint."""
    allowed = [url for _, url in (_protocol_and_url(Store(r, options).url()) for r in roots)]
    protocol, url = _protocol_and_url(recorded)
    if protocol is not None and any(under(url, root) for root in allowed):
        return url
    if protocol in STORAGE_PROTOCOLS:
        at = url.find("/tokenizer/")
        while at >= 0:  # every place the suffix may start (a root's own path may hold "/tokenizer/" too)
            for root in allowed:
                candidate = f"{root.rstrip('/')}/{url[at + 1:]}"
                parent, name = candidate.rsplit("/", 1)
                if Store(parent, options).exists(name):
                    return candidate
            at = url.find("/tokenizer/", at + 1)
    raise UserError(f"{checkpoint_url}: names its tokenizer at {recorded}, outside the roots this run was given "
                    f"({', '.join(allowed) or 'none'}); nothing is fetched — copy the tokenizer under the root")


def load_models(checkpoint_url: str, options: dict, device: str, cfg: SampleConfig | None = None,
                roots: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(CARTSampler or NDPSampler — the checkpoint's kind — on `device`, the checkpoint's record). The
    tokenizer comes from the record's url, read only under `roots` (storage.root) or the checkpoint's own root
    (`tokenizer_url`), and must still have the recorded sha256. `cfg`: NDP's dial."""
    from nextdetail.models import family
    from nextdetail.models.tokenizer import load_tokenizer
    from nextdetail.stages.train_ar.tasks import load_transformer

    parent, name = checkpoint_url.rstrip("/").rsplit("/", 1)
    store = Store(parent, options)
    if not store.exists(name):
        raise UserError(f"{checkpoint_url}: no such checkpoint; pass a transformer.pt or best.pt of "
                        "`nextdetail train-ar` (under <storage.root>/transformer/)")
    transformer, record = load_transformer(store.read_bytes(name), where=checkpoint_url)
    own = checkpoint_root(checkpoint_url)
    url = tokenizer_url(checkpoint_url, record["tokenizer"]["url"], (*roots, *([own] if own else [])), options)
    tokenizer = load_tokenizer(url, options, record["tokenizer"]["sha256"], checkpoint_url)
    sampler = family(record.get("kind", "cart"), "sampler").from_config(transformer.to(device), tokenizer.to(device),
                                                                         cfg or SampleConfig())
    return sampler, record


def generate(sampler: Any, classes: list[int], cfg: SampleConfig, device: str,
             progress: bool = False) -> dict[str, Any]:
    """Samples per class: {"images": {c: (n, H, W, 3) uint8}, "hires": {c: (…, fH, fW, 3)}, "bilinear": …,
    "seconds": trained-size sampling time, "hires_seconds"}; NDP adds "levels": {c: (n, S, S)} (the level
    each latent cell was refined to), "flops" and "tokens" (per image, all classes)."""
    from tqdm import tqdm

    from nextdetail.models.sampler import bilinear_upscale

    images: dict[int, np.ndarray] = {}
    hires: dict[int, np.ndarray] = {}
    bilinear: dict[int, np.ndarray] = {}
    levels: dict[int, np.ndarray] = {}
    flops: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    seconds = hires_seconds = 0.0
    ndp = hasattr(sampler, "estimator")
    for c in tqdm(classes, desc="sample", unit="class", disable=not progress, leave=False):
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + c)
        chunks, hchunks, bchunks, lchunks = [], [], [], []
        for start in range(0, cfg.per_class, cfg.batch_size):
            n = min(cfg.batch_size, cfg.per_class - start)
            labels = torch.full((n,), c, dtype=torch.long, device=device)
            t0 = time.perf_counter()
            out = sampler.sample(labels, cfg.cfg, cfg.top_k, cfg.top_p, g)
            seconds += time.perf_counter() - t0
            chunks.append(to_uint8(out.images))
            if ndp:
                lchunks.append(out.level_maps.cpu().numpy().astype(np.uint8))
                flops.append(out.flops.cpu().numpy())
                tokens.append(out.tokens.cpu().numpy())
            elif cfg.upscale > 1:
                t0 = time.perf_counter()
                hchunks.append(to_uint8(sampler.upscale(labels, out.maps, cfg.upscale, cfg.cfg, cfg.top_k, cfg.top_p, g)))
                hires_seconds += time.perf_counter() - t0
                bchunks.append(to_uint8(bilinear_upscale(out.images, cfg.upscale)))
        images[c] = np.concatenate(chunks)
        if hchunks:
            hires[c], bilinear[c] = np.concatenate(hchunks), np.concatenate(bchunks)
        if lchunks:
            levels[c] = np.concatenate(lchunks)
    out = {"images": images, "hires": hires, "bilinear": bilinear, "seconds": seconds, "hires_seconds": hires_seconds}
    if ndp:
        out.update(levels=levels, flops=np.concatenate(flops), tokens=np.concatenate(tokens),
                   pyramid_levels=len(sampler.sides))
    return out


def write_outputs(store: Store, result: dict[str, Any], class_names: list[str], references: dict[int, np.ndarray],
                  upscale: int, threads: int | None = None) -> dict[str, str]:
    """PNGs, grids, the webdataset tar; returns the files written (relative to `store`) with their sha256.

    The PNGs are encoded class by class in `threads` threads (default: one per core; Pillow lets go of the GIL
    while it compresses), a few classes ahead of the writes, which stay in class order: the files, the tar and the
    marker are the bytes one thread writes. On the cluster this is the merge, the stage's serial tail: ImageNet's
    preset (50 samples per class, ×2) encodes 50,000 PNGs of 256 px and 50,000 of 512 px, ≈ 36 ms an image on
    one thread here with the grids and writes (`benchmarks/sample_outputs.py`): an hour."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from nextdetail.figures import class_grid, pair_grid, png_bytes
    from nextdetail.storage.hashing import bytes_sha256
    from nextdetail.storage.shards import ShardTarWriter

    files: dict[str, str] = {}

    def put(rel: str, data: bytes, sha256: str | None = None) -> None:
        store.write_bytes(rel, data)
        files[rel] = sha256 or bytes_sha256(data)

    def encoded(img: Image.Image) -> tuple[bytes, str]:  # in a pool thread: the PNG and its sha256
        data = png_bytes(img)
        return data, bytes_sha256(data)

    def samples_of(c: int) -> tuple[list[tuple[bytes, str]], tuple[bytes, str]]:
        imgs = result["images"][c]
        return ([encoded(Image.fromarray(a)) for a in imgs],
                encoded(class_grid([(class_names[c], references.get(c), imgs)])))

    def hires_of(c: int) -> list[tuple[bytes, str]]:
        return [encoded(Image.fromarray(a)) for a in result["hires"][c]]

    tar = io.BytesIO()
    writer = ShardTarWriter(tar)
    workers = threads or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        # The overview pictures need only arrays at hand: drawn first, beside the classes' PNGs (at ImageNet's 16
        # rows of 50 samples, grid.png alone is ≈ 55 megapixels).
        overview = {"grid.png": pool.submit(lambda: encoded(class_grid(
            [(class_names[c], references.get(c), imgs) for c, imgs in result["images"].items()])))}
        if result.get("levels"):
            from nextdetail.figures import refinement_grid

            overview["heatmap.png"] = pool.submit(lambda: encoded(refinement_grid(
                [(class_names[c], result["images"][c], result["levels"][c]) for c in result["levels"]],
                result["pyramid_levels"])))
        if result["hires"]:
            overview["hires/grid.png"] = pool.submit(lambda: encoded(pair_grid(
                [(class_names[c], result["bilinear"][c][:2], imgs[:2]) for c, imgs in result["hires"].items()],
                (f"bilinear x{upscale}", f"CART x{upscale}"))))
        for c, (pngs, (grid, grid_sha)) in zip(result["images"], _in_order(pool, samples_of, list(result["images"]),
                                                                          2 * workers), strict=True):
            stem = f"{c:04d}-{class_names[c]}"
            for i, (data, sha) in enumerate(pngs):
                put(f"images/{stem}/{i:04d}.png", data, sha)
                writer.write({"__key__": f"{stem}-{i:04d}", "png": data, "cls": str(c)})
            put(f"grids/{stem}.png", grid, grid_sha)
        writer.close()
        put("samples.tar", tar.getvalue())
        put("grid.png", *overview["grid.png"].result())
        if "heatmap.png" in overview:
            put("heatmap.png", *overview["heatmap.png"].result())
        if result["hires"]:
            for c, pngs in zip(result["hires"], _in_order(pool, hires_of, list(result["hires"]), 2 * workers),
                               strict=True):
                stem = f"{c:04d}-{class_names[c]}"
                for i, (data, sha) in enumerate(pngs):
                    put(f"hires/images/{stem}/{i:04d}.png", data, sha)
            put("hires/grid.png", *overview["hires/grid.png"].result())
    return files


def _in_order(pool: Any, fn: Callable[[Any], Any], items: list[Any], ahead: int) -> Any:
    """fn(item) for each item, computed in `pool` at most `ahead` items ahead of the consumer, yielded in order:
    what is encoded but not yet written stays bounded."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def decode_references(references: tuple[tuple[int, bytes], ...]) -> dict[int, np.ndarray]:
    from PIL import Image

    out = {}
    for c, data in references:
        with Image.open(io.BytesIO(data)) as im:
            out[c] = np.asarray(im.convert("RGB"))
    return out


def run_sampling(store: Store, inputs: SampleInputs, cfg: SampleConfig, log: Callable[[str], None] = print,
                 progress: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Sample, write everything under `store`; returns (summary, files with their sha256)."""
    device = cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("sample.device=cuda but no CUDA device is visible; use -o sample.device=cpu")
    sampler, record = load_models(inputs.checkpoint_url, inputs.options, device, cfg, inputs.roots)
    class_names = record["classes"]
    classes = cfg.classes if cfg.classes is not None else list(range(len(class_names)))
    bad = [c for c in classes if not 0 <= c < len(class_names)]
    if bad:
        raise UserError(f"classes {bad} are not in 0…{len(class_names) - 1} (this model's classes: "
                        f"{', '.join(class_names[:5])}…)")
    ndp = record.get("kind") == "ndp"
    log(f"sample: {len(classes)} classes × {cfg.per_class}, cfg {cfg.cfg}, top-k {cfg.top_k}, top-p {cfg.top_p}, "
        f"seed {cfg.seed}" + (f", NDP budget {cfg.budget:.0%} ({cfg.estimator}, {cfg.refine_per_step} per step)" if ndp
                             else f", and ×{cfg.upscale} by patch-wise detail" if cfg.upscale > 1 else ""))
    if ndp:
        cfg = cfg.model_copy(update={"upscale": 1})  # CART's patch-wise ×f needs detail maps
    result = gather_groups(inputs) if inputs.groups else generate(sampler, classes, cfg, device, progress)
    files = write_outputs(store, result, class_names, decode_references(inputs.references), cfg.upscale)
    n = len(classes) * cfg.per_class
    summary = {
        "images": n, "classes": len(classes), "per_class": cfg.per_class, "cfg": cfg.cfg, "top_k": cfg.top_k,
        "top_p": cfg.top_p, "seed": cfg.seed, "upscale": cfg.upscale,
        "images_per_s": round(n / max(result["seconds"], 1e-9), 2),
        "forward_passes_per_image": sampler.forward_passes,
        "hires_images_per_s": round(n / result["hires_seconds"], 2) if result["hires_seconds"] else None,
        "checkpoint": inputs.checkpoint_url, "checkpoint_step": record["step"], "url": store.url(),
        "model": record.get("kind", "cart"),
    }
    if result["hires"]:  # issue 42's measure: a row's mean colour against the interior's (0–255)
        from nextdetail.models.fidelity import row_bands
        from nextdetail.models.sampler import seam_rows

        hires = np.concatenate(list(result["hires"].values()))
        H = hires.shape[1] // cfg.upscale
        grid = (sampler.latent_side, cfg.upscale, H // sampler.latent_side)
        seams = {*seam_rows(*grid), *seam_rows(*grid, overlap=False)}  # where patches meet now, and met edge to edge
        summary["hires_row_bands"] = {k: round(v, 1) for k, v in row_bands(hires, sorted(seams)).items()}
    if ndp:
        summary.update(budget=cfg.budget, estimator=cfg.estimator, refine_per_step=cfg.refine_per_step,
                       gflops_per_image=round(float(result["flops"].mean()) / 1e9, 6),
                       tokens_per_image=round(float(result["tokens"].mean()), 2))
    else:
        summary["gflops_per_image"] = round(sampler.flops_per_image / 1e9, 6)
        if sampler.dial_active:
            summary.update(detail_budget=cfg.detail_budget, detail_patch=cfg.detail_patch)
    summary_bytes = json.dumps(summary, indent=1).encode()
    store.write_bytes("summary.json", summary_bytes)
    if inputs.groups:
        store.remove_tree("parts")  # merged: the groups' arrays are not kept
    from nextdetail.storage.hashing import bytes_sha256

    return summary, {**files, "summary.json": bytes_sha256(summary_bytes)}


# ---- on the cluster: class groups as tasks, then one merge --------------------------------------------------

_SAMPLERS: dict[str, tuple[Any, dict]] = {}  # one checkpoint's sampler per process (a Dask worker's too)
_SAMPLERS_LOCK = threading.Lock()
RESULT_KEYS = ("images", "hires", "bilinear", "levels")  # per class (n, …) arrays of `generate`


def cached_models(inputs: SampleInputs, cfg: SampleConfig) -> tuple[Any, dict]:
    """`load_models`, once per process for the same checkpoint and settings: a worker samples group after group."""
    key = json.dumps([inputs.checkpoint_url, cfg.model_dump_json(), inputs.roots])
    with _SAMPLERS_LOCK:
        if key not in _SAMPLERS:
            _SAMPLERS.clear()
            _SAMPLERS[key] = load_models(inputs.checkpoint_url, inputs.options, cfg.device, cfg, inputs.roots)
        return _SAMPLERS[key]


def group_artifact(parent: Artifact, key: StageKey, classes: tuple[int, ...]) -> Artifact:
    """A class group of the samples, inside their directory (`parts/`, removed once merged); a cached task, so a
    killed run keeps the groups it finished."""
    return Artifact("sample", key.artifact({"classes": list(classes)}),
                    parent.store.sub("parts", f"{classes[0]:04d}-{classes[-1]:04d}"), lineage={"part_of": parent.identity})


@stage_task(name="sample_classes", retries=2)
def sample_group(artifact: Artifact, inputs: SampleInputs, classes: tuple[int, ...], cfg: SampleConfig
                 ) -> tuple[dict, list[str]]:
    """A group of classes on a worker: `generate`'s arrays as one result.npz (arrays only; a class's samples depend
    on its class and the settings alone, so the merged outputs are one process's)."""
    with torch_threads(cfg.torch_threads or 1):  # the workers share the machine's cores
        sampler, record = cached_models(inputs, cfg)
        if record.get("kind") == "ndp":
            cfg = cfg.model_copy(update={"upscale": 1})
        result = generate(sampler, list(classes), cfg, cfg.device)
    arrays = {f"{k}_{c}": a for k in RESULT_KEYS for c, a in (result.get(k) or {}).items()}
    for k in ("flops", "tokens"):
        if k in result:
            arrays[k] = result[k]
    buf = io.BytesIO()
    np.savez(buf, classes=np.asarray(classes), **arrays)
    artifact.store.write_bytes("result.npz", buf.getvalue())
    summary = {"classes": list(classes), "seconds": result["seconds"], "hires_seconds": result["hires_seconds"],
               "pyramid_levels": result.get("pyramid_levels")}
    return summary, ["result.npz"]


def gather_groups(inputs: SampleInputs) -> dict[str, Any]:
    """The class groups' arrays (in class order) → what `generate` returns for all of them."""
    out: dict[str, Any] = {k: {} for k in RESULT_KEYS}
    out.update(seconds=0.0, hires_seconds=0.0)
    flat: dict[str, list[np.ndarray]] = {"flops": [], "tokens": []}
    for url in inputs.groups:
        part = Store(url, inputs.options)
        summary = json.loads(part.read_bytes("_COMPLETE.json"))["summary"]
        out["seconds"] += summary["seconds"]
        out["hires_seconds"] += summary["hires_seconds"]
        with np.load(io.BytesIO(part.read_bytes("result.npz")), allow_pickle=False) as z:
            for c in z["classes"].tolist():
                for k in RESULT_KEYS:
                    if f"{k}_{c}" in z:
                        out[k][c] = z[f"{k}_{c}"]
            for k in flat:
                if k in z:
                    flat[k].append(z[k])
        if summary.get("pyramid_levels") is not None:
            out["pyramid_levels"] = summary["pyramid_levels"]
    out.update({k: np.concatenate(v) for k, v in flat.items() if v})
    return out


@stage_task(name="sample", retries=1)
def sample_stage(artifact: Artifact, inputs: SampleInputs, cfg: SampleConfig, progress: bool = False
                 ) -> tuple[dict, dict[str, str]]:
    from prefect import get_run_logger

    with torch_threads(cfg.torch_threads):
        return run_sampling(artifact.store, inputs, cfg, get_run_logger().info, progress)


def plan_samples(root: Store, key: StageKey, cfg: SampleConfig) -> Artifact:
    """The samples artifact in its own directory under `root`, named by the stage identity (which keys on the
    transformer's weights)."""
    return Artifact("sample", key.identity, root.sub(f"{cfg.checkpoint}-{key.identity[:12]}"), "_COMPLETE.json",
                    lineage=key.lineage())

