"""CART's ×2 (issue 42): which patch every latent cell of the upscaled image is taken from, and the row-band
measure the pipeline test checks samples with."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("side", [4, 8, 16])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_every_cell_comes_from_a_patch_interior_or_the_image_border(side, factor):
    """A patch is sampled as if it were a whole image, so its edge rows carry image-edge detail: with overlap, no
    cell is taken from within a quarter patch of a patch edge that lies inside the image."""
    from nextdetail.models.sampler import patch_grid

    starts, owner, local = patch_grid(side, factor)
    big = factor * side
    assert len(starts) == 2 * factor - 1 and starts[0] == 0 and starts[-1] == big - side
    assert local.min() >= 0 and local.max() < side
    cells = torch.arange(big)
    assert torch.equal(torch.tensor(starts)[owner] + local, cells)  # each cell maps back to itself
    inside = (local >= side // 4) & (local < side - side // 4)
    top_border, bottom_border = (owner == 0) & (cells < side), (owner == len(starts) - 1) & (cells >= big - side)
    assert bool((inside | top_border | bottom_border).all())


def test_without_overlap_the_patches_tile_edge_to_edge():
    from nextdetail.models.sampler import patch_grid

    starts, owner, local = patch_grid(8, 2, overlap=False)
    assert starts == [0, 8]
    assert torch.equal(owner, torch.arange(16) // 8) and torch.equal(local, torch.arange(16) % 8)


def test_a_marker_on_every_patch_edge_never_reaches_the_inside_of_the_composed_map():
    """What sampler.upscale does with the patches' tokens, on tokens that mark each patch's edge rows and columns:
    only the image's own border keeps them (tiling edge to edge puts them across the middle)."""
    from nextdetail.models.sampler import patch_grid

    side, factor = 8, 2
    for overlap, leaks in ((True, False), (False, True)):
        starts, owner, local = patch_grid(side, factor, overlap)
        n = len(starts)
        edge = torch.zeros(side, side, dtype=torch.long)
        edge[[0, -1], :] = edge[:, [0, -1]] = 1
        per_patch = edge.expand(1, n, n, side, side)  # (B, n, n, h, w)
        composed = per_patch[:, owner.view(-1, 1), owner.view(1, -1), local.view(-1, 1), local.view(1, -1)][0]
        inner = composed[1:-1, 1:-1]
        assert bool(inner.any()) == leaks


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
