"""Beyond the paper (issue 15): where a slide's patches lie, for the routing and for the slot tokens.

METHOD.md's compressor forgets positions: a slot token is a weighted mean of features, the same
wherever its patches were. Two cues put position back, both computed from each slide's real patches
only, so padding never changes them:

- ``normalise_coords``: patch coordinates (B x N x 2, any unit) centred on the mean of the slide's
  real patches and divided by their largest distance from it, so every slide spans the unit disc
  whatever its size, offset or scanner resolution; the aspect ratio is kept.
- ``fourier_features``: sin and cos of the normalised coordinates at octave frequencies
  (pi * 2^f, f = 0 .. F-1), 4F numbers per patch, for the gate: a linear gate on them can carve
  the slide into regions of any scale down to 1/2^F of its width.
- ``slot_spatial_summary``: per slot, the centroid of its patches weighted by their routing weight
  P~ (2 numbers), the weighted spread about that centroid along each axis (2) and the weighted mean
  distance of its patches from the slide centre (1). An empty slot gets zeros.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Numbers per slot in ``slot_spatial_summary``: centroid x, y; spread x, y; mean radius.
SUMMARY_SIZE = 5
_EPS = 1e-9


def normalise_coords(coords: Tensor, mask: Tensor) -> Tensor:
    """B x N x 2 float32 coordinates of each slide in its unit disc (see the module docstring); padded
    positions get 0. A slide whose real patches all share one position maps them all to 0."""
    if coords.dim() != 3 or coords.shape[-1] != 2 or tuple(coords.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"coords must be B x N x 2 matching mask {tuple(mask.shape)}, got {tuple(coords.shape)}"
        )
    real = mask.unsqueeze(-1).to(torch.float64)
    xy = coords.to(torch.float64) * real
    centre = xy.sum(dim=1, keepdim=True) / real.sum(dim=1, keepdim=True).clamp(min=1)
    offset = (xy - centre) * real
    radius = offset.norm(dim=-1).amax(dim=1).clamp(min=_EPS)  # B; padding contributes 0
    return (offset / radius.view(-1, 1, 1)).to(torch.float32)


def fourier_features(unit: Tensor, num_frequencies: int) -> Tensor:
    """B x N x 4F: sin and cos of pi * 2^f * u for f < F, for both coordinates of ``unit`` (B x N x 2)."""
    if num_frequencies < 1:
        raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
    scales = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=unit.dtype, device=unit.device)
    angles = (unit.unsqueeze(-1) * scales).flatten(-2)  # B x N x 2F
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def slot_spatial_summary(unit: Tensor, topk_weight: Tensor, topk_index: Tensor, num_slots: int) -> Tensor:
    """B x K x 5: each slot's weighted centroid (x, y), spread (std along x and y) and mean distance
    from the slide centre, with the routing weights P~ (``topk_weight``/``topk_index``, B x N x top_k,
    0 and -1 at padding) as weights and ``unit`` the normalised coordinates. Differentiable in the
    weights."""
    batch, n, _ = unit.shape
    weights = unit.new_zeros(batch, n, num_slots)
    weights = weights.scatter_add(-1, topk_index.clamp(min=0), topk_weight.to(unit.dtype))  # B x N x K
    mass = weights.sum(dim=1).unsqueeze(-1)  # B x K x 1
    denominator = mass + _EPS
    centroid = weights.transpose(1, 2) @ unit / denominator  # B x K x 2
    second = weights.transpose(1, 2) @ unit.square() / denominator
    spread = (second - centroid.square()).clamp(min=0).add(_EPS).sqrt() * (mass > 0)
    radius = weights.transpose(1, 2) @ unit.norm(dim=-1, keepdim=True) / denominator
    return torch.cat([centroid, spread, radius], dim=-1)
