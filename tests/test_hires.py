"""CART's ×2 (issue 42): which patch every latent cell of the upscaled image is taken from, and the row-band
measure the pipeline test checks samples with."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("side", [2, 4, 5, 8, 16])
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_every_cell_comes_from_a_patch_interior_or_the_image_border(side, factor):
    """A patch is sampled as if it were a whole image, so its edge rows carry image-edge detail: with overlap, no
    cell is taken from within ⌊side/4⌋ cells of a patch edge that lies inside the image."""
    from nextdetail.models.sampler import patch_grid

    starts, owner, local = patch_grid(side, factor)
    big, n, margin = factor * side, len(starts), side // 4
    assert starts[0] == 0 and starts[-1] == big - side and (factor == 1 or n > factor)
    assert local.min() >= 0 and local.max() < side
    assert torch.equal(torch.tensor(starts)[owner] + local, torch.arange(big))  # each cell maps back to itself
    assert bool(((owner == 0) | (local >= margin)).all())  # far from the patch's inner top edge …
    assert bool(((owner == n - 1) | (local < side - margin)).all())  # … and from its inner bottom edge


def test_without_overlap_the_patches_tile_edge_to_edge():
    from nextdetail.models.sampler import patch_grid, seam_rows

    starts, owner, local = patch_grid(8, 2, overlap=False)
    assert starts == [0, 8]
    assert torch.equal(owner, torch.arange(16) // 8) and torch.equal(local, torch.arange(16) % 8)
    assert seam_rows(8, 2, 4, overlap=False) == [32] and seam_rows(8, 2, 4) == [24, 40]  # cells 6 and 10, ×4 px


@pytest.mark.parametrize(("side", "factor"), [(8, 2), (4, 3), (5, 2), (16, 4)])
def test_compose_puts_every_cell_of_every_patch_where_it_belongs(side, factor):
    """Patches cut from a map whose cells hold their own (Y, X) position compose back to that map, whatever
    patch each cell is taken from — rows and columns are not swapped."""
    from nextdetail.models.sampler import compose, patch_grid

    starts, owner, local = patch_grid(side, factor)
    big = factor * side
    position = torch.arange(big).view(-1, 1) * 1000 + torch.arange(big).view(1, -1)  # (Y, X) → 1000·Y + X
    per_patch = torch.stack([torch.stack([position[y : y + side, x : x + side] for x in starts]) for y in starts])
    assert torch.equal(compose(per_patch.unsqueeze(0), owner, local)[0], position)


def test_a_marker_on_every_patch_edge_never_reaches_the_inside_of_the_composed_map():
    """What sampler.upscale does with the patches' tokens, on tokens that mark each patch's edge rows and columns:
    only the image's own border keeps them (tiling edge to edge puts them across the middle)."""
    from nextdetail.models.sampler import compose, patch_grid

    side, factor = 8, 2
    for overlap, leaks in ((True, False), (False, True)):
        starts, owner, local = patch_grid(side, factor, overlap)
        n = len(starts)
        edge = torch.zeros(side, side, dtype=torch.long)
        edge[[0, -1], :] = edge[:, [0, -1]] = 1
        composed = compose(edge.expand(1, n, n, side, side), owner, local)[0]
        assert bool(composed[1:-1, 1:-1].any()) == leaks


def test_row_bands_finds_a_band_at_a_boundary_and_not_in_plain_images():
    from nextdetail.models.fidelity import row_bands

    rng = np.random.default_rng(0)
    images = rng.integers(100, 140, size=(16, 64, 64, 3)).astype(np.uint8)
    clean = row_bands(images, [32])
    assert clean["boundary"] < 3 and clean["edges"] < 3 and clean["interior"] < 3
    banded = images.copy()
    banded[:, 30:32, :, 0] = 220  # a red band just above the boundary
    banded[:, 0, :, 2] = 10  # a blue-less top row
    bands = row_bands(banded, [32])
    assert bands["boundary"] > 80 and bands["edges"] > 100 and bands["interior"] < 3
    columns = row_bands(images.transpose(0, 2, 1, 3).copy(), [32])  # the same measure finds a band of columns
    banded_columns = images.copy()
    banded_columns[:, :, 31, 1] = 0
    assert row_bands(banded_columns, [32])["boundary"] > 80 and columns["boundary"] < 3
    with pytest.raises(ValueError, match="no interior"):
        row_bands(images[:, :8, :8], [4], width=2)


class _Decoder:
    """Stands in for the tokenizer in `decode_in_tiles`: each latent cell → a 4 × 4 block of its first three
    channels, and with `border` the decoder also draws its map's border (what a decoder trained on whole images
    does at every edge of the map it is given)."""

    def __init__(self, border: float = 0.0) -> None:
        self.border = border

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        img = torch.nn.functional.interpolate(f_hat[:, :3], scale_factor=4, mode="nearest").clone()
        img[:, :, [0, -1], :] += self.border
        img[:, :, :, [0, -1]] += self.border
        return img.clamp(-1, 1)


