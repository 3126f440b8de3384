"""`nextdetail plan`: what a run of this config will write and cost, before anyone books a cluster (issue 39).

Per stage: images, bytes and objects written, CPU- or GPU-hours, peak memory per worker — for the configured
source and, beside it, for ImageNet-1k at the same settings. Every number says where it comes from:
- **measured here**, on a seeded sample of the source's images run through the stages' own code: the shard's
  bytes per image (decode, crop, encode, tar members) and seconds per image; the factors' bytes per image
  (the solver, `factors.quantize`, one shard written by `factors.write_whole`) and seconds per image per core;
  PNG bytes of an image at the trained (and upscaled) size, what sample and evaluate write;
- **counted from the layout**: tars per split (`shard_count_for`), objects per tar and per artifact, tokens per
  image, parameters of both models (built on the meta device) → checkpoint bytes (weights 4 B/param, a step
  checkpoint 12 B/param: weights and AdamW's two moments);
- **assumed, and printed as such**: token arrays at log2(V) bits per code (what blosc's shuffle + zstd keeps of
  codes spread over the vocabulary: an upper bound), and compute hours as training/encoding FLOPs over a throughput — on CUDA 40 %
  of one H200's dense bf16 peak (no GPU has measured this code yet), on a CPU this machine's measured fp32
  matmul rate (a lower bound on hours: convolutions and attention reach less).

It runs no stage and writes nothing under the root: the sample is read from the source (the embedded dataset is
built in a temporary folder), and the factor store is written to a temporary one.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nextdetail.conf.schema import PipelineConfig
from nextdetail.errors import UserError
from nextdetail.figures import GRID_ROWS

IMAGENET = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H200 (NVIDIA's datasheet), as the GPU check's MFU uses
ASSUMED_GPU_UTILISATION = 0.40
INCEPTION_GFLOPS = 5.7  # Inception-v3 forward at 299 px, per image (torch-fidelity's feature extractor)
SAMPLE_IMAGES = 16


@dataclass
class StagePlan:
    stage: str
    images: int
    bytes: int
    objects: int
    hours: float  # CPU-hours (device cpu) or GPU-hours (cuda)
    device: str
    peak_memory_bytes: int  # per worker
    basis: str  # how the bytes and hours were obtained


@dataclass
class Plan:
    source: str
    images: dict[str, int]
    classes: int
    stages: list[StagePlan]
    workers: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.stages)

    @property
    def total_objects(self) -> int:
        return sum(s.objects for s in self.stages)

    def wall_hours(self) -> float:
        """Hours on `workers` workers: CPU stages split over them, GPU stages over as many GPUs."""
        return sum(s.hours for s in self.stages) / max(1, self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "images": self.images, "classes": self.classes, "workers": self.workers,
                "stages": [asdict(s) for s in self.stages], "total_bytes": self.total_bytes,
                "total_objects": self.total_objects, "wall_hours_on_workers": round(self.wall_hours(), 3),
                "assumptions": self.assumptions}


# ---- what is measured on a sample of the source -------------------------------------------------------------


@dataclass(frozen=True)
class SampleCosts:
    images: int
    tar_bytes_per_image: float  # the shard's tar members (image, cls, json) with their headers
    shard_seconds_per_image: float  # decode + preprocess + encode, one core
    factor_bytes_per_image: float  # one shard of this many images, divided
    decompose_seconds_per_image: float  # solver + quantize + encode, one core
    png_bytes_per_image: float  # an image at the trained size as PNG (what sample/evaluate write)
    png_bytes_per_upscaled_image: float
    largest_source_pixels: int


def _sample_items(cfg: PipelineConfig, tmp: str) -> tuple[Any, list[Any], dict[str, int], int]:
    """(source store, a seeded sample of train items, images per split, classes) of the configured source."""
    from nextdetail.storage.embedded import build_embedded
    from nextdetail.storage.fs import Store
    from nextdetail.storage.sources import list_source

    url, options = cfg.data.source, cfg.storage.options  # a source is read with the storage's options, as shard does
    embedded = cfg.data.embedded
    if url == "embedded":  # its size is its settings; the sample: a few crops per photo, built in `tmp`
        few = embedded.model_copy(update={"per_class": 2, "val_per_class": 1})
        url, options = build_embedded(Store(tmp), few, log=lambda _: None).url(), None
    listing = list_source(url, cfg.data.splits, cfg.data.layout, options)
    counts = {split: sum(1 for it in items if it.wnid is not None and it.size >= 0)
              for split, items in listing.items.items()}
    if cfg.data.source == "embedded":
        counts = {split: len(listing.classes) * (embedded.per_class if split == "train" else embedded.val_per_class)
                  for split in counts}
    train = [it for it in listing.items[cfg.data.splits[0]] if it.wnid is not None and it.size >= 0]
    if not train:
        raise UserError(f"plan: {cfg.data.source} has no images in {cfg.data.splits[0]!r}; pass --images N")
    rng = np.random.default_rng(0)
    picked = [train[i] for i in sorted(rng.choice(len(train), min(SAMPLE_IMAGES, len(train)), replace=False))]
    return Store(url, options, follow_links=True), picked, counts, len(listing.classes)


def measure_sample(cfg: PipelineConfig, source: Any, items: list[Any], tmp: str) -> SampleCosts:
    """Run the sample through the shard's encoder and the decomposition's solver and store (module docstring)."""
    import torch
    from PIL import Image

    from nextdetail.models.mumford_shah import ATConfig, decompose
    from nextdetail.stages.shard.tasks import ShardItem, _encode_sample
    from nextdetail.storage import factors
    from nextdetail.storage.fs import Store
    from nextdetail.storage.images import encode_image
    from nextdetail.storage.shards import ShardTarWriter

    buffer, pixels, arrays = io.BytesIO(), 0, []
    writer = ShardTarWriter(buffer)
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        data = source.read_bytes(item.relpath)
        row: dict[str, Any] = {}  # the manifest row the shard writes: the source's width and height
        sample = _encode_sample(ShardItem(item.key, item.relpath, item.wnid, i, len(data), ""), data, cfg.shard, row)
        writer.write(sample)
        with Image.open(io.BytesIO(sample[cfg.shard.image_format])) as im:
            arrays.append(np.asarray(im.convert("RGB")))
        pixels = max(pixels, row["width"] * row["height"])
    shard_s = (time.perf_counter() - t0) / len(items)
    writer.close()
    tar_bytes = (buffer.tell() - 10240) / len(items)  # without the end-of-archive blocks, paid once per tar
    side = {a.shape for a in arrays}
    if len(side) != 1:
        raise UserError("plan: the sample's images differ in size; set shard.resolution (decompose needs one size)")
    images = np.stack(arrays)  # (N, H, W, 3)
    png = float(np.mean([len(encode_image(Image.fromarray(a), "png")) for a in arrays]))
    up = cfg.sample.upscale
    png_up = float(np.mean([len(encode_image(Image.fromarray(a).resize((a.shape[1] * up, a.shape[0] * up),
                                                                          Image.BICUBIC), "png")) for a in arrays]))
    d = cfg.decompose
    torch.set_num_threads(1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    at = ATConfig.from_settings(d, side=images.shape[2])
    decompose(x[:1], 1, at)  # untimed: the first call may build the solver's C++ extension
    t0 = time.perf_counter()
    bases = torch.cat([decompose(x[s:s + d.batch_size], d.order, at).transpose(0, 1)
                       for s in range(0, len(x), d.batch_size)]).numpy()
    stored, _ = factors.quantize(bases, d.dtype)
    store = Store(f"{tmp}/factors")
    factors.create_groups(store, ["train"])
    factors.create_array(store, "train", "sample.tar", len(x), bases.shape[1:], d.dtype, d.chunk_images)
    factors.write_whole(store, "train", "sample.tar", stored)
    decompose_s = (time.perf_counter() - t0) / len(x)
    shard_object = [r for r in store.find("factors.zarr/train/sample") if "/c/" in r]
    factor_bytes = sum(len(store.read_bytes(r)) for r in shard_object) / len(x)
    return SampleCosts(len(items), tar_bytes, shard_s, factor_bytes, decompose_s, png, png_up, pixels)


def cpu_flops_per_second() -> float:
    """This machine's fp32 matmul rate on one thread (the best of three 512² products)."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(8):
            a @ a
        best = min(best, time.perf_counter() - t0)
    return 8 * 2 * 512**3 / best


