"""The models' settings sections: the tokenizer (`tokenizer.*`) and the next-detail transformer (`ar.*`). Their
architecture defaults are VAR's (`models/configs.py`); what changes a trained model is `identity_settings()`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from nextdetail.conf.environment import Section as _Section
from nextdetail.conf.environment import check_resources_setting
from nextdetail.models.configs import VAR_SHAPE as V
from nextdetail.models.configs import VAR_TOKENIZER as T


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
    decay: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="constant (VQGAN's and LlamaGen's recipe over 100k+ steps); cosine or linear "
        "to min_lr_ratio·lr at the last step: a short run's last steps jitter less (issue 42: tiny's edge band)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="the decay's floor, a fraction of lr")
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    rec_loss: Literal["l2", "l1"] = "l2"
    lpips_weight: float = Field(default=0.0, ge=0, description="0 disables the perceptual loss")
    lpips_vgg16: str | None = Field(default=None, description="torchvision's vgg16 weights (vgg16-397923af.pth)")
    lpips_lin: str | None = Field(default=None, description="LPIPS's linear layers (lpips/weights/v0.1/vgg.pth)")
    gan_weight: float = Field(default=0.0, ge=0, description="0 disables the PatchGAN hinge loss")
    gan_start: int = Field(default=0, ge=0, description="steps of warm-up before the discriminator joins")
    mosaic_weight: float = Field(
        default=0.0, ge=0, description="weight of a second reconstruction each step: the batch's quantized latents "
        "tiled 2×2 into maps twice the trained side, decoded against the same images tiled (issue 42: a decoder "
        "that only ever saw the trained side renders the image border of a ×2 latent badly); 0: off")
    restart_dead_every: int = Field(default=200, ge=0, description="steps between dead-code restarts; 0: never")
    dead_threshold: float = Field(default=0.01, ge=0, description="dead: EMA hits below this fraction of uniform")
    seed: int = 0
    # How the work runs, not what it computes: excluded from the artifact identity.
    device: Literal["cpu", "cuda"] = "cpu"
    nproc: int | None = Field(default=1, ge=1, description="data-parallel processes per node (torchrun); None: one "
                              "per GPU")
    resources: dict[str, float] | None = Field(
        default=None, description="None: train where the flow runs; e.g. {GPU: 1}: on a Dask worker that offers these "
        "resources (`dask worker --resources GPU=1`), each node's worker with tokenizer.nodes > 1")
    nodes: int = Field(default=1, ge=1, description="hosts the training spans (torchrun's nodes, tokenizer.nproc "
                       "processes each): > 1 needs a Dask cluster (dask.address) with workers on that many hosts")
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (per process)")
    loader_workers: int = Field(default=0, ge=0, description="processes decoding batches ahead; 0: in the loop")
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="step checkpoints kept")
    log_every: int = Field(default=100, ge=1)

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"device", "nproc", "resources", "nodes", "torch_threads", "loader_workers", "checkpoint_every",
         "keep_checkpoints", "log_every"})

    _check_resources = field_validator("resources", mode="after")(check_resources_setting)

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
        skip = self.RUNTIME_FIELDS | ({"min_lr_ratio"} if self.decay == "constant" else set())  # no floor to reach
        skip |= {"mosaic_weight"} if self.mosaic_weight == 0 else set()  # off: what tokenizers trained before it did
        return {k: v for k, v in self.model_dump().items() if k not in skip}


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
    nproc: int | None = Field(default=1, ge=1, description="processes per node (torchrun); None: one per visible GPU")
    resources: dict[str, float] | None = Field(
        default=None, description="None: train where the flow runs; e.g. {GPU: 1}: on a Dask worker that offers these "
        "resources (`dask worker --resources GPU=1`), each node's worker with ar.nodes > 1")
    nodes: int = Field(default=1, ge=1, description="hosts the training spans (torchrun's nodes, ar.nproc processes "
                       "each): > 1 needs a Dask cluster (dask.address) with workers on that many hosts")
    torch_threads: int | None = Field(default=None, ge=1, description="None: all cores (per process)")
    loader_workers: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, description="step checkpoints kept (evaluate with "
                                  "eval.checkpoints=all draws its metric-vs-step curve from them)")
    log_every: int = Field(default=100, ge=1)

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"device", "nproc", "resources", "nodes", "torch_threads", "loader_workers", "checkpoint_every",
         "keep_checkpoints", "log_every"})
    ARCHITECTURE_FIELDS: ClassVar[frozenset[str]] = frozenset(  # what adopted weights (`pretrained`) must match
        {"model", "depth", "width", "heads", "mlp_ratio", "attn_l2_norm"})

    _check_resources = field_validator("resources", mode="after")(check_resources_setting)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / self.base_batch

    def identity_settings(self) -> dict:
        skip = self.RUNTIME_FIELDS | ({"min_lr_ratio"} if self.decay == "constant" else set())  # no floor to reach
        return {k: v for k, v in self.model_dump().items() if k not in skip}
