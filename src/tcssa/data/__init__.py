"""Slide data: feature files, labels, cohorts, splits, batches, a synthetic cohort and MIL benchmarks."""

from tcssa.data.classic_mil import BENCHMARK_NAMES, load_benchmark, write_benchmark_cohort
from tcssa.data.cohort import Cohort, resolve_feature_files, validate_cohort
from tcssa.data.dataset import BagBatch, BagDataset, collate_bags
from tcssa.data.labels import TCGA_CASE_PATTERN, LabelTable, load_class_map, read_labels, save_class_map
from tcssa.data.splits import (
    Split,
    check_splits,
    cohort_cases,
    load_splits,
    make_kfold_splits,
    make_train_val_test_split,
    save_splits,
)
from tcssa.data.synthetic import SyntheticCohort, SyntheticConfig, make_synthetic_cohort
from tcssa.io.bag import MAX_FEATURE_MAGNITUDE, Bag
from tcssa.io.features import (
    FEATURE_EXTENSIONS,
    FeatureHeader,
    peek_header,
    peek_shape,
    read_bag,
    scan_values,
    write_h5,
)
from tcssa.io.files import NoSpaceError

__all__ = [
    "BENCHMARK_NAMES",
    "Bag",
    "BagBatch",
    "BagDataset",
    "Cohort",
    "FEATURE_EXTENSIONS",
    "LabelTable",
    "MAX_FEATURE_MAGNITUDE",
    "FeatureHeader",
    "NoSpaceError",
    "TCGA_CASE_PATTERN",
    "Split",
    "SyntheticCohort",
    "SyntheticConfig",
    "check_splits",
    "cohort_cases",
    "load_splits",
    "make_kfold_splits",
    "make_synthetic_cohort",
    "make_train_val_test_split",
    "load_benchmark",
    "write_benchmark_cohort",
    "save_splits",
    "collate_bags",
    "load_class_map",
    "peek_header",
    "peek_shape",
    "read_bag",
    "read_labels",
    "resolve_feature_files",
    "save_class_map",
    "scan_values",
    "validate_cohort",
    "write_h5",
]
