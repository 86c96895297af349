"""tcssa inspect: a file's description and a folder's table, with unreadable files as error rows."""

import tracemalloc

import numpy as np
import pytest
import torch

from tcssa.cli import main
from tcssa.data.inspection import inspect_folder, summarize_file
from tcssa.io.features import write_h5


def _with_peak_memory(fn, *args):
    """fn(*args) and the peak of Python-tracked memory it allocated (bytes)."""
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _folder(tmp_path):
    folder = tmp_path / "feats"
    rng = np.random.default_rng(0)
    coords = np.array([[0, 512], [256, 768], [1024, 0]])
    write_h5(folder / "a.h5", rng.normal(size=(3, 8)), coords, attrs={"patch_size": 256}, dtype="float16")
    torch.save({"features": torch.ones(5, 8)}, folder / "b.pt")
    np.save(folder / "c.npy", np.ones((7, 4), dtype=np.float32))
    (folder / "d.h5").write_bytes(b"not an h5 file")
    (folder / "notes.txt").write_text("ignored: not a feature file")
    return folder


def test_summarize_file(tmp_path):
    summary = summarize_file(_folder(tmp_path) / "a.h5")
    assert (summary.num_patches, summary.dim, summary.dtype) == (3, 8, "float16")
    assert summary.coords_extent == (0, 0, 1024, 768)
    assert summary.datasets == {"coords": (3, 2), "features": (3, 8)}
    assert summary.attrs == {"patch_size": 256}


def test_inspect_folder_lists_errors_instead_of_crashing(tmp_path):
    summaries = inspect_folder(_folder(tmp_path))
    assert [s.path.name for s in summaries] == ["a.h5", "b.pt", "c.npy", "d.h5"]
    assert [s.error is None for s in summaries] == [True, True, True, False]
    assert "not a readable HDF5 file" in summaries[3].error


def test_inspect_command_on_a_file(tmp_path, capsys):
    assert main(["inspect", str(_folder(tmp_path) / "a.h5")]) == 0
    out = capsys.readouterr().out
    assert "N = 3" in out and "D = 8, stored as float16" in out
    assert "x 0..1024, y 0..768" in out and "patch_size" in out


def test_inspect_command_on_a_folder(tmp_path, capsys):
    assert main(["inspect", str(_folder(tmp_path))]) == 1  # one unreadable file
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and "." in line.split()[0]}
    assert rows["a.h5"].split()[1:5] == ["3", "8", "float16", "yes"]
    assert rows["b.pt"].split()[1:5] == ["5", "8", "float32", "no"]
    assert "ERROR: not a readable HDF5 file" in rows["d.h5"]
    assert "notes.txt" not in out
    assert "4 files: 3 readable, 1 with errors" in out
    assert "feature dimension DIFFERS across files: D=4: 1 files (e.g. c.npy); D=8: 2 files" in out


def test_inspect_command_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.h5").write_bytes(b"junk")
    assert main(["inspect", str(tmp_path / "bad.h5")]) == 2
    assert "bad.h5: not a readable HDF5 file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 0
    assert "no feature files" in capsys.readouterr().out


def test_inspect_reports_the_stored_dtype(tmp_path):
    folder = tmp_path / "ints"
    folder.mkdir()
    np.save(folder / "n.npy", np.arange(12, dtype=np.int64).reshape(3, 4))
    torch.save({"features": torch.arange(12, dtype=torch.int64).reshape(3, 4)}, folder / "t.pt")
    torch.save(torch.ones(3, 4, dtype=torch.bfloat16), folder / "b.pt")
    write_h5(folder / "h.h5", np.arange(12, dtype=np.int64).reshape(3, 4))
    dtypes = {s.path.name: s.dtype for s in inspect_folder(folder)}
    assert dtypes == {"n.npy": "int64", "t.pt": "int64", "b.pt": "bfloat16", "h.h5": "int64"}


def test_inspect_of_an_h5_claiming_25_gb_reads_only_its_header(tmp_path):
    import h5py

    path = tmp_path / "claims.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(6_000_000, 1024), dtype="float32")  # 24.6 GB, never written
    summaries, peak = _with_peak_memory(inspect_folder, tmp_path)
    assert peak < 50 * 2**20
    assert summaries[0].error.startswith("features 6000000x1024 float32 (24.6 GB) is declared but its data")


def test_inspect_of_a_large_file_checks_a_bounded_sample(tmp_path, monkeypatch, capsys):
    import h5py

    from tcssa.data import inspection

    monkeypatch.setattr(inspection, "INSPECT_READ_BYTES", 2**20)  # "large" = over 1 MiB here
    monkeypatch.setattr(inspection, "INSPECT_SAMPLE_BYTES", 2**18)
    features = np.random.default_rng(0).normal(size=(40_000, 64)).astype(np.float32)  # 10 MiB
    coords = np.stack([np.arange(40_000) * 256, np.zeros(40_000)], axis=1)
    path = write_h5(tmp_path / "big.h5", features, coords, attrs={"patch_size": 256})
    summary, peak = _with_peak_memory(summarize_file, path)
    assert peak < 4 * 2**20  # far less than the 10 MiB of features
    assert (summary.num_patches, summary.dim, summary.dtype) == (40_000, 64, "float32")
    assert summary.sampled and 0 < summary.rows_checked <= 2**18 // (64 * 4)
    assert summary.attrs == {"patch_size": 256} and summary.datasets["features"] == (40_000, 64)
    x0, _, x1, _ = summary.coords_extent
    assert x0 == 0 and x1 == 39_999 * 256  # the sample includes the start and the end
    assert main(["inspect", str(path)]) == 0
    assert "checked on a sample of 1,023 of 40,000 rows" in capsys.readouterr().out
    with h5py.File(path, "r+") as f:  # write_h5 refuses NaN; damage the file in place
        f["features"][39_990, 5] = np.nan  # in the last rows, which the sample covers
    path.rename(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match=r"bad.h5: features contain NaN or Inf in 1 of 40000 patches.*39990"):
        summarize_file(tmp_path / "bad.h5")
