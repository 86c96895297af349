"""tcssa.wsi.extract: slides to TRIDENT-layout feature files, resumable, failures reported, sharded.

The pipeline's own logic is tested with the stand-ins of tests/wsi_fakes.py (PNG "slides", a
mean-colour encoder); the end of the file runs the real slide reader, tissue detection, tiling and
encoders on the real slides of the shared data (skipped until those parts are merged in).
"""

import os
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import wsi_fakes

wsi_fakes.install_missing_parts()

from tcssa.io.features import TRIDENT_COORDS_ATTRS, EmptyFeatureFileWarning, read_bag  # noqa: E402
from tcssa.wsi import extract  # noqa: E402

ENCODER = "fake-mean"


@pytest.fixture
def fakes(monkeypatch):
    """tcssa.wsi.extract with every part swapped for its stand-in; a single process."""
    wsi_fakes.swap_in(monkeypatch)
    return wsi_fakes


def _h5(path: Path):
    with h5py.File(path, "r") as f:
        return (
            f["features"][()],
            f["coords"][()],
            dict(f["coords"].attrs),
            dict(f["features"].attrs),
            dict(f.attrs),
            {k: f[k][()] for k in f if k not in ("features", "coords")},
        )


def test_one_slide_gives_tridents_layout_and_features_in_coords_order(fakes, tmp_path):
    slide = fakes.write_slide(tmp_path / "slides" / "case-01.svs")
    previews = []
    path = extract.extract_slide(
        slide,
        tmp_path / "out",
        ENCODER,
        batch_size=4,
        previews=lambda p, folder: previews.append((p, folder)),
    )
    assert path == tmp_path / "out" / "features_fake-mean" / "case-01.h5"
    assert (tmp_path / "out" / "contours_geojson" / "case-01.geojson").is_file()
    features, coords, coords_attrs, features_attrs, root, extras = _h5(path)
    assert len(coords) == 9  # 3 tissue columns x 3 rows of 256-px tiles at 20x
    assert coords.dtype == np.int64 and features.dtype == np.float32 and features.shape == (9, 4)
    assert coords.tolist() == sorted(coords.tolist(), key=lambda c: (c[1], c[0]))  # row-major
    np.testing.assert_allclose(features[:, 0], 20 + 25 * (coords[:, 0] // 256))  # each row is its tile
    np.testing.assert_allclose(features[:, 1], 20 + 25 * (coords[:, 1] // 256))
    assert set(TRIDENT_COORDS_ATTRS) <= set(coords_attrs)
    assert {k: coords_attrs[k] for k in ("patch_size", "patch_size_level0", "level0_magnification")} == {
        "patch_size": 256,
        "patch_size_level0": 256,
        "level0_magnification": 20,
    }
    assert (coords_attrs["level0_width"], coords_attrs["level0_height"], coords_attrs["name"]) == (
        1024,
        768,
        "case-01",
    )
    assert features_attrs == {
        "name": "case-01",
        "savetodir": str(tmp_path / "out" / "features_fake-mean"),
        "encoder": "fake-mean",
    }
    assert root["mpp"] == 0.5 and root["tissue"] == "detected" and root["slide_file"] == str(slide)
    assert extras["tone"].shape == (9, 2)
    ((preview, folder),) = previews
    assert folder == tmp_path / "out" / "thumbnails" and len(preview.grid.coords) == 9
    assert preview.info.name == "case-01" and preview.tissue.mask.any()
    bag = read_bag(path, extras=("tone",))
    assert bag.num_patches == 9 and bag.attrs["target_magnification"] == 20


def test_a_40x_slide_tiled_at_20x_has_512_px_level0_tiles(fakes, tmp_path):
    slide = fakes.write_slide(tmp_path / "big.tif", width=2048, height=1024, tissue_columns=8)
    path = extract.extract_slide(slide, tmp_path / "out", ENCODER, mpp=0.25, progress=False)
    _, coords, attrs, _, root, _ = _h5(path)
    assert (attrs["patch_size_level0"], attrs["level0_magnification"], attrs["target_magnification"]) == (
        512,
        40,
        20,
    )
    assert len(coords) == 8 and root["mpp_source"] == "user"
    with pytest.raises(ValueError, match="40x asked of a 20x slide"):
        extract.extract_slide(slide, tmp_path / "out2", ENCODER, target_magnification=40, progress=False)


def test_a_slide_without_tissue_writes_tridents_empty_file_and_warns(fakes, tmp_path):
    slide = fakes.write_slide(tmp_path / "blank.svs", tissue_columns=0)
    with pytest.warns(EmptyFeatureFileWarning, match="blank.h5: no patches"):
        path = extract.extract_slide(slide, tmp_path / "out", ENCODER, progress=False)
    features, coords, attrs, features_attrs, _, extras = _h5(path)
    assert features.shape == (0, 4) and coords.shape == (0, 2) and extras["tone"].shape == (0, 2)
    assert attrs["patch_size"] == 256 and features_attrs["encoder"] == "fake-mean"


def test_a_given_mask_replaces_tissue_detection(fakes, tmp_path):
    slide = fakes.write_slide(tmp_path / "s.svs", tissue_columns=4)
    mask = np.zeros((768, 1024), dtype=np.uint8)
    mask[:, :256] = 255  # only the first column
    from PIL import Image

    Image.fromarray(mask).save(tmp_path / "s.png")
    path = extract.extract_slide(
        slide, tmp_path / "out", ENCODER, mask_path=tmp_path / "s.png", progress=False
    )
    _, coords, _, _, root, _ = _h5(path)
    assert coords[:, 0].tolist() == [0, 0, 0] and root["tissue"] == str(tmp_path / "s.png")


def _slide_folder(fakes, folder: Path) -> Path:
    for name in ("a.svs", "b.tif", "c.ndpi"):
        fakes.write_slide(folder / name)
    (folder / "broken.svs").write_text("this is a text file, not a slide\n")
    whole = fakes.write_slide(folder / "whole.png").read_bytes()  # .png is no slide extension: ignored
    (folder / "cut.tiff").write_bytes(whole[: len(whole) // 3])  # a truncated slide
    (folder / "notes.txt").write_text("not a slide either")
    return folder


def test_a_folder_run_reports_failures_goes_on_and_resumes(fakes, tmp_path, capsys):
    slides = _slide_folder(fakes, tmp_path / "slides")
    out = tmp_path / "out"
    (out / "features_fake-mean").mkdir(parents=True)
    (out / "README.txt").write_text("the user's own file")
    stale = out / "features_fake-mean" / "a.h5.999999.partial"  # a killed run's leftover
    stale.write_bytes(b"half a file")

    first = extract.extract_folder(slides, out, ENCODER, batch_size=4)
    assert [d.slide.name for d in first.done] == ["a.svs", "b.tif", "c.ndpi"]
    assert [d.tiles for d in first.done] == [9, 9, 9] and first.tiles == 27
    assert {f.slide.name for f in first.failed} == {"broken.svs", "cut.tiff"}
    assert all(f.slide.name in f.reason for f in first.failed)
    assert "failed: " in capsys.readouterr().err  # reported as it happens
    summary = first.summary()
    assert "3 slides extracted (27 tiles" in summary and "2 failed" in summary and "broken.svs" in summary
    names = sorted(p.name for p in (out / "features_fake-mean").iterdir())
    assert names == ["a.h5", "a.h5.999999.partial", "b.h5", "c.h5"]
    assert (out / "README.txt").read_text() == "the user's own file"

    before = {p: p.stat().st_mtime_ns for p in (out / "features_fake-mean").glob("*.h5")}
    second = extract.extract_folder(slides, out, ENCODER, progress=False)
    assert second.done == [] and sorted(p.name for p in second.skipped) == ["a.h5", "b.h5", "c.h5"]
    assert len(second.failed) == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten


def test_a_slide_failing_mid_way_leaves_no_feature_file_and_the_next_one_runs(fakes, tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    for name in ("a.svs", "b.svs"):
        fakes.write_slide(slides / name)
    encoder = fakes.MeanColourEncoder()
    encoder.fail_on_batch = 2  # a's second batch, of three
    result = extract.extract_folder(slides, tmp_path / "out", encoder, batch_size=4, progress=False)
    assert [f.slide.name for f in result.failed] == ["a.svs"]
    assert "RuntimeError: the fake encoder failed on purpose" in result.failed[0].reason
    assert [d.slide.name for d in result.done] == ["b.svs"]
    assert os.listdir(tmp_path / "out" / "features_fake-mean") == ["b.h5"]  # a: no file, no partial
    again = extract.extract_folder(slides, tmp_path / "out", encoder, batch_size=4, progress=False)
    assert [d.slide.name for d in again.done] == ["a.svs"] and not again.failed


def test_each_process_takes_every_world_th_slide(fakes, tmp_path, monkeypatch):
    slides = tmp_path / "slides"
    for name in ("a.svs", "b.svs", "c.svs", "d.svs", "e.svs"):
        fakes.write_slide(slides / name, tissue_columns=1)
    monkeypatch.setattr(extract, "process_share", lambda device="auto": (1, 2, False, 1))
    result = extract.extract_folder(slides, tmp_path / "out", ENCODER, device="cpu")
    assert [d.slide.name for d in result.done] == ["b.svs", "d.svs"]
    assert (result.rank, result.world) == (1, 2) and "process 1 of 2" in result.summary()


def test_a_process_started_without_torchrun_takes_every_slide_on_the_cpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert extract.process_share("cpu") == (0, 1, True, 0)
    assert extract.resolve_device("cpu") == extract.torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        extract.resolve_device("tpu")


def test_tiles_read_by_dataloader_workers_keep_their_order(fakes, tmp_path):
    slide = fakes.write_slide(tmp_path / "s.svs", width=1536, height=1024, tissue_columns=6)
    path = extract.extract_slide(
        slide, tmp_path / "out", ENCODER, batch_size=5, num_workers=2, progress=False
    )
    features, coords, *_ = _h5(path)
    assert len(coords) == 24
    np.testing.assert_allclose(features[:, 0], 20 + 25 * (coords[:, 0] // 256))
    np.testing.assert_allclose(features[:, 1], 20 + 25 * (coords[:, 1] // 256))


def test_bad_requests_are_refused_before_any_slide_is_touched(fakes, tmp_path):
    slides = tmp_path / "slides"
    fakes.write_slide(slides / "a.svs")
    fakes.write_slide(slides / "b.svs")
    out = tmp_path / "out"
    for options, message in [
        ({"min_tissue": 1.5}, "min tissue is a share"),
        ({"overlap": 256}, "overlap must be"),
        ({"batch_size": 0}, "batch size"),
        ({"mask_path": slides / "a.svs"}, "one mask file"),
        ({"mask_path": tmp_path / "nowhere"}, "no such tissue mask"),
        ({"device": "tpu"}, "unknown device"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            extract.extract_folder(slides, out, ENCODER, progress=False, **options)
    with pytest.raises(ValueError, match="unknown encoder 'nope'"):
        extract.extract_folder(slides, out, "nope", progress=False)
    fakes.write_slide(slides / "a.tif")
    with pytest.raises(ValueError, match=r"a\.svs and .*a\.tif would both write a\.h5"):
        extract.extract_folder(slides, out, ENCODER, progress=False)
    with pytest.raises(FileNotFoundError, match="no such slide file or folder"):
        extract.extract_folder(tmp_path / "missing", out, ENCODER, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------ the real parts, on real slides


def _shared_wsi() -> Path:
    root = os.environ.get("TCSSA_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return base / "wsi"


real = pytest.mark.skipif(
    not wsi_fakes.REAL_PARTS,
    reason="tcssa.wsi.slide/tiling/tissue/encoders and tcssa.io.geojson not merged in yet",
)


@pytest.fixture
def real_slides(tmp_path) -> Path:
    source = _shared_wsi()
    svs, tif = source / "cmu-1-small-region.svs", source / "kidney-48-5.tif"
    if not (svs.is_file() and tif.is_file()):
        pytest.skip(f"real slides not found in {source} (set TCSSA_SHARED_DATA)")
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(svs, folder / svs.name)
    shutil.copy(tif, folder / tif.name)
    (folder / "not-a-slide.svs").write_text("text, not a slide\n")
    (folder / "truncated.svs").write_bytes(svs.read_bytes()[: svs.stat().st_size // 4])
    return folder


@real
# DenseNet-121 on a CPU takes about a minute here (twice the slide, its weights converted once): slow
@pytest.mark.parametrize(
    "encoder", ["handcrafted", pytest.param("capricorn-densenet121", marks=pytest.mark.slow)]
)
def test_real_slides_end_to_end(real_slides, tmp_path, encoder):
    from tcssa.wsi.encoders import build_encoder
    from tcssa.wsi.slide import MissingMppWarning

    model = build_encoder(encoder)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingMppWarning)  # kidney-48-5.tif has no mpp: 20x assumed
        with pytest.warns(EmptyFeatureFileWarning, match="kidney-48-5.h5: no patches"):
            result = extract.extract_folder(real_slides, out, model, batch_size=16, progress=False)
    assert sorted(d.slide.name for d in result.done) == ["cmu-1-small-region.svs", "kidney-48-5.tif"]
    assert {f.slide.name for f in result.failed} == {"not-a-slide.svs", "truncated.svs"}
    svs, kidney = sorted(result.done, key=lambda d: d.slide.name)
    assert svs.tiles > 0
    bag = read_bag(svs.features)
    assert bag.dim == model.dim and bag.num_patches == svs.tiles
    assert bag.attrs["encoder"] == model.name and bag.attrs["target_magnification"] == 20
    assert bag.attrs["level0_magnification"] == 20 and bag.attrs["patch_size_level0"] == 256  # 0.499 um/px
    # kidney-48-5.tif holds one fragment of about 110 x 60 px, a tenth of a 256-px tile: TRIDENT's empty file
    features, coords, attrs, features_attrs, _, _ = _h5(kidney.features)
    assert kidney.tiles == 0 and features.shape == (0, model.dim) and coords.shape == (0, 2)
    assert attrs["level0_width"] == 1493 and features_attrs["encoder"] == model.name
    for done in result.done:
        assert (out / "contours_geojson" / f"{done.slide.stem}.geojson").is_file()
    again = extract.extract_folder(real_slides, out, model, progress=False)
    assert len(again.skipped) == 2 and not again.done


class _UnreadableRegionDataset(wsi_fakes.TileDataset):
    def __getitem__(self, index):
        if index == 5:
            raise wsi_fakes.SlideReadError(f"{self.slide_path}: region at tile {index} is unreadable")
        return super().__getitem__(index)


def test_an_error_in_a_dataloader_worker_is_reported_as_its_own_line(fakes, tmp_path, monkeypatch):
    fakes.write_slide(tmp_path / "slides" / "a.svs")
    tiling = wsi_fakes.fake_modules()["tiling"]
    tiling.TileDataset = _UnreadableRegionDataset
    monkeypatch.setattr(extract, "tiling", tiling)
    result = extract.extract_folder(
        tmp_path / "slides", tmp_path / "out", ENCODER, num_workers=1, progress=False
    )
    (failure,) = result.failed
    assert failure.reason.endswith("a.svs: region at tile 5 is unreadable") and "\n" not in failure.reason
    assert os.listdir(tmp_path / "out" / "features_fake-mean") == []
