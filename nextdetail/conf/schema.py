"""Typed pipeline configuration: one pydantic model per stage, composed into `PipelineConfig`.

Every model forbids unknown keys, so a typo fails loudly instead of being ignored. A stage's cache
key is derived from its own model only (`PipelineConfig.stage_settings`), so changing one knob
re-runs only the stages that read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nextdetail.models.configs import VAR_SHAPE as V
from nextdetail.models.configs import VAR_TOKENIZER as T
from nextdetail.models.configs import dyadic_sides

VAR_PATCH_NUMS: dict[int, tuple[int, ...]] = {
    16: T.patch_nums,  # VAR-256: its released tokenizer and d16…d30
    32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # VAR-512: VAR's 512 px schedule (CART-512, Table 2)
}
"""VAR's own base-scale schedules, by latent side."""


def derived_patch_nums(latent_side: int, dyadic: bool = False) -> tuple[int, ...]:
    """What `tokenizer.patch_nums: auto` stands for at this latent side: VAR's own schedule at 16 and 32 (unless
    the dyadic pyramid is asked for: NDP's quadtree), else the powers of two below the side, then the side — the
    pyramid 1, 2, 4, … at a power of two. Every schedule increases and ends at the latent side, as the decomposed
    base needs (`PipelineConfig._cross_problems`)."""
    if latent_side < 1:
        raise ValueError(f"the latent side must be positive, got {latent_side}")
    if not dyadic and latent_side in VAR_PATCH_NUMS:
        return VAR_PATCH_NUMS[latent_side]
    return (*(2**k for k in range(latent_side.bit_length()) if 2**k < latent_side), latent_side)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def _secret_options(value: Any) -> Any:
    """fsspec options with their credential-like values held as secrets (conf/secrets.py)."""
    from nextdetail.conf.secrets import wrap

    return wrap(value) if isinstance(value, dict) else value


class StorageConfig(_Section):
    """Where every artifact lives: a local path or an fsspec URL (``s3://bucket/prefix``)."""

    root: str = "./nextdetail-data"
    # Passed to fsspec (e.g. {"client_kwargs": {"endpoint_url": ...}}). Credentials: the environment / an AWS
    # profile, `credentials_file`, `credentials_block`, or inline here (held as secrets: never shown or stored).
    options: dict[str, object] = Field(default_factory=dict)
    credentials_file: str | None = Field(default=None, description="a JSON/YAML file of fsspec options (key, "
                                         "secret, …) merged into `options` at run time")
    credentials_block: str | None = Field(default=None, description="a Prefect Secret block (its value a mapping "
                                          "of fsspec options as a JSON string) merged into `options` at run time")

    _wrap_options = field_validator("options", mode="after")(_secret_options)


class DaskConfig(_Section):
    """Dask cluster for the parallel stages: a LocalCluster unless `address` names a running scheduler."""

    address: str | None = None
    n_workers: int | None = Field(default=None, ge=1, description="None: one per CPU core")
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str = "auto"


class EmbeddedConfig(_Section):
    """The embedded dataset: crops of real photographs that ship inside scikit-image, one class per photo."""

    per_class: int = Field(default=200, ge=1, description="training images per class")
    val_per_class: int = Field(default=20, ge=0, description="validation images per class")
    image_size: int = Field(default=32, ge=8, le=1024, description="side of the square crops, pixels")
    min_crop: float = Field(default=0.25, gt=0, le=1, description="smallest crop side, fraction of the shorter side")
    image_format: Literal["png", "jpg"] = "png"
    seed: int = 0


