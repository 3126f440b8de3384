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
