"""Figures on a slide's thumbnail: the tissue mask, the tile grid, and per-tile slot and class maps.

Each function draws arrays it is given and returns a ``tcssa.viz.plots.Plot`` (a
``matplotlib.figure.Figure`` built without pyplot, its title and a one-line caption); ``save_png``
writes one atomically. Nothing here reads a slide or a feature file: the caller passes the thumbnail
(H x W x 3 uint8), its ``downsample`` (level-0 px per thumbnail px), the tiles' level-0 top-left
``coords`` (N x 2, x then y) and their side ``patch_size_level0``. The axes are in level-0 px, the
coordinates of the feature files, so a tile can be found again in the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tcssa.io.files import atomic_output
from tcssa.viz.plots import TITLE_SIZE, Plot, phenotype_palette, slot_palette

MASK_COLOUR = "#00a03c"  # the Tissue class colour of tcssa.io.geojson
GRID_COLOUR = "#1f3fbf"
OVERLAY_ALPHA = 0.55
#: Legends list at most this many entries (the most frequent), so 32 slots stay readable.
MAX_LEGEND_ENTRIES = 16


def save_png(plot: Plot, path: str | Path, dpi: int = 110) -> Path:
    """Write ``plot`` as a PNG at ``path`` (folders created, written atomically); returns ``path``."""
    path = Path(path)
    png = plot.to_png(dpi)
    with atomic_output(path) as partial:
        partial.write_bytes(png)
    return path


def _check_thumbnail(thumbnail: np.ndarray) -> None:
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ValueError(
            f"a thumbnail is an H x W x 3 uint8 RGB array, got {thumbnail.dtype} {thumbnail.shape}"
        )


def _check_tiles(coords: np.ndarray, values: np.ndarray | None = None, name: str = "") -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be N x 2 level-0 (x, y) tile corners, got shape {coords.shape}")
    if values is not None and len(values) != len(coords):
        raise ValueError(f"{name} has {len(values)} entries for {len(coords)} tiles")
    return coords


def _slide_figure(
    thumbnail: np.ndarray, downsample: float, unit: str, panels: int = 1
) -> tuple[Figure, list]:
    """A figure with ``panels`` axes side by side, each showing the thumbnail stretched over the slide's
    level-0 extent (``downsample`` level-0 px per thumbnail px), axes labelled in ``unit``."""
    height, width = thumbnail.shape[:2]
    panel_width = 5.5 * min(1.6, max(0.5, width / max(height, 1)))
    figure = Figure(figsize=(panel_width * panels + 2.2, 6.4), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    extent = (0, width * downsample, height * downsample, 0)
    for ax in axes:
        ax.imshow(thumbnail, extent=extent, interpolation="antialiased")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xlabel(f"x ({unit})")
        ax.set_ylabel(f"y ({unit})")
    return figure, list(axes)


def _tile_squares(coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """N x 4 x 2 corners of each tile, in level-0 px."""
    x0, y0 = coords[:, 0].astype(float), coords[:, 1].astype(float)
    side = float(patch_size_level0)
    corners = [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    return np.stack([np.stack(c, axis=1) for c in corners], axis=1)


def _check_downsample(downsample: float) -> None:
    if not downsample > 0:
        raise ValueError(f"downsample (level-0 px per thumbnail px) must be positive, got {downsample}")


def mask_overlay(
    thumbnail: np.ndarray, mask: np.ndarray, *, downsample: float | None = None, title: str = "Tissue mask"
) -> Plot:
    """The thumbnail with the tissue mask tinted green and outlined; ``mask`` (H' x W' bool) may have
    another resolution than the thumbnail: both are stretched over the same slide area. With the
    thumbnail's ``downsample`` the axes are in level-0 px, without it in thumbnail px."""
    _check_thumbnail(thumbnail)
    unit = "thumbnail px" if downsample is None else "level-0 px"
    downsample = 1.0 if downsample is None else downsample
    _check_downsample(downsample)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a tissue mask is a 2-D bool array, got shape {mask.shape}")
    height, width = thumbnail.shape[0] * downsample, thumbnail.shape[1] * downsample
    figure, (ax,) = _slide_figure(thumbnail, downsample, unit)
    tint = np.zeros((*mask.shape, 4))
    tint[mask] = (*to_rgb(MASK_COLOUR), 0.35)
    ax.imshow(tint, extent=(0, width, height, 0), interpolation="nearest")
    if mask.any() and not mask.all():
        rows = np.linspace(0, height, mask.shape[0], endpoint=False) + height / mask.shape[0] / 2
        cols = np.linspace(0, width, mask.shape[1], endpoint=False) + width / mask.shape[1] / 2
        ax.contour(cols, rows, mask.astype(float), levels=[0.5], colors=[MASK_COLOUR], linewidths=1.2)
    fraction = float(mask.mean()) if mask.size else 0.0
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.legend(handles=[Patch(color=MASK_COLOUR, alpha=0.6, label="tissue")], loc="upper right")
    caption = (
        f"Green: where tissue was detected ({fraction:.1%} of the slide). Check that no tissue is left "
        "uncovered and that glass, pen marks and debris are not green."
    )
    return Plot(figure, title, caption)


