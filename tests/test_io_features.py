"""Feature files: reading and writing TRIDENT/CLAM h5, and the errors bad files get."""

import h5py
import numpy as np
import pytest
import torch

from tcssa.io.features import peek_shape, read_bag, write_h5


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


# --------------------------------------------------------------------------- .pt, .npy/.npz, .csv


def test_pt_tensor_and_dict(tmp_path):
    features = torch.from_numpy(_features())
    torch.save(features, tmp_path / "tensor.pt")
    bag = read_bag(tmp_path / "tensor.pt")
    assert torch.equal(bag.features, features) and bag.coords is None and bag.slide_id == "tensor"
    torch.save(
        {"features": features.half(), "coords": torch.from_numpy(_coords()), "name": "x"}, tmp_path / "d.pth"
    )
    bag = read_bag(tmp_path / "d.pth")
    assert bag.features.dtype == torch.float32
    assert torch.equal(bag.features, features.half().float())
    assert torch.equal(bag.coords, torch.from_numpy(_coords())) and bag.attrs == {"name": "x"}
    assert read_bag(tmp_path / "d.pth", dtype=None).features.dtype == torch.float16
    torch.save(features.bfloat16(), tmp_path / "bf16.pt")
    assert read_bag(tmp_path / "bf16.pt").features.dtype == torch.float32


class _Payload:
    """Any class instance: unpickling it would import and run code, so weights_only refuses it."""


def test_pt_never_runs_code(tmp_path):
    torch.save({"features": torch.ones(2, 3), "payload": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=r"unsafe.pt: refused to load.*weights_only=True"):
        read_bag(tmp_path / "unsafe.pt")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"feats": torch.ones(2, 3)}, r"no 'features' key \(found: feats\)"),
        ([torch.ones(2, 3), torch.ones(4, 3)], "list of 2 items.*ragged"),
        ({"features": [[1.0, 2.0], [3.0]]}, "not a tensor"),
        ({"features": torch.ones(5)}, "must be N x D"),
        ({"features": torch.ones(4, 3), "coords": torch.zeros(3, 2)}, "3 coords for 4 feature rows"),
        ({"features": torch.full((2, 3), float("nan"))}, "NaN or Inf"),
    ],
)
def test_bad_pt_files(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"bad.pt: .*{message}"):
        read_bag(tmp_path / "bad.pt")


