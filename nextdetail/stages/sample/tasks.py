"""The `sample` stage (and `nextdetail sample --ckpt …`): a trained transformer → class-conditional
samples people can look at and the evaluation can read.

Data flow (sampling here, in `models/sampler.py`; the files in `outputs.py`):
  transformer.pt (or best.pt) + the tokenizer.pt it names (sha256 checked)
  ─▶ `generate_class`: per class `per_class` samples in batches; CFG ramped over the maps (VAR), top-k/top-p;
     one torch.Generator seeded `seed` per class, so a class's samples do not depend on which other
     classes were asked for
  ─▶ class by class as sampled (`outputs.write_classes`): images/<class index>-<class>/<i>.png,
     grids/<class index>-<class>.png (a real photo of the class first, then its samples), their members of
     samples.tar (webdataset: png, cls); then grid.png (one row per class, at most 16 evenly spread:
     `figures.grid_rows`)
  ─▶ NDP (kind ndp): the budgeted sampler (`models/ndp_sampler.py`: budget, estimator, refine_per_step);
     heatmap.png — the shown classes' first samples beside the map of how deep each patch was refined — and the
     FLOPs and tokens per image in summary.json
  ─▶ CART with upscale = f > 1: hires/grid.png — per class, the bilinear ×f baseline beside CART's
     upscaled base + patch-wise detail (§4.2.1), and hires/images/…
  ─▶ summary.json (images/s, forward passes per image, settings, the ×f seam bands), _COMPLETE.json
  On a cluster (`sample.resources`) class groups write their classes the same way and one merge joins them
  (`sample_group`, `outputs.merge_groups`).

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
    # on the cluster: the class groups (`group_part`, its classes), in class order; their files are in place
    groups: tuple[tuple[str, tuple[int, ...]], ...] = ()


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


@dataclass
class ClassResult:
    """One class's samples (`generate_class`): (n, H, W, 3) uint8 images; with `upscale` f > 1 (CART) the ×f
    images and their bilinear baseline (n, fH, fW, 3); NDP the level each latent cell was refined to (n, S, S) and
    the FLOPs and tokens per image (n,)."""

    c: int
    images: np.ndarray
    hires: np.ndarray | None = None
    bilinear: np.ndarray | None = None
    levels: np.ndarray | None = None
    flops: np.ndarray | None = None
    tokens: np.ndarray | None = None
    seconds: float = 0.0  # sampling at the trained size
    hires_seconds: float = 0.0


def generate_class(sampler: Any, c: int, cfg: SampleConfig, device: str) -> ClassResult:
    """`cfg.per_class` samples of class `c` in batches; CFG ramped over the maps (VAR), top-k/top-p; one
    torch.Generator seeded by `seed` and the class, so a class's samples do not depend on which other classes were
    asked for, nor on where they ran."""
    from nextdetail.models.sampler import bilinear_upscale

    ndp = hasattr(sampler, "estimator")
    g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + c)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "hires", "bilinear", "levels", "flops", "tokens")}
    seconds = hires_seconds = 0.0
    for start in range(0, cfg.per_class, cfg.batch_size):
        n = min(cfg.batch_size, cfg.per_class - start)
        labels = torch.full((n,), c, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        out = sampler.sample(labels, cfg.cfg, cfg.top_k, cfg.top_p, g)
        seconds += time.perf_counter() - t0
        chunks["images"].append(to_uint8(out.images))
        if ndp:
            chunks["levels"].append(out.level_maps.cpu().numpy().astype(np.uint8))
            chunks["flops"].append(out.flops.cpu().numpy())
            chunks["tokens"].append(out.tokens.cpu().numpy())
        elif cfg.upscale > 1:
            t0 = time.perf_counter()
            chunks["hires"].append(to_uint8(sampler.upscale(labels, out.maps, cfg.upscale, cfg.cfg, cfg.top_k,
                                                            cfg.top_p, g)))
            hires_seconds += time.perf_counter() - t0
            chunks["bilinear"].append(to_uint8(bilinear_upscale(out.images, cfg.upscale)))
    arrays = {k: np.concatenate(v) if v else None for k, v in chunks.items()}
    return ClassResult(c, seconds=seconds, hires_seconds=hires_seconds, **arrays)


def decode_references(references: tuple[tuple[int, bytes], ...]) -> dict[int, np.ndarray]:
    from PIL import Image

    out = {}
    for c, data in references:
        with Image.open(io.BytesIO(data)) as im:
            out[c] = np.asarray(im.convert("RGB"))
    return out


def chosen_classes(cfg: SampleConfig, class_names: list[str]) -> list[int]:
    """`sample.classes` (default: every class), each checked to be one of `class_names` (one line if not)."""
    classes = cfg.classes if cfg.classes is not None else list(range(len(class_names)))
    bad = [c for c in classes if not 0 <= c < len(class_names)]
    if bad:
        raise UserError(f"classes {bad} are not in 0…{len(class_names) - 1} (this model's classes: "
                        f"{', '.join(class_names[:5])}…)")
    return classes


def run_sampling(store: Store, inputs: SampleInputs, cfg: SampleConfig, log: Callable[[str], None] = print,
                 progress: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Sample class by class and write everything under `store` (`outputs.write_classes`), or with
    `inputs.groups` merge the class groups that did (`outputs.merge_groups`); returns (summary, files with their
    sha256)."""
    from tqdm import tqdm

    from nextdetail.stages.sample.outputs import Overview, merge_groups, overview_pictures, write_classes
    from nextdetail.storage.hashing import bytes_sha256

    device = cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("sample.device=cuda but no CUDA device is visible; use -o sample.device=cpu")
    sampler, record = load_models(inputs.checkpoint_url, inputs.options, device, cfg, inputs.roots)
    class_names = record["classes"]
    classes = chosen_classes(cfg, class_names)
    ndp = record.get("kind") == "ndp"
    log(f"sample: {len(classes)} classes × {cfg.per_class}, cfg {cfg.cfg}, top-k {cfg.top_k}, top-p {cfg.top_p}, "
        f"seed {cfg.seed}" + (f", NDP budget {cfg.budget:.0%} ({cfg.estimator}, {cfg.refine_per_step} per step)" if ndp
                             else f", and ×{cfg.upscale} by patch-wise detail" if cfg.upscale > 1 else ""))
    if ndp:
        cfg = cfg.model_copy(update={"upscale": 1})  # CART's patch-wise ×f needs detail maps
    references = decode_references(inputs.references)
    overview = Overview.of(classes)
    if inputs.groups:
        files = merge_groups(store, list(inputs.groups), class_names, cfg.per_class, cfg.upscale > 1, overview)
    else:
        results = (generate_class(sampler, c, cfg, device)
                   for c in tqdm(classes, desc="sample", unit="class", disable=not progress, leave=False))
        files = write_classes(store, results, class_names, references, "samples.tar", overview)
    pictures = overview_pictures(overview, classes, class_names, references, cfg.upscale,
                                 len(sampler.sides) if ndp else None)
    for rel, (data, sha) in pictures.items():
        store.write_bytes(rel, data)
        files[rel] = sha
    n = len(classes) * cfg.per_class
    summary = {
        "images": n, "classes": len(classes), "per_class": cfg.per_class, "cfg": cfg.cfg, "top_k": cfg.top_k,
        "top_p": cfg.top_p, "seed": cfg.seed, "upscale": cfg.upscale,
        "images_per_s": round(n / max(overview.seconds, 1e-9), 2),
        "forward_passes_per_image": sampler.forward_passes,
        "hires_images_per_s": round(n / overview.hires_seconds, 2) if overview.hires_seconds else None,
        "checkpoint": inputs.checkpoint_url, "checkpoint_step": record["step"], "url": store.url(),
        "model": record.get("kind", "cart"),
    }
    if overview.hires_sums is not None:  # issue 42's measure: a row's mean colour against the interior's (0–255)
        from nextdetail.models.sampler import seam_rows

        H = len(overview.hires_sums[0]) // cfg.upscale
        grid = (sampler.latent_side, cfg.upscale, H // sampler.latent_side)
        seams = {*seam_rows(*grid), *seam_rows(*grid, overlap=False)}  # where patches meet now, and met edge to edge
        summary["hires_row_bands"] = {k: round(v, 1) for k, v in overview.row_bands(sorted(seams)).items()}
    if ndp:
        summary.update(budget=cfg.budget, estimator=cfg.estimator, refine_per_step=cfg.refine_per_step,
                       gflops_per_image=round(float(np.concatenate(overview.flops).mean()) / 1e9, 6),
                       tokens_per_image=round(float(np.concatenate(overview.tokens).mean()), 2))
    else:
        summary["gflops_per_image"] = round(sampler.flops_per_image / 1e9, 6)
        if sampler.dial_active:
            summary.update(detail_budget=cfg.detail_budget, detail_patch=cfg.detail_patch)
    summary_bytes = json.dumps(summary, indent=1).encode()
    store.write_bytes("summary.json", summary_bytes)
    if inputs.groups:
        store.remove_tree("parts")  # merged: the groups' tars and overviews are not kept
    return summary, {**files, "summary.json": bytes_sha256(summary_bytes)}


# ---- on the cluster: class groups as tasks, then one merge --------------------------------------------------

_SAMPLERS: dict[str, tuple[Any, dict]] = {}  # one checkpoint's sampler per process (a Dask worker's too)
_SAMPLERS_LOCK = threading.Lock()


def cached_models(inputs: SampleInputs, cfg: SampleConfig) -> tuple[Any, dict]:
    """`load_models`, once per process for the same checkpoint and settings: a worker samples group after group."""
    key = json.dumps([inputs.checkpoint_url, cfg.model_dump_json(), inputs.roots])
    with _SAMPLERS_LOCK:
        if key not in _SAMPLERS:
            _SAMPLERS.clear()
            _SAMPLERS[key] = load_models(inputs.checkpoint_url, inputs.options, cfg.device, cfg, inputs.roots)
        return _SAMPLERS[key]


def group_part(classes: tuple[int, ...]) -> str:
    """A class group's own directory under the samples' (`parts/`, removed once merged): its tar and overview."""
    return f"parts/{classes[0]:04d}-{classes[-1]:04d}"


def group_artifact(parent: Artifact, key: StageKey, classes: tuple[int, ...]) -> Artifact:
    """A class group of the samples: its classes' files in the samples' directory, its marker, tar and overview in
    `group_part`; a cached task, so a killed run keeps the groups it finished."""
    return Artifact("sample", key.artifact({"classes": list(classes)}), parent.store,
                    f"{group_part(classes)}/_COMPLETE.json", lineage={"part_of": parent.identity})


@stage_task(name="sample_classes", retries=2)
def sample_group(artifact: Artifact, inputs: SampleInputs, classes: tuple[int, ...], cfg: SampleConfig,
                 shown: tuple[int, ...] = ()) -> tuple[dict, dict[str, str]]:
    """A group of classes on a worker: each class's files written into the samples' directory as it is sampled,
    the group's tar members and its part of the overview (`shown`: the classes grid.png shows) in `group_part`. A
    class's samples depend on its class and the settings alone, so the merged outputs are one process's."""
    from nextdetail.stages.sample.outputs import Overview, write_classes
    from nextdetail.storage.hashing import bytes_sha256

    part = group_part(classes)
    threads = cfg.torch_threads or 1  # the workers share the machine's cores
    with torch_threads(threads):
        sampler, record = cached_models(inputs, cfg)
        if record.get("kind") == "ndp":
            cfg = cfg.model_copy(update={"upscale": 1})
        overview = Overview(frozenset(shown))
        files = write_classes(artifact.store, (generate_class(sampler, c, cfg, cfg.device) for c in classes),
                              record["classes"], decode_references(inputs.references), f"{part}/samples.tar",
                              overview, threads)
    data = overview.to_bytes()
    artifact.store.write_bytes(f"{part}/overview.npz", data)
    files[f"{part}/overview.npz"] = bytes_sha256(data)
    return {"classes": list(classes)}, files


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

