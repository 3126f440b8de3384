"""Sampling a CART model: class labels → token maps → images, and images at `factor`× the trained size
without retraining (CART §4.2.1, Figure 6).

High resolution, as we implement the paper's one-paragraph description (the details are ours):
1. sample all M maps at the trained size; the base latent f̂_B = Σ_{base maps} φ_k(z_k) (B, C, h, w);
2. upscale f̂_B bilinearly to (factor·h, factor·w): the base is smooth, so it survives upscaling;
3. cut the upscaled base into overlapping patches of the trained latent size, half a patch apart
   ((2·factor − 1)² of them; `patch_grid`), and re-quantize each over the base scales (Algorithm 1 on the
   base source) so the transformer sees base tokens as in training;
4. for every patch, sample only the detail maps, the patch's base tokens given as the prefix;
5. compose full-size detail token maps: each latent cell takes the tokens of the patch whose centre is
   nearest, so no cell comes from within a quarter patch of a patch edge that lies inside the image;
6. decode upscaled base + Σ_k φ_k(composed detail map k) with the tokenizer's decoder at the side it trained on:
   in overlapping tiles of the trained latent side, on the same grid as the patches, each decoded alone and
   cross-faded into the image over their overlaps (`decode_in_tiles`);
7. keep the trained-size sample's colour: the ×2's low frequencies (a Gaussian of σ = 0.75·factor pixels) are
   replaced by those of the sample resized bilinearly (`keep_colour`), CART's details above them are kept.
Why 3 and 5 (issue 42): a patch is sampled as if it were a whole image, and its edges carry what the model
learned about image edges (the position embedding tells it where the border is; at a real border the detail
corrects the tokenizer's border error). Tiled edge to edge, as we first did, those edge rows landed in the
middle of the ×2 image as a band at every patch boundary; and φ's 3×3 convolution, applied per patch, saw zero
padding there. Composing tokens first and applying φ once removes the second; taking every cell from a patch's
interior removes the first. The price: (2f − 1)² patches instead of f² (9 instead of 4 at ×2).
Why 6 (issue 42, session 24): the decoder (GroupNorm statistics, a mid-block attention over the whole map) renders a
map twice its trained side differently from the same content at the trained side: the same latents tiled 2×2 came
out 18–20 dB from their decodes alone, and the ×2 images' edge rows strayed 20.8–25.1 of 255 from the interior's
colour against 8.0–11.3 for the trained-size samples (two tokenizer seeds; `benchmarks/decoder_size.py`). Decoded in
trained-size tiles, their edges stray 9.3 / 17.7 (interior 9.7 / 12.2), near what the same model's trained-size
samples show. `tiles=False` decodes whole, as before, for the comparison in benchmarks/hires.py.
Why 7 (issue 42, session 24): the upscaled base latent does not decode to the base's colour. For the grey classes of
`make run`'s models the upscaled base alone decodes to red − blue 62–99 of 255 (bilinear or nearest alike), the
details sampled per patch correct it only in part (×2 decoded in tiles: 19–49, the trained-size samples 0–8), so the
×2 of a grey sample came out reddish. Taking the ×2's low frequencies from the sample itself is the colour fix of
super-resolution practice (StableSR's wavelet / AdaIN colour fix): the sample holds the image's colour and layout
(the paper's "global features" of the base), the patches add detail. `keep_colour=False` skips it.
The baseline beside it is the trained-size sample resized bilinearly.

The detail dial (ours, NDP's idea on CART): with `detail_budget` b < 1, after the base maps the
transformer's detail head scores each position of the last base map (how much detail lives under it);
the latent is cut into `detail_patch`² patches, and only the round(b · patches) hardest get detail tokens:
every detail map runs (and caches) only their positions; everywhere else the image is base-only. The
decoder then sees base + the kept details (`MultiScaleQuantizer.indices_to_f_mixed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nextdetail.models.quant import NextInput
from nextdetail.models.tokenizer import BaseDetailVQVAE
from nextdetail.models.transformer import NextDetailTransformer


@dataclass
class Samples:
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    maps: list[Tensor]  # M × (B, h_k, w_k) token maps
    detail_keep: Tensor | None = None  # (B, h, w) bool: latent cells that got detail tokens (the dial), None: all


class CARTSampler:
    def __init__(self, transformer: NextDetailTransformer, tokenizer: BaseDetailVQVAE, detail_budget: float = 1.0,
                 detail_patch: int = 2, cfg_schedule: str = "all_maps") -> None:
        sides = tuple(m.side for m in tokenizer.schedule)
        if sides != transformer.cfg.sides or tokenizer.spec.vocab_size != transformer.cfg.vocab_size:
            raise ValueError(f"transformer (maps {transformer.cfg.sides}, V {transformer.cfg.vocab_size}) and tokenizer "
                             f"(maps {sides}, V {tokenizer.spec.vocab_size}) do not belong together")
        self.transformer, self.tokenizer = transformer.eval(), tokenizer.eval()
        self.quantizer, self.latent_side = tokenizer.quantize, tokenizer.spec.latent_side
        self.n_base = sum(1 for m in tokenizer.schedule if m.source == 0)
        self.detail_budget, self.detail_patch = detail_budget, detail_patch
        if cfg_schedule not in ("all_maps", "base_maps"):
            raise ValueError(f"cfg_schedule must be all_maps or base_maps, got {cfg_schedule!r}")
        self.cfg_ramp_maps = len(sides) if cfg_schedule == "all_maps" else self.n_base  # GuidedDraw's ramp
        if self.dial_active and (self.latent_side % detail_patch or self.latent_side % sides[self.n_base - 1]):
            raise ValueError(f"detail_patch={detail_patch} and the last base map ({sides[self.n_base - 1]}²) must "
                             f"divide the latent side {self.latent_side}")

    @property
    def dial_active(self) -> bool:
        return self.detail_budget < 1 and self.transformer.detail_head is not None

    def kept_patches(self) -> int:
        return max(1, round(self.detail_budget * (self.latent_side // self.detail_patch) ** 2))

    def select_details(self, difficulty_Bl: Tensor) -> Tensor:
        """Detail difficulty at the last base map (B, b²) → the kept latent cells (B, S²) bool: the
        `kept_patches()` patches of the highest summed detail energy."""
        B, S, P = difficulty_Bl.shape[0], self.latent_side, self.detail_patch
        b = round(difficulty_Bl.shape[1] ** 0.5)
        energy = difficulty_Bl.float().exp().view(B, 1, b, b)  # the head predicts log energy
        energy = F.interpolate(energy, size=(S, S), mode="nearest") if b != S else energy
        per_patch = F.avg_pool2d(energy, P).flatten(1)  # (B, (S/P)²)
        chosen = torch.zeros_like(per_patch, dtype=torch.bool)
        chosen.scatter_(1, per_patch.topk(self.kept_patches(), dim=1).indices, True)
        side = S // P
        return chosen.view(B, 1, side, side).repeat_interleave(P, 2).repeat_interleave(P, 3).view(B, S * S)
    @property
    def forward_passes(self) -> int:
        """Transformer calls per image (one per token map, KV-cached; CFG runs both halves in that one call)."""
        return len(self.transformer.cfg.sides)

    @property
    def flops_per_image(self) -> float:
        """Forward FLOPs of one sample at the trained size (both CFG halves, KV cache; with the dial, only the
        kept detail positions): NDP's x axis."""
        from nextdetail.models.flops import cart_sample_flops

        kept = self.kept_patches() * self.detail_patch**2 / self.latent_side**2 if self.dial_active else 1.0
        return 2 * cart_sample_flops(self.transformer.cfg, detail_fraction=kept)

    @torch.no_grad()
    def sample(self, labels: Tensor, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
               generator: torch.Generator | None = None) -> Samples:
        kept: list[Tensor] = []

        def dial(difficulty_Bl: Tensor) -> Tensor:
            kept.append(self.select_details(difficulty_Bl))
            return kept[-1]

        maps = self.transformer.sample(labels, NextInput(self.quantizer, self.latent_side), cfg, top_k, top_p, generator,
                                       select_details=dial if self.dial_active else None,
                                       cfg_ramp_maps=self.cfg_ramp_maps)
        if not kept:
            return Samples(self.tokenizer.indices_to_img(maps), maps)
        keep = kept[-1].view(-1, self.latent_side, self.latent_side)  # (B, S, S)
        present = [torch.ones_like(m, dtype=torch.bool) for m in maps[: self.n_base]] + [keep] * (len(maps) - self.n_base)
        return Samples(self.tokenizer.indices_to_img_mixed(maps, present), maps, keep)

    def _latent(self, maps: list[Tensor], ks: range) -> Tensor:
        return sum(self.quantizer._to_latent(k, maps[k], self.latent_side) for k in ks)  # (B, C, h, w)

    @torch.no_grad()
    def upscale(self, labels: Tensor, maps: list[Tensor], factor: int, cfg: float = 1.5, top_k: int = 0,
                top_p: float = 0.0, generator: torch.Generator | None = None, overlap: bool = True,
                tiles: bool = True, keep_colour: bool = True) -> Tensor:
        """Images (B, 3, factor·H, factor·W) in [-1, 1] from trained-size samples' maps (module docstring).
        `overlap=False`: factor² patches edge to edge with φ per patch, as first written (issue 42's seam);
        `tiles=False`: the ×2 latent decoded whole (issue 42's edge rows); `keep_colour=False`: without step 7
        (the grey classes' red); all kept for benchmarks/hires.py."""
        B, h, M = labels.shape[0], self.latent_side, len(maps)
        base = self._latent(maps, range(self.n_base))  # (B, C, h, w)
        big = F.interpolate(base, scale_factor=factor, mode="bilinear", align_corners=False)  # (B, C, f·h, f·w)

        def decode(f_hat: Tensor) -> Tensor:
            big_images = decode_in_tiles(self.tokenizer, f_hat, h) if tiles else self.tokenizer.fhat_to_img(f_hat)
            if not keep_colour:
                return big_images
            return with_colour_of(big_images, self.tokenizer.fhat_to_img(self._latent(maps, range(M))), factor)

        if self.n_base == M:  # order 0 (VAR): no detail factor to add
            return decode(big)
        if any(self.transformer.cfg.sides[k] != h for k in range(self.n_base, M)):
            raise ValueError(f"patch-wise detail needs every detail map at the latent side {h}, "
                             f"got {self.transformer.cfg.sides[self.n_base:]}")
        starts, owner, local = patch_grid(h, factor, overlap)
        n = len(starts)
        patches = torch.stack([big[:, :, y : y + h, x : x + h] for y in starts for x in starts], 1)  # (B, n², C, h, h)
        patches = patches.flatten(0, 1)  # (B·n², C, h, h)
        sources = [patches] + [torch.zeros_like(patches)] * (self.quantizer.n_sources - 1)
        base_maps = self.quantizer.f_to_indices(sources)[: self.n_base]  # the base scales of each patch
        out = self.transformer.sample(labels.repeat_interleave(n * n), NextInput(self.quantizer, h), cfg, top_k,
                                      top_p, generator, given=base_maps, cfg_ramp_maps=self.cfg_ramp_maps)
        detail_maps = [out[k].view(B, n, n, h, h) for k in range(self.n_base, M)]  # (B, patch y, patch x, h, w)
        if overlap:  # φ_k once on each composed (B, f·h, f·w) map
            detail = sum(self.quantizer._to_latent(k, compose(m, owner, local), factor * h)
                         for k, m in zip(range(self.n_base, M), detail_maps, strict=True))
        else:  # as first written: φ_k per patch, the latents tiled (zero padding at every seam)
            per_patch = sum(self.quantizer._to_latent(k, m.flatten(0, 2), h)
                            for k, m in zip(range(self.n_base, M), detail_maps, strict=True))  # (B·n², C, h, w)
            detail = compose(per_patch.view(B, n, n, -1, h, h).permute(0, 3, 1, 2, 4, 5).flatten(0, 1), owner, local)
            detail = detail.view(B, -1, factor * h, factor * h)
        return decode(big + detail)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of `sigma` pixels (truncated at 3σ, edges replicated)."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    C = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def with_colour_of(big: Tensor, small: Tensor, factor: int) -> Tensor:
    """`big` (B, 3, f·H, f·W) with its low frequencies taken from `small` (B, 3, H, W) resized bilinearly: below a
    Gaussian of σ = 0.75·f pixels (what the trained-size image resolves), the sample's colour and layout; above it,
    `big`'s own detail. In [-1, 1]."""
    sigma = 0.75 * factor
    return (big - gaussian_blur(big, sigma) + gaussian_blur(bilinear_upscale(small, factor), sigma)).clamp_(-1, 1)


