"""Tissue outlines as GeoJSON (what QuPath imports and exports), and tissue masks read from files.

``save_tissue_geojson`` writes one Polygon Feature per tissue piece, in level-0 pixel coordinates:
the outer ring first, then one ring per hole, each ring closed (first point = last point), outer rings
counter-clockwise and holes clockwise as RFC 7946 counts it on the numbers (on screen, where y points
down, the other way round). Each Feature's properties are QuPath's: ``{"objectType": "annotation",
"classification": {"name": "Tissue", "color": [r, g, b]}}``, so "File > Import objects" in QuPath
shows them as Tissue annotations.

Coordinates: mask pixel (row, col) covers level-0 x in [col * d, (col + 1) * d) for downsample d, so its
centre is at ((col + 0.5) * d, (row + 0.5) * d). Outlines run midway between the centres of tissue and
background pixels, i.e. along the tissue pixels' edges (a pixel's corner is cut by half a pixel where
the outline turns diagonally); rasterising them again (``load_tissue_mask``) fills the pixels whose
centres lie inside, which gives the same mask back.

``load_tissue_mask`` reads a tissue outline from a GeoJSON file (Polygon and MultiPolygon, holes left
out) or from a mask image (png, tif, ...: nonzero = tissue, any size, rescaled to the requested grid).

``TissueMask`` is defined here, beside its file formats, because ``tcssa.io`` may not import
``tcssa.wsi``; ``tcssa.wsi.tissue`` (which computes masks) re-exports it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from tcssa.io.files import read_json, write_text

GEOJSON_SUFFIXES = (".geojson", ".json")
TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 60]}


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask: ``mask`` is H x W bool, each mask pixel covers ``downsample`` x ``downsample``
    level-0 pixels (mask pixel (row, col) covers level-0 x in [col * downsample, (col + 1) * downsample))."""

    mask: np.ndarray
    downsample: float

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError(
                f"a tissue mask is a 2-D bool array, got {self.mask.dtype} of shape {self.mask.shape}"
            )
        if not (math.isfinite(self.downsample) and self.downsample > 0):
            raise ValueError(f"a tissue mask's downsample must be a positive number, got {self.downsample}")

    @property
    def tissue_fraction(self) -> float:
        """The share of the slide's area covered by tissue (0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def num_components(self) -> int:
        """The number of separate tissue pieces (8-connected)."""
        return int(ndimage.label(self.mask, structure=np.ones((3, 3), bool))[1])


# ----------------------------------------------------------------------------------- writing
def _ring_area(ring: np.ndarray) -> float:
    """Signed area (shoelace) of an x, y ring: positive when counter-clockwise with y pointing up."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring without the points that lie on the straight line through their neighbours
    (find_contours puts one every half pixel along a straight edge); the closing point is kept."""
    previous, following = np.roll(ring[:-1], 1, axis=0), np.roll(ring[:-1], -1, axis=0)
    cross = (ring[:-1, 0] - previous[:, 0]) * (following[:, 1] - ring[:-1, 1]) - (
        ring[:-1, 1] - previous[:, 1]
    ) * (following[:, 0] - ring[:-1, 0])
    corners = ring[:-1][np.abs(cross) > 1e-9]
    return np.vstack([corners, corners[:1]]) if len(corners) >= 3 else ring


def _outline(region: np.ndarray, downsample: float, counter_clockwise: bool) -> list[list[float]]:
    """The closed outline of one 8-connected region without holes, as level-0 [x, y] points."""
    # scikit-image is an optional dependency (the `wsi` extra); only tissue outlines need it.
    from skimage.measure import find_contours

    padded = np.pad(region, 1).astype(np.float32)
    # The longest contour is the region's outer boundary (a region without holes has just one).
    contour = max(find_contours(padded, 0.5, fully_connected="high"), key=len)
    # Only the points on straight runs go: the outline stays exact (Douglas-Peucker simplification
    # would save about a fifth of the points more, at several times the cost, and move pixels).
    contour = _drop_collinear(contour)
    rows, cols = contour[:, 0] - 1, contour[:, 1] - 1  # undo the padding
    ring = np.stack([(cols + 0.5) * downsample, (rows + 0.5) * downsample], axis=1)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    # Orientation by the numbers (shoelace area > 0 is counter-clockwise), as RFC 7946 and shapely count it.
    if (_ring_area(ring) > 0) != counter_clockwise:
        ring = ring[::-1]
    return [[round(float(x), 2), round(float(y), 2)] for x, y in ring]


def tissue_polygons(mask: TissueMask) -> list[list[list[list[float]]]]:
    """Each tissue piece of ``mask`` as GeoJSON Polygon coordinates: [outer ring, hole rings...]."""
    eight = np.ones((3, 3), bool)
    pieces, _count = ndimage.label(mask.mask, structure=eight)
    polygons = []
    for index, window in enumerate(ndimage.find_objects(pieces), start=1):
        piece = pieces[window] == index
        filled = ndimage.binary_fill_holes(piece)
        outer = _outline(filled, mask.downsample, counter_clockwise=True)
        # Holes are 4-connected background regions inside the piece (8-connected tissue encloses
        # 4-connected background, so the two never cross).
        holes, _hole_count = ndimage.label(filled & ~piece)
        offset_x, offset_y = window[1].start * mask.downsample, window[0].start * mask.downsample
        rings = [[[round(x + offset_x, 2), round(y + offset_y, 2)] for x, y in outer]]
        for hole_index, hole_window in enumerate(ndimage.find_objects(holes), start=1):
            hole = holes[hole_window] == hole_index
            ring = _outline(hole, mask.downsample, counter_clockwise=False)
            hole_x = offset_x + hole_window[1].start * mask.downsample
            hole_y = offset_y + hole_window[0].start * mask.downsample
            rings.append([[round(x + hole_x, 2), round(y + hole_y, 2)] for x, y in ring])
        polygons.append(rings)
    return polygons


def save_tissue_geojson(mask: TissueMask, path: str | Path) -> Path:
    """Write ``mask``'s tissue pieces to ``path`` as a QuPath-style GeoJSON FeatureCollection (see the
    module docstring), atomically; an empty mask gives an empty FeatureCollection. Returns ``path``."""
    path = Path(path)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": dict(TISSUE_CLASS)},
        }
        for rings in tissue_polygons(mask)
    ]
    write_text(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")
    return path


# ----------------------------------------------------------------------------------- reading
def _geometries(data: Any, path: Path) -> list[dict]:
    """The geometry objects of a GeoJSON value: a FeatureCollection, a Feature, a geometry, or a list
    of Features (what some QuPath versions export)."""
    if isinstance(data, list):
        return [g for item in data for g in _geometries(item, path)]
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or geometry object)")
    kind = data["type"]
    if kind == "FeatureCollection":
        return [g for feature in data.get("features") or [] for g in _geometries(feature, path)]
    if kind == "Feature":
        return [] if data.get("geometry") is None else _geometries(data["geometry"], path)
    if kind == "GeometryCollection":
        return [g for item in data.get("geometries") or [] for g in _geometries(item, path)]
    return [data]


def _ring_points(ring: Any, path: Path) -> np.ndarray:
    try:
        points = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: a polygon ring is not a list of [x, y] numbers") from None
    if points.ndim != 2 or points.shape[1] < 2 or len(points) < 3 or not np.isfinite(points[:, :2]).all():
        raise ValueError(f"{path}: a polygon ring needs at least 3 finite [x, y] points, got {points.shape}")
    return points[:, :2]


def _fill_ring(
    rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels whose centres lie inside a ring (even-odd rule), the ring given in pixel-centre
    coordinates (pixel (i, j) has its centre at row i, column j): the window of the mask holding the
    ring's bounding box, and the inside as a bool array of that window's shape.

    A scanline fill: each edge crossing a pixel row's centre line toggles "inside" from the first
    pixel centre at or right of the crossing, so the parity of a row's cumulative toggles is the
    mask. It costs one step per edge and row crossed, where a point-in-polygon test per pixel
    (skimage.draw.polygon) costs the bounding box's area times the number of vertices.
    """
    height, width = shape
    if rows[0] != rows[-1] or cols[0] != cols[-1]:
        rows, cols = np.append(rows, rows[0]), np.append(cols, cols[0])
    top, bottom = int(np.clip(np.ceil(rows.min()), 0, height)), int(np.clip(np.ceil(rows.max()), 0, height))
    left, right = int(np.clip(np.ceil(cols.min()), 0, width)), int(np.clip(np.ceil(cols.max()), 0, width))
    window = (slice(top, bottom), slice(left, right))
    rows, cols = rows - top, cols - left
    height, width = bottom - top, right - left
    r0, r1, c0, c1 = rows[:-1], rows[1:], cols[:-1], cols[1:]
    # Edge e crosses the centre line of every pixel row i with min(r) <= i < max(r).
    first = np.clip(np.ceil(np.minimum(r0, r1)), 0, height).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(r0, r1)), 0, height).astype(np.int64)
    counts = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(r0)), counts)
    starts = np.cumsum(counts) - counts
    row = first[edge] + np.arange(int(counts.sum())) - starts[edge]
    crossing = c0[edge] + (row - r0[edge]) * (c1[edge] - c0[edge]) / (r1[edge] - r0[edge])
    column = np.clip(np.ceil(crossing), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), np.int32)
    np.add.at(toggles, (row, column), 1)
    return window, (np.cumsum(toggles, axis=1)[:, :width] & 1).astype(bool)


