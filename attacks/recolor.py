"""ReColor (Laidlaw & Feizi 2019), as MetaPoison's reference applies it before the additive perturbation: a smooth
per-image colour map, a small 3-D lookup table over YUV colour space (identity + a bounded perturbation at every grid
point), interpolated trilinearly at each pixel's colour.

Facts from the reference (wronnyhuang/metapoison): YUV space, a 10 x 10 x 10 grid, each grid point's perturbation
bounded per channel (0.04 of the channel's range), a smoothness penalty (the mean squared finite difference between
neighbouring grid points, per unit of colour) added to the crafting objective with weight 1. Here the grid spans each
channel's exact range over RGB in [0, 1], so a zero perturbation is exactly the identity (the reference's U and V grids
stop at +-0.5 and so clip saturated colours even unperturbed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# RGB -> YUV (BT.601, as tf.image.rgb_to_yuv), rows Y, U, V
RGB_TO_YUV = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.14714119, -0.28886916, 0.43601035], [0.61497538, -0.51496512, -0.10001026]]
)
YUV_TO_RGB = torch.linalg.inv(RGB_TO_YUV)
# each YUV channel's range over the RGB cube: Y in [0, 1], U and V symmetric
YUV_HIGH = RGB_TO_YUV.clamp(min=0).sum(dim=1)
YUV_LOW = RGB_TO_YUV.clamp(max=0).sum(dim=1)


def _convert(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix.to(images), images)


def identity_grid(resolution: int, device: torch.device | None = None) -> torch.Tensor:
    """(3, G, G, G): grid point (y, u, v) holds its own YUV colour."""
    axes = [torch.linspace(float(lo), float(hi), resolution) for lo, hi in zip(YUV_LOW, YUV_HIGH)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).to(device)


def recolor(images: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] through their colour maps: `perturbation` (B, 3, G, G, G) in YUV units on the
    identity grid; differentiable in both; the result clipped to [0, 1]."""
    batch, resolution = len(images), perturbation.shape[-1]
    table = identity_grid(resolution, images.device).to(images) + perturbation  # (B, 3, Y, U, V)
    yuv = _convert(images, RGB_TO_YUV)
    low, high = YUV_LOW.to(images).view(1, 3, 1, 1), YUV_HIGH.to(images).view(1, 3, 1, 1)
    unit = (yuv - low) / (high - low) * 2 - 1  # each channel onto [-1, 1], the grid's corners
    # grid_sample reads a 5-D volume (D, H, W) = (Y, U, V) at coordinates ordered (W, H, D) = (v, u, y)
    where = unit.flip(1).permute(0, 2, 3, 1).reshape(batch, 1, 1, -1, 3)
    mapped = F.grid_sample(table, where, mode="bilinear", padding_mode="border", align_corners=True)
    return _convert(mapped.reshape(images.shape), YUV_TO_RGB).clamp(0, 1)


def smoothness(perturbation: torch.Tensor) -> torch.Tensor:
    """The mean squared difference between neighbouring grid points per unit of colour, over all three axes (the
    reference's penalty)."""
    resolution = perturbation.shape[-1]
    steps = [perturbation.diff(dim=axis) * (resolution - 1) for axis in (2, 3, 4)]
    return torch.cat([(step**2).flatten() for step in steps]).mean()


def project_colour(perturbation: torch.Tensor, bound: float) -> torch.Tensor:
    """Each grid point's perturbation into +-bound per channel, and the perturbed table into YUV's range."""
    table = identity_grid(perturbation.shape[-1], perturbation.device).to(perturbation)
    low, high = YUV_LOW.to(perturbation).view(1, 3, 1, 1, 1), YUV_HIGH.to(perturbation).view(1, 3, 1, 1, 1)
    perturbation = perturbation.clamp(-bound, bound)
    return torch.max(torch.min(table + perturbation, high), low) - table


def largest_change(bound: float) -> int:
    """The most grey levels a colour map within `bound` can move any RGB channel of any pixel: trilinear weights are
    convex, so each YUV channel moves at most `bound`, and RGB moves by YUV_TO_RGB's absolute row sums times that."""
    return math.ceil(float(YUV_TO_RGB.abs().sum(dim=1).max()) * bound * 255)
