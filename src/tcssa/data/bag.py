"""One slide as a bag of patch features, and the checks every reader applies to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Bag:
    """The patch features of one slide.

    features: N x D float tensor (float32 unless a reader was asked for another dtype).
    coords:   N x 2 int64 tensor of patch positions (level-0 pixels, x then y), or None.
    slide_id: the file stem, always a string (so "007" keeps its zeros).
    attrs:    metadata from the file (for h5: the root, features and coords attributes).
    extras:   further per-patch arrays read on request (e.g. the synthetic ``phenotype``).
    """

    features: Tensor
    coords: Tensor | None
    slide_id: str
    attrs: dict = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def check_features(features: np.ndarray, source: str | Path) -> np.ndarray:
    """Return ``features`` as a 2-D numeric array or raise a ValueError naming ``source``.

    A leading singleton axis (1 x N x D, written by some extractors) is dropped; anything
    else that is not N x D is refused rather than guessed at.
    """
    if features.dtype == object:
        raise ValueError(f"{source}: features are ragged or not numeric (object array)")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise ValueError(f"{source}: features have non-numeric dtype {features.dtype}")
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise ValueError(f"{source}: features must be N x D (2-D), got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{source}: empty bag (0 patches)")
    if features.shape[1] == 0:
        raise ValueError(f"{source}: features have dimension D = 0")
    return features


def all_finite(values: np.ndarray) -> bool:
    """True when no element is NaN or Inf (float16 through its exponent bits: several times faster)."""
    if values.dtype == np.float16:
        exponent = np.uint16(0x7C00)
        return not ((values.view(np.uint16) & exponent) == exponent).any()
    if np.issubdtype(values.dtype, np.floating):
        return bool(np.isfinite(values).all())
    return True


def check_coords(coords: np.ndarray, num_patches: int, source: str | Path) -> np.ndarray:
    """Return ``coords`` as N x 2 or raise a ValueError naming ``source``."""
    if coords.dtype == object:
        raise ValueError(f"{source}: coords are ragged or not numeric (object array)")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{source}: coords must be N x 2, got shape {tuple(coords.shape)}")
    if coords.shape[0] != num_patches:
        raise ValueError(
            f"{source}: {coords.shape[0]} coords for {num_patches} feature rows (counts must match)"
        )
    if np.issubdtype(coords.dtype, np.floating):
        if not np.isfinite(coords).all():
            raise ValueError(f"{source}: coords contain NaN or Inf")
        if not np.array_equal(coords, np.round(coords)):
            raise ValueError(f"{source}: coords are not whole pixel positions")
    return coords


def to_bag(
    features: np.ndarray | Tensor,
    coords: np.ndarray | Tensor | None,
    slide_id: str,
    source: str | Path,
    *,
    attrs: dict | None = None,
    extras: dict[str, np.ndarray] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> Bag:
    """Validate raw arrays from any reader and build a Bag (features cast once to ``dtype``;
    None keeps a floating stored dtype and makes integer features float32)."""
    if isinstance(features, Tensor):
        features = features.detach().cpu()
        # bfloat16 has no numpy dtype; float32 holds it exactly
        features = (features.float() if features.dtype == torch.bfloat16 else features).numpy()
    features = check_features(np.asarray(features), source)
    tensor = torch.from_numpy(np.ascontiguousarray(features))
    if dtype is None:
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{source}: features contain NaN or Inf in {len(bad)} of {len(tensor)} patches "
            f"(first rows: {bad[:5].tolist()})"
        )
    coords_tensor = None
    if coords is not None:
        if isinstance(coords, Tensor):
            coords = coords.detach().cpu().numpy()
        coords = check_coords(np.asarray(coords), len(tensor), source)
        coords_tensor = torch.from_numpy(np.ascontiguousarray(coords)).to(torch.int64)
    for name, values in (extras or {}).items():
        if len(values) != len(tensor):
            raise ValueError(f"{source}: {name} has {len(values)} rows for {len(tensor)} patches")
    return Bag(tensor, coords_tensor, str(slide_id), dict(attrs or {}), dict(extras or {}))