def _polygon_mask(rings: Any, shape: tuple[int, int], downsample: float, path: Path) -> np.ndarray:
    """One GeoJSON Polygon (outer ring, then holes) drawn on the mask grid."""
    if not isinstance(rings, list) or not rings:
        raise ValueError(f"{path}: a Polygon's coordinates must be a list of rings")
    mask = np.zeros(shape, bool)
    for ring_index, ring in enumerate(rings):
        points = _ring_points(ring, path)
        # Level-0 x, y to the mask grid, whose pixel centres sit at (col + 0.5) * downsample.
        window, inside = _fill_ring(points[:, 1] / downsample - 0.5, points[:, 0] / downsample - 0.5, shape)
        if ring_index == 0:
            mask[window] |= inside
        else:
            mask[window] &= ~inside  # a hole
    return mask


def _mask_shape(width: int, height: int, downsample: float) -> tuple[int, int]:
    if width < 1 or height < 1:
        raise ValueError(f"the slide's level-0 size must be positive, got {width} x {height}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample}")
    # Enough mask pixels to cover the slide (the last row/column may stick out past its edge); the
    # small slack keeps a size that divides exactly, up to rounding, from gaining a pixel.
    return max(1, math.ceil(height / downsample - 1e-6)), max(1, math.ceil(width / downsample - 1e-6))


