"""tcssa.io.features.FeatureFileWriter: TRIDENT's feature-file layout, streamed, written atomically."""

import warnings

import h5py
import numpy as np
import pytest

from tcssa.data.inspection import file_report, folder_report, inspect_folder, summarize_file
from tcssa.io.features import (
    TRIDENT_COORDS_ATTRS,
    EmptyFeatureFileWarning,
    FeatureFileWriter,
    peek_header,
    read_bag,
)

COORDS_ATTRS = {
    "patch_size": 256,
    "patch_size_level0": 512,
    "level0_magnification": 40,
    "target_magnification": 20,
    "overlap": 0,
    "name": "slide-1",
    "savetodir": "/out",
    "level0_width": 9000,
    "level0_height": 7000,
}
FEATURES_ATTRS = {"name": "slide-1", "savetodir": "/out/features_toy", "encoder": "toy"}
CLASSES = ("tumour", "stroma", "fat")


def _writer(path, dim=8, **kwargs):
    kwargs.setdefault("coords_attrs", COORDS_ATTRS)
    kwargs.setdefault("features_attrs", FEATURES_ATTRS)
    return FeatureFileWriter(path, dim, **kwargs)


def _batches(sizes, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    start = 0
    for size in sizes:
        features = rng.normal(size=(size, dim)).astype(np.float32)
        coords = np.stack([np.arange(start, start + size) * 512, np.full(size, 1024)], axis=1)
        probs = rng.dirichlet(np.ones(len(CLASSES)), size=size).astype(np.float32)
        start += size
        yield features, coords, probs


def test_streamed_file_has_tridents_datasets_and_attrs_and_reads_back(tmp_path):
    path = tmp_path / "features_toy" / "slide-1.h5"
    sizes = [37, 5, 0, 64, 19, 1]  # not multiples of the chunk, one empty batch
    batches = list(_batches(sizes))
    with _writer(path, extras={"class_probs": CLASSES}, file_attrs={"mpp": 0.25}, chunk_rows=16) as writer:
        for features, coords, probs in batches:
            writer.append(features, coords, {"class_probs": probs})
    expected = np.concatenate([b[0] for b in batches])
    expected_coords = np.concatenate([b[1] for b in batches])
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (sum(sizes), 8)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (sum(sizes), 2)
        assert f["features"].maxshape == (None, 8) and f["features"].chunks == (16, 8)
        np.testing.assert_array_equal(f["features"][()], expected)
        np.testing.assert_array_equal(f["coords"][()], expected_coords)
        assert {k: f["coords"].attrs[k] for k in TRIDENT_COORDS_ATTRS} == COORDS_ATTRS
        assert dict(f["features"].attrs) == FEATURES_ATTRS
        assert list(f["class_probs"].attrs["columns"]) == list(CLASSES)
        assert f.attrs["mpp"] == 0.25
    bag = read_bag(path, extras=("class_probs",))
    assert bag.num_patches == sum(sizes) and bag.slide_id == "slide-1"
    np.testing.assert_array_equal(bag.features.numpy(), expected)
    np.testing.assert_array_equal(bag.coords.numpy(), expected_coords)
    np.testing.assert_allclose(bag.extras["class_probs"], np.concatenate([b[2] for b in batches]))
    assert (
        bag.attrs["patch_size_level0"] == 512 and bag.attrs["encoder"] == "toy" and bag.attrs["mpp"] == 0.25
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide-1.h5"]  # no partial file left


def test_rows_reach_the_disk_as_whole_chunks_while_the_slide_is_written(tmp_path):
    with _writer(tmp_path / "s.h5", chunk_rows=32) as writer:
        for i, (features, coords, _) in enumerate(_batches([10] * 20)):
            writer.append(features, coords)
            on_disk = writer._file["features"].shape[0]
            assert on_disk % 32 == 0 and writer.num_rows - on_disk < 32, (i, on_disk)
    assert peek_header(tmp_path / "s.h5").num_patches == 200


@pytest.mark.parametrize("interruption", [RuntimeError("encoder failed"), KeyboardInterrupt()])
def test_an_error_mid_slide_leaves_neither_the_file_nor_a_partial(tmp_path, interruption):
    (tmp_path / "notes.txt").write_text("someone else's file")
    path = tmp_path / "slide-1.h5"
    with pytest.raises(type(interruption)):
        with _writer(path, chunk_rows=4) as writer:
            for features, coords, _ in _batches([9, 9]):
                writer.append(features, coords)
            assert writer.partial_path.is_file() and not path.exists()
            raise interruption
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_slide_without_tiles_is_tridents_empty_file_with_a_warning(tmp_path):
    path = tmp_path / "empty.h5"
    with pytest.warns(EmptyFeatureFileWarning, match="empty.h5: no patches"):
        with _writer(path, dim=1024, extras={"class_probs": CLASSES}):
            pass
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (0, 1024) and f["features"].dtype == np.float32
        assert f["coords"].shape == (0, 2) and f["coords"].dtype == np.int64
        assert f["class_probs"].shape == (0, 3)
        assert f["coords"].attrs["patch_size"] == 256 and f["features"].attrs["encoder"] == "toy"
    with pytest.raises(ValueError, match="empty.h5: empty bag"):
        read_bag(path)


def test_tcssa_inspect_describes_written_files_and_flags_the_empty_one(tmp_path):
    with _writer(tmp_path / "full.h5") as writer:
        for features, coords, _ in _batches([12]):
            writer.append(features, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyFeatureFileWarning)
        with _writer(tmp_path / "empty.h5"):
            pass
    report = file_report(summarize_file(tmp_path / "full.h5"))
    assert "N = 12" in report and "D = 8, stored as float32" in report
    assert "patch_size_level0" in report and "level0_magnification" in report and "encoder" in report
    table = folder_report(tmp_path, inspect_folder(tmp_path))
    assert "ERROR: empty bag (0 patches)" in table and "2 files: 1 readable, 1 with errors" in table


def test_bad_batches_are_refused_naming_the_file_and_nothing_is_left(tmp_path):
    path = tmp_path / "bad.h5"
    features, coords, probs = next(_batches([4]))
    cases = [
        ((features[:, :5], coords), {}, "must be B x 8"),
        ((features, coords[:3]), {}, "coords must be 4 x 2"),
        ((np.where(np.eye(4, 8) > 0, np.nan, features), coords), {}, "NaN"),
        ((features, coords), {}, "missing"),
        ((features, coords, {"class_probs": probs[:, :2]}), {}, "must be 4 x 3"),
    ]
    for args, _, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            with _writer(path, extras={"class_probs": CLASSES}) as writer:
                writer.append(*args)
        assert "bad.h5" in str(caught.value)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="level0_width"):
        _writer(path, coords_attrs={k: v for k, v in COORDS_ATTRS.items() if k != "level0_width"})
    with pytest.raises(ValueError, match="may not be called"):
        _writer(path, extras={"coords": ("x", "y")})
