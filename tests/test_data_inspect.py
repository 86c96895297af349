"""tcssa inspect: a file's description and a folder's table, with unreadable files as error rows."""

import numpy as np
import torch

from tcssa.cli import main
from tcssa.data import write_h5
from tcssa.data.inspection import inspect_folder, summarize_file


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
