"""Slides for the tcssa.wsi tests: the real ones in the shared data folder, synthetic TIFFs written here."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Tests that open slide files need the readers of the `wsi` extra; the grid arithmetic does not.
needs_slide_readers = pytest.mark.skipif(
    not all(find_spec(name) for name in ("openslide", "tiffslide", "tifffile")),
    reason="the `wsi` extra (openslide-python, openslide-bin, tiffslide, tifffile) is not installed",
)


def wsi_data_dir() -> Path:
    """TCSSA_SHARED_DATA/wsi if the variable is set, else <repo root>/../shared/data/wsi."""
    base = os.environ.get("TCSSA_SHARED_DATA")
    return (Path(base) if base else ROOT.parent / "shared" / "data") / "wsi"


def real_slide(name: str) -> Path:
    path = wsi_data_dir() / name
    if not path.is_file():
        pytest.skip(
            f"real slide {name} not found at {path} (set TCSSA_SHARED_DATA to the shared data folder)"
        )
    return path


def pyramid_image(width: int = 1536, height: int = 1024, seed: int = 0) -> np.ndarray:
    """Level 0 of a synthetic slide: smooth colour ramps plus noise, so every region differs."""
    rng = np.random.default_rng(seed)
    cols = np.linspace(0, 255, width)[None, :]
    rows = np.linspace(0, 255, height)[:, None]
    image = np.stack([cols + 0 * rows, rows + 0 * cols, (cols + rows) / 2], axis=2)
    image = image + rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_pyramid_tiff(
    path: Path, image: np.ndarray, levels: int = 3, mpp: float | None = 0.25, unit: str = "CENTIMETER"
) -> list[np.ndarray]:
    """A tiled pyramidal TIFF OpenSlide reads as generic-tiff (levels as further pages, each half the
    last, taken by [::2, ::2] so a level's pixels are known exactly); no compression, so pixels
    read back unchanged. ``mpp`` sets XResolution/ResolutionUnit; None writes no resolution tags."""
    import tifffile  # optional dependency (the `wsi` extra)

    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(np.ascontiguousarray(pyramid[-1][::2, ::2]))
    with tifffile.TiffWriter(path) as writer:
        for level, pixels in enumerate(pyramid):
            options = {}
            if mpp is not None:
                per_unit = (1e4 if unit == "CENTIMETER" else 25_400.0) / (mpp * 2**level)
                options = {"resolution": (per_unit, per_unit), "resolutionunit": unit}
            writer.write(
                pixels, tile=(256, 256), photometric="rgb", subfiletype=0 if level == 0 else 1, **options
            )
    return pyramid
