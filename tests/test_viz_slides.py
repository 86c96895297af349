"""Figures on a slide thumbnail: the arrays given come back as the drawn tiles, colours and legends."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from tcssa.viz.plots import Plot, phenotype_palette, slot_palette
from tcssa.viz.slides import (
    class_map_on_slide,
    mask_overlay,
    save_png,
    slot_and_class_maps,
    slot_map_on_slide,
    tile_grid_overlay,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOWNSAMPLE = 16.0
PATCH = 256  # level-0 px: 16 thumbnail px
CLASSES = ("adipose", "background", "debris", "lymphocytes", "mucus", "muscle", "mucosa", "stroma", "tumour")


def thumbnail() -> np.ndarray:
    image = np.full((96, 128, 3), 240, np.uint8)
    image[16:80, 16:112] = (220, 140, 190)
    return image


def tile_coords() -> np.ndarray:
    """A 3 x 5 block of tiles over the pink area, row-major, in level-0 px."""
    xs, ys = np.meshgrid(np.arange(5) * PATCH + 256, np.arange(3) * PATCH + 256)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def tiles_collection(ax) -> PolyCollection:
    (collection,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    return collection


def check_plot(plot: Plot) -> None:
    assert isinstance(plot, Plot) and isinstance(plot.figure, Figure)
    assert plot.title and plot.caption
    for ax in plot.figure.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert plot.to_png().startswith(PNG_MAGIC)


def legend_labels(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_mask_overlay_covers_the_slide_and_states_the_fraction():
    mask = np.zeros((48, 64), bool)  # half the thumbnail's resolution
    mask[8:40, 8:56] = True
    plot = mask_overlay(thumbnail(), mask, downsample=DOWNSAMPLE)
    check_plot(plot)
    ax = plot.figure.axes[0]
    assert f"{mask.mean():.1%}" in plot.caption
    for image in ax.get_images():  # thumbnail and tint both span the slide's level-0 extent
        assert tuple(image.get_extent()) == (0, 128 * DOWNSAMPLE, 96 * DOWNSAMPLE, 0)
    assert "level-0 px" in ax.get_xlabel()
    assert "thumbnail px" in mask_overlay(thumbnail(), mask).figure.axes[0].get_xlabel()
    check_plot(mask_overlay(thumbnail(), np.zeros((10, 10), bool)))  # no tissue: nothing to outline


def test_tile_grid_draws_every_tile_where_it_lies():
    coords = tile_coords()
    plot = tile_grid_overlay(thumbnail(), DOWNSAMPLE, coords, PATCH)
    check_plot(plot)
    squares = tiles_collection(plot.figure.axes[0]).get_paths()
    assert len(squares) == len(coords)
    first = squares[0].vertices[:4]
    assert np.allclose(first, [[256, 256], [512, 256], [512, 512], [256, 512]])
    assert str(len(coords)) in plot.caption
    check_plot(tile_grid_overlay(thumbnail(), DOWNSAMPLE, np.zeros((0, 2), np.int64), PATCH))


def test_slot_map_colours_each_tile_by_its_slot_and_lists_them():
    coords = tile_coords()
    slots = np.array([3, 3, 3, 7, 7, 7, 7, 7, 0, 0, 3, 3, 3, 3, 7])
    plot = slot_map_on_slide(thumbnail(), DOWNSAMPLE, coords, PATCH, slots, 32, "slide 1")
    check_plot(plot)
    ax = plot.figure.axes[0]
    assert ax.get_title() == "slide 1" and plot.title == "slide 1"
    colours = tiles_collection(ax).get_facecolors()
    palette = slot_palette(32)
    for tile, slot in enumerate(slots):
        assert np.allclose(colours[tile][:3], palette[slot])
    # Most used first, each with its tile count.
    assert legend_labels(ax) == ["slot 3 (7)", "slot 7 (6)", "slot 0 (2)"]
    assert "3 of 32 slots" in plot.caption


def test_slot_map_legend_is_capped_for_many_slots():
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(200) % 20 * 64, np.arange(200) // 20 * 64], axis=1)
    slots = rng.permutation(np.arange(200) % 32)
    plot = slot_map_on_slide(thumbnail(), 8.0, coords, 64, slots, 32)
    labels = legend_labels(plot.figure.axes[0])
    assert len(labels) == 17 and labels[-1] == "+16 more"


def test_class_map_and_side_by_side_maps():
    coords = tile_coords()
    labels = np.arange(15) % 9
    plot = class_map_on_slide(thumbnail(), DOWNSAMPLE, coords, PATCH, labels, CLASSES)
    check_plot(plot)
    colours = tiles_collection(plot.figure.axes[0]).get_facecolors()
    palette = phenotype_palette(9)
    assert all(np.allclose(colours[i][:3], palette[c]) for i, c in enumerate(labels))
    assert "adipose (2)" in legend_labels(plot.figure.axes[0])

    slots = np.arange(15) % 4
    both = slot_and_class_maps(thumbnail(), DOWNSAMPLE, coords, PATCH, slots, 32, labels, CLASSES, "slide 2")
    check_plot(both)
    class_ax, slot_ax = both.figure.axes
    assert class_ax.get_title() == "tile class" and slot_ax.get_title() == "top-1 slot"
    assert both.figure.get_suptitle() == "slide 2"
    assert np.allclose(tiles_collection(slot_ax).get_facecolors()[5][:3], slot_palette(32)[1])
    assert "9 of 9" in both.caption and "4 of 32" in both.caption
    # Both panels use the same tiles.
    assert np.allclose(
        tiles_collection(class_ax).get_paths()[7].vertices, tiles_collection(slot_ax).get_paths()[7].vertices
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: slot_map_on_slide(thumbnail(), 16.0, tile_coords(), PATCH, np.zeros(14, int), 32),
            "14 entries",
        ),
        (lambda: slot_map_on_slide(thumbnail(), 16.0, tile_coords(), PATCH, np.full(15, 32), 32), "0..31"),
        (lambda: slot_map_on_slide(thumbnail(), 16.0, tile_coords(), PATCH, np.zeros(15), 32), "integers"),
        (
            lambda: class_map_on_slide(thumbnail(), 16.0, tile_coords(), PATCH, np.full(15, 9), CLASSES),
            "0..8",
        ),
        (lambda: tile_grid_overlay(thumbnail(), 16.0, np.zeros((4, 3)), PATCH), "N x 2"),
        (lambda: tile_grid_overlay(thumbnail(), 0.0, tile_coords(), PATCH), "positive"),
        (lambda: tile_grid_overlay(thumbnail()[..., 0], 16.0, tile_coords(), PATCH), "H x W x 3"),
        (lambda: mask_overlay(thumbnail(), np.zeros((2, 2, 2), bool)), "2-D"),
    ],
)
def test_bad_arrays_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_save_png_writes_the_figure_atomically(tmp_path):
    plot = tile_grid_overlay(thumbnail(), DOWNSAMPLE, tile_coords(), PATCH)
    target = tmp_path / "thumbnails" / "slide_grid.png"
    assert save_png(plot, target) == target
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in target.parent.iterdir()] == ["slide_grid.png"]


def test_overlay_alpha_keeps_the_slide_visible():
    plot = slot_map_on_slide(thumbnail(), DOWNSAMPLE, tile_coords(), PATCH, np.zeros(15, int), 4)
    alpha = tiles_collection(plot.figure.axes[0]).get_facecolors()[0][3]
    assert 0.3 < alpha < 0.8
