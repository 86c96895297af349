"""tcssa.wsi.slide: opening slides (OpenSlide, tiffslide), pixel size, magnification, regions, thumbnails."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from tcssa.wsi.slide import (
    MissingMppWarning,
    SlideReadError,
    best_level_for_downsample,
    magnification_from_mpp,
    mpp_from_properties,
    open_slide,
)
from wsi_slide_helpers import needs_slide_readers, pyramid_image, real_slide, write_pyramid_tiff

pytest.importorskip("tiffslide", reason="the `wsi` extra (tiffslide) is not installed")

SVS = "cmu-1-small-region.svs"
PLAIN_TIFF = "kidney-48-5.tif"


# ------------------------------------------------------------------ magnification and pixel size


@pytest.mark.parametrize(
    ("mpp", "magnification"),
    [
        (0.1, 80),
        (0.1599, 80),
        (0.16, 60),
        (0.1999, 60),
        (0.2, 40),
        (0.25, 40),
        (0.2999, 40),
        (0.3, 20),
        (0.499, 20),
        (0.5, 20),
        (0.5999, 20),
        (0.6, 10),
        (1.0, 10),
        (1.1999, 10),
        (1.2, 5),
        (2.0, 5),
        (2.3999, 5),
    ],
)
def test_magnification_from_mpp_follows_tridents_bounds(mpp, magnification):
    assert magnification_from_mpp(mpp) == magnification


@pytest.mark.parametrize("mpp", [2.4, 10.0, 1e6, 0.0, -0.5, math.nan, math.inf, -math.inf])
def test_magnification_from_mpp_rejects_coarse_and_odd_values_naming_them(mpp):
    with pytest.raises(ValueError, match="mpp="):
        magnification_from_mpp(mpp)


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.5"}, (0.499, "openslide.mpp-x")),
        ({"openslide.mpp-y": "0.26"}, (0.26, "openslide.mpp-y")),
        ({"tiffslide.mpp-x": 0.25, "tiffslide.mpp-y": 0.25}, (0.25, "tiffslide.mpp-x")),
        (
            {"tiffslide.mpp-x": None, "tiff.ResolutionUnit": "CENTIMETER", "tiff.XResolution": 20000.0},
            (0.5, None),
        ),
        ({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}, (0.25, None)),
        ({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}, None),
        ({"tiffslide.mpp-x": None, "tiffslide.mpp-y": None}, None),
        ({}, None),
    ],
)
def test_mpp_from_properties_reads_the_readers_keys_then_the_tiff_tags(properties, expected):
    found = mpp_from_properties(properties)
    if expected is None:
        assert found is None
        return
    value, key = found
    assert value == pytest.approx(expected[0])
    if expected[1] is not None:
        assert key == expected[1]
    else:
        assert "XResolution" in key


def test_mpp_from_properties_returns_a_zero_resolution_as_infinite_for_the_caller_to_reject():
    value, key = mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "0"})
    assert value == math.inf and "XResolution" in key


def test_best_level_for_downsample_takes_the_deepest_level_at_or_above_the_resolution():
    downsamples = (1.0, 4.0003, 16.0012)  # OpenSlide's downsamples come from rounded level sizes
    assert best_level_for_downsample(downsamples, 4.0) == 1
    assert best_level_for_downsample(downsamples, 3.5) == 0
    assert best_level_for_downsample(downsamples, 15.0) == 1
    assert best_level_for_downsample(downsamples, 1000.0) == 2
    assert best_level_for_downsample(downsamples, 0.5) == 0


# ------------------------------------------------------------------ synthetic pyramidal TIFFs


@needs_slide_readers
def test_a_pyramidal_tiff_with_resolution_tags_opens_with_openslide_and_its_mpp(tmp_path):
    path = tmp_path / "pyramid.tif"
    pyramid = write_pyramid_tiff(path, pyramid_image(), levels=3, mpp=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMppWarning)
        slide = open_slide(path)
    with slide:
        info = slide.info
        assert info.backend == "openslide"
        assert info.name == "pyramid" and info.path == path
        assert (info.width, info.height) == (1536, 1024)
        assert info.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
        assert info.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert info.mpp == pytest.approx(0.25) and info.mpp_source == "metadata"
        assert info.magnification == 40
        assert slide.best_level_for_downsample(2.0) == 1
        np.testing.assert_array_equal(
            slide.read_region((300, 200), 0, (100, 50)), pyramid[0][200:250, 300:400]
        )
        # location is in level-0 px at every level (OpenSlide's convention)
        np.testing.assert_array_equal(
            slide.read_region((600, 400), 1, (64, 32)), pyramid[1][200:232, 300:364]
        )
        np.testing.assert_array_equal(slide.read_region((0, 0), 2, (384, 256)), pyramid[2])


@needs_slide_readers
def test_inch_resolution_tags_give_the_same_mpp(tmp_path):
    path = tmp_path / "inch.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=0.5, unit="INCH")
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx(0.5) and slide.info.magnification == 20


@needs_slide_readers
def test_a_tiff_without_resolution_warns_and_assumes_20x(tmp_path):
    path = tmp_path / "no_mpp.tif"
    write_pyramid_tiff(path, pyramid_image(), levels=3, mpp=None)
    with pytest.warns(MissingMppWarning, match=r"no_mpp\.tif.*assuming 0\.5 µm/px \(20x\).*--mpp"):
        slide = open_slide(path)
    with slide:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "assumed" and slide.info.magnification == 20
        assert slide.info.level_count == 3


@needs_slide_readers
def test_the_default_mpp_can_be_changed(tmp_path):
    path = tmp_path / "no_mpp.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=None)
    with pytest.warns(MissingMppWarning, match="assuming 0.25 µm/px"):
        slide = open_slide(path, default_mpp=0.25)
    with slide:
        assert slide.info.magnification == 40 and slide.info.mpp_source == "assumed"


@pytest.mark.parametrize("write_mpp", [None, 0.25])
@needs_slide_readers
def test_the_mpp_argument_overrides_the_metadata_without_a_warning(tmp_path, write_mpp):
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=write_mpp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMppWarning)
        slide = open_slide(path, mpp=1.0)
    with slide:
        assert slide.info.mpp == 1.0 and slide.info.mpp_source == "user" and slide.info.magnification == 10


@pytest.mark.parametrize("mpp", [0.0, -0.25, math.nan, 5.0])
@needs_slide_readers
def test_an_unusable_mpp_argument_is_a_value_error_naming_it(tmp_path, mpp):
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=0.25)
    with pytest.raises(ValueError, match="mpp="):
        open_slide(path, mpp=mpp)


@pytest.mark.parametrize(
    ("resolution_per_cm", "shown"),
    [(0.5, "20000"), ((0, 1), "XResolution")],  # 20000 µm/px (> 100: not a scan); XResolution 0: none
    ids=["huge", "zero"],
)
@needs_slide_readers
def test_odd_metadata_mpp_is_treated_as_missing_and_the_warning_names_it(tmp_path, resolution_per_cm, shown):
    import tifffile  # optional dependency (the `wsi` extra)

    path = tmp_path / "odd.tif"
    resolution = (resolution_per_cm, resolution_per_cm)
    tifffile.imwrite(
        path,
        pyramid_image(512, 512),
        tile=(256, 256),
        photometric="rgb",
        resolution=resolution,
        resolutionunit="CENTIMETER",
    )
    with pytest.warns(MissingMppWarning, match=f"not usable.*{shown}.*assuming 0.5"):
        slide = open_slide(path)
    with slide:
        assert slide.info.mpp_source == "assumed" and slide.info.magnification == 20


@needs_slide_readers
def test_metadata_coarser_than_5x_is_an_error_pointing_to_the_mpp_option(tmp_path):
    path = tmp_path / "coarse.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=5.0)
    with pytest.raises(SlideReadError, match=r"coarse\.tif.*5(\.0)? µm/px.*--mpp"):
        open_slide(path)


@needs_slide_readers
def test_read_region_outside_the_slide_is_white(tmp_path):
    path = tmp_path / "pyramid.tif"
    pyramid = write_pyramid_tiff(path, pyramid_image(), levels=2, mpp=0.25)
    with open_slide(path) as slide:
        region = slide.read_region((1500, 1000), 0, (64, 40))
    assert region.shape == (40, 64, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region[:24, :36], pyramid[0][1000:, 1500:])
    assert (region[24:] == 255).all() and (region[:, 36:] == 255).all()


@needs_slide_readers
def test_thumbnail_fits_max_size_and_reports_its_downsample(tmp_path):
    path = tmp_path / "pyramid.tif"
    pyramid = write_pyramid_tiff(path, pyramid_image(), levels=3, mpp=0.25)
    with open_slide(path) as slide:
        thumbnail, downsample = slide.thumbnail(max_size=300)
        full, full_downsample = slide.thumbnail(max_size=4096)
    assert thumbnail.dtype == np.uint8 and thumbnail.shape == (200, 300, 3)
    assert downsample == pytest.approx(1536 / 300)
    assert 1024 / thumbnail.shape[0] == pytest.approx(downsample, rel=0.01)
    # a thumbnail is an average of the slide: its mean colour is the slide's
    assert np.abs(thumbnail.astype(float).mean(axis=(0, 1)) - pyramid[0].mean(axis=(0, 1))).max() < 3
    assert full_downsample == 1.0 and full.shape == (1024, 1536, 3)  # never upsampled
    np.testing.assert_array_equal(full, pyramid[0])


@needs_slide_readers
def test_thumbnail_read_in_bands_matches_the_one_read_thumbnail(tmp_path, monkeypatch):
    import tcssa.wsi.slide as slide_module

    path = tmp_path / "flat.tif"
    write_pyramid_tiff(path, pyramid_image(1200, 900), levels=1, mpp=0.25)
    with open_slide(path) as slide:
        whole, downsample = slide.thumbnail(max_size=150)
        monkeypatch.setattr(slide_module, "THUMBNAIL_BAND_PIXELS", 1200 * 50)  # 50-row bands: 18 reads
        banded, banded_downsample = slide.thumbnail(max_size=150)
    assert banded_downsample == downsample and banded.shape == whole.shape == (112, 150, 3)
    np.testing.assert_array_equal(banded, whole)


@needs_slide_readers
def test_a_closed_slide_cannot_be_read(tmp_path):
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, pyramid_image(512, 512), levels=1, mpp=0.25)
    with open_slide(path) as slide:
        pass
    with pytest.raises(SlideReadError, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))


# ------------------------------------------------------------------ bad input


def test_a_missing_file_is_a_slide_read_error_naming_it(tmp_path):
    with pytest.raises(SlideReadError, match=r"nowhere\.svs.*no such slide file"):
        open_slide(tmp_path / "nowhere.svs")


def test_a_folder_is_not_a_slide(tmp_path):
    with pytest.raises(SlideReadError, match="not a file"):
        open_slide(tmp_path)


@needs_slide_readers
def test_a_text_file_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("patient 12, slide 3: see the report\n", encoding="utf-8")
    with pytest.raises(SlideReadError, match=r"notes\.svs: not a slide OpenSlide or tiffslide can read"):
        open_slide(path)


@needs_slide_readers
def test_a_truncated_svs_is_a_slide_read_error_naming_it(tmp_path):
    data = real_slide(SVS).read_bytes()
    path = tmp_path / "half.svs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"half\.svs: not a slide OpenSlide or tiffslide can read"):
        open_slide(path)


@needs_slide_readers
def test_a_truncated_tiled_tiff_is_reported_by_openslide_not_read_by_tiffslide(tmp_path):
    whole = tmp_path / "whole.tif"
    write_pyramid_tiff(whole, pyramid_image(1024, 1024), levels=1, mpp=0.25)
    data = whole.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"cut\.tif: OpenSlide cannot read this slide"):
        open_slide(path)


@needs_slide_readers
def test_a_region_the_file_cannot_deliver_is_a_slide_read_error(tmp_path):
    # A stripped TIFF (OpenSlide does not read those, tiffslide does) cut short: it opens, but its
    # pixel data is incomplete.
    data = real_slide(PLAIN_TIFF).read_bytes()
    path = tmp_path / "cut_kidney.tif"
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.warns(MissingMppWarning):
        slide = open_slide(path)
    with (
        slide,
        pytest.raises(SlideReadError, match=r"cut_kidney\.tif: cannot read the region at level-0 \(0, 800\)"),
    ):
        slide.read_region((0, 800), 0, (256, 64))


# ------------------------------------------------------------------ the real slides


@needs_slide_readers
def test_the_real_svs_opens_with_openslide_at_20x():
    path = real_slide(SVS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMppWarning)
        slide = open_slide(path)
    with slide:
        info = slide.info
        assert info.backend == "openslide" and info.name == "cmu-1-small-region"
        assert info.level_dimensions == ((2220, 2967),) and info.level_downsamples == (1.0,)
        assert info.mpp == pytest.approx(0.499) and info.mpp_source == "metadata"
        assert info.magnification == 20
        region = slide.read_region((1000, 1500), 0, (256, 256))
        thumbnail, downsample = slide.thumbnail(max_size=512)
    assert region.shape == (256, 256, 3) and region.std() > 10  # tissue, not blank glass
    assert thumbnail.shape == (512, 383, 3) and downsample == pytest.approx(2967 / 512)


@needs_slide_readers
def test_the_plain_rgb_tiff_opens_with_tiffslide_as_one_level_and_warns():
    path = real_slide(PLAIN_TIFF)
    with pytest.warns(MissingMppWarning, match=r"kidney-48-5\.tif: no pixel size"):
        slide = open_slide(path)
    with slide:
        info = slide.info
        assert info.backend == "tiffslide"
        assert info.level_dimensions == ((1493, 901),) and info.level_count == 1
        assert info.mpp == 0.5 and info.mpp_source == "assumed" and info.magnification == 20
        edge = slide.read_region((1400, 800), 0, (128, 128))
    assert edge.shape == (128, 128, 3)
    assert (edge[101:] == 255).all() and (edge[:, 93:] == 255).all()  # beyond the image: white, not black
