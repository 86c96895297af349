"""tcssa.wsi.tiling: the tile grid, tissue fractions on the mask, reading tiles, TileDataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tcssa.wsi.slide import MissingMppWarning, SlideInfo, open_slide
from tcssa.wsi.tiling import TileDataset, TileGrid, read_tile, tile_slide
from wsi_slide_helpers import needs_slide_readers, pyramid_image, real_slide, write_pyramid_tiff


def slide_info(
    width: int = 1000, height: int = 600, magnification: int = 20, downsamples: tuple[float, ...] = (1.0,)
) -> SlideInfo:
    """A SlideInfo for grid arithmetic alone: no file behind it."""
    return SlideInfo(
        path=Path("synthetic.tif"),
        name="synthetic",
        width=width,
        height=height,
        level_dimensions=tuple((round(width / d), round(height / d)) for d in downsamples),
        level_downsamples=downsamples,
        mpp={20: 0.5, 40: 0.25, 10: 1.0}[magnification],
        mpp_source="metadata",
        magnification=magnification,
        backend="openslide",
    )


# ------------------------------------------------------------------ the grid


def test_the_grid_is_row_major_level0_int64_and_keeps_whole_tiles_only():
    grid = tile_slide(slide_info(1000, 600))
    # columns 0, 256, 512 (768 + 256 > 1000: that partial tile is dropped); rows 0, 256
    expected = [(0, 0), (256, 0), (512, 0), (0, 256), (256, 256), (512, 256)]
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (6, 2)
    assert [tuple(c) for c in grid.coords.tolist()] == expected
    assert grid.tissue_fraction.dtype == np.float32 and (grid.tissue_fraction == 1.0).all()
    assert (grid.patch_size, grid.patch_size_level0, grid.overlap) == (256, 256, 0)
    assert (grid.target_magnification, grid.level0_magnification) == (20, 20)
    assert (grid.read_level, grid.read_size) == (0, 256)
    assert len(grid) == 6


@pytest.mark.parametrize(("width", "columns"), [(767, 2), (768, 3), (1023, 3), (1024, 4), (255, 0)])
def test_a_tile_reaching_the_right_edge_exactly_is_kept_a_partial_one_dropped(width, columns):
    grid = tile_slide(slide_info(width, 256))
    assert len(grid) == columns
    if columns:
        assert int((grid.coords[:, 0] + grid.patch_size_level0).max()) <= width


def test_overlap_shortens_the_stride_in_target_pixels():
    grid = tile_slide(slide_info(1000, 256), overlap=64)  # stride 192
    assert grid.coords[:, 0].tolist() == [0, 192, 384, 576]  # 768 + 256 > 1000
    assert grid.overlap == 64
    grid40 = tile_slide(slide_info(2000, 512, magnification=40), overlap=64)  # level-0 stride 384
    assert grid40.coords[:, 0].tolist() == [0, 384, 768, 1152]  # 1536 + 512 > 2000
    assert grid40.patch_size_level0 == 512


@pytest.mark.parametrize("overlap", [256, 300, -1])
def test_an_overlap_outside_0_to_patch_size_is_a_value_error(overlap):
    with pytest.raises(ValueError, match="overlap"):
        tile_slide(slide_info(), overlap=overlap)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 0}, "patch_size"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"target_magnification": 0}, "target"),
    ],
)
def test_other_bad_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tile_slide(slide_info(), **kwargs)


def test_a_target_above_the_slides_magnification_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"synthetic\.tif.*40x.*20x"):
        tile_slide(slide_info(magnification=20), target_magnification=40)


def test_a_patch_larger_than_the_slide_gives_an_empty_grid():
    grid = tile_slide(slide_info(200, 150), patch_size=256)
    assert len(grid) == 0
    assert grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64
    assert grid.tissue_fraction.shape == (0,) and grid.tissue_fraction.dtype == np.float32
    with_mask = tile_slide(slide_info(200, 150), np.ones((15, 20), bool), 10.0)
    assert len(with_mask) == 0


@pytest.mark.parametrize(
    ("downsamples", "target", "level", "read_size"),
    [
        ((1.0, 2.0, 4.0), 40, 0, 256),
        ((1.0, 2.0, 4.0), 20, 1, 256),
        ((1.0, 2.0, 4.0), 10, 2, 256),
        ((1.0, 2.0, 4.0), 5, 2, 512),  # no level as coarse as 5x: read 10x, resize down
        ((1.0, 4.0003, 16.0012), 10, 1, 256),  # OpenSlide's rounded downsamples still count as 4x
        ((1.0, 4.0003, 16.0012), 20, 0, 512),  # 4x is coarser than 20x needs: read level 0
        ((1.0,), 10, 0, 1024),
    ],
)
def test_the_read_level_is_the_deepest_at_or_above_the_target_resolution(
    downsamples, target, level, read_size
):
    grid = tile_slide(
        slide_info(4096, 4096, magnification=40, downsamples=downsamples), target_magnification=target
    )
    assert (grid.read_level, grid.read_size) == (level, read_size)
    assert grid.patch_size_level0 == 256 * 40 // target


def test_a_read_level_can_be_chosen_but_not_a_coarser_one():
    info = slide_info(4096, 4096, magnification=40, downsamples=(1.0, 2.0, 4.0))
    grid = tile_slide(info, target_magnification=20, read_level=0)
    assert (grid.read_level, grid.read_size) == (0, 512)
    with pytest.raises(ValueError, match="coarser"):
        tile_slide(info, target_magnification=20, read_level=2)
    with pytest.raises(ValueError, match="does not exist"):
        tile_slide(info, read_level=3)


# ------------------------------------------------------------------ tissue fractions


def brute_force_fraction(mask: np.ndarray, downsample: int, x: int, y: int, tile: int) -> float:
    """Share of tissue in a tile, by expanding the mask to level-0 pixels (integer downsample)."""
    level0 = np.repeat(np.repeat(mask, downsample, axis=0), downsample, axis=1)
    covered = level0[y : y + tile, x : x + tile]
    return float(covered.mean()) if covered.size else 0.0


def test_tissue_fractions_match_a_brute_force_count():
    rng = np.random.default_rng(3)
    mask = rng.random((75, 125)) < 0.4  # 1000 x 600 level-0 px at downsample 8
    grid = tile_slide(slide_info(1000, 600), mask, 8.0, patch_size=100, overlap=30, min_tissue=0.0)
    expected = [brute_force_fraction(mask, 8, x, y, 100) for x, y in grid.coords.tolist()]
    assert len(grid) == 13 * 8  # stride 70: 0 ... 840 (900 + 100 > 1000), 0 ... 490
    np.testing.assert_allclose(grid.tissue_fraction, expected, atol=1e-6)


def test_tissue_fractions_with_a_fractional_mask_downsample_are_exact_areas():
    mask = np.zeros((40, 60), bool)  # covers 438 x 292 level-0 px at downsample 7.3
    mask[:, :50] = True  # tissue left of level-0 x = 50 * 7.3 = 365
    grid = tile_slide(slide_info(438, 256), mask, 7.3, patch_size=256, overlap=224, min_tissue=0.0)
    starts = grid.coords[:, 0].tolist()
    assert starts == [0, 32, 64, 96, 128, 160]  # stride 32; 192 + 256 > 438
    expected = [min(256, 365 - x) / 256 for x in starts]  # the tissue left of x = 365
    assert expected[-2:] == [237 / 256, 205 / 256]
    np.testing.assert_allclose(grid.tissue_fraction, expected, atol=1e-6)


def test_tiles_below_min_tissue_are_dropped_and_the_threshold_is_inclusive():
    mask = np.zeros((2, 4), bool)  # one mask px per 256 x 256 tile (downsample 256)
    mask[0, :2] = True
    mask[1, 0] = True
    info = slide_info(1024, 512)
    assert len(tile_slide(info, mask, 256.0, min_tissue=0.5)) == 3
    half = np.zeros((4, 8), bool)  # two mask px per tile side: a tile can be exactly half tissue
    half[:, :3] = True
    grid = tile_slide(info, half, 128.0, min_tissue=0.5)
    assert grid.coords.tolist() == [[0, 0], [256, 0], [0, 256], [256, 256]]
    np.testing.assert_allclose(grid.tissue_fraction, [1.0, 0.5, 1.0, 0.5])
    assert len(tile_slide(info, half, 128.0, min_tissue=0.0)) == 8
    assert len(tile_slide(info, half, 128.0, min_tissue=1.0)) == 2


def test_a_tile_beyond_the_masks_rounded_edge_counts_only_the_covered_part():
    mask = np.ones((37, 62), bool)  # a 1000 x 600 slide at downsample 16 would round to 38 x 63
    grid = tile_slide(slide_info(1000, 600), mask, 16.0, min_tissue=0.0)
    np.testing.assert_allclose(grid.tissue_fraction, 1.0, atol=1e-6)


def test_an_all_false_mask_gives_an_empty_grid():
    grid = tile_slide(slide_info(), np.zeros((60, 100), bool), 10.0)
    assert len(grid) == 0


@pytest.mark.parametrize(("mask", "downsample"), [(np.ones((4,), bool), 1.0), (np.ones((4, 4), bool), 0.0)])
def test_a_bad_mask_is_a_value_error(mask, downsample):
    with pytest.raises(ValueError, match="mask"):
        tile_slide(slide_info(), mask, downsample)


def test_tissue_fractions_of_a_40_000_tile_grid():
    # The size of a real 40x slide at 20x: the area sums handle all tiles in one pass.
    mask = np.zeros((500, 500), bool)
    mask[:, :250] = True
    grid = tile_slide(slide_info(51200, 51200), mask, 102.4, min_tissue=0.0)
    assert len(grid) == 200 * 200
    left = grid.coords[:, 0] + 256 <= 25600
    assert (grid.tissue_fraction[left] == 1.0).all() and (grid.tissue_fraction[~left] == 0.0).all()


# ------------------------------------------------------------------ reading tiles


@pytest.fixture
def pyramid(tmp_path) -> tuple[Path, list[np.ndarray]]:
    pytest.importorskip(
        "openslide", reason="the `wsi` extra (openslide-python, openslide-bin) is not installed"
    )
    path = tmp_path / "pyramid.tif"
    return path, write_pyramid_tiff(path, pyramid_image(), levels=3, mpp=0.25)


@needs_slide_readers
def test_read_tile_reads_the_pyramid_level_of_the_target_magnification(pyramid):
    path, levels = pyramid
    with open_slide(path) as slide:
        grid = tile_slide(slide.info, target_magnification=20)  # 40x slide: level 1 is 20x
        assert (grid.read_level, grid.read_size, grid.patch_size_level0) == (1, 256, 512)
        assert len(grid) == 3 * 2
        for index in range(len(grid)):
            x, y = grid.coords[index].tolist()
            tile = read_tile(slide, grid, index)
            np.testing.assert_array_equal(tile, levels[1][y // 2 : y // 2 + 256, x // 2 : x // 2 + 256])


@needs_slide_readers
def test_read_tile_resizes_down_from_a_finer_level(pyramid):
    path, levels = pyramid
    with open_slide(path) as slide:
        grid = tile_slide(slide.info, target_magnification=20, read_level=0)
        tile = read_tile(slide, grid, 4)
        x, y = grid.coords[4].tolist()
    region = Image.fromarray(levels[0][y : y + 512, x : x + 512])
    expected = np.asarray(region.resize((256, 256), Image.Resampling.BILINEAR))
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, expected)
    # an antialiased shrink is a local average: close to the 2 x 2 means of level 0
    means = levels[0][y : y + 512, x : x + 512].reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(tile.astype(float) - means).mean() < 8


@needs_slide_readers
def test_read_tile_rejects_an_index_outside_the_grid(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        grid = tile_slide(slide.info)
        with pytest.raises(IndexError, match="out of range"):
            read_tile(slide, grid, len(grid))


@needs_slide_readers
def test_tile_dataset_opens_the_slide_lazily_and_pickles_without_it(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        grid = tile_slide(slide.info, target_magnification=20)
        expected = [read_tile(slide, grid, i) for i in range(len(grid))]
    dataset = TileDataset(path, grid)
    assert len(dataset) == len(grid) and dataset._slide is None
    np.testing.assert_array_equal(dataset[2], expected[2])
    assert dataset._slide is not None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._slide is None
    np.testing.assert_array_equal(copy[3], expected[3])
    dataset.close()
    copy.close()


@needs_slide_readers
def test_tile_dataset_streams_through_dataloader_workers(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        grid = tile_slide(slide.info, target_magnification=40)  # 6 x 4 tiles at level 0
        expected = np.stack([read_tile(slide, grid, i) for i in range(len(grid))])
    loader = torch.utils.data.DataLoader(TileDataset(path, grid), batch_size=5, num_workers=2)
    batches = list(loader)
    assert [b.shape[0] for b in batches] == [5, 5, 5, 5, 4]
    assert batches[0].dtype == torch.uint8 and tuple(batches[0].shape[1:]) == (256, 256, 3)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)


@needs_slide_readers
def test_tile_dataset_of_a_slide_without_mpp_uses_the_given_mpp(tmp_path):
    pytest.importorskip(
        "openslide", reason="the `wsi` extra (openslide-python, openslide-bin) is not installed"
    )
    path = tmp_path / "no_mpp.tif"
    write_pyramid_tiff(path, pyramid_image(), levels=1, mpp=None)
    with open_slide(path, mpp=0.25) as slide:
        grid = tile_slide(slide.info, target_magnification=20)
    dataset = TileDataset(path, grid, mpp=0.25)
    assert dataset[0].shape == (256, 256, 3)
    assert dataset._slide.info.magnification == 40 and dataset._slide.info.mpp_source == "user"
    dataset.close()


# ------------------------------------------------------------------ the real slides


@needs_slide_readers
def test_the_real_svs_tiles_88_times_at_20x_and_20_times_at_10x():
    pytest.importorskip(
        "openslide", reason="the `wsi` extra (openslide-python, openslide-bin) is not installed"
    )
    path = real_slide("cmu-1-small-region.svs")  # 2220 x 2967 at 0.499 µm/px, one level
    with open_slide(path) as slide:
        grid20 = tile_slide(slide.info, target_magnification=20, patch_size=256)
        grid10 = tile_slide(slide.info, target_magnification=10, patch_size=256)
        assert len(grid20) == 8 * 11 and (grid20.read_level, grid20.read_size) == (0, 256)
        assert len(grid10) == 4 * 5 and (grid10.patch_size_level0, grid10.read_size) == (512, 512)
        tile = read_tile(slide, grid20, 50)
        x, y = grid20.coords[50].tolist()
        np.testing.assert_array_equal(tile, slide.read_region((x, y), 0, (256, 256)))
        assert read_tile(slide, grid10, 7).shape == (256, 256, 3)


@needs_slide_readers
def test_the_plain_tiff_tiles_at_the_assumed_20x():
    path = real_slide("kidney-48-5.tif")  # 1493 x 901, no mpp
    with pytest.warns(MissingMppWarning):
        slide = open_slide(path)
    with slide:
        grid = tile_slide(slide.info)
        assert len(grid) == 5 * 3
        assert read_tile(slide, grid, len(grid) - 1).shape == (256, 256, 3)


def test_tile_grid_is_frozen():
    grid = tile_slide(slide_info())
    assert isinstance(grid, TileGrid)
    with pytest.raises(AttributeError):
        grid.patch_size = 512
