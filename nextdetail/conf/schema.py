"""Typed pipeline configuration: one pydantic section per stage, composed into `PipelineConfig` with the
environment's sections (`environment.py`); what is derived and checked across sections is `cross.py`.

Every model forbids unknown keys, so a typo fails loudly instead of being ignored. A stage's cache
key is derived from its own model only (`PipelineConfig.stage_settings`), so changing one knob
re-runs only the stages that read it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nextdetail.conf.cross import auto_patch_nums, cross_problems
from nextdetail.conf.environment import (  # noqa: F401 (EmbeddedConfig: re-exported)
    DaskConfig,
    DataConfig,
    EmbeddedConfig,
    StorageConfig,
    check_resources_setting,
)
from nextdetail.conf.environment import Section as _Section
from nextdetail.conf.environment import secret_options as _secret_options
from nextdetail.conf.model_settings import ARConfig, TokenizerConfig


class ShardConfig(_Section):
    """The `shard` stage: class folders → webdataset tars + Parquet manifest."""

    resolution: int | None = Field(default=256, ge=8, description="output side in pixels; None keeps originals")
    preprocess: Literal["center_crop", "keep"] = "center_crop"
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    samples_per_shard: int = Field(default=1000, ge=1, description="target mean; shard count is a power of two")
    shard_count: dict[str, int] | None = Field(
        default=None, description="fixed shards per split (e.g. {train: 1024}); None derives it from the size"
    )
    small_images: Literal["upscale", "skip"] = "upscale"
    exif: Literal["apply", "ignore"] = Field(
        default="apply", description="EXIF orientation: apply (photos upright; recorded per file in the manifest) or "
        "ignore (the stored pixels, as ADM/VAR prepare ImageNet: the imagenet presets)")
    fingerprint: Literal["stat", "content"] = Field(
        default="stat", description="input identity: (path, size, mtime) or the bytes' sha256 (portable, reads all)"
    )
    max_file_bytes: int = Field(default=64 << 20, ge=1, description="a file larger than this is a manifest row "
                                "(too_large), never read (a 2 GB file named .JPEG)")
    max_pixels: int = Field(default=89_478_485, ge=1, description="an image of more pixels (read from its header) is "
                            "a manifest row (too_large), never decoded; Pillow's own bomb threshold")

    @model_validator(mode="after")
    def _check(self) -> ShardConfig:
        if self.preprocess == "center_crop" and self.resolution is None:
            raise ValueError("preprocess=center_crop needs a resolution")
        for split, n in (self.shard_count or {}).items():
            if n < 1:
                raise ValueError(f"shard.shard_count.{split}={n}: must be >= 1 (tars for that split)")
        return self


class DecomposeConfig(_Section):
    """CART §3.1: n-th order base/detail decomposition by Ambrosio–Tortorelli smoothing (Eq. 8)."""

    order: int = Field(default=3, ge=1, le=8, description="n in I = B_n + D_n + … + D_1")
    alpha: float = Field(default=10.0, gt=0, description="smoothness weight α of Eq. 8 (images in [0, 1], unit pixels)")
    alpha_reference_px: int | None = Field(
        default=None, ge=1, description="None: α applies as given at every resolution (in pixel² units the smoothing "
        "reaches ≈ √α pixels, a larger share of a small image); R: α is given for R-px images and scaled by "
        "(side / R)², so the base factors smooth the same fraction of the image at any size (λ and ε stay in pixels)")
    lambda_: float = Field(default=0.01, gt=0, alias="lambda", description="edge-length weight λ of Eq. 8")
    epsilon: float = Field(default=0.01, gt=0, description="ε of Eq. 8: the edge zone's width (final value)")
    epsilon_start: float | None = Field(default=None, gt=0, description="None: constant ε; else ε decays from this")
    outer_iterations: int = Field(default=3, ge=1, le=100, description="s-step/u-step alternations (at most)")
    outer_tol: float = Field(default=1e-3, ge=0, description="an image stops once u changes less than this (relative)")
    cg_tol: float = Field(default=3e-2, gt=0, lt=1, description="relative residual of each conjugate-gradient solve")
    cg_max_iter: int = Field(default=40, ge=1, description="iteration cap of each conjugate-gradient solve")
    # uint8 by default: 0.22× float16's bytes, and the tokenizer trained on it is within training noise of one
    # trained on float32 factors (docs/results.md "The 8-bit factor store and the tokenizer").
    dtype: Literal["float16", "float32", "uint8", "uint16"] = Field(
        default="uint8", description="storage type of the base factors: uint8/uint16 quantized over [0, 1] with each "
        "RGB plane a lossless WebP/JPEG-XL image (error ≤ half a level), or float16/float32 (blosc-zstd)")
    # How the work runs, not what it computes: excluded from the artifact identity.
    # On a CPU one image at a time is fastest (its CG vectors stay in cache); on a GPU use 64+.
    batch_size: int = Field(default=1, ge=1, description="images per solver call")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="where the solver runs in each worker")
    torch_threads: int = Field(default=1, ge=1, description="torch threads per Dask worker thread")
    chunk_images: int = Field(default=1, ge=1, description="images per inner Zarr chunk (the unit a reader "
                              "decodes) of the one shard per tar")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "torch_threads"})

    def alpha_at(self, side: int) -> float:
        """α for images `side` px wide (`alpha_reference_px`)."""
        return self.alpha if self.alpha_reference_px is None else self.alpha * (side / self.alpha_reference_px) ** 2

    def identity_settings(self) -> dict:
        """The settings the base factors depend on (the solver freezes each image on its own, so the
        batch size does not change a result; devices agree to within the solver tolerance)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


