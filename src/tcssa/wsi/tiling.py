"""The grid of tiles over a slide at a target magnification, and reading the tiles.

``tile_slide`` lays a square grid over level 0 (row-major, stride ``patch_size - overlap`` at the
target magnification), keeps the tiles that lie wholly inside the slide (a partial tile at the
right or bottom edge is dropped, it is never padded), measures each tile's share of tissue on the
mask with an integral image (one vectorised pass, whatever the number of tiles) and drops tiles
below ``min_tissue``. Coordinates are level-0 pixels, as TRIDENT and CLAM store them.

Each tile is read at the deepest pyramid level that still has at least the target resolution and
resized down to ``patch_size`` (``read_tile``). ``TileDataset`` does this lazily, one slide handle
per DataLoader worker process, so memory does not grow with the number of tiles.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tcssa.wsi.slide import MissingMppWarning, Slide, SlideInfo, best_level_for_downsample, open_slide

#: Float noise in the area sums must not drop a tile whose tissue share is exactly min_tissue.
_TISSUE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide: where they are (level 0) and how to read them."""

    coords: np.ndarray  # N x 2 int64, level-0 (x, y) of each tile's top-left corner, row-major order
    tissue_fraction: np.ndarray  # N float32: share of the tile covered by the tissue mask (1.0 without one)
    patch_size: int  # output tile side in px at the target magnification
    patch_size_level0: int  # the tile's side in level-0 px
    target_magnification: int
    level0_magnification: int
    overlap: int  # px at the target magnification
    read_level: int  # pyramid level the tiles are read from
    read_size: int  # tile side in px at read_level (then resized to patch_size)

    def __len__(self) -> int:
        return len(self.coords)


def _grid_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Start offsets of the tiles that fit wholly in ``length`` px: 0, stride, ... (none if tile > length)."""
    if tile > length:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, length - tile + 1, stride, dtype=np.int64)


def _tissue_fractions(coords: np.ndarray, tile: int, mask: np.ndarray, mask_downsample: float) -> np.ndarray:
    """Share of each level-0 square [x, x + tile) x [y, y + tile) that the mask covers.

    The mask is a piecewise-constant image (one value per mask pixel), so its integral over a
    rectangle with fractional corners is the bilinear interpolation of the summed-area table at
    those corners: exact, and one vectorised pass for all tiles. The part of a tile beyond the
    mask's edge (the mask's size is rounded) is left out of both the tissue and the tile's area.
    """
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def area_below(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Mask pixels in [0, u) x [0, v), for fractional u (columns) and v (rows) within the mask."""
        col, row = (
            np.minimum(np.floor(u).astype(np.int64), width - 1),
            np.minimum(np.floor(v).astype(np.int64), height - 1),
        )
        col, row = np.maximum(col, 0), np.maximum(row, 0)
        du, dv = u - col, v - row
        return (
            table[row, col] * (1 - du) * (1 - dv)
            + table[row, col + 1] * du * (1 - dv)
            + table[row + 1, col] * (1 - du) * dv
            + table[row + 1, col + 1] * du * dv
        )

    left = np.clip(coords[:, 0] / mask_downsample, 0, width)
    right = np.clip((coords[:, 0] + tile) / mask_downsample, 0, width)
    top = np.clip(coords[:, 1] / mask_downsample, 0, height)
    bottom = np.clip((coords[:, 1] + tile) / mask_downsample, 0, height)
    tissue = (
        area_below(right, bottom) - area_below(left, bottom) - area_below(right, top) + area_below(left, top)
    )
    area = (right - left) * (bottom - top)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(area > 0, tissue / np.where(area > 0, area, 1.0), 0.0)
    return np.clip(fraction, 0.0, 1.0)