# ---- counted from the layout and the models ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCounts:
    tokenizer_params: int
    tokenizer_tensors: int  # torch.save stores each in its own zip record: ≈ 330 B apiece (measured)
    discriminator_params: int  # 0 without the GAN loss; its weights and AdamW moments join each checkpoint
    discriminator_tensors: int
    tokenizer_train_flops: float  # per image, one training step (forward × 3)
    tokenizer_encode_flops: float  # per image
    transformer_params: int
    transformer_tensors: int
    transformer_train_flops: float  # per image (forward × 3 over L tokens)
    sample_flops: float  # per image, with CFG
    tokens_per_image: int
    token_itemsize: int


def count_models(cfg: PipelineConfig, classes: int) -> ModelCounts:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.models.flops import cart_sample_flops, transformer_flops
    from nextdetail.models.quant import schedule_of
    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.stages.train_ar.tasks import transformer_config
    from nextdetail.storage.tokens import token_dtype, token_layout

    spec = TokenizerSpec.from_config(cfg)
    with torch.device("meta"):
        tokenizer = BaseDetailVQVAE(spec)
        disc = {}
        if cfg.tokenizer.gan_weight > 0:
            from nextdetail.models.discriminator import PatchDiscriminator

            disc = PatchDiscriminator().state_dict()
    side = cfg.shard.resolution
    image = torch.empty(1, 3, side, side, device="meta")
    bases = torch.empty(spec.order, 1, 3, side, side, device="meta") if spec.order else None
    with FlopCounterMode(display=False) as counter:
        tokenizer.img_to_indices(image, bases)
    encode = float(counter.get_total_flops())
    layout = token_layout(schedule_of(spec), spec.order, spec.vocab_size, list(cfg.tokens.variants))
    tcfg = transformer_config(cfg.ar, layout, classes, spec.z_channels)
    from nextdetail.models.transformer import NextDetailTransformer

    with torch.device("meta"):
        transformer = NextDetailTransformer(tcfg)
    L = layout["tokens_per_image"]
    forward = transformer_flops(tcfg.depth, tcfg.C, tcfg.mlp_hidden, L, L) + 2 * L * tcfg.C * tcfg.vocab_size
    return ModelCounts(
        tokenizer_params=sum(t.numel() for t in tokenizer.state_dict().values()),  # buffers saved too
        tokenizer_tensors=len(tokenizer.state_dict()),
        discriminator_params=sum(t.numel() for t in disc.values()),
        discriminator_tensors=len(disc),
        tokenizer_train_flops=3 * 2.2 * encode,  # decoder ≈ 1.2 × encoder at VAR's widths (docs/results.md)
        tokenizer_encode_flops=encode,
        transformer_params=sum(t.numel() for t in transformer.state_dict().values()),
        transformer_tensors=len(transformer.state_dict()),
        transformer_train_flops=3 * forward,
        sample_flops=2 * cart_sample_flops(tcfg),
        tokens_per_image=L,
        token_itemsize=np.dtype(token_dtype(spec.vocab_size)).itemsize)