@pytest.mark.parametrize(("side", "factor"), [(8, 2), (8, 3), (5, 2)])
def test_tiles_decode_a_large_latent_as_a_size_independent_decoder_would(side, factor):
    """Issue 42: the ×2 latent is decoded in tiles of the trained side, cross-faded. With a decoder that renders
    any map alike, the tiles give exactly the whole map's decode (the weights put each pixel back where it was);
    a latent of the trained side is one tile."""
    from nextdetail.models.sampler import decode_in_tiles

    g = torch.Generator().manual_seed(0)
    f_hat = torch.rand(2, 4, factor * side, factor * side, generator=g) * 1.6 - 0.8
    torch.testing.assert_close(decode_in_tiles(_Decoder(), f_hat, side), _Decoder().fhat_to_img(f_hat))
    small = f_hat[:, :, :side, :side]
    assert torch.equal(decode_in_tiles(_Decoder(0.5), small, side), _Decoder(0.5).fhat_to_img(small))


def test_the_border_each_tile_draws_stays_at_the_images_border():
    """A decoder draws an image border at every edge of the map it decodes. Decoded whole, a ×2 map has it only at
    its own border; decoded in tiles, every tile draws it, and the cross-fade must keep it off the inside: the
    image's border rows keep it, the rows where tiles meet less than 1/16 of it (a band of 0.3 → < 0.02)."""
    from nextdetail.models.sampler import decode_in_tiles

    f_hat = torch.zeros(1, 4, 16, 16)
    tiled = decode_in_tiles(_Decoder(0.3), f_hat, 8)[0, 0]  # (64, 64)
    for border in (tiled[0, 1:-1], tiled[-1, 1:-1], tiled[1:-1, 0], tiled[1:-1, -1]):
        assert torch.allclose(border, torch.full((62,), 0.3), atol=0.02), border  # (+ a tile's corner, faded)
    inside = tiled[1:-1, 1:-1]
    assert float(inside.max()) < 0.02, inside.max()


def test_a_real_decoder_renders_a_map_twice_its_side_differently_and_tiles_keep_it_at_its_side():
    """Why the ×2 is decoded in tiles (issue 42): the tokenizer's decoder (GroupNorm over the map, attention across
    it) renders four latents tiled 2×2 into one map differently from each decoded alone — here a seeded, untrained
    tokenizer; `make run`'s trained ones differ by 18–20 dB (`benchmarks/decoder_size.py`). `decode_in_tiles` gives
    each latent's own decode where only its tile covers the image (the first half tile of each corner)."""
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.models.sampler import decode_in_tiles
    from nextdetail.models.tokenizer import BaseDetailVQVAE

    torch.manual_seed(0)
    model = BaseDetailVQVAE(TokenizerSpec(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), resolution=32,
                                          patch_nums=(1, 2, 4, 8))).eval()  # tiny's shape: 8 × 8 latents, 32 px
    h = model.spec.latent_side
    latents = torch.randn(4, model.spec.z_channels, h, h)
    mosaic = torch.cat([torch.cat([latents[0], latents[1]], 2), torch.cat([latents[2], latents[3]], 2)], 1)[None]
    with torch.no_grad():
        alone = model.fhat_to_img(latents)  # (4, 3, P, P)
        whole = model.fhat_to_img(mosaic)[0]
        tiled = decode_in_tiles(model, mosaic, h)[0]
    P = alone.shape[-1]
    q = P // 2
    corners = [(0, 0, 0), (1, 0, P), (2, P, 0), (3, P, P)]  # latent, top row, left column of its tile
    for i, y, x in corners:
        own = slice(y, y + q) if y == 0 else slice(y + q, y + P), slice(x, x + q) if x == 0 else slice(x + q, x + P)
        mine = (slice(0, q) if y == 0 else slice(q, P), slice(0, q) if x == 0 else slice(q, P))
        torch.testing.assert_close(tiled[:, own[0], own[1]], alone[i][:, mine[0], mine[1]])
        assert float((whole[:, own[0], own[1]] - alone[i][:, mine[0], mine[1]]).abs().max()) > 1e-3


def test_the_x2_keeps_the_samples_colour_and_its_own_detail():
    """Step 7 of the ×2 (issue 42): the patches' image with a colour cast (the grey classes' red) and a fine
    texture of its own comes out with the sample's colour — the cast gone — and the texture kept."""
    from nextdetail.models.sampler import bilinear_upscale, gaussian_blur, with_colour_of

    g = torch.Generator().manual_seed(0)
    small = gaussian_blur(torch.rand(2, 3, 32, 32, generator=g) * 1.2 - 0.6, 2.0)  # a smooth sample
    plain = bilinear_upscale(small, 2)
    assert torch.allclose(with_colour_of(plain, small, 2), plain, atol=1e-5)  # nothing to fix: unchanged
    texture = 0.2 * (torch.arange(64).view(1, -1) % 2 * 2 - 1) * (torch.arange(64).view(-1, 1) % 2 * 2 - 1)
    cast = torch.tensor([0.3, 0.0, -0.3]).view(1, 3, 1, 1)  # red up, blue down
    fixed = with_colour_of(plain + cast + texture, small, 2)
    colour = (fixed - plain).mean(dim=(0, 2, 3))
    assert float(colour.abs().max()) < 0.01, colour  # the cast is gone (it was 0.3)
    kept = ((fixed - plain) * texture).sum() / (texture * texture).sum() / 2  # the texture's share left in it
    assert float(kept) > 0.9, kept
