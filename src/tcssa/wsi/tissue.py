"""Where the tissue is on a slide: a boolean mask computed from a low-resolution thumbnail.

Stained tissue is coloured and glass is not, so the mask starts from the HSV saturation of the
thumbnail, thresholded with Otsu's method. Otsu separates two populations; on a slide that is mostly
glass those are glass and tissue, but on a slide covered by tissue they are pale and dark tissue, so
the threshold is kept inside ``[MIN_SATURATION, MAX_SATURATION]``: glass never reaches the upper
bound, and faint stains (e.g. a pale kidney biopsy, saturation about 0.1) stay above the lower one.
Near-white pixels are background whatever their saturation. Morphology then smooths the outline,
pieces smaller than ``min_area_level0`` are dropped (dust, debris), holes are filled on request, and
pen marks (blue, green, black or strongly red ink, which H&E does not produce) are cut out.

The thumbnail comes from ``tcssa.wsi.slide.Slide.thumbnail``; this module reads no file.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# TissueMask lives in tcssa.io (the geojson/mask-image format needs it and io may not import wsi).
from tcssa.io.geojson import TissueMask

__all__ = [
    "TissueMask",
    "detect_tissue",
    "detection_image",
    "pen_colours",
    "pen_marks",
    "rgb_to_hsv",
]

#: Tissue is found on an image of about this many microns per pixel, or coarser when the thumbnail
#: already is (TRIDENT and CLAM segment at similar or coarser levels): 8 um is 16 level-0 px at 20x,
#: so a 256-px tile at 20x still spans 16 x 16 mask pixels, ample for its tissue fraction, while
#: detection on a finer image costs seconds for nothing a tile can use (2.6 s on a 2048-px
#: thumbnail at 3 um/px, most of it the median filter; docs/RESULTS.md).
DETECTION_UM_PER_PX = 8.0

#: Bounds for the Otsu threshold on HSV saturation (0..1); see the module docstring.
MIN_SATURATION = 0.05
MAX_SATURATION = 0.15
#: A pixel whose red, green and blue are all at least this bright is glass (or an empty scan area).
NEAR_WHITE = 220
#: Odd size (thumbnail px) of the median filter applied to the saturation before thresholding.
MEDIAN_SIZE = 5
#: Radius (thumbnail px) of the disk used to close small gaps in the mask and open thin spurs.
SMOOTHING_RADIUS = 2
#: Pen pixels are grown by this many thumbnail px, so the faint rim of a stroke goes with it.
PEN_DILATION = 2
#: Ink-coloured pieces smaller than this (level-0 px^2; about 160 x 160 um at 0.5 um/px) are stain,
#: not a pen stroke: clusters of dark nuclei and flecks of tissue-marking dye are that small, while a
#: marker line is about a millimetre wide.
PEN_MIN_AREA_LEVEL0 = 100_000.0


def _check_thumbnail(thumbnail: np.ndarray, downsample: float) -> None:
    if not isinstance(thumbnail, np.ndarray) or thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        shape = getattr(thumbnail, "shape", None)
        raise ValueError(f"detect_tissue needs an H x W x 3 RGB thumbnail, got shape {shape}")
    if thumbnail.dtype != np.uint8:
        raise ValueError(f"detect_tissue needs a uint8 RGB thumbnail (0..255), got {thumbnail.dtype}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(
            f"downsample (level-0 px per thumbnail px) must be a positive number, got {downsample}"
        )


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB to H x W x 3 float32 HSV, every channel in 0..1 (hue 0 = red, 1/3 green,
    2/3 blue; grey pixels have hue 0 and saturation 0). The same values as ``skimage.color.rgb2hsv``,
    in float32 rather than float64 because thumbnails are large."""
    channels = rgb.astype(np.float32) / 255
    red, green, blue = channels[..., 0], channels[..., 1], channels[..., 2]
    value = channels.max(axis=2)
    chroma = value - channels.min(axis=2)
    grey = chroma == 0
    safe_chroma = np.where(grey, 1, chroma)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1), 0)
    hue = np.where(
        value == red,
        (green - blue) / safe_chroma,
        np.where(value == green, 2 + (blue - red) / safe_chroma, 4 + (red - green) / safe_chroma),
    )
    hue = np.where(grey, 0, (hue / 6) % 1)
    return np.stack([hue, saturation, value], axis=2).astype(np.float32)


def _smooth(mask: np.ndarray) -> np.ndarray:
    """Close gaps narrower than ``SMOOTHING_RADIUS`` px, then open away spurs one pixel thick. The mask is
    extended past its edges by repeating them first, so tissue cut by the thumbnail's border stays."""
    pad = SMOOTHING_RADIUS + 1
    padded = np.pad(mask, pad, mode="edge")
    padded = ndimage.binary_closing(padded, structure=_disk(SMOOTHING_RADIUS))
    padded = ndimage.binary_opening(padded, structure=_disk(1))
    return padded[pad:-pad, pad:-pad]


