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


# The largest |feature value| a bag may hold. Real features stay far below it: an encoder ending in
# a LayerNorm (UNI, CONCH, Virchow, GigaPath, H-optimus, ...) bounds each output by
# sqrt(D - 1) * |gamma| + |beta|, about 40 |gamma| at D = 1536; ResNet / CLAM features (ReLU then
# average pooling) stay in the tens; hand-crafted ones are larger but not by orders of magnitude
# (the UCSB breast-cancer MIL benchmark, shape and texture measures in pixels, peaks at 10,823,
# which is why the bound is not 1e4). A value beyond 1e6 is a corrupt file or not features at all
# (3e38 float32 garbage, uninitialised memory, unscaled sums). Within the bound every float32 product
# downstream stays finite with a wide margin: a gate logit sum_d x_d w_dk is at most
# D * 1e6 * max|w| = 1e11 even at D = 1e4 and an absurd weight of 10, its square in the router's
# z-loss 1e22, a squared feature norm D * 1e12 = 1e16, all far below float32's 3.4e38 (at 3e38 a
# single product overflows to Inf). Bags beyond it are refused, not rescaled: rescaling one slide
# would silently change what the model sees. (float16 is not covered: the optional float16 cache of
# BagDataset keeps a bag beyond 65504 on disk instead, and write_h5 refuses a float16 overflow.)
MAX_FEATURE_MAGNITUDE = 1e6


def magnitude_error(source: str | Path, peak: float, bad_rows: list[int], num_bad: int, num_rows: int) -> str:
    """The message for features beyond ``MAX_FEATURE_MAGNITUDE`` (one wording for every check)."""
    return (
        f"{source}: feature values reach {peak:.3g}, beyond the bound |x| <= {MAX_FEATURE_MAGNITUDE:g}, "
        f"in {num_bad} of {num_rows} patches (first rows: {bad_rows}). No patch encoder emits values "
        "this large (a final LayerNorm keeps them near sqrt(D) at most; the largest real features "
        "tcssa knows of, hand-crafted ones, peak near 1.1e4); the file is probably corrupt or holds "
        "something other than features, and "
        "such values overflow or swamp the gate's float32 logits. Re-extract the slide or leave it "
        "out; tcssa does not rescale a slide silently."
    )


def nonfinite_error(source: str | Path, bad_rows: list[int], num_bad: int, num_rows: int) -> str:
    return (
        f"{source}: features contain NaN or Inf in {num_bad} of {num_rows} patches (first rows: {bad_rows})"
    )


def value_problem(values: np.ndarray, source: str | Path, row_offset: int = 0, num_rows: int | None = None):
    """None when a block of feature rows is finite and within ``MAX_FEATURE_MAGNITUDE``; else the
    message (rows counted from ``row_offset``; ``num_rows`` is the bag's size, for the message).
    Costs a min and a max over the block; the rows are located only when something is wrong."""
    if values.size == 0:
        return None
    num_rows = len(values) if num_rows is None else num_rows
    low, high = values.min(), values.max()  # NaN propagates through both
    if np.issubdtype(values.dtype, np.floating) and not (np.isfinite(low) and np.isfinite(high)):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        return nonfinite_error(source, (bad[:5] + row_offset).tolist(), len(bad), num_rows)
    if max(-float(low), float(high)) > MAX_FEATURE_MAGNITUDE:
        bad = np.flatnonzero((np.abs(values.astype(np.float64)) > MAX_FEATURE_MAGNITUDE).any(axis=1))
        peak = max(-float(low), float(high))
        return magnitude_error(source, peak, (bad[:5] + row_offset).tolist(), len(bad), num_rows)
    return None


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
    low, high = torch.aminmax(tensor)  # one pass; NaN propagates, so this also finds NaN and Inf
    if not (torch.isfinite(low) and torch.isfinite(high)):
        if features.dtype == np.float64 and np.isfinite(features).all():  # finite, beyond float32
            raise ValueError(value_problem(features, source))
        bad = (~torch.isfinite(tensor)).any(dim=1).nonzero().flatten()
        raise ValueError(nonfinite_error(source, bad[:5].tolist(), len(bad), len(tensor)))
    peak = max(-float(low), float(high))
    if peak > MAX_FEATURE_MAGNITUDE:
        bad = (tensor.abs() > MAX_FEATURE_MAGNITUDE).any(dim=1).nonzero().flatten()
        raise ValueError(magnitude_error(source, peak, bad[:5].tolist(), len(bad), len(tensor)))
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
