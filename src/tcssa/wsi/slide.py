"""Opening a whole-slide image: its levels, its pixel size and magnification, regions and thumbnails.

OpenSlide (openslide-python, the C library from openslide-bin) is tried first; when it does not
know the format, tiffslide (pure Python, on tifffile) is the fallback, which also opens plain
TIFFs without a pyramid. ``SlideInfo.backend`` records which one opened the slide. This module is
the only place tcssa opens slide files: OpenSlide and tiffslide own that format, so it is left
outside ``tcssa.io`` on purpose (docs/LAYOUT.md).

The pixel size (microns per pixel, mpp) at level 0 sets the magnification through TRIDENT's rule
(``magnification_from_mpp``). It comes from the metadata (``openslide.mpp-x``,
``tiffslide.mpp-x``, else the TIFF ``XResolution``/``ResolutionUnit`` tags), from the caller
(``mpp=``), or, when neither gives a usable value, it is assumed (``default_mpp``, 20x) with a
``MissingMppWarning``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Pixel sizes above this (µm/px) are not a slide scan: metadata that says so is treated as missing.
MAX_PLAUSIBLE_MPP = 100.0

#: Level downsamples reported by OpenSlide come from rounded level sizes (4.0002 for a 4x level):
#: a level counts as "at or above the wanted resolution" within this relative tolerance.
LEVEL_DOWNSAMPLE_TOLERANCE = 0.01

#: Thumbnails of a level larger than this many pixels are read in horizontal bands, so that a
#: slide without a pyramid does not need its whole level 0 in memory at once. 8 M pixels (32 MB of
#: RGBA per band): at 64 M the bands alone took extract's peak from 596 to 1,254 MiB on a 12288^2
#: slide without a pyramid (docs/RESULTS.md).
THUMBNAIL_BAND_PIXELS = 8_000_000

# TRIDENT's rule (mahmoodlab/TRIDENT, WSI._fetch_magnification): the first bound above the mpp.
_MAGNIFICATION_BOUNDS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

_MICRONS_PER_RESOLUTION_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0}


class SlideReadError(ValueError):
    """A slide file that cannot be opened or read: the message names the file and why."""


class MissingMppWarning(UserWarning):
    """The slide's metadata gives no usable pixel size, so one was assumed."""


def magnification_from_mpp(mpp: float) -> int:
    """The objective power (80, 60, 40, 20, 10 or 5) of a level-0 pixel size in µm/px, TRIDENT's rule.

    Each magnification covers the mpp values below its bound and at or above the next finer one:
    ``< 0.16`` is 80x, ``< 0.2`` 60x, ``< 0.3`` 40x, ``< 0.6`` 20x, ``< 1.2`` 10x, ``< 2.4`` 5x.
    A pixel size of 2.4 µm or more, zero, negative or not finite is a ValueError naming it.
    """
    value = float(mpp)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"microns per pixel must be a positive finite number, got mpp={mpp!r}")
    for bound, magnification in _MAGNIFICATION_BOUNDS:
        if value < bound:
            return magnification
    raise ValueError(
        f"mpp={value} µm/px is coarser than 5x (TRIDENT's rule stops at mpp < 2.4): "
        "not a slide's full-resolution level"
    )


def _as_float(value: object) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mpp_from_properties(properties: Mapping[str, object]) -> tuple[float, str] | None:
    """The level-0 pixel size the metadata states, and the property it came from; None if it states none.

    Looks at the readers' own keys first (``openslide.mpp-x``, ``tiffslide.mpp-x``, then the ``-y``
    ones: pixels are square in practice, and TRIDENT uses x too), then converts the TIFF
    ``XResolution`` tag (pixels per ``ResolutionUnit``, centimeter or inch; unit "none" states
    nothing). The value is returned as found, even when odd (0, inf): the caller decides.
    """
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "openslide.mpp-y", "tiffslide.mpp-y"):
        value = _as_float(properties.get(key))
        if value is not None:
            return value, key
    unit = str(properties.get("tiff.ResolutionUnit", "")).strip().lower()
    resolution = _as_float(properties.get("tiff.XResolution"))
    if unit in _MICRONS_PER_RESOLUTION_UNIT and resolution is not None:
        microns = _MICRONS_PER_RESOLUTION_UNIT[unit]
        mpp = microns / resolution if resolution > 0 else math.inf
        return mpp, f"tiff.XResolution = {properties.get('tiff.XResolution')} per {unit}"
    return None