class TokensConfig(_Section):
    """The `tokenize` stage: every image's token maps in a content-addressed, shareable Zarr cache."""

    cache: str | None = Field(default=None, description="root of the token caches (a path or s3://bucket/prefix, "
                                                         "e.g. a team bucket); None: storage.root")
    cache_options: dict[str, object] | None = Field(default=None, description="fsspec options for `cache`; "
                                                                                "None: storage.options")
    local_cache: str = Field(default="./.nextdetail/token-cache",
                             description="read-through copy of a remote cache's files (verified by sha256)")
    variants: list[Literal["none", "hflip"]] = Field(default_factory=lambda: ["none", "hflip"], min_length=1,
                                                     description="augmentations stored per image (LlamaGen's idea)")
    splits: list[str] | None = Field(default=None, description="splits to encode; None: every split decomposed")
    verify: Literal["sha256", "size"] = Field(default="sha256", description="check of a cache before reuse")
    # How the work runs, not what it computes: excluded from the cache identity.
    batch_size: int = Field(default=64, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (1 per task on Dask workers)")
    resources: dict[str, float] | None = Field(
        default=None, description="None: encode in this process, one tar after another; e.g. {GPU: 1}: one task "
        "per tar on the Dask cluster's workers that offer these resources (`dask worker --resources GPU=1`)")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"cache", "cache_options", "local_cache", "verify", "batch_size", "device", "torch_threads", "resources"})

    _wrap_options = field_validator("cache_options", mode="after")(_secret_options)
    _check_resources = field_validator("resources", mode="after")(check_resources_setting)

    @model_validator(mode="after")
    def _check(self) -> TokensConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"tokens.variants has repeats: {self.variants}")
        return self

    def identity_settings(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


class SampleConfig(_Section):
    """The `sample` stage: class-conditional samples of the trained transformer, with CFG."""

    classes: list[int] | None = Field(default=None, description="class indices; None: every class")
    per_class: int = Field(default=8, ge=1)
    cfg: float = Field(default=1.5, ge=0, description="guidance at the last map (VAR's ramp from 0)")
    cfg_schedule: Literal["all_maps", "base_maps"] = Field(
        default="all_maps", description="cart: guidance ramps from 0 over all M maps (VAR's rule; the last base "
        "map's guidance then falls as detail maps are added) or over the base maps only (full guidance from the "
        "last base map on)")
    top_k: int = Field(default=0, ge=0, description="0: no top-k cut")
    top_p: float = Field(default=0.0, ge=0, le=1, description="0: no nucleus cut")
    seed: int = 0
    upscale: int = Field(default=2, ge=1, le=8, description="also generate at this many times the trained size "
                         "(CART §4.2.1: upscaled base + patch-wise detail; 1: off)")
    checkpoint: Literal["last", "best"] = "last"
    # NDP's compute dial (ar.model=ndp only).
    budget: float = Field(default=1.0, gt=0, le=1, description="ndp: fraction of the full pyramid's refinements "
                          "spent per image (1: every patch refined to the finest scale)")
    estimator: Literal["learned", "entropy", "oracle", "random", "uniform"] = Field(
        default="learned", description="ndp: which leaves to refine first — the difficulty head, the children's "
        "predictive entropy, the oracle (analysis only), random, or uniform breadth-first (VAR's order)")
    refine_per_step: int = Field(default=4, ge=1, description="ndp: leaves refined per forward pass")
    # CART's detail dial (ar.model=cart with detail maps).
    detail_budget: float = Field(default=1.0, gt=0, le=1, description="cart: fraction of latent patches that get "
                                 "detail tokens, the hardest by the detail head (1: all — the standard sampler)")
    detail_patch: int = Field(default=2, ge=1, description="cart: side of a detail-dial patch in latent cells")
    # How the work runs: excluded from the cache identity.
    batch_size: int = Field(default=32, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (1 per task on Dask "
                                      "workers); also the threads that encode the PNGs beside the sampling (on a "
                                      "GPU node: its cores over its workers)")
    resources: dict[str, float] | None = Field(
        default=None, description="None: sample every class in this process; e.g. {GPU: 1}: one task per group of "
        "`classes_per_task` classes on the Dask cluster's workers that offer these resources")
    classes_per_task: int = Field(default=16, ge=1, description="classes per cluster task (`resources`); the "
                                  "results are the same for any value and any number of workers")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "device", "torch_threads", "resources", "classes_per_task"})
    NDP_FIELDS: ClassVar[tuple[str, ...]] = ("budget", "estimator", "refine_per_step")
    CART_FIELDS: ClassVar[tuple[str, ...]] = ("upscale", "detail_budget", "detail_patch", "cfg_schedule")

    _check_resources = field_validator("resources", mode="after")(check_resources_setting)

    def evaluation_fields(self, model: str = "cart") -> tuple[str, ...]:
        """The sample.* settings evaluation samples with (its own count and seed; no upscaling); "any": both dials."""
        dial = {"ndp": self.NDP_FIELDS, "cart": ("detail_budget", "detail_patch", "cfg_schedule")}
        return ("cfg", "top_k", "top_p", *dial.get(model, (*dial["ndp"], *dial["cart"])))

    def identity_settings(self, model: str = "cart") -> dict:
        """The settings that change the samples of a `model` (cart|ndp) transformer."""
        skip = self.RUNTIME_FIELDS | frozenset(self.NDP_FIELDS if model == "cart" else self.CART_FIELDS)
        return {k: v for k, v in self.model_dump().items() if k not in skip}


