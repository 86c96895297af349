"""Tissue detection on synthetic thumbnails (known truth) and on the two real slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage", reason="tissue detection needs scikit-image (the wsi extra)")

from tcssa.wsi.tissue import (  # noqa: E402
    DETECTION_UM_PER_PX,
    MAX_SATURATION,
    TissueMask,
    detect_tissue,
    detection_image,
    pen_colours,
    rgb_to_hsv,
)

ROOT = Path(__file__).resolve().parents[1]
GLASS = (243, 241, 244)
EOSIN = (226, 140, 186)
HEMATOXYLIN = (105, 55, 140)
BLUE_INK = (35, 65, 190)


def shared_wsi_dir() -> Path:
    """The real slides: $TCSSA_SHARED_DATA/wsi, else ../shared/data/wsi beside the checkout."""
    base = os.environ.get("TCSSA_SHARED_DATA")
    folder = (Path(base) if base else ROOT.parent / "shared" / "data") / "wsi"
    if not folder.is_dir():
        pytest.skip(f"real slides not found at {folder} (set TCSSA_SHARED_DATA to the shared data folder)")
    return folder


def glass(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A blank slide thumbnail: near-white glass with a little scanner noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-3, 4, (height, width, 3))
    return np.clip(np.array(GLASS) + noise, 0, 255).astype(np.uint8)


def disk_mask(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def paint_tissue(image: np.ndarray, where: np.ndarray, seed: int = 1, colour=EOSIN) -> np.ndarray:
    """H&E-like texture: ``colour`` with noise, and small dark-purple nuclei scattered over it."""
    rng = np.random.default_rng(seed)
    out = image.copy()
    texture = np.clip(np.array(colour) + rng.integers(-12, 13, (*where.shape, 3)), 0, 255)
    out[where] = texture[where]
    nuclei = where & (rng.random(where.shape) < 0.04)
    out[nuclei] = HEMATOXYLIN
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_rgb_to_hsv_matches_scikit_image():
    from skimage.color import rgb2hsv

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    image[0] = 0
    image[1] = 128  # grey: hue and saturation 0
    image[2, :, :2] = 255
    ours, theirs = rgb_to_hsv(image), rgb2hsv(image)
    hue_gap = np.abs(ours[..., 0] - theirs[..., 0])
    assert np.minimum(hue_gap, 1 - hue_gap).max() < 1e-5
    assert np.abs(ours[..., 1:] - theirs[..., 1:]).max() < 1e-5


def test_blank_glass_gives_an_empty_mask():
    for thumbnail in (glass(), np.full((64, 48, 3), 255, np.uint8), np.zeros((64, 48, 3), np.uint8)):
        result = detect_tissue(thumbnail, downsample=32.0)
        assert isinstance(result, TissueMask)
        assert result.mask.shape == thumbnail.shape[:2] and result.mask.dtype == np.bool_
        assert not result.mask.any()
        assert result.tissue_fraction == 0.0 and result.num_components == 0
        assert result.downsample == 32.0


def test_a_thumbnail_covered_by_tissue_is_all_tissue():
    # A constant image gives Otsu nothing to split; a stained one is still tissue everywhere.
    result = detect_tissue(np.full((50, 60, 3), EOSIN, np.uint8), downsample=8.0, min_area_level0=0)
    assert result.mask.all()


def test_two_tissue_pieces_are_found_with_their_shape():
    shape = (240, 320)
    truth = disk_mask(shape, (120, 90), 60) | disk_mask(shape, (110, 240), 45)
    result = detect_tissue(paint_tissue(glass(*shape), truth), downsample=16.0)
    assert iou(result.mask, truth) > 0.95
    assert result.num_components == 2
    assert result.tissue_fraction == pytest.approx(truth.mean(), rel=0.05)


def test_pale_tissue_beside_dark_tissue_is_kept():
    # Otsu alone would split dark from pale tissue here; the clamped threshold keeps both.
    shape = (200, 300)
    dark = disk_mask(shape, (100, 80), 55)
    pale = disk_mask(shape, (100, 220), 55)
    image = paint_tissue(glass(*shape), dark, colour=(150, 40, 120))
    pale_blue_grey = (185, 200, 225)  # saturation about 0.18, like the faint kidney biopsy
    image = paint_tissue(image, pale, seed=2, colour=pale_blue_grey)
    assert rgb_to_hsv(np.array([[pale_blue_grey]], np.uint8))[0, 0, 1] > MAX_SATURATION
    result = detect_tissue(image, downsample=16.0)
    assert iou(result.mask, dark | pale) > 0.9
    assert result.num_components == 2


def test_small_pieces_are_dropped_by_their_level0_area():
    shape = (200, 200)
    big = disk_mask(shape, (100, 70), 50)
    speck = disk_mask(shape, (100, 170), 6)  # about 113 thumbnail px
    image = paint_tissue(glass(*shape), big | speck)
    # At 8 level-0 px per thumbnail px the speck is ~7,200 level-0 px^2: below a 20,000 px^2 minimum.
    small = detect_tissue(image, downsample=8.0, min_area_level0=20_000)
    assert small.num_components == 1 and not small.mask[speck].any()
    # The same thumbnail of a slide scanned at twice the resolution: the speck is 4x larger at level 0.
    large = detect_tissue(image, downsample=16.0, min_area_level0=20_000)
    assert large.num_components == 2 and large.mask[speck].mean() > 0.8


def test_fill_holes_closes_a_lumen_and_can_keep_it():
    shape = (220, 220)
    piece = disk_mask(shape, (110, 110), 90)
    lumen = disk_mask(shape, (110, 110), 30)  # ~2,800 px: 720,000 level-0 px^2 at 16 px per px
    gap = disk_mask(shape, (110, 170), 4)  # ~50 px: 12,800 level-0 px^2, below the 16,384 minimum
    image = paint_tissue(glass(*shape), piece & ~lumen & ~gap)
    filled = detect_tissue(image, downsample=16.0)
    assert filled.mask[lumen].all() and filled.mask[gap].all()
    kept = detect_tissue(image, downsample=16.0, fill_holes=False)
    inner = disk_mask(shape, (110, 110), 25)
    assert not kept.mask[inner].any()
    assert kept.mask[piece & ~lumen].mean() > 0.95
    assert kept.mask[gap].all()  # too small to be a lumen: filled anyway
    every_hole = detect_tissue(image, downsample=16.0, fill_holes=False, min_hole_area_level0=0)
    assert not every_hole.mask[disk_mask(shape, (110, 170), 2)].any()


def blue_pen_thumbnail() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue with a blue marker line drawn across it and on over the glass."""
    shape = (240, 320)
    tissue = disk_mask(shape, (120, 130), 90)
    image = paint_tissue(glass(*shape), tissue)
    line = np.zeros(shape, bool)
    line[116:124, 20:310] = True
    image[line] = BLUE_INK
    return image, tissue, line


