"""Feature files: reading and writing TRIDENT/CLAM h5, and the errors bad files get."""

import h5py
import numpy as np
import pytest
import torch

from tcssa.data import read_bag, write_h5
from tcssa.data.formats import peek_shape


def _features(n=10, d=8, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def _coords(n=10):
    return np.stack([np.arange(n) * 256, np.arange(n)[::-1] * 256], axis=1)


TRIDENT_ATTRS = {
    "patch_size": 256,
    "patch_size_level0": 512,
    "level0_magnification": 40,
    "target_magnification": 20,
    "overlap": 0,
    "name": "007",
}


def test_trident_h5_round_trip_casts_float16_once(tmp_path):
    features = _features(dtype=np.float16)
    path = write_h5(tmp_path / "007.h5", features, _coords(), attrs=TRIDENT_ATTRS)
    bag = read_bag(path)
    assert bag.slide_id == "007" and isinstance(bag.slide_id, str)
    assert bag.features.dtype == torch.float32
    assert torch.equal(bag.features, torch.from_numpy(features.astype(np.float32)))
    assert bag.coords.dtype == torch.int64 and torch.equal(bag.coords, torch.from_numpy(_coords()))
    assert (bag.num_patches, bag.dim) == (10, 8)
    for key, value in TRIDENT_ATTRS.items():
        assert bag.attrs[key] == value
    with h5py.File(path) as f:  # TRIDENT's layout: patching metadata on the coords dataset
        assert f["coords"].attrs["patch_size_level0"] == 512
        assert f["features"].dtype == np.float16


def test_write_h5_can_store_float16_and_extra_datasets(tmp_path):
    phenotype = np.arange(10) % 3
    path = write_h5(
        tmp_path / "s.h5",
        torch.from_numpy(_features()),
        _coords(),
        extra={"phenotype": phenotype},
        file_attrs={"phenotype_names": ["stroma", "tumour", "immune"], "label": "tumour", "info": None},
        dtype="float16",
    )
    bag = read_bag(path, extras=["phenotype"])
    assert np.array_equal(bag.extras["phenotype"], phenotype)
    assert bag.attrs["phenotype_names"] == ["stroma", "tumour", "immune"]
    assert bag.attrs["label"] == "tumour" and bag.attrs["info"] == "None"
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="no 'tissue' dataset"):
        read_bag(path, extras=["tissue"])


def test_read_bag_as_float16_when_asked(tmp_path):
    path = write_h5(tmp_path / "s.h5", _features())
    assert read_bag(path, dtype=torch.float16).features.dtype == torch.float16


def test_clam_h5_older_coords_attrs_give_level0_patch_size(tmp_path):
    path = tmp_path / "clam_slide.h5"
    with h5py.File(path, "w") as f:
        f["features"] = _features()
        coords = f.create_dataset("coords", data=_coords())
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_level"] = 1
        coords.attrs["downsample"] = np.array([4.0, 4.0])
        coords.attrs["name"] = b"clam_slide"
    bag = read_bag(path)
    assert bag.attrs["patch_size_level0"] == 1024
    assert bag.attrs["patch_level"] == 1 and bag.attrs["name"] == "clam_slide"
    assert bag.attrs["downsample"] == [4.0, 4.0]


def test_clam_feature_h5_without_attrs_or_coords(tmp_path):
    path = tmp_path / "plain.hdf5"
    with h5py.File(path, "w") as f:
        f["features"] = _features()
    bag = read_bag(path)
    assert bag.coords is None and bag.attrs == {} and bag.slide_id == "plain"
    assert peek_shape(path) == (10, 8)


def test_a_leading_singleton_axis_is_dropped(tmp_path):
    path = tmp_path / "batched.h5"
    with h5py.File(path, "w") as f:
        f["features"] = _features()[None]
    assert read_bag(path).features.shape == (10, 8)
    assert peek_shape(path) == (10, 8)


def test_slide_ids_with_dots_keep_everything_but_the_extension(tmp_path):
    name = "TCGA-50-5055-01Z-00-DX1.0c9d846b-89b4-4b18-a2eb-0f8d8e0a33c7"
    path = write_h5(tmp_path / f"{name}.h5", _features())
    assert read_bag(path).slide_id == name


# ------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_bag(tmp_path / "nope.h5")


def test_unknown_extension(tmp_path):
    path = tmp_path / "slide.txt"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"slide.txt.*unknown feature file extension"):
        read_bag(path)


def test_corrupt_h5_names_the_file(tmp_path):
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(ValueError, match=r"corrupt.h5.*not a readable HDF5"):
        read_bag(path)
    with pytest.raises(ValueError, match="corrupt.h5"):
        peek_shape(path)


def test_truncated_h5_names_the_file(tmp_path):
    path = write_h5(tmp_path / "truncated.h5", _features(n=2000, d=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.h5"):
        read_bag(path)


def test_h5_without_features_lists_what_it_has(tmp_path):
    path = tmp_path / "nofeat.h5"
    with h5py.File(path, "w") as f:
        f["feats"] = _features()
        f["coords"] = _coords()
    with pytest.raises(ValueError, match=r"nofeat.h5: no 'features' dataset \(found: coords, feats\)"):
        read_bag(path)


@pytest.mark.parametrize(
    "features, message",
    [
        (np.zeros(10, dtype=np.float32), "must be N x D"),
        (np.zeros((2, 3, 4), dtype=np.float32), "must be N x D"),
        (np.zeros((0, 8), dtype=np.float32), "empty bag"),
    ],
)
def test_bad_feature_shapes(tmp_path, features, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["features"] = features
    with pytest.raises(ValueError, match=f"bad.h5.*{message}"):
        read_bag(path)


def test_ragged_h5_features(tmp_path):
    path = tmp_path / "ragged.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", (2,), dtype=h5py.vlen_dtype(np.float32))
        ds[0] = np.ones(3, dtype=np.float32)
        ds[1] = np.ones(5, dtype=np.float32)
    with pytest.raises(ValueError, match=r"ragged.h5.*ragged"):
        read_bag(path)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, bad_value):
    features = _features()
    features[3, 2] = bad_value
    path = tmp_path / "nonfinite.h5"
    with h5py.File(path, "w") as f:
        f["features"] = features
    with pytest.raises(ValueError, match=r"nonfinite.h5.*NaN or Inf in 1 of 10 patches.*\[3\]"):
        read_bag(path)
    with pytest.raises(ValueError, match="refusing to write"):
        write_h5(tmp_path / "out.h5", features)


def test_float16_overflow_is_caught(tmp_path):
    with pytest.raises(ValueError, match=r"big.h5: feature values exceed the range of float16"):
        write_h5(tmp_path / "big.h5", _features() * 1e6, dtype="float16")


def test_coords_count_must_match(tmp_path):
    path = tmp_path / "mismatch.h5"
    with h5py.File(path, "w") as f:
        f["features"] = _features(n=10)
        f["coords"] = _coords(n=9)
    with pytest.raises(ValueError, match=r"mismatch.h5: 9 coords for 10 feature rows"):
        read_bag(path)
    with pytest.raises(ValueError, match="9 coords for 10"):
        write_h5(tmp_path / "out.h5", _features(n=10), _coords(n=9))


def test_coords_must_be_n_by_2(tmp_path):
    with pytest.raises(ValueError, match="coords must be N x 2"):
        write_h5(tmp_path / "out.h5", _features(), np.zeros((10, 3)))