def _is_plausible_mpp(mpp: float) -> bool:
    return math.isfinite(mpp) and 0 < mpp <= MAX_PLAUSIBLE_MPP


@dataclass(frozen=True)
class SlideInfo:
    """What tiling needs to know about a slide, without holding the file open."""

    path: Path
    name: str  # file stem: the slide id used for output file names
    width: int  # level 0, pixels
    height: int
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) of each level
    level_downsamples: tuple[float, ...]  # level-0 px per level px
    mpp: float  # level-0 microns per pixel actually used
    mpp_source: str  # "metadata" | "user" | "assumed"
    magnification: int  # level-0 objective power, magnification_from_mpp(mpp)
    backend: str  # "openslide" | "tiffslide"

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def best_level_for_downsample(level_downsamples: tuple[float, ...], downsample: float) -> int:
    """The deepest level whose downsample is at most ``downsample`` (within LEVEL_DOWNSAMPLE_TOLERANCE).

    Reading there gives at least the wanted resolution; the caller resizes down. Level 0 when no
    level is coarse enough, or when ``downsample`` is below 1.
    """
    best = 0
    for level, level_downsample in enumerate(level_downsamples):
        if level_downsample <= downsample * (1 + LEVEL_DOWNSAMPLE_TOLERANCE) and (
            level_downsample >= level_downsamples[best]
        ):
            best = level
    return best


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB from what a reader returns: alpha is composited on white."""
    if region.dtype != np.uint8:
        raise ValueError(f"pixels are {region.dtype}, not 8-bit")
    if region.ndim == 2:
        region = region[:, :, None]
    channels = region.shape[2]
    if channels in (1, 2):  # grey, or grey + alpha
        colour, alpha = np.repeat(region[:, :, :1], 3, axis=2), region[:, :, 1] if channels == 2 else None
    elif channels in (3, 4):
        colour, alpha = region[:, :, :3], region[:, :, 3] if channels == 4 else None
    else:
        raise ValueError(f"pixels have {channels} channels, not RGB")
    if alpha is None or bool((alpha == 255).all()):
        return np.ascontiguousarray(colour)
    # OpenSlide marks pixels outside the scanned area (and outside the slide) transparent:
    # they become white, the colour of empty glass, like OpenSlide's own thumbnails.
    weight = alpha[:, :, None].astype(np.float32) / 255.0
    blended = colour.astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


class Slide:
    """An open slide file; use ``open_slide`` to get one. A context manager: ``with open_slide(p) as s``."""

    def __init__(self, handle, info: SlideInfo) -> None:
        self._handle = handle
        self.info = info

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self.info
        return (
            f"Slide({str(info.path)!r}, {info.width}x{info.height}, {info.level_count} levels, "
            f"{info.mpp} µm/px ({info.mpp_source}), {info.magnification}x, {info.backend})"
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def best_level_for_downsample(self, downsample: float) -> int:
        return best_level_for_downsample(self.info.level_downsamples, downsample)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """H x W x 3 uint8 RGB of ``size`` (w, h) level px at ``level``, top-left ``location`` in level-0 px.

        Pixels outside the slide are white. A region the file cannot deliver (damaged data, a
        truncated file) is a SlideReadError naming the file, the region and the reason.
        """
        if self._handle is None:
            raise SlideReadError(f"{self.info.path}: the slide is closed")
        if not 0 <= level < self.info.level_count:
            raise ValueError(
                f"{self.info.path}: level {level} does not exist (levels 0-{self.info.level_count - 1})"
            )
        x, y = (int(v) for v in location)
        width, height = (int(v) for v in size)
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.info.path}: region size must be positive, got {size}")
        try:
            if self.info.backend == "openslide":
                region = np.asarray(self._handle.read_region((x, y), level, (width, height)))
                return _to_rgb(region)
            region = _to_rgb(self._handle.read_region((x, y), level, (width, height), as_array=True))
        except SlideReadError:
            raise
        except Exception as error:  # the readers raise many kinds (OpenSlideError, codec errors, OSError)
            raise SlideReadError(
                f"{self.info.path}: cannot read the region at level-0 ({x}, {y}), level {level}, "
                f"size {width}x{height}: {type(error).__name__}: {error}"
            ) from error
        return self._whiten_outside(region, x, y, level)

    def _whiten_outside(self, region: np.ndarray, x: int, y: int, level: int) -> np.ndarray:
        """tiffslide pads outside the image with black; OpenSlide with transparent, which is white here."""
        level_width, level_height = self.info.level_dimensions[level]
        downsample = self.info.level_downsamples[level]
        first_col, first_row = x / downsample, y / downsample
        cols = first_col + np.arange(region.shape[1])
        rows = first_row + np.arange(region.shape[0])
        outside_cols = (cols < 0) | (cols >= level_width)
        outside_rows = (rows < 0) | (rows >= level_height)
        if outside_cols.any() or outside_rows.any():
            region = region.copy()
            region[:, outside_cols] = 255
            region[outside_rows, :] = 255
        return region

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide, its longer side ``max_size`` px at most (never upsampled), and its downsample.

        Returns (H x W x 3 uint8, downsample): level-0 px per thumbnail px, the same on both axes
        up to the rounding of the thumbnail's size to whole pixels.
        """
        if max_size < 1:
            raise ValueError(f"thumbnail max_size must be at least 1, got {max_size}")
        info = self.info
        downsample = max(1.0, max(info.width, info.height) / max_size)
        out_width = max(1, round(info.width / downsample))
        out_height = max(1, round(info.height / downsample))
        level = self.best_level_for_downsample(downsample)
        level_width, level_height = info.level_dimensions[level]
        level_downsample = info.level_downsamples[level]
        # Bands of whole `reduce` rows: Image.reduce (a box filter) shrinks each band exactly, so
        # bands join without seams, before the final resize to the thumbnail's size.
        reduce = max(1, int(downsample / level_downsample))
        band_rows = max(reduce, THUMBNAIL_BAND_PIXELS // max(1, level_width) // reduce * reduce)
        bands = []
        for top in range(0, level_height, band_rows):
            rows = min(band_rows, level_height - top)
            location = (0, round(top * level_downsample))
            band = Image.fromarray(self.read_region(location, level, (level_width, rows)))
            bands.append(np.asarray(band.reduce(reduce) if reduce > 1 else band))
        reduced = Image.fromarray(np.concatenate(bands, axis=0))
        thumbnail = reduced.resize((out_width, out_height), Image.Resampling.BILINEAR)
        return np.asarray(thumbnail), downsample


def _open_handle(path: Path):
    """(handle, backend) from OpenSlide, else tiffslide; SlideReadError with both readers' reasons."""
    import openslide  # optional dependency (the `wsi` extra)

    try:
        return openslide.OpenSlide(str(path)), "openslide"
    except openslide.OpenSlideUnsupportedFormatError as error:
        openslide_reason = str(error)  # a format OpenSlide does not know: tiffslide may
    except openslide.OpenSlideError as error:
        # OpenSlide knows the format and found it damaged (a short read, a broken tile table):
        # falling back would read the same broken data with less checking.
        raise SlideReadError(f"{path}: OpenSlide cannot read this slide: {error}") from error

    import tiffslide  # optional dependency (the `wsi` extra), the fallback reader

    handle = None
    try:
        handle = tiffslide.TiffSlide(path)
        _ = (
            handle.level_dimensions,
            handle.properties,
        )  # tiffslide parses lazily: fail here, with both reasons
        return handle, "tiffslide"
    except Exception as error:  # tifffile raises TiffFileError, IndexError, ValueError, ... on bad files
        if handle is not None:
            handle.close()
        raise SlideReadError(
            f"{path}: not a slide OpenSlide or tiffslide can read (truncated, damaged or another "
            f"format); OpenSlide: {openslide_reason}; tiffslide: {type(error).__name__}: {error}"
        ) from error


def _choose_mpp(path: Path, properties: Mapping[str, object], mpp: float | None, default_mpp: float):
    """(mpp, source): the caller's value, else the metadata's, else ``default_mpp`` with a warning."""
    if mpp is not None:
        magnification_from_mpp(mpp)  # a ValueError naming an unusable value
        return float(mpp), "user"
    found = mpp_from_properties(properties)
    if found is not None and _is_plausible_mpp(found[0]):
        value, key = found
        try:
            magnification_from_mpp(value)
        except ValueError as error:
            raise SlideReadError(
                f"{path}: the metadata's pixel size ({key}: {value} µm/px) is coarser than 5x; "
                "if that is wrong, give the real one with --mpp (open_slide(path, mpp=...))"
            ) from error
        return value, "metadata"
    magnification_from_mpp(default_mpp)
    assumed = f"assuming {default_mpp} µm/px ({magnification_from_mpp(default_mpp)}x)"
    override = "give the real value with --mpp (open_slide(path, mpp=...))"
    if found is None:
        message = f"{path}: no pixel size (microns per pixel) in the slide's metadata; {assumed}; {override}"
    else:
        message = (
            f"{path}: the metadata's pixel size is not usable ({found[1]}: {found[0]} µm/px); "
            f"{assumed}; {override}"
        )
    warnings.warn(message, MissingMppWarning, stacklevel=3)
    return float(default_mpp), "assumed"


def open_slide(path: str | Path, mpp: float | None = None, *, default_mpp: float = 0.5) -> Slide:
    """Open a slide file with OpenSlide (tiffslide as the fallback) and settle its pixel size.

    ``mpp`` overrides the metadata's level-0 microns per pixel. Without it and without a usable value
    in the metadata (none, zero, not finite, above MAX_PLAUSIBLE_MPP), ``default_mpp`` (0.5 µm/px,
    20x) is assumed with a MissingMppWarning. A missing file, a file that is not a slide, or a
    damaged one is a SlideReadError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: no such slide file")
    if not path.is_file():
        raise SlideReadError(
            f"{path}: not a file (a slide is one file; MIRAX/DICOM folders are not supported)"
        )
    handle, backend = _open_handle(path)
    try:
        try:  # tiffslide parses the file lazily: a damaged one fails here, on its first question
            level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
            level_downsamples = tuple(float(d) for d in handle.level_downsamples)
            properties = dict(handle.properties)
        except Exception as error:  # tifffile raises TiffFileError, IndexError, ValueError, ...
            raise SlideReadError(
                f"{path}: not a slide {backend} can read (truncated or damaged): "
                f"{type(error).__name__}: {error}"
            ) from error
        if not level_dimensions or min(min(dims) for dims in level_dimensions) < 1:
            raise SlideReadError(
                f"{path}: the slide has no image ({backend} reports levels {level_dimensions})"
            )
        chosen_mpp, mpp_source = _choose_mpp(path, properties, mpp, default_mpp)
        info = SlideInfo(
            path=path,
            name=path.stem,
            width=level_dimensions[0][0],
            height=level_dimensions[0][1],
            level_dimensions=level_dimensions,
            level_downsamples=level_downsamples,
            mpp=chosen_mpp,
            mpp_source=mpp_source,
            magnification=magnification_from_mpp(chosen_mpp),
            backend=backend,
        )
    except BaseException:
        handle.close()
        raise
    return Slide(handle, info)