def test_a_blue_pen_line_is_cut_out_of_the_tissue():
    image, tissue, line = blue_pen_thumbnail()
    assert pen_colours(rgb_to_hsv(image))[line].all()
    result = detect_tissue(image, downsample=16.0)
    assert not result.mask[line].any()
    beside_the_line = tissue & ~np.pad(line, 0)
    beside_the_line[110:130] = False
    assert result.mask[beside_the_line].mean() > 0.97
    # The line cuts the disk in two; the ink over the glass is not tissue.
    assert result.num_components == 2
    assert not result.mask[:, 230:].any()
    # Without pen removal the ink is taken for tissue, over the glass as well.
    with_ink = detect_tissue(image, downsample=16.0, drop_pen=False)
    assert with_ink.mask[118:122, 240:300].all()


def test_a_pen_circle_on_tissue_is_not_filled_back_in():
    shape = (240, 240)
    tissue = disk_mask(shape, (120, 120), 100)
    image = paint_tissue(glass(*shape), tissue)
    ring = disk_mask(shape, (120, 120), 50) & ~disk_mask(shape, (120, 120), 44)
    image[ring] = (20, 140, 60)  # green marker
    result = detect_tissue(image, downsample=16.0)
    assert not result.mask[ring].any()
    assert result.mask[disk_mask(shape, (120, 120), 38)].all()  # the circled tissue stays


def test_dark_nuclei_are_not_pen_marks():
    shape = (200, 200)
    tissue = disk_mask(shape, (100, 100), 80)
    image = paint_tissue(glass(*shape), tissue)
    rng = np.random.default_rng(3)
    dots = tissue & (rng.random(shape) < 0.01)
    image[dots] = (25, 10, 40)  # nearly black, like the darkest nuclei on a thumbnail
    result = detect_tissue(image, downsample=16.0, fill_holes=False)
    assert result.mask[tissue].mean() > 0.98


