"""ReColor's colour maps: the identity when unperturbed, each perturbation landing on the colour axis it names, the
bound on how far a pixel can move, and the smoothness penalty."""

import pytest
import torch

from attacks.recolor import RGB_TO_YUV, identity_grid, largest_change, project_colour, recolor, smoothness

GRID = 6


def _images():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # saturated colours sit on the edges of YUV's range
    images[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    return images


def _yuv(images):
    return torch.einsum("ij,bjhw->bihw", RGB_TO_YUV, images)


def test_an_unperturbed_colour_map_is_the_identity_even_for_saturated_colours():
    images = _images()
    assert torch.allclose(recolor(images, torch.zeros(4, 3, GRID, GRID, GRID)), images, atol=1e-5)


def test_each_perturbation_moves_the_colour_axis_it_names_at_the_colours_it_names():
    """A perturbation linear over the grid is reproduced exactly by trilinear interpolation: U moved by 0.05 x V
    checks both which channel is moved and which coordinate is read."""
    images = _images() * 0.5 + 0.25  # away from the RGB cube's faces, where the result would be clipped
    grid = identity_grid(GRID)
    perturbation = torch.zeros(4, 3, GRID, GRID, GRID)
    perturbation[:, 1] = 0.05 * grid[2]
    perturbation[:, 0] = 0.05 * grid[0]
    moved = _yuv(recolor(images, perturbation))
    original = _yuv(images)
    assert torch.allclose(moved[:, 1], original[:, 1] + 0.05 * original[:, 2], atol=1e-5)
    assert torch.allclose(moved[:, 0], original[:, 0] * 1.05, atol=1e-5)
    assert torch.allclose(moved[:, 2], original[:, 2], atol=1e-5)


def test_no_pixel_moves_further_than_the_bound_allows_and_the_projection_keeps_the_bound():
    images = _images()
    wild = torch.randn(4, 3, GRID, GRID, GRID, generator=torch.Generator().manual_seed(1))
    perturbation = project_colour(wild, 0.04)
    assert float(perturbation.abs().max()) <= 0.04 + 1e-7
    table = identity_grid(GRID) + perturbation
    assert float(table[:, 0].min()) >= -1e-6 and float(table[:, 0].max()) <= 1 + 1e-6
    change = (recolor(images, perturbation) - images).abs().max() * 255
    assert 1 < float(change) <= largest_change(0.04)


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_the_smoothness_penalty_is_zero_for_a_constant_map_and_grows_with_roughness(axis):
    constant = torch.full((1, 3, GRID, GRID, GRID), 0.03)
    assert float(smoothness(constant)) == 0
    rough = constant.clone()
    rough.narrow(axis, 0, 1).fill_(-0.03)
    rougher = constant.clone()
    rougher.narrow(axis, 0, 3).fill_(-0.03)
    rougher.narrow(axis, 1, 1).fill_(0.03)
    assert 0 < float(smoothness(rough)) < float(smoothness(rougher))
