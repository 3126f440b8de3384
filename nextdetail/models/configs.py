"""The models' architectures, one frozen dataclass per model (nanoGPT's `GPTConfig`): the tokenizer's
`TokenizerSpec`, CART's `TransformerConfig`, NDP's `NDPConfig` (their shared VAR shape in `VARShape`).

Every default is written here once — VAR's released models (the tokenizer vae_ch160v4096z32, the d16
transformer rules) — and the user-facing config sections (`conf/schema.py`: `tokenizer.*`, `ar.*`) take their
defaults from these classes. The module imports no torch, so loading a config (and `nextdetail status`) stays
torch-free; the model modules re-export their class (`models/transformer.py:Config`, …).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


def dyadic_sides(latent_side: int) -> tuple[int, ...]:
    """(1, 2, 4, …, latent_side); the latent side must be a power of two."""
    if latent_side < 1 or latent_side & (latent_side - 1):
        raise ValueError(f"a dyadic pyramid needs a power-of-two latent side, got {latent_side}")
    return tuple(2**k for k in range(latent_side.bit_length()))


@dataclass(frozen=True)
class TokenizerSpec:
    """Architecture of the tokenizer; the defaults are VAR's released one (vae_ch160v4096z32) at 256 px."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    using_sa: bool = True
    using_mid_sa: bool = True
    beta: float = 0.25  # commitment
    using_znorm: bool = False  # cosine lookup (VAR's flag: codes stay as they are)
    normalized_codes: bool = False  # LlamaGen's normalized embedding space (NDP §2.1): see quant.MultiScaleQuantizer
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # φ's blend ratio
    share_quant_resi: int = 4  # φ's shared by all maps
    resolution: int = 256
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # base scales
    order: int = 0  # decomposition order n; 0 = VAR
    detail_depth: int = 1  # token maps per detail factor, (M − B)/n
    # shared | independent | independent+global (quant.MultiScaleQuantizer). `shared` by default: at equal tokens
    # it reconstructs closer to VAR's multi-scale than the literal reading of Algorithm 1 (benchmarks/
    # tokenizer_recon.py; docs/architecture.md "Fidelity to the papers").
    residual: str = "shared"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: Any) -> TokenizerSpec:
        """The architecture a `PipelineConfig` trains: `tokenizer.*` + the decomposition order + the resolution."""
        t = cfg.tokenizer
        if cfg.shard.resolution is None:
            raise ValueError("the tokenizer needs shard.resolution (one image size)")
        return cls(
            vocab_size=t.vocab_size, z_channels=t.z_channels, ch=t.ch, ch_mult=tuple(t.ch_mult),
            num_res_blocks=t.num_res_blocks, dropout=t.dropout, using_sa=t.using_sa, using_mid_sa=t.using_mid_sa,
            beta=t.beta, using_znorm=t.using_znorm, normalized_codes=t.normalized_codes,
            quant_resi=t.quant_resi, share_quant_resi=t.share_quant_resi,
            resolution=cfg.shard.resolution, patch_nums=tuple(t.patch_nums),
            order=cfg.tokenizer_order, detail_depth=t.detail_depth, residual=t.residual)

    @property
    def n_maps(self) -> int:
        """M: the base scales, `detail_depth` maps per detail factor, and the global map if there is one."""
        return len(self.patch_nums) + self.order * self.detail_depth + (self.residual == "independent+global")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


@dataclass(frozen=True, kw_only=True)
class VARShape:
    """What both transformers share with VAR's: vocabulary, conditioning and the depth-derived shape (width
    64 per layer, one head per layer, drop path 0.1·depth/24 unless set)."""

    vocab_size: int = 4096
    cvae: int = 32  # the tokenizer's z channels (the input features)
    num_classes: int = 1000
    depth: int = 16
    width: int | None = None  # None: 64 · depth (VAR)
    heads: int | None = None  # None: depth (VAR)
    mlp_ratio: float = 4.0
    drop_path: float | None = None  # None: 0.1 · depth / 24 (VAR)
    cond_drop: float = 0.1  # class dropout for classifier-free guidance
    attn_l2_norm: bool = True

    @property
    def C(self) -> int:
        return self.width or 64 * self.depth  # VAR: 64 per layer

    @property
    def H(self) -> int:
        return self.heads or self.depth

    @property
    def mlp_hidden(self) -> int:
        return round(self.C * self.mlp_ratio)


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(VARShape):
    """CART's block-causal next-detail transformer (`models/transformer.py`)."""

    kind: ClassVar[str] = "cart"  # the model family (nextdetail.models.FAMILIES)
    sides: tuple[int, ...]  # side of each token map, in prediction order
    n_base: int | None = None  # base maps of the schedule; fewer than the maps: a detail-difficulty head (the dial)

    @property
    def has_detail_head(self) -> bool:
        return self.n_base is not None and 0 < self.n_base < len(self.sides)

    @property
    def L(self) -> int:
        return sum(s * s for s in self.sides)

    @property
    def first_l(self) -> int:
        return self.sides[0] ** 2


@dataclass(frozen=True, kw_only=True)
class NDPConfig(VARShape):
    """NDP's masked next-detail transformer (`models/ndp.py`) over the dyadic pyramid 1, 2, 4, …, latent side."""

    kind: ClassVar[str] = "ndp"  # the model family (nextdetail.models.FAMILIES)
    latent_side: int  # S: the pyramid is 1, 2, 4, …, S

    @property
    def sides(self) -> tuple[int, ...]:
        return dyadic_sides(self.latent_side)

    @property
    def L(self) -> int:
        return sum(s * s for s in self.sides)


VAR_TOKENIZER, VAR_SHAPE = TokenizerSpec(), VARShape()  # the defaults the config sections read