# ---- the plan ------------------------------------------------------------------------------------------------


def _tars(cfg: PipelineConfig, images: dict[str, int]) -> dict[str, int]:
    from nextdetail.storage.shards import shard_count_for

    fixed = cfg.shard.shard_count or {}
    return {s: fixed.get(s) or shard_count_for(n, cfg.shard.samples_per_shard) for s, n in images.items() if n}


def _tar_bytes(members: int, png: float) -> float:
    """A webdataset tar of `members` samples (a PNG and its class): headers and padding included."""
    return members * (math.ceil(png / 512) * 512 + 512 + 1024) + 10_240


def build_plan(cfg: PipelineConfig, images: dict[str, int], classes: int, sample: SampleCosts, models: ModelCounts,
               cpu_rate: float, workers: int, source: str) -> Plan:
    """Every stage's images, bytes, objects, hours and peak memory for `images` per split (module docstring)."""
    tars = _tars(cfg, images)
    n_tars, n_images, splits = sum(tars.values()), sum(images.values()), len(tars)
    per_tar = max(math.ceil(n / tars[s]) for s, n in images.items() if n)  # a tar's mean images (hashing)
    side, d = cfg.shard.resolution, cfg.decompose
    variants = len(cfg.tokens.variants)

    def hours(flops: float, device: str) -> float:
        rate = ASSUMED_GPU_UTILISATION * H200_BF16_PEAK if device == "cuda" else cpu_rate  # CPU-hours: core-hours
        return flops / rate / 3600

    tok, ar, smp, ev = cfg.tokenizer, cfg.ar, cfg.sample, cfg.eval

    def weights(params: int, tensors: int) -> int:
        """One fp32 copy of a model as torch.save writes it (a checkpoint holds three: weights, AdamW's moments)."""
        return 4 * params + 330 * tensors

    factor_value = np.dtype(d.dtype).itemsize
    png, png_up = sample.png_bytes_per_image, sample.png_bytes_per_upscaled_image
    kept_tok = min(tok.keep_checkpoints, math.ceil(tok.steps / tok.checkpoint_every))
    kept_ar = min(ar.keep_checkpoints, math.ceil(ar.steps / ar.checkpoint_every))
    # tokens: blosc's shuffle + zstd keeps about the bits a code uses (log2 V of the dtype's), upper bound
    token_bytes = models.token_itemsize * min(1.0, math.log2(cfg.tokenizer.vocab_size) / (8 * models.token_itemsize))
    # sample: images (and ×f), the webdataset tar, per-class grids and grid.png (figures.class_grid: a real photo
    # and the samples, small images enlarged to 64 px — a PNG of an enlarged image ≈ 2× the image's, measured),
    # hires/grid.png (two samples per class, bilinear beside CART, enlarged to 128 px)
    sample_classes = len(smp.classes) if smp.classes else classes
    generated = smp.per_class * sample_classes
    upscaled = generated if smp.upscale > 1 else 0
    cell = png * (2 if side < 64 else 1)
    hires_cell = png_up * (2 if side * smp.upscale < 128 else 1)
    sample_bytes = (generated * png + upscaled * png_up + _tar_bytes(generated, png)
                    + 2 * (generated + sample_classes) * cell
                    + (2 * min(2, smp.per_class) * sample_classes * hires_cell if upscaled else 0) + 8_000)
    # held while sampling (stages/sample/outputs.py): the samples of grid.png's ≤ 16 classes, and the classes in
    # flight — one being sampled, up to two per core encoded ahead of the writes (this machine's cores)
    class_array = smp.per_class * 3 * side * side * (1 + 2 * smp.upscale**2 if upscaled else 1)
    sample_held = (min(GRID_ROWS, sample_classes) * smp.per_class * 3 * side * side
                   + (1 + 2 * (os.cpu_count() or 1)) * class_array)
    # evaluate: per evaluated checkpoint a samples tar; grids; the reference statistics (mean + covariance of the
    # extractor's features, float64) for the reference and, with rfid, the held-out split
    evaluated = ev.samples_per_class * classes
    checkpoints = kept_ar if ev.checkpoints == "all" else 1
    features = 2048 if ev.extractor == "inception-v3-compat" else 512
    statistics = 1 + int(ev.rfid)
    reference = images.get(ev.reference, 0) if ev.reference in images else (ev.reference_max or 0)
    stages = [
        StagePlan("shard", n_images,
                  round(n_images * (sample.tar_bytes_per_image + 200) + n_tars * (10_240 + 9_000)),
                  3 * n_tars + 3, n_images * sample.shard_seconds_per_image / 3600, "cpu",
                  sample.largest_source_pixels * 4 + per_tar * round(sample.tar_bytes_per_image),
                  f"tar bytes and seconds per image measured on {sample.images} source images; manifest ≈ 200 B/row, "
                  "≈ 9 KB of part records per tar"),
        StagePlan("decompose", n_images, round(n_images * (sample.factor_bytes_per_image + 20) + n_tars * 4_000),
                  3 * n_tars + 3 + splits, n_images * sample.decompose_seconds_per_image / 3600, "cpu",
                  per_tar * d.order * 3 * side * side * factor_value + round(per_tar * sample.factor_bytes_per_image),
                  f"{d.dtype} factor shard and solver seconds measured on {sample.images} images; ≈ 4 KB of "
                  "metadata and part records per tar"),
        StagePlan("train_tokenizer", tok.steps * tok.batch_size,
                  (1 + 3 * kept_tok) * weights(models.tokenizer_params, models.tokenizer_tensors)
                  + 3 * kept_tok * weights(models.discriminator_params, models.discriminator_tensors) + 90_000,
                  6 + kept_tok,
                  hours(tok.steps * tok.batch_size * models.tokenizer_train_flops, tok.device), tok.device,
                  16 * models.tokenizer_params, "parameters counted (tokenizer.pt 4 B, a checkpoint 12 B each); FLOPs "
                  "counted (forward × 3) over the throughput"),
        StagePlan("tokenize", n_images * variants,
                  round(n_images * variants * models.tokens_per_image * token_bytes + n_tars * 1_500 + 50_000),
                  3 * n_tars + 5 + splits,
                  hours(n_images * variants * models.tokenizer_encode_flops, cfg.tokens.device), cfg.tokens.device,
                  4 * models.tokenizer_params + per_tar * (d.order + 1) * 3 * side * side * 4,
                  "tokens per image counted, log2(V) bits each (an upper bound); encoder FLOPs counted"),
        StagePlan("train_ar", ar.steps * ar.batch_size,
                  (2 + 3 * kept_ar) * weights(models.transformer_params, models.transformer_tensors) + 100_000,
                  6 + kept_ar, hours(ar.steps * ar.batch_size * models.transformer_train_flops, ar.device), ar.device,
                  16 * models.transformer_params, "parameters counted (transformer.pt and best.pt 4 B, a checkpoint "
                  "12 B each); FLOPs counted (forward × 3) over the throughput"),
        StagePlan("sample", generated + upscaled, round(sample_bytes),
                  generated + upscaled + sample_classes + 4 + int(upscaled > 0),
                  hours(generated * models.sample_flops * (1 + (smp.upscale**2 if upscaled else 0)), smp.device),
                  smp.device, 4 * models.transformer_params + 4 * models.tokenizer_params + sample_held,
                  "PNG bytes per image measured on the source sample; sampler FLOPs counted; memory: the models, "
                  "grid.png's classes and the classes in flight"),
        StagePlan("evaluate", evaluated * checkpoints + reference,
                  round(checkpoints * _tar_bytes(evaluated, png) + 2 * (evaluated + classes) * cell
                        + statistics * features**2 * 8 + 80_000),
                  checkpoints + classes + 5 + 2 + 2 * statistics,
                  hours(evaluated * checkpoints * (models.sample_flops + INCEPTION_GFLOPS * 1e9)
                        + reference * INCEPTION_GFLOPS * 1e9, ev.device), ev.device,
                  4 * models.transformer_params + features * features * 8 + (evaluated + reference) * features * 4,
                  f"samples tar per evaluated checkpoint; {statistics} reference statistics ({features}² covariance); "
                  "memory: every feature held (KID, precision/recall need them)"),
    ]
    assumptions = [
        f"compute on cuda: FLOPs at {ASSUMED_GPU_UTILISATION:.0%} of one H200's dense bf16 peak "
        f"({H200_BF16_PEAK / 1e12:.0f} TFLOP/s) — assumed, no GPU has measured this code yet",
        f"compute on cpu: FLOPs at this machine's measured fp32 matmul rate, {cpu_rate / 1e9:.1f} GFLOP/s per "
        "thread (a lower bound on hours)",
        f"{n_tars} tars of about {per_tar} images (shard.samples_per_shard={cfg.shard.samples_per_shard}, a power "
        "of two per split); one factor shard and one token chunk per tar",
        "token arrays at log2(V) bits per code (what shuffle + zstd keeps of uniform codes: an upper bound); peak "
        "memory excludes activations",
        f"hours on {workers} workers: the total divided by the workers (GPU stages: by as many GPUs)",
    ]
    return Plan(source, images, classes, stages, workers, assumptions)