class DataConfig(_Section):
    """The source dataset: `embedded`, or a path/URL to an ImageNet-layout or class-folder dataset."""

    source: str = "embedded"
    layout: Literal["auto", "imagenet", "class_folders"] = "auto"
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], min_length=1)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)


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
    dtype: Literal["float16", "float32"] = Field(default="float16", description="storage type of the base factors")
    # How the work runs, not what it computes: excluded from the artifact identity.
    # On a CPU one image at a time is fastest (its CG vectors stay in cache); on a GPU use 64+.
    batch_size: int = Field(default=1, ge=1, description="images per solver call")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="where the solver runs in each worker")
    torch_threads: int = Field(default=1, ge=1, description="torch threads per Dask worker thread")
    chunk_images: int = Field(default=1, ge=1, description="images per Zarr chunk (whole chunks per shard)")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "torch_threads"})

    @model_validator(mode="after")
    def _check(self) -> DecomposeConfig:
        if self.batch_size % self.chunk_images:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of chunk_images={self.chunk_images} "
                             "(each write covers whole chunks)")
        return self

    def alpha_at(self, side: int) -> float:
        """α for images `side` px wide (`alpha_reference_px`)."""
        return self.alpha if self.alpha_reference_px is None else self.alpha * (side / self.alpha_reference_px) ** 2

    def identity_settings(self) -> dict:
        """The settings the base factors depend on (the solver freezes each image on its own, so the
        batch size does not change a result; devices agree to within the solver tolerance)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


class TokenizerConfig(_Section):
    """CART's base-detail VQ-VAE on VAR's tokenizer (models/tokenizer.py) and its `train_tokenizer` stage."""

    # Architecture (defaults: models/configs.TokenizerSpec, VAR's released tokenizer: ch 160, V 4096, z 32,
    # ch_mult 1,1,2,2,4 → 16×).
    vocab_size: int = Field(default=T.vocab_size, ge=2)
    z_channels: int = Field(default=T.z_channels, ge=1)
    ch: int = Field(default=T.ch, ge=8)
    ch_mult: list[int] = Field(default_factory=lambda: list(T.ch_mult), min_length=1)
    num_res_blocks: int = Field(default=T.num_res_blocks, ge=1)
    dropout: float = Field(default=T.dropout, ge=0, lt=1)
    using_sa: bool = T.using_sa
    using_mid_sa: bool = T.using_mid_sa
    beta: float = Field(default=T.beta, ge=0, description="commitment weight")
    using_znorm: bool = Field(default=T.using_znorm, description="cosine code lookup instead of L2 (VAR's flag: "
                              "only the lookup; codes and features stay as they are)")
    normalized_codes: bool = Field(default=T.normalized_codes, description="LlamaGen's normalized embedding space "
                                   "(NDP §2.1): the encoder's feature is ℓ2-normalized per position and map k's code "
                                   "is s_k·e/‖e‖ with a learned per-map scale s_k, so the cosine lookup is also the "
                                   "nearest code in L2")
    quant_resi: float = Field(default=T.quant_resi, ge=0, le=1, description="φ's blend of conv and identity")
    share_quant_resi: int = Field(default=T.share_quant_resi, ge=2, description="φ's shared by all token maps")
    patch_nums: Annotated[list[int], Field(min_length=1)] | Literal["auto"] = Field(
        default="auto", description="sides of the base token maps (the multi-scale schedule); auto: derived from "
        "the latent side shard.resolution / downsampling (derived_patch_nums: VAR's schedule at "
        "16 and 32, the dyadic pyramid 1, 2, 4, … for NDP and other powers of two)")
    order: int | None = Field(default=None, ge=0, description="detail factors used; None: decompose.order; 0: VAR")
    detail_depth: int = Field(default=T.detail_depth, ge=1,
                              description="(M − B)/n: full-resolution token maps per detail factor")
    residual: Literal["independent", "shared", "independent+global"] = Field(
        default=T.residual, description="shared (default): each source's chain starts from what the chains before "
        "it left, so the last map quantizes the global residual f_I − f̂ (Algorithm 1's running f_I); independent: "
        "one residual chain per source (Algorithm 1 read literally: what the base chain leaves is never corrected); "
        "independent+global: the independent chains, then one more full-resolution map on f_I − f̂")
    pretrained: str | None = Field(default=None, description="a tokenizer file (path or URL) to adopt instead of "
                                   "training: VAR's release (vae_ch160v4096z32.pth) or a nextdetail tokenizer.pt; "
                                   "the architecture settings must describe it")
    init_from: str | None = Field(default=None, description="VAR tokenizer checkpoint (vae_ch160v4096z32.pth) to start "
                                  "from (fine-tuning; `pretrained` adopts one without training)")
    truncation: float = Field(default=0.0, ge=0, le=1, description="NDP: fraction of training images decoded from "
                              "a random quadtree state of the dyadic pyramid (region-wise truncation); needs order 0 "
                              "and patch_nums 1, 2, 4, … up to the latent side")
    # Training.
    steps: int = Field(default=100_000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    rec_loss: Literal["l2", "l1"] = "l2"
    lpips_weight: float = Field(default=0.0, ge=0, description="0 disables the perceptual loss")
    lpips_vgg16: str | None = Field(default=None, description="torchvision's vgg16 weights (vgg16-397923af.pth)")
    lpips_lin: str | None = Field(default=None, description="LPIPS's linear layers (lpips/weights/v0.1/vgg.pth)")
    gan_weight: float = Field(default=0.0, ge=0, description="0 disables the PatchGAN hinge loss")
    gan_start: int = Field(default=0, ge=0, description="steps of warm-up before the discriminator joins")
    restart_dead_every: int = Field(default=200, ge=0, description="steps between dead-code restarts; 0: never")
    dead_threshold: float = Field(default=0.01, ge=0, description="dead: EMA hits below this fraction of uniform")
    seed: int = 0
    # How the work runs, not what it computes: excluded from the artifact identity.
    device: Literal["cpu", "cuda"] = "cpu"
    nproc: int | None = Field(default=1, ge=1, description="data-parallel processes (torchrun); None: one per GPU")
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (per process)")
    loader_workers: int = Field(default=0, ge=0, description="processes decoding batches ahead; 0: in the loop")
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="step checkpoints kept")
    log_every: int = Field(default=100, ge=1)

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"device", "nproc", "torch_threads", "loader_workers", "checkpoint_every", "keep_checkpoints", "log_every"})

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if self.patch_nums != "auto" and self.patch_nums != sorted(self.patch_nums):
            raise ValueError(f"patch_nums must not decrease (repeats = residual maps at one scale), got {self.patch_nums}")
        if self.lpips_weight > 0 and not (self.lpips_vgg16 and self.lpips_lin):
            raise ValueError("lpips_weight > 0 needs lpips_vgg16 and lpips_lin (weights files; nothing is downloaded)")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def identity_settings(self) -> dict:
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
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores")

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"cache", "cache_options", "local_cache", "verify", "batch_size", "device", "torch_threads"})

    _wrap_options = field_validator("cache_options", mode="after")(_secret_options)

    @model_validator(mode="after")
    def _check(self) -> TokensConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"tokens.variants has repeats: {self.variants}")
        return self

    def identity_settings(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


class ARConfig(_Section):
    """The `train_ar` stage: the next-detail transformer (CART §3.3) on the token cache, VAR's recipe."""

    model: Literal["cart", "ndp"] = Field(
        default="cart", description="cart: the block-causal next-detail transformer (CART); ndp: the masked "
        "next-detail model with a difficulty head (NDP; needs tokenizer.order=0 and a dyadic patch_nums)")
    # The model (defaults: models/configs.VARShape): width 64·depth and heads = depth unless set (VAR).
    depth: int = Field(default=V.depth, ge=1)
    width: int | None = Field(default=V.width, ge=8, description="None: 64 · depth (VAR)")
    heads: int | None = Field(default=V.heads, ge=1, description="None: depth (VAR)")
    mlp_ratio: float = Field(default=V.mlp_ratio, gt=0)
    drop_path: float | None = Field(default=V.drop_path, ge=0, lt=1, description="None: 0.1 · depth / 24 (VAR)")
    attn_l2_norm: bool = V.attn_l2_norm
    class_dropout: float = Field(default=V.cond_drop, ge=0, le=1,
                                 description="labels dropped for classifier-free guidance")
    pretrained: str | None = Field(default=None, description="VAR's released transformer (var_d16.pth …, path or "
                                   "URL) to adopt instead of training: order 0 over VAR's scales, its depth; the "
                                   "model settings must describe it")
    # The optimisation: AdamW, lr = base_lr · batch_size / base_batch (VAR: 1e-4 per 256), linear warm-up
    # from warmup_start · lr, then decay to min_lr_ratio · lr.
    steps: int = Field(default=200_000, ge=1)
    batch_size: int = Field(default=768, ge=1, description="global batch, split over the processes")
    base_lr: float = Field(default=1e-4, gt=0)
    base_batch: int = Field(default=256, ge=1)
    warmup_steps: int = Field(default=2000, ge=0)
    warmup_start: float = Field(default=0.005, ge=0, le=1)
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.05, ge=0)
    grad_clip: float = Field(default=2.0, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    loss_weighting: Literal["token", "map"] = Field(
        default="token", description="token: every token counts the same (VAR); map: every token map counts the "
        "same (the few coarse tokens that fix an image's layout and colours weigh as much as a detail map)")
    difficulty_weight: float = Field(default=0.5, ge=0, description="weight of the difficulty head's loss — ndp: "
                                     "MSE to the log latent error that refining a leaf removes; cart with detail maps: "
                                     "the detail dial's head (detached features: the transformer is unchanged)")
    split: str = "train"
    val_split: str | None = Field(default="val", description="held-out split for the best checkpoint; None: none")
    val_batches: int = Field(default=4, ge=1)
    seed: int = 0
    # How the work runs, not what it computes: excluded from the cache identity.
    device: Literal["cpu", "cuda"] = "cpu"
    nproc: int | None = Field(default=1, ge=1, description="processes (torchrun); None: one per visible GPU")
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (per process)")
    loader_workers: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="step checkpoints kept (evaluate with "
                                  "eval.checkpoints=all draws its metric-vs-step curve from them)")
    log_every: int = Field(default=100, ge=1)

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"device", "nproc", "torch_threads", "loader_workers", "checkpoint_every", "keep_checkpoints", "log_every"})
    ARCHITECTURE_FIELDS: ClassVar[frozenset[str]] = frozenset(  # what adopted weights (`pretrained`) must match
        {"model", "depth", "width", "heads", "mlp_ratio", "attn_l2_norm"})

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / self.base_batch

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

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})
    NDP_FIELDS: ClassVar[tuple[str, ...]] = ("budget", "estimator", "refine_per_step")
    CART_FIELDS: ClassVar[tuple[str, ...]] = ("upscale", "detail_budget", "detail_patch", "cfg_schedule")

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

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"reference_cache", "reference_cache_options", "batch_size", "device", "weights_cache", "inception_weights"})

    _wrap_options = field_validator("reference_cache_options", mode="after")(_secret_options)

    def identity_settings(self) -> dict:
        # inception_weights is excluded: the extractor's identity is the sha256 of the weights themselves.
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}

    def protocol(self) -> dict[str, Any]:
        return {"isc_splits": self.isc_splits, "kid_subsets": self.kid_subsets, "kid_subset_size": self.kid_subset_size,
                "prc_neighborhood": self.prc_neighborhood, "rng_seed": self.rng_seed}