def decode_in_tiles(tokenizer: BaseDetailVQVAE, f_hat_BChw: Tensor, side: int) -> Tensor:
    """Images (B, 3, s·H, s·W) in [-1, 1] of a latent larger than the decoder's trained `side`, decoded in tiles of
    that side: tiles start every ⌈side/2⌉ cells (the last flush with the far edge: `patch_grid`'s grid), each is
    decoded alone, and each pixel is the weighted mean of the tiles covering it. A tile's weight falls linearly
    toward 0 over the half tile next to each neighbour and stays 1 toward the image's border, so neighbours
    cross-fade over their overlap and the rows along a tile's inner edge (drawn by the decoder as an image border)
    keep almost no weight. A latent of the trained side is one tile: the plain decode."""
    if f_hat_BChw.shape[-2:] == (side, side):
        return tokenizer.fhat_to_img(f_hat_BChw)
    B, _, H, W = f_hat_BChw.shape
    ys, xs = (sorted(set(range(0, n - side + 1, (side + 1) // 2)) | {n - side}) for n in (H, W))
    tiles = [[tokenizer.fhat_to_img(f_hat_BChw[:, :, y : y + side, x : x + side]) for x in xs] for y in ys]
    P = tiles[0][0].shape[-1]  # a tile's pixels per side
    s = P // side  # pixels per latent cell
    like = {"dtype": f_hat_BChw.dtype, "device": f_hat_BChw.device}

    def ramp(start: int, n: int) -> Tensor:  # (P,) the weights along one axis of the tile starting at cell `start`
        centre = torch.arange(P, **like) + 0.5
        w = torch.ones(P, **like)
        if start > 0:  # a neighbour before it
            w = torch.minimum(w, centre / (P / 2))
        if start + side < n:  # a neighbour after it
            w = torch.minimum(w, (P - centre) / (P / 2))
        return w

    out = f_hat_BChw.new_zeros(B, 3, H * s, W * s)
    total = f_hat_BChw.new_zeros(1, 1, H * s, W * s)
    for y, row in zip(ys, tiles, strict=True):
        for x, tile in zip(xs, row, strict=True):
            weight = (ramp(y, H).view(-1, 1) * ramp(x, W).view(1, -1)).view(1, 1, P, P)
            out[:, :, y * s : y * s + P, x * s : x * s + P] += tile * weight
            total[:, :, y * s : y * s + P, x * s : x * s + P] += weight
    return (out / total).clamp_(-1, 1)


def patch_grid(side: int, factor: int, overlap: bool = True) -> tuple[list[int], Tensor, Tensor]:
    """Patches of `side` cells along one axis of a factor·side latent: (their first cells, and for every cell
    the patch it is taken from and its position in that patch (factor·side,) each). With `overlap` the patches
    start every ⌈side/2⌉ cells (the last one flush with the far edge) and a cell belongs to the patch whose
    centre is nearest, so it lies at least ⌊side/4⌋ cells from that patch's edges unless the edge is the
    image's; without, they tile edge to edge."""
    big = factor * side
    stride = (side + 1) // 2 if overlap else side
    starts = sorted(set(range(0, big - side + 1, stride)) | {big - side})
    centres = torch.tensor(starts, dtype=torch.float64) + side / 2
    cells = torch.arange(big, dtype=torch.float64) + 0.5
    owner = (cells.view(-1, 1) - centres.view(1, -1)).abs().argmin(1)  # (big,): the first of equals on a tie
    local = torch.arange(big) - torch.tensor(starts)[owner]
    return starts, owner, local


def compose(per_patch: Tensor, owner: Tensor, local: Tensor) -> Tensor:
    """Full-size maps (B, Y, X) from per-patch maps (B, patch y, patch x, h, w): cell (Y, X) is cell
    (local[Y], local[X]) of patch (owner[Y], owner[X]) (`patch_grid`)."""
    return per_patch[:, owner.view(-1, 1), owner.view(1, -1), local.view(-1, 1), local.view(1, -1)]


def seam_rows(side: int, factor: int, pixels_per_cell: int, overlap: bool = True) -> list[int]:
    """The image rows (or columns) of an upscaled image where the patch its details come from changes."""
    _, owner, _ = patch_grid(side, factor, overlap)
    return [int(i) * pixels_per_cell for i in torch.nonzero(owner[1:] != owner[:-1]).flatten() + 1]


def bilinear_upscale(images: Tensor, factor: int) -> Tensor:
    """The baseline of Figure 6: a trained-size sample resized bilinearly."""
    return F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False).clamp_(-1, 1)


def from_config(transformer: NextDetailTransformer, tokenizer: BaseDetailVQVAE, cfg: Any) -> CARTSampler:
    """The family's sampler (nextdetail.models.FAMILIES) with `sample.*`'s detail dial and guidance schedule."""
    return CARTSampler(transformer, tokenizer, cfg.detail_budget, cfg.detail_patch, cfg.cfg_schedule)