@pytest.mark.parametrize(
    ("thumbnail", "downsample", "message"),
    [
        (np.zeros((10, 10), np.uint8), 1.0, "H x W x 3"),
        (np.zeros((10, 10, 4), np.uint8), 1.0, "H x W x 3"),
        (np.zeros((10, 10, 3), np.float32), 1.0, "uint8"),
        (np.zeros((10, 10, 3), np.uint8), 0.0, "positive"),
        (np.zeros((10, 10, 3), np.uint8), float("nan"), "positive"),
    ],
)
def test_bad_input_is_a_clear_error(thumbnail, downsample, message):
    with pytest.raises(ValueError, match=message):
        detect_tissue(thumbnail, downsample)


def test_tissue_mask_checks_its_fields():
    with pytest.raises(ValueError, match="2-D bool"):
        TissueMask(np.zeros((4, 4), np.uint8), 1.0)
    with pytest.raises(ValueError, match="positive"):
        TissueMask(np.zeros((4, 4), bool), -2.0)


def test_real_svs_slide():
    openslide = pytest.importorskip("openslide", reason="reading the SVS slide needs openslide-python")
    slide = openslide.OpenSlide(shared_wsi_dir() / "cmu-1-small-region.svs")
    try:
        thumbnail = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
        downsample = slide.dimensions[0] / thumbnail.shape[1]
    finally:
        slide.close()
    result = detect_tissue(thumbnail, downsample)
    # One long strip of skin covers about a third of this region; the rest is glass.
    assert 0.25 < result.tissue_fraction < 0.5
    assert result.num_components == 1
    assert not result.mask[:300, :250].any()  # the top left is glass
    without_filling = detect_tissue(thumbnail, downsample, fill_holes=False)
    assert without_filling.tissue_fraction < result.tissue_fraction


def test_real_plain_tiff_with_one_small_faint_piece():
    from PIL import Image

    with Image.open(shared_wsi_dir() / "kidney-48-5.tif") as image:
        thumbnail = np.asarray(image.convert("RGB"))
    # The image is its own level 0; its one pale biopsy piece (~8,000 px^2) is smaller than the
    # default minimum (250,000 level-0 px^2), so by default nothing is kept.
    assert not detect_tissue(thumbnail, 1.0).mask.any()
    result = detect_tissue(thumbnail, 1.0, min_area_level0=2_000)
    assert result.num_components == 1
    assert 0.001 < result.tissue_fraction < 0.01
    rows, cols = np.nonzero(result.mask)
    assert 450 < rows.mean() < 650 and 250 < cols.mean() < 450  # where the piece lies


def test_detection_image_shrinks_a_fine_thumbnail_to_the_detection_resolution():
    thumbnail = paint_tissue(glass(400, 300), np.pad(np.ones((200, 100), bool), ((100, 100), (100, 100))))
    # 0.5 um/px at level 0, thumbnail at downsample 2 (1 um/px): shrunk 8 times to 8 um/px.
    image, downsample = detection_image(thumbnail, 2.0, 0.5)
    assert image.shape == (50, 38, 3) and image.dtype == np.uint8
    assert downsample == pytest.approx(2.0 * 300 / 38)
    assert 0.5 * downsample == pytest.approx(DETECTION_UM_PER_PX, rel=0.05)
    # Box filter: the tissue block's inside keeps its colour (darkened a little by the 4% nuclei).
    assert np.abs(image[25, 19].astype(int) - np.array(EOSIN)).max() <= 15
    # The mask found on it covers the same level-0 area as the one found on the thumbnail itself.
    coarse = detect_tissue(image, downsample, min_area_level0=0)
    fine = detect_tissue(thumbnail, 2.0, min_area_level0=0)
    area = coarse.mask.sum() * downsample**2
    assert area == pytest.approx(fine.mask.sum() * 2.0**2, rel=0.1)


def test_detection_image_keeps_a_coarse_thumbnail_and_rejects_a_bad_mpp():
    thumbnail = glass(64, 64)
    image, downsample = detection_image(thumbnail, 32.0, 0.25)  # 8 um/px already
    assert image is thumbnail and downsample == 32.0
    tiny = glass(3, 3)
    assert detection_image(tiny, 1.0, 0.25)[0] is tiny  # too small to shrink
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="mpp"):
            detection_image(thumbnail, 1.0, bad)