STAGES: tuple[str, ...] = ("shard", "decompose", "train_tokenizer", "tokenize", "train_ar", "sample", "evaluate")
"""Stages in pipeline order."""


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

    def artifact_options(self, stage: str) -> dict[str, Any]:
        """fsspec options for the storage a stage's artifact lives on (token caches may live elsewhere)."""
        if stage == "tokenize" and self.tokens.cache_options is not None:
            return dict(self.tokens.cache_options)
        return dict(self.storage.options)

    _later_problems: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_cross(self, info: ValidationInfo) -> PipelineConfig:
        """Derive what `auto` stands for, then check the sections against each other. A command that runs the
        stages up to `until` (validation context {"until": stage}) refuses only the problems of those stages
        and their upstream; a later stage's problem is kept as a warning line (`warnings()`)."""
        if self.tokenizer.patch_nums == "auto":
            self.tokenizer.patch_nums = list(self._derived_patch_nums())
        until = (info.context or {}).get("until")
        last = STAGES.index(until) if until in STAGES else len(STAGES) - 1
        problems = list(self._cross_problems())
        for stage, message in problems:
            if STAGES.index(stage) <= last:
                raise ValueError(message)
        self._later_problems = [f"{message} ({stage} will refuse this config; this command stops before it)"
                                for stage, message in problems]
        return self

    def warnings(self) -> list[str]:
        """Problems of stages the command that loaded this config does not run (see `_check_cross`)."""
        return list(self._later_problems)

    def _derived_patch_nums(self) -> tuple[int, ...]:
        res, down = self.shard.resolution, self.tokenizer.downsample
        if res is None or res < down:
            return tuple(T.patch_nums)
        dyadic = self.ar.model == "ndp" or self.tokenizer.truncation > 0
        return derived_patch_nums(res // down, dyadic=dyadic)

    def _cross_problems(self) -> Iterator[tuple[str, str]]:
        """(the first stage that cannot run, why) for each inconsistency between sections."""
        res, down = self.shard.resolution, self.tokenizer.downsample
        if res is not None and res % down:
            yield "train_tokenizer", f"shard.resolution={res} is not a multiple of the tokenizer's downsampling {down}"
        if res is not None and self.tokenizer.patch_nums[-1] > res // down:
            yield "train_tokenizer", (
                f"tokenizer.patch_nums must end at most at the latent side {res // down} (= shard.resolution / {down}),"
                f" not {self.tokenizer.patch_nums[-1]} (or set tokenizer.patch_nums=auto)")
        if self.tokenizer.order is not None and self.tokenizer.order > self.decompose.order:
            yield "train_tokenizer", (f"tokenizer.order={self.tokenizer.order} needs decompose.order ≥ it "
                                      f"(now {self.decompose.order})")
        order = self.tokenizer_order
        latent = None if res is None else res // down
        if order >= 1 and latent is not None and self.tokenizer.patch_nums[-1] != latent:
            # The base maps are B_n's multi-scale tokens: with one chain per source (`independent`) nothing
            # quantizes the base above its last grid, so what lies between that grid and the latent one is lost
            # for good; with `shared` the detail maps would have to carry it, which is not what they are for.
            yield "train_tokenizer", (
                f"with decomposition order {order} the base scales must end at the latent side {latent} "
                f"(= shard.resolution / {down}), not at {self.tokenizer.patch_nums[-1]}: the base maps "
                f"would leave the base unquantized above their last scale; end tokenizer.patch_nums with {latent} "
                f"(e.g. VAR's [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] at 16), or set tokenizer.patch_nums=auto")
        if self.ar.model == "ndp" or self.tokenizer.truncation > 0:
            what = "ar.model=ndp" if self.ar.model == "ndp" else "tokenizer.truncation > 0"
            if self.tokenizer.order != 0 or (latent is not None and (latent & (latent - 1) or
                                                                      self.tokenizer.patch_nums != list(dyadic_sides(latent)))):
                yield "train_tokenizer" if self.tokenizer.truncation > 0 else "train_ar", (
                    f"{what} needs a dyadic pyramid tokenizer: tokenizer.order=0 and tokenizer.patch_nums="
                    f"{list(dyadic_sides(latent)) if latent and not latent & (latent - 1) else '1, 2, 4, …'}"
                    " (`--model ndp` sets both)")
