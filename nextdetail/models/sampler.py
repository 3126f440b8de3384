"""Sampling a CART model: class labels → token maps → images, and images at `factor`× the trained size
without retraining (CART §4.2.1, Figure 6).

High resolution, as we implement the paper's one-paragraph description (the details are ours):
1. sample all M maps at the trained size; the base latent f̂_B = Σ_{base maps} φ_k(z_k) (B, C, h, w);
2. upscale f̂_B bilinearly to (factor·h, factor·w): the base is smooth, so it survives upscaling;
3. cut the upscaled base into factor² patches of the trained latent size; re-quantize each patch over
   the base scales (Algorithm 1 on the base source) so the transformer sees base tokens as in training;
4. for every patch, sample only the detail maps, the patch's base tokens given as the prefix: details
   are local (textures, edges), so patches generated independently meet without seams;
5. decode upscaled base + the patches' details, tiled back, with the tokenizer's decoder (convolutional:
   any size).
The baseline beside it is the trained-size sample resized bilinearly.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class CARTSampler:
    def __init__(self, transformer: NextDetailTransformer, tokenizer: BaseDetailVQVAE) -> None:
        sides = tuple(m.side for m in tokenizer.schedule)
        if sides != transformer.cfg.sides or tokenizer.spec.vocab_size != transformer.cfg.vocab_size:
            raise ValueError(f"transformer (maps {transformer.cfg.sides}, V {transformer.cfg.vocab_size}) and tokenizer "
                             f"(maps {sides}, V {tokenizer.spec.vocab_size}) do not belong together")
        self.transformer, self.tokenizer = transformer.eval(), tokenizer.eval()
        self.quantizer, self.latent_side = tokenizer.quantize, tokenizer.spec.latent_side
        self.n_base = sum(1 for m in tokenizer.schedule if m.source == 0)

    @property
    def forward_passes(self) -> int:
        """Transformer calls per image (one per token map, KV-cached; CFG runs both halves in that one call)."""
        return len(self.transformer.cfg.sides)

    @property
    def flops_per_image(self) -> float:
        """Forward FLOPs of one sample at the trained size (both CFG halves, KV cache): NDP's x axis."""
        from nextdetail.models.flops import cart_sample_flops

        return 2 * cart_sample_flops(self.transformer.cfg)

    @torch.no_grad()
    def sample(self, labels: Tensor, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
               generator: torch.Generator | None = None) -> Samples:
        maps = self.transformer.sample(labels, NextInput(self.quantizer, self.latent_side), cfg, top_k, top_p, generator)
        return Samples(self.tokenizer.indices_to_img(maps), maps)

    def _latent(self, maps: list[Tensor], ks: range) -> Tensor:
        return sum(self.quantizer._to_latent(k, maps[k], self.latent_side) for k in ks)  # (B, C, h, w)

    @torch.no_grad()
    def upscale(self, labels: Tensor, maps: list[Tensor], factor: int, cfg: float = 1.5, top_k: int = 0,
                top_p: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, factor·H, factor·W) in [-1, 1] from trained-size samples' maps (module docstring)."""
        B, h, M = labels.shape[0], self.latent_side, len(maps)
        base = self._latent(maps, range(self.n_base))  # (B, C, h, w)
        big = F.interpolate(base, scale_factor=factor, mode="bilinear", align_corners=False)  # (B, C, f·h, f·w)
        if self.n_base == M:  # order 0 (VAR): no detail factor to add
            return self.tokenizer.fhat_to_img(big)
        C = big.shape[1]
        patches = big.view(B, C, factor, h, factor, h).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, h, h)  # (B·f², C, h, w)
        sources = [patches] + [torch.zeros_like(patches)] * (self.quantizer.n_sources - 1)
        base_maps = self.quantizer.f_to_indices(sources)[: self.n_base]  # the base scales of each patch
        patch_labels = labels.repeat_interleave(factor * factor)  # (B·f²,)
        out = self.transformer.sample(patch_labels, NextInput(self.quantizer, self.latent_side), cfg, top_k, top_p,
                                      generator, given=base_maps)
        detail = self._latent(out, range(self.n_base, M))  # (B·f², C, h, w)
        detail = detail.view(B, factor, factor, C, h, h).permute(0, 3, 1, 4, 2, 5).reshape(B, C, factor * h, factor * h)
        return self.tokenizer.fhat_to_img(big + detail)


def bilinear_upscale(images: Tensor, factor: int) -> Tensor:
    """The baseline of Figure 6: a trained-size sample resized bilinearly."""
    return F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False).clamp_(-1, 1)