class EvalConfig(_Section):
    """The `evaluate` stage: FID, IS, KID, precision/recall (torch-fidelity) of generated vs. real images,
    the tokenizer's reconstruction FID and PSNR, a report. Sampling uses sample.cfg / top_k / top_p."""

    extractor: Literal["inception-v3-compat", "nextdetail-randconv-v1"] = Field(
        default="inception-v3-compat", description="inception-v3-compat: the published protocol; "
        "nextdetail-randconv-v1: offline, deterministic, NOT comparable with published numbers")
    inception_weights: str | None = Field(default=None, description="weights-inception-2015-12-05-6726825d.pth: a "
                                          "path or URL; None: torch-fidelity's own download")
    reference: str = Field(default="train", description="real images: a split of the shard dataset (train, val, …) "
                           "or a path/URL to a folder of images or an .npz reference batch (ADM's arr_0)")
    reference_max: int | None = Field(default=None, ge=2, description="use at most this many reference images "
                                      "(the first by key); None: all")
    reference_cache: str | None = Field(default=None, description="root of the reference-statistics cache "
                                        "(shareable, e.g. s3://team-bucket/nd); None: storage.root")
    reference_cache_options: dict[str, object] | None = Field(default=None, description="None: storage.options")
    samples_per_class: int = Field(default=50, ge=1, description="generated images per class (VAR: 50 × 1000)")
    seed: int = Field(default=0, description="sampling seed of the evaluation (independent of sample.seed)")
    checkpoints: Literal["last", "best", "all"] = Field(
        default="last", description="all: every kept step checkpoint too (metric-vs-step curves)")
    metrics: list[Literal["fid", "isc", "kid", "prc"]] = Field(
        default_factory=lambda: ["fid", "isc", "kid", "prc"], min_length=1)
    rfid: bool = Field(default=True, description="also the tokenizer's reconstruction FID and PSNR on held-out images")
    rfid_split: str = "val"
    # torch-fidelity's protocol settings (its defaults).
    isc_splits: int = Field(default=10, ge=1)
    kid_subsets: int = Field(default=100, ge=1)
    kid_subset_size: int = Field(default=1000, ge=2, description="capped at the smaller set's size (noted)")
    prc_neighborhood: int = Field(default=3, ge=1)
    rng_seed: int = 2020
    # How the work runs: excluded from the cache identity.
    batch_size: int = Field(default=64, ge=1, description="images per feature-extractor call")
    device: Literal["cpu", "cuda"] = "cpu"
    weights_cache: str = Field(default="./.nextdetail/weights", description="where downloaded weights are kept")
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (1 per task on Dask workers)")
    resources: dict[str, float] | None = Field(
        default=None, description="None: sample and extract features of every class in this process; e.g. {GPU: 1}: one task per group of "
        "`classes_per_task` classes on the Dask cluster's workers that offer these resources")
    classes_per_task: int = Field(default=16, ge=1, description="classes per cluster task (`resources`); the "
                                  "results are the same for any value and any number of workers")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"reference_cache", "reference_cache_options", "batch_size", "device", "weights_cache", "inception_weights",
         "torch_threads", "resources", "classes_per_task"})

    _wrap_options = field_validator("reference_cache_options", mode="after")(_secret_options)
    _check_resources = field_validator("resources", mode="after")(check_resources_setting)

    def identity_settings(self) -> dict:
        # inception_weights is excluded: the extractor's identity is the sha256 of the weights themselves.
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}

    def protocol(self) -> dict[str, Any]:
        return {"isc_splits": self.isc_splits, "kid_subsets": self.kid_subsets, "kid_subset_size": self.kid_subset_size,
                "prc_neighborhood": self.prc_neighborhood, "rng_seed": self.rng_seed}