def _mask_from_geojson(path: Path, shape: tuple[int, int], downsample: float) -> np.ndarray:
    geometries = _geometries(read_json(path, hint="a tissue outline must be GeoJSON"), path)
    polygons, skipped = [], []
    for geometry in geometries:
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            polygons.append(coordinates)
        elif kind == "MultiPolygon":
            if not isinstance(coordinates, list):
                raise ValueError(f"{path}: a MultiPolygon's coordinates must be a list of polygons")
            polygons.extend(coordinates)
        elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
            skipped.append(kind)
        else:
            raise ValueError(
                f"{path}: unknown GeoJSON geometry type {kind!r} (a tissue outline is a Polygon)"
            )
    if not polygons:
        found = f" (found only {sorted(set(skipped))})" if skipped else ""
        raise ValueError(f"{path}: no Polygon or MultiPolygon in this GeoJSON, so no tissue outline{found}")
    if skipped:
        warnings.warn(
            f"{path}: ignored {len(skipped)} geometries that are not polygons ({sorted(set(skipped))})",
            UserWarning,
            stacklevel=3,
        )
    # Each polygon is drawn on its own, so one polygon's hole never cuts another polygon lying in it.
    mask = np.zeros(shape, bool)
    for rings in polygons:
        mask |= _polygon_mask(rings, shape, downsample, path)
    return mask


def _mask_from_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            values = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable mask image ({err})") from None
    if values.ndim == 3:
        values = values[..., :3] if values.shape[2] == 4 else values  # an alpha channel is not tissue
        values = values.any(axis=2)
    tissue = Image.fromarray((values != 0).astype(np.uint8) * 255)
    # A box filter then a majority vote: each output pixel is tissue when most of what it covers is.
    resized = np.asarray(tissue.resize((shape[1], shape[0]), Image.Resampling.BOX))
    return resized >= 128


def load_tissue_mask(path: str | Path, width: int, height: int, downsample: float) -> TissueMask:
    """A tissue mask for a slide of level-0 size ``width`` x ``height`` at ``downsample`` level-0 px per
    mask px, read from a GeoJSON outline (``.geojson``/``.json``, level-0 coordinates) or a mask image
    (any other suffix; nonzero = tissue, any size: it is taken to cover the whole slide and rescaled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tissue mask file not found: {path}")
    shape = _mask_shape(width, height, downsample)
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        mask = _mask_from_geojson(path, shape, downsample)
    else:
        mask = _mask_from_image(path, shape)
    return TissueMask(mask, float(downsample))
