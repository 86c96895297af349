"""Tissue outlines as QuPath GeoJSON and masks read back from GeoJSON or mask images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="tissue outlines need scikit-image (the wsi extra)")

from tcssa.io.geojson import TissueMask, load_tissue_mask, save_tissue_geojson, tissue_polygons  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def ring_area(ring) -> float:
    """Shoelace area of an x, y ring; positive when counter-clockwise with y pointing up."""
    points = np.asarray(ring)
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def pieces_with_holes() -> np.ndarray:
    """A slab with two holes (one holding an island), a lone pixel, a thin line and a piece on the
    border of the image."""
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:30, 20:30] = False
    mask[24:27, 24:27] = True  # an island inside the first hole: a piece of its own
    mask[40:46, 50:60] = False
    mask[4, 4] = True
    mask[0, 20:60] = True
    mask[30:60, 76:80] = True
    return mask


def test_round_trip_keeps_the_mask(tmp_path):
    truth = pieces_with_holes()
    path = save_tissue_geojson(TissueMask(truth, 4.0), tmp_path / "slide.geojson")
    assert path == tmp_path / "slide.geojson"
    back = load_tissue_mask(path, width=320, height=240, downsample=4.0)
    assert back.mask.shape == truth.shape and back.downsample == 4.0
    assert iou(back.mask, truth) > 0.95
    assert (back.mask != truth).sum() == 0  # outlines run between pixel centres: nothing is lost


def test_the_file_is_qupath_style_geojson_in_level0_pixels(tmp_path):
    path = save_tissue_geojson(TissueMask(pieces_with_holes(), 4.0), tmp_path / "slide.geojson")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == 5  # slab, island, pixel, line, border piece
    for feature in features:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        outer, *holes = feature["geometry"]["coordinates"]
        for ring in (outer, *holes):
            assert ring[0] == ring[-1] and len(ring) >= 4
        # RFC 7946 orientation on the numbers: outer rings counter-clockwise, holes clockwise.
        assert ring_area(outer) > 0
        assert all(ring_area(hole) < 0 for hole in holes)
    hole_counts = sorted(len(f["geometry"]["coordinates"]) - 1 for f in features)
    assert hole_counts == [0, 0, 0, 0, 2]
    slab = max(features, key=lambda f: len(f["geometry"]["coordinates"]))
    xs = [x for x, _ in slab["geometry"]["coordinates"][0]]
    ys = [y for _, y in slab["geometry"]["coordinates"][0]]
    # Mask columns 10..69 at 4 level-0 px each cover x in [40, 280): the outline follows those edges.
    assert min(xs) == pytest.approx(10 * 4) and max(xs) == pytest.approx(70 * 4)
    assert min(ys) == pytest.approx(10 * 4) and max(ys) == pytest.approx(50 * 4)


def test_tissue_polygons_of_an_empty_mask_and_its_file(tmp_path):
    empty = TissueMask(np.zeros((10, 12), bool), 8.0)
    assert tissue_polygons(empty) == []
    path = save_tissue_geojson(empty, tmp_path / "empty.geojson")
    assert json.loads(path.read_text(encoding="utf-8")) == {"type": "FeatureCollection", "features": []}
    with pytest.raises(ValueError, match=r"empty\.geojson.*no Polygon"):
        load_tissue_mask(path, 96, 80, 8.0)


def test_the_file_is_written_atomically_into_a_new_folder(tmp_path):
    target = tmp_path / "contours_geojson" / "slide.geojson"
    save_tissue_geojson(TissueMask(pieces_with_holes(), 2.0), target)
    assert [p.name for p in target.parent.iterdir()] == ["slide.geojson"]  # no partial file left


def test_loading_at_another_downsample_rescales_the_outline(tmp_path):
    rng = np.random.default_rng(0)
    from scipy import ndimage

    truth = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((120, 160)), 3) > 0.5)
    path = save_tissue_geojson(TissueMask(truth, 8.0), tmp_path / "blobs.geojson")
    finer = load_tissue_mask(path, width=1280, height=960, downsample=4.0)
    assert finer.mask.shape == (240, 320)
    assert iou(finer.mask[::2, ::2], truth) > 0.95
    coarser = load_tissue_mask(path, width=1280, height=960, downsample=16.0)
    assert coarser.mask.shape == (60, 80)
    assert abs(coarser.mask.mean() - truth.mean()) < 0.03


def test_real_slide_round_trip(tmp_path):
    openslide = pytest.importorskip("openslide", reason="reading the SVS slide needs openslide-python")
    from tcssa.wsi.tissue import detect_tissue

    base = os.environ.get("TCSSA_SHARED_DATA")
    slide_path = (Path(base) if base else ROOT.parent / "shared" / "data") / "wsi" / "cmu-1-small-region.svs"
    if not slide_path.is_file():
        pytest.skip(f"real slide not found at {slide_path} (set TCSSA_SHARED_DATA to the shared data folder)")
    slide = openslide.OpenSlide(slide_path)
    try:
        thumbnail = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
        width, height = slide.dimensions
    finally:
        slide.close()
    downsample = width / thumbnail.shape[1]
    for fill_holes in (True, False):
        mask = detect_tissue(thumbnail, downsample, fill_holes=fill_holes)
        path = save_tissue_geojson(mask, tmp_path / f"cmu-{fill_holes}.geojson")
        back = load_tissue_mask(path, width, height, downsample)
        rows, cols = min(back.mask.shape[0], mask.mask.shape[0]), min(back.mask.shape[1], mask.mask.shape[1])
        assert iou(back.mask[:rows, :cols], mask.mask[:rows, :cols]) > 0.95


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def square(x0, y0, side):
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def test_multipolygons_holes_and_lists_of_features(tmp_path):
    donut = {"type": "Polygon", "coordinates": [square(0, 0, 400), square(100, 100, 200)]}
    two = {"type": "MultiPolygon", "coordinates": [[square(500, 0, 100)], [square(500, 300, 100)]]}
    features = [{"type": "Feature", "geometry": g, "properties": {}} for g in (donut, two)]
    path = write_json(tmp_path / "qupath.json", features)  # some QuPath versions export a bare list
    mask = load_tissue_mask(path, width=800, height=400, downsample=10.0).mask
    assert mask.shape == (40, 80)
    assert mask[5, 5] and not mask[20, 20]  # inside the donut's ring, inside its hole
    assert mask[5, 55] and mask[35, 55] and not mask[20, 55]
    # A hole of one polygon never cuts another polygon lying in it.
    island = {"type": "Polygon", "coordinates": [square(150, 150, 100)]}
    island_feature = {"type": "Feature", "geometry": island}
    collection = {"type": "FeatureCollection", "features": [*features, island_feature]}
    with_island = load_tissue_mask(write_json(tmp_path / "island.geojson", collection), 800, 400, 10.0).mask
    assert with_island[20, 20] and not with_island[12, 12]


def test_non_polygon_geometries_are_skipped_with_a_warning(tmp_path):
    data = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 50)]}},
        ],
    }
    with pytest.warns(UserWarning, match="Point"):
        mask = load_tissue_mask(write_json(tmp_path / "mixed.geojson", data), 100, 100, 1.0).mask
    assert mask[:50, :50].all() and not mask[60:].any()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        ('{"hello": 1}', "not GeoJSON"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}', "no Polygon.*Point"),
        ('{"type": "Circle", "coordinates": [1, 2]}', "unknown GeoJSON geometry type 'Circle'"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}', "at least 3"),
        ('{"type": "Polygon", "coordinates": [[["a", 0], [1, 1], [2, 2]]]}', r"\[x, y\] numbers"),
        ('{"type": "Polygon", "coordinates": 5}', "list of rings"),
    ],
)
def test_bad_geojson_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "outline.geojson"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as raised:
        load_tissue_mask(path, 100, 100, 1.0)
    assert "outline.geojson" in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.geojson"):
        load_tissue_mask(tmp_path / "nowhere.geojson", 100, 100, 1.0)


def test_a_mask_image_of_any_size_is_rescaled(tmp_path):
    truth = np.zeros((60, 80), bool)
    truth[10:40, 20:70] = True
    big = np.kron(truth, np.ones((5, 5), bool)).astype(np.uint8) * 200  # 300 x 400, nonzero = tissue
    Image.fromarray(big).save(tmp_path / "mask.png")
    loaded = load_tissue_mask(tmp_path / "mask.png", width=1600, height=1200, downsample=20.0)
    assert loaded.mask.shape == (60, 80) and np.array_equal(loaded.mask, truth)
    rgb = np.repeat(big[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "mask.tif")
    finer = load_tissue_mask(tmp_path / "mask.tif", width=1600, height=1200, downsample=10.0)
    assert finer.mask.shape == (120, 160) and np.array_equal(finer.mask[::2, ::2], truth)


def test_a_bad_mask_image_is_named(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"mask\.png: not a readable mask image"):
        load_tissue_mask(path, 100, 100, 1.0)


def test_bad_sizes_are_clear_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match="level-0 size"):
        load_tissue_mask(tmp_path / "mask.png", 0, 100, 1.0)
    with pytest.raises(ValueError, match="downsample"):
        load_tissue_mask(tmp_path / "mask.png", 100, 100, 0.0)