class PipelineConfig(_Section):
    preset: str = "custom"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    decompose: DecomposeConfig = Field(default_factory=DecomposeConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    ar: ARConfig = Field(default_factory=ARConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def tokenizer_order(self) -> int:
        """The decomposition order the tokenizer uses: `tokenizer.order`, else `decompose.order` (0: VAR's)."""
        return self.decompose.order if self.tokenizer.order is None else self.tokenizer.order

    _later_problems: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_cross(self, info: ValidationInfo) -> PipelineConfig:
        """Derive what `auto` stands for, then check the sections against each other. A command that runs the
        stages up to `until` (validation context {"until": stage}) refuses only the problems of those stages
        and their upstream; a later stage's problem is kept as a warning line (`warnings()`)."""
        if self.tokenizer.patch_nums == "auto":
            self.tokenizer.patch_nums = list(auto_patch_nums(self))
        from nextdetail.stages import (
            STAGES,  # the stages' declarations read this module: looked up when validating
        )

        until = (info.context or {}).get("until")
        last = STAGES.index(until) if until in STAGES else len(STAGES) - 1
        problems = list(cross_problems(self))
        for stage, message in problems:
            if STAGES.index(stage) <= last:
                raise ValueError(message)
        self._later_problems = [f"{message} ({stage} will refuse this config; this command stops before it)"
                                for stage, message in problems]
        return self

    def warnings(self) -> list[str]:
        """Problems of stages the command that loaded this config does not run (see `_check_cross`)."""
        return list(self._later_problems)