def tile_slide(
    info: SlideInfo,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
    *,
    target_magnification: int = 20,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    read_level: int | None = None,
) -> TileGrid:
    """The tiles of ``info``'s slide at ``target_magnification``, ``patch_size`` px each, on tissue.

    The tile's side at level 0 is ``round(patch_size * level0_magnification / target_magnification)``
    and the stride ``round((patch_size - overlap) * level0 / target)``. Only tiles wholly inside
    the slide are kept (the right and bottom strips narrower than a tile are not covered); a patch
    larger than the slide gives an empty grid. ``mask`` (H x W bool, ``mask_downsample`` level-0
    px per mask px, e.g. TissueMask.mask and .downsample) sets each tile's ``tissue_fraction``;
    tiles below ``min_tissue`` are dropped. ``read_level`` (default: the deepest level at or
    above the target resolution) is where ``read_tile`` reads from.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be at least 1 px, got {patch_size}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be at least 0 and below patch_size ({patch_size}), got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a share of the tile, in [0, 1], got {min_tissue}")
    if target_magnification <= 0:
        raise ValueError(f"target_magnification must be positive, got {target_magnification}")
    if target_magnification > info.magnification:
        raise ValueError(
            f"{info.path}: target magnification {target_magnification}x is above the slide's "
            f"level-0 magnification {info.magnification}x (mpp {info.mpp}, {info.mpp_source}); "
            "tiles would be upsampled"
        )
    scale = info.magnification / target_magnification  # level-0 px per target px
    patch_size_level0 = round(patch_size * scale)
    stride_level0 = max(1, round((patch_size - overlap) * scale))

    if read_level is None:
        read_level = best_level_for_downsample(info.level_downsamples, scale)
    elif not 0 <= read_level < len(info.level_downsamples):
        raise ValueError(
            f"{info.path}: read_level {read_level} does not exist ({len(info.level_downsamples)} levels)"
        )
    elif info.level_downsamples[read_level] > scale * 1.01:
        raise ValueError(
            f"{info.path}: level {read_level} (downsample {info.level_downsamples[read_level]:g}) is coarser "
            f"than the target magnification needs (downsample {scale:g}); tiles would be upsampled"
        )
    read_size = max(1, round(patch_size_level0 / info.level_downsamples[read_level]))

    xs = _grid_starts(info.width, patch_size_level0, stride_level0)
    ys = _grid_starts(info.height, patch_size_level0, stride_level0)
    rows, cols = np.meshgrid(ys, xs, indexing="ij")  # row-major: x varies fastest
    coords = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.int64).reshape(-1, 2)

    if mask is None:
        fraction = np.ones(len(coords), dtype=np.float64)
    else:
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"the tissue mask must be a non-empty 2-D array, got shape {mask.shape}")
        if not (math.isfinite(mask_downsample) and mask_downsample > 0):
            raise ValueError(f"mask_downsample must be a positive number, got {mask_downsample}")
        fraction = _tissue_fractions(coords, patch_size_level0, mask.astype(bool), float(mask_downsample))
    keep = fraction >= min_tissue - _TISSUE_TOLERANCE
    return TileGrid(
        coords=np.ascontiguousarray(coords[keep]),
        tissue_fraction=fraction[keep].astype(np.float32),
        patch_size=patch_size,
        patch_size_level0=patch_size_level0,
        target_magnification=target_magnification,
        level0_magnification=info.magnification,
        overlap=overlap,
        read_level=read_level,
        read_size=read_size,
    )


def read_tile(slide: Slide, grid: TileGrid, index: int) -> np.ndarray:
    """Tile ``index`` of ``grid`` as patch_size x patch_size x 3 uint8 RGB (antialiased bilinear resize)."""
    if not -len(grid) <= index < len(grid):
        raise IndexError(f"tile {index} out of range: the grid has {len(grid)} tiles")
    x, y = (int(v) for v in grid.coords[index])
    region = slide.read_region((x, y), grid.read_level, (grid.read_size, grid.read_size))
    if grid.read_size == grid.patch_size:
        return region
    # Pillow widens the bilinear kernel by the scale factor when shrinking: an antialiased resize.
    resized = Image.fromarray(region).resize((grid.patch_size, grid.patch_size), Image.Resampling.BILINEAR)
    return np.asarray(resized)


class TileDataset(torch.utils.data.Dataset):
    """The tiles of one slide as uint8 H x W x 3 numpy arrays, read when asked for.

    The slide file is opened on first use in each process (a DataLoader worker opens its own:
    slide handles do not survive being copied into another process) and only the grid's
    coordinates are held, so memory stays flat however many tiles the slide has. The default
    collate turns a batch into a B x H x W x 3 uint8 tensor.
    """

    def __init__(self, slide_path: str | Path, grid: TileGrid, mpp: float | None = None) -> None:
        self.slide_path = Path(slide_path)
        self.grid = grid
        self.mpp = mpp
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.grid)

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            with warnings.catch_warnings():
                # The caller opened this slide already and saw the warning; one per worker is noise.
                warnings.simplefilter("ignore", MissingMppWarning)
                self._slide = open_slide(self.slide_path, mpp=self.mpp)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> np.ndarray:
        return read_tile(self._open(), self.grid, index)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"] = None  # a worker opens its own handle
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None
        self._pid = None