def make_plans(cfg: PipelineConfig, images: int | None = None, workers: int = 1) -> list[Plan]:
    """[the configured source's plan, ImageNet-1k's at the same settings] (one plan when the source is
    ImageNet-1k's size). `images`: the train split's image count,
    for a source that cannot be listed (a bucket without credentials; val then scaled as ImageNet's 50 000 :
    1 281 167, 1000 classes): its per-image costs are then measured on the embedded photographs, and said so."""
    if cfg.shard.resolution is None:
        raise UserError("plan: shard.resolution is None (originals kept); plan needs one image size")
    with tempfile.TemporaryDirectory(prefix="nextdetail-plan-") as tmp:
        source_name = cfg.data.source
        try:
            source, sampled, counts, classes = _sample_items(cfg, tmp)
        except (UserError, OSError) as err:
            if images is None:
                raise UserError(f"plan: cannot list {cfg.data.source} ({str(err).split(';')[0]}); give the image "
                                "count: nextdetail plan --images 1281167") from None
            # photographs at the trained size (never upscaled: that would flatter the codecs), as JPEG like a
            # photo collection's originals
            photos = cfg.data.embedded.model_copy(update={"per_class": 2, "val_per_class": 1, "image_format": "jpg",
                                                          "image_size": cfg.shard.resolution})
            embedded = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "embedded",
                                                                                  "embedded": photos})})
            source, sampled, _, _ = _sample_items(embedded, tmp)
            source_name = f"{cfg.data.source} (not listed: per-image costs from the embedded photographs)"
            counts, classes = {}, IMAGENET_CLASSES
        if images is not None:
            counts = {s: images if s == "train" else round(images * IMAGENET["val"] / IMAGENET["train"])
                      for s in cfg.data.splits}
        sample = measure_sample(cfg, source, sampled, tmp)
    rate = cpu_flops_per_second()
    here = build_plan(cfg, counts, classes, sample, count_models(cfg, classes), rate, workers, source_name)
    if classes == IMAGENET_CLASSES and all(counts.get(s) == IMAGENET.get(s) for s in cfg.data.splits):
        return [here]  # the configured source is ImageNet-1k's size already
    imagenet = build_plan(cfg, {s: IMAGENET.get(s, 0) for s in cfg.data.splits}, IMAGENET_CLASSES, sample,
                          count_models(cfg, IMAGENET_CLASSES), rate, workers,
                          "ImageNet-1k (these settings; this source's per-image costs)")
    return [here, imagenet]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render(plan: Plan) -> str:
    """The plan as the table `nextdetail plan` prints."""
    splits = ", ".join(f"{s} {n:,}" for s, n in plan.images.items())
    lines = [f"{plan.source}: {sum(plan.images.values()):,} images ({splits}), {plan.classes} classes",
             f"  {'stage':<16}{'images':>12}{'bytes':>12}{'objects':>10}{'hours':>16}  {'peak memory/worker':>18}"]
    for s in plan.stages:
        unit = "GPU-h" if s.device == "cuda" else "CPU-h"
        lines.append(f"  {s.stage:<16}{s.images:>12,}{_size(s.bytes):>12}{s.objects:>10,}{s.hours:>10.2f} {unit}"
                     f"  {_size(s.peak_memory_bytes):>18}")
    lines.append(f"  {'total':<16}{'':>12}{_size(plan.total_bytes):>12}{plan.total_objects:>10,}"
                 f"{sum(s.hours for s in plan.stages):>10.2f} h      on {plan.workers} worker(s): "
                 f"{plan.wall_hours():.2f} h")
    return "\n".join(lines)