def test_corrupt_pt(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.pt"):
        read_bag(tmp_path / "corrupt.pt")


def test_npy_and_npz(tmp_path):
    features = _features()
    np.save(tmp_path / "a.npy", features)
    assert torch.equal(read_bag(tmp_path / "a.npy").features, torch.from_numpy(features))
    assert peek_shape(tmp_path / "a.npy") == (10, 8)
    np.savez(tmp_path / "b.npz", features=features, coords=_coords(), phenotype=np.arange(10))
    bag = read_bag(tmp_path / "b.npz", extras=["phenotype"])
    assert torch.equal(bag.coords, torch.from_numpy(_coords()))
    assert np.array_equal(bag.extras["phenotype"], np.arange(10))
    np.savez(tmp_path / "single.npz", whatever=features)
    assert read_bag(tmp_path / "single.npz").num_patches == 10
    np.save(tmp_path / "ints.npy", np.arange(20).reshape(10, 2))
    assert read_bag(tmp_path / "ints.npy").features.dtype == torch.float32


def test_bad_numpy_files(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.ones(3), np.ones(4)
    np.save(tmp_path / "ragged.npy", ragged, allow_pickle=True)
    with pytest.raises(ValueError, match=r"ragged.npy: features are ragged or not numeric"):
        read_bag(tmp_path / "ragged.npy")
    np.savez(tmp_path / "two.npz", a=_features(), b=_features())
    with pytest.raises(ValueError, match=r"two.npz: no 'features' array \(found: a, b\)"):
        read_bag(tmp_path / "two.npz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="empty.npy: empty bag"):
        read_bag(tmp_path / "empty.npy")
    with pytest.raises(ValueError, match="empty.npy: empty bag"):
        peek_shape(tmp_path / "empty.npy")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="corrupt.npz"):
        read_bag(tmp_path / "corrupt.npz")


def _write_feature_csv(path, features, bom=False, header=None):
    header = header if header is not None else ",".join(str(i) for i in range(features.shape[1]))
    body = "\n".join(",".join(f"{v:.6f}" for v in row) for row in features)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + f"{header}\n{body}\n".encode())
    return path


def test_dsmil_slidechat_csv(tmp_path):
    features = _features()
    bag = read_bag(_write_feature_csv(tmp_path / "patient_1.csv", features, bom=True))
    assert bag.slide_id == "patient_1" and bag.coords is None
    torch.testing.assert_close(bag.features, torch.from_numpy(features), atol=1e-6, rtol=0)


def test_bad_csv_files(tmp_path):
    features = _features(n=3, d=4)
    with pytest.raises(ValueError, match=r"no_header.csv: expected a DSMIL/SlideChat feature CSV"):
        read_bag(_write_feature_csv(tmp_path / "no_header.csv", features, header="a,b,c,d"))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("0,1,2\n1,2,3\n1,2\n")
    with pytest.raises(ValueError, match="ragged.csv: feature rows are ragged or not numeric"):
        read_bag(ragged)
    wide = tmp_path / "wide.csv"
    wide.write_text("0,1\n1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="wide.csv: rows have 3 values for a header of 2 columns"):
        read_bag(wide)
    empty = tmp_path / "empty.csv"
    empty.write_text("0,1,2\n")
    with pytest.raises(ValueError, match="empty.csv: empty bag"):
        read_bag(empty)
    nan = tmp_path / "nan.csv"
    nan.write_text("0,1\n1,nan\n")
    with pytest.raises(ValueError, match="nan.csv: features contain NaN"):
        read_bag(nan)


# ------------------------------------------------------------------ huge values, unwritten data, full disks


@pytest.mark.parametrize("ext", [".h5", ".npy", ".pt"])
def test_finite_but_huge_features_are_refused_naming_the_file(tmp_path, ext):
    features = _features()
    features[6, 2] = 3e38  # finite in float32, and it would overflow the gate's logits
    path = tmp_path / f"huge{ext}"
    if ext == ".h5":
        write_h5(path, features)
    elif ext == ".npy":
        np.save(path, features)
    else:
        torch.save(torch.from_numpy(features), path)
    with pytest.raises(
        ValueError, match=rf"huge\{ext}: feature values reach 3e\+38, beyond .*1 of 10 patches .*\[6\]"
    ):
        read_bag(path)
    from tcssa.io.features import scan_values

    with pytest.raises(ValueError, match=rf"huge\{ext}: feature values reach 3e\+38"):
        scan_values(path, block_bytes=64)  # block by block: the bad row is found in its block


def test_magnitude_bound_keeps_real_feature_ranges_and_float64_overflow_is_a_magnitude_error(tmp_path):
    from tcssa.io.bag import MAX_FEATURE_MAGNITUDE

    ok = _features() * 300  # a large LayerNorm output is far inside the bound
    ok[0, 0] = 10_823  # the peak of the hand-crafted UCSB breast-cancer benchmark features
    assert read_bag(write_h5(tmp_path / "ok.h5", ok)).dim == 8
    assert 1e5 <= MAX_FEATURE_MAGNITUDE <= 1e10  # float32 products of K x D gates cannot overflow
    big = _features().astype(np.float64)
    big[1, 1] = -1e300  # beyond float32: must not be reported as "NaN or Inf"
    np.save(tmp_path / "f64.npy", big)
    with pytest.raises(ValueError, match=r"f64.npy: feature values reach 1e\+300.*first rows: \[1\]"):
        read_bag(tmp_path / "f64.npy")


def test_h5_whose_data_was_never_written_is_refused_from_its_header(tmp_path):
    path = tmp_path / "unwritten.h5"
    with h5py.File(path, "w") as f:  # the header claims 24.6 GB; the file holds a few hundred bytes
        f.create_dataset("features", shape=(6_000_000, 1024), dtype="float32")
    with pytest.raises(
        ValueError, match=r"unwritten.h5: features 6000000x1024 float32 \(24.6 GB\) is declared"
    ):
        peek_shape(path)
    with pytest.raises(ValueError, match="unwritten.h5: .*never written"):
        read_bag(path)
    chunked = tmp_path / "half.h5"
    with h5py.File(chunked, "w") as f:
        f.create_dataset("features", shape=(100, 8), dtype="float32", chunks=(10, 8))[:30] = 1.0
    with pytest.raises(ValueError, match=r"half.h5: .*has 3 of its 10 chunks stored"):
        read_bag(chunked)


def _fail_mid_write(monkeypatch, when="phenotype", err=None):
    """h5py's create_dataset writes a few datasets, then the disk is full."""
    import errno

    original = h5py.Group.create_dataset

    def create_dataset(self, name, *args, **kwargs):
        if name == when:
            raise err or OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


@pytest.mark.parametrize(
    "err",
    [
        None,  # a plain OSError(ENOSPC)
        OSError(  # h5py's wording, errno in the message
            "Can't synchronously write data (file write failed: ..., errno = 28, "
            "error message = 'No space left on device', ...)"
        ),
        RuntimeError("Can't decrement id ref count (file write failed: errno = 28, No space left on device)"),
    ],
)
def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch, err):
    from tcssa.io.files import NoSpaceError

    _fail_mid_write(monkeypatch, err=err)
    target = tmp_path / "slide.h5"
    with pytest.raises(NoSpaceError, match=r"^no space left writing .*slide.h5") as caught:
        write_h5(target, _features(), _coords(), extra={"phenotype": np.zeros(10)})
    assert caught.value.errno == 28 and isinstance(caught.value, ValueError)  # the CLI prints ValueErrors
    assert list(tmp_path.iterdir()) == []  # neither slide.h5 nor slide.h5.partial


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    _fail_mid_write(monkeypatch, err=OSError(13, "Permission denied"))
    with pytest.raises(OSError, match="Permission denied") as caught:
        write_h5(tmp_path / "slide.h5", _features(), extra={"phenotype": np.zeros(10)})
    assert "no space" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, where mounting is allowed (root on Linux); skipped elsewhere."""
    import os
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_write_h5_on_a_really_full_disk(tiny_disk):
    from tcssa.io.files import NoSpaceError

    write_h5(tiny_disk / "small.h5", _features())  # fits
    with pytest.raises(NoSpaceError, match=r"no space left writing .*big.h5 \(.*MiB free"):
        write_h5(tiny_disk / "big.h5", _features(n=2000, d=256))  # 2 MB into 1 MiB
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["small.h5"]
    assert read_bag(tiny_disk / "small.h5").num_patches == 10