def tile_grid_overlay(
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    patch_size_level0: int,
    *,
    title: str = "Tiles",
) -> Plot:
    """The thumbnail with the outline of every tile that will be encoded."""
    _check_thumbnail(thumbnail)
    _check_downsample(downsample)
    coords = _check_tiles(coords)
    figure, (ax,) = _slide_figure(thumbnail, downsample, "level-0 px")
    squares = _tile_squares(coords, patch_size_level0)
    ax.add_collection(PolyCollection(squares, facecolors="none", edgecolors=GRID_COLOUR, linewidths=0.5))
    ax.set_title(title, fontsize=TITLE_SIZE)
    caption = (
        f"{len(coords)} tiles of {patch_size_level0} x {patch_size_level0} level-0 px drawn on the slide; "
        "every tile should lie on tissue and the tissue should be covered."
    )
    return Plot(figure, title, caption)


def _draw_categories(
    ax,
    squares: np.ndarray,
    values: np.ndarray,
    colours: np.ndarray,
    names: Sequence[str],
    legend_title: str,
) -> int:
    """Fill each tile with its category's colour and add a legend of the most frequent categories;
    returns how many categories occur."""
    ax.add_collection(
        PolyCollection(squares, facecolors=colours[values], edgecolors="none", alpha=OVERLAY_ALPHA)
    )
    counts = np.bincount(values, minlength=len(colours))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    shown = present[:MAX_LEGEND_ENTRIES]
    handles = [Patch(color=colours[i], alpha=0.8, label=f"{names[i]} ({counts[i]})") for i in shown]
    if len(present) > len(shown):
        handles.append(Patch(color="white", label=f"+{len(present) - len(shown)} more"))
    if handles:
        ax.legend(
            handles=handles,
            title=legend_title,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title_fontsize=9,
            frameon=False,
        )
    return len(present)


def _check_categories(values: np.ndarray, count: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D array of integers, got {values.dtype} {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= count):
        raise ValueError(f"{name} must lie in 0..{count - 1}, got {values.min()}..{values.max()}")
    return values.astype(np.int64)


def slot_map_on_slide(
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    patch_size_level0: int,
    top1_slot: np.ndarray,
    num_slots: int,
    title: str = "Slot map",
) -> Plot:
    """Each tile coloured by the slot its patch was routed to first (top-1), over the thumbnail."""
    _check_thumbnail(thumbnail)
    slots = _check_categories(top1_slot, num_slots, "top1_slot")
    _check_downsample(downsample)
    coords = _check_tiles(coords, slots, "top1_slot")
    figure, (ax,) = _slide_figure(thumbnail, downsample, "level-0 px")
    used = _draw_categories(
        ax,
        _tile_squares(coords, patch_size_level0),
        slots,
        slot_palette(num_slots),
        [f"slot {i}" for i in range(num_slots)],
        "top-1 slot (tiles)",
    )
    ax.set_title(title, fontsize=TITLE_SIZE)
    caption = (
        f"Each of the {len(slots)} tiles is coloured by its top-1 slot; {used} of {num_slots} slots "
        "are used. Slots that follow tissue regions make contiguous patches of one colour."
    )
    return Plot(figure, title, caption)


def class_map_on_slide(
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    patch_size_level0: int,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str = "Tissue classes",
) -> Plot:
    """Each tile coloured by its class (e.g. one of the 9 PathMNIST tissue classes), over the thumbnail."""
    _check_thumbnail(thumbnail)
    classes = _check_categories(labels, len(class_names), "labels")
    _check_downsample(downsample)
    coords = _check_tiles(coords, classes, "labels")
    figure, (ax,) = _slide_figure(thumbnail, downsample, "level-0 px")
    used = _draw_categories(
        ax,
        _tile_squares(coords, patch_size_level0),
        classes,
        phenotype_palette(len(class_names)),
        list(class_names),
        "class (tiles)",
    )
    ax.set_title(title, fontsize=TITLE_SIZE)
    caption = (
        f"Each of the {len(classes)} tiles is coloured by its class; {used} of {len(class_names)} occur."
    )
    return Plot(figure, title, caption)


def slot_and_class_maps(
    thumbnail: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    patch_size_level0: int,
    top1_slot: np.ndarray,
    num_slots: int,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str = "Slots and tissue classes",
) -> Plot:
    """The class map (left) beside the slot map (right) of the same tiles, to see which slots follow
    which tissue classes."""
    _check_thumbnail(thumbnail)
    slots = _check_categories(top1_slot, num_slots, "top1_slot")
    classes = _check_categories(labels, len(class_names), "labels")
    coords = _check_tiles(coords, slots, "top1_slot")
    _check_tiles(coords, classes, "labels")
    _check_downsample(downsample)
    squares = _tile_squares(coords, patch_size_level0)
    figure, (class_ax, slot_ax) = _slide_figure(thumbnail, downsample, "level-0 px", panels=2)
    classes_used = _draw_categories(
        class_ax, squares, classes, phenotype_palette(len(class_names)), list(class_names), "class (tiles)"
    )
    slots_used = _draw_categories(
        slot_ax,
        squares,
        slots,
        slot_palette(num_slots),
        [f"slot {i}" for i in range(num_slots)],
        "top-1 slot (tiles)",
    )
    class_ax.set_title("tile class", fontsize=TITLE_SIZE - 2)
    slot_ax.set_title("top-1 slot", fontsize=TITLE_SIZE - 2)
    figure.suptitle(title, fontsize=TITLE_SIZE)
    caption = (
        f"{len(slots)} tiles: left by class ({classes_used} of {len(class_names)} occur), right by "
        f"top-1 slot ({slots_used} of {num_slots} used). A slot whose tiles share one class follows "
        "that tissue."
    )
    return Plot(figure, title, caption)