def _remove_small_pieces(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected pieces of fewer than ``min_pixels`` pixels."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def pen_colours(hsv: np.ndarray) -> np.ndarray:
    """Pixels coloured like marker ink, from an H x W x 3 HSV image (all channels 0..1).

    The ranges keep clear of most of H&E: hematoxylin is blue-purple (hue about 0.65-0.85, red above
    green, so hue above 2/3) and eosin pink (0.85-0.97); a pale blue-grey biopsy has hue about 0.62 but
    saturation below 0.25; red blood cells are red with saturation below 0.75; dark nuclei are dark
    but strongly saturated, black ink is not. Single dark nuclei still match; ``pen_marks`` keeps only
    pieces the size of a pen stroke.
    """
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (hue >= 0.55) & (hue <= 0.67) & (saturation >= 0.45) & (value >= 0.15)
    green = (hue >= 0.20) & (hue < 0.55) & (saturation >= 0.25) & (value >= 0.15)
    red = ((hue <= 0.03) | (hue >= 0.98)) & (saturation >= 0.75) & (value >= 0.35)
    black = (value < 0.15) & (saturation < 0.5)
    return blue | green | red | black


def pen_marks(hsv: np.ndarray, downsample: float) -> np.ndarray:
    """Marker ink on a thumbnail: pieces of ``pen_colours`` of at least ``PEN_MIN_AREA_LEVEL0``
    level-0 px^2, grown by ``PEN_DILATION`` px to take the stroke's faint rim too."""
    ink = pen_colours(hsv)
    min_pixels = max(1, int(math.ceil(PEN_MIN_AREA_LEVEL0 / downsample**2)))
    strokes = _remove_small_pieces(ink, min_pixels)
    if not strokes.any():
        return strokes
    return ndimage.binary_dilation(strokes, structure=_disk(PEN_DILATION))


def detection_image(thumbnail: np.ndarray, downsample: float, mpp: float) -> tuple[np.ndarray, float]:
    """The thumbnail shrunk (box filter, whole factors) to about ``DETECTION_UM_PER_PX`` microns per
    pixel, and its downsample (level-0 px per pixel); the thumbnail itself when it is that coarse
    already. ``mpp`` is the slide's level-0 microns per pixel."""
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp (level-0 microns per pixel) must be a positive number, got {mpp}")
    _check_thumbnail(thumbnail, downsample)
    factor = round(DETECTION_UM_PER_PX / (mpp * downsample))
    if factor < 2 or min(thumbnail.shape[:2]) < 2 * factor:
        return thumbnail, float(downsample)
    from PIL import Image  # pillow: part of the `wsi` extra, like scikit-image below

    reduced = np.asarray(Image.fromarray(thumbnail).reduce(factor))
    # Image.reduce keeps a last, partial block, so the exact scale is the ratio of the sizes.
    return reduced, float(downsample) * thumbnail.shape[1] / reduced.shape[1]


def detect_tissue(
    thumbnail: np.ndarray,
    downsample: float,
    *,
    fill_holes: bool = True,
    min_area_level0: float = 250_000.0,
    drop_pen: bool = True,
    min_hole_area_level0: float = 16_384.0,
) -> TissueMask:
    """The tissue mask of a slide from its RGB thumbnail (H x W x 3 uint8).

    ``downsample`` is the number of level-0 pixels per thumbnail pixel. ``min_area_level0`` is the
    smallest tissue piece kept, in level-0 pixels squared: the default 250,000 px^2 is a 500 x 500 px
    square, 250 x 250 um at 0.5 um/px (20x). ``fill_holes`` closes holes inside a piece (set it to
    False to keep a lumen or a tear out of the mask); even then, holes smaller than
    ``min_hole_area_level0`` (level-0 px^2; the default is a 128 x 128 px square, a quarter of a
    256-px tile at 20x) are filled, since gaps that small between fibres are not worth an outline.
    ``drop_pen`` cuts out marker ink (``pen_marks``). A thumbnail without tissue (blank glass) gives
    an all-False mask.
    """
    # scikit-image is an optional dependency (the `wsi` extra), needed only to detect tissue.
    from skimage.filters import threshold_otsu

    _check_thumbnail(thumbnail, downsample)
    if thumbnail.shape[0] == 0 or thumbnail.shape[1] == 0:
        return TissueMask(np.zeros(thumbnail.shape[:2], bool), float(downsample))
    hsv = rgb_to_hsv(thumbnail)
    saturation = ndimage.median_filter(np.round(hsv[..., 1] * 255).astype(np.uint8), size=MEDIAN_SIZE)
    if saturation.max() == saturation.min():
        threshold = MAX_SATURATION  # a constant image (blank glass): Otsu has nothing to split
    else:
        threshold = float(np.clip(threshold_otsu(saturation) / 255, MIN_SATURATION, MAX_SATURATION))
    near_white = (thumbnail >= NEAR_WHITE).all(axis=2)
    tissue = (saturation / 255 > threshold) & ~near_white
    pen = np.zeros_like(tissue)
    if drop_pen:
        pen = pen_marks(hsv, downsample)
        # Ink over glass is never tissue; ink over tissue hides the tissue, cut out below.
        tissue &= ~pen

    tissue = _smooth(tissue)
    min_pixels = max(1, int(math.ceil(min_area_level0 / downsample**2)))
    tissue = _remove_small_pieces(tissue, min_pixels)
    if fill_holes:
        tissue = ndimage.binary_fill_holes(tissue)
    else:
        holes = ndimage.binary_fill_holes(tissue) & ~tissue
        min_hole_pixels = max(1, int(math.ceil(min_hole_area_level0 / downsample**2)))
        tissue |= holes & ~_remove_small_pieces(holes, min_hole_pixels)
    if drop_pen:
        # After hole filling: a pen circle drawn on tissue would otherwise be filled back in.
        tissue &= ~pen
        tissue = _remove_small_pieces(tissue, min_pixels)
    return TissueMask(np.ascontiguousarray(tissue, dtype=bool), float(downsample))
