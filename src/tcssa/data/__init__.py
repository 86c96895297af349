"""Slide data: labels, cohorts, splits, datasets and batches, a synthetic cohort, classic MIL data sets.

Feature files themselves (``Bag``, ``read_bag``, ``write_h5``, ...) are read and written by ``tcssa.io``.
"""

from tcssa.data.classic_mil import BENCHMARK_NAMES, load_benchmark, write_benchmark_cohort
from tcssa.data.cohort import Cohort, resolve_feature_files, validate_cohort
from tcssa.data.dataset import BagBatch, BagDataset, collate_bags, pooled_patches
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

__all__ = [
    "BENCHMARK_NAMES",
    "BagBatch",
    "BagDataset",
    "Cohort",
    "LabelTable",
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
    "pooled_patches",
    "load_class_map",
    "read_labels",
    "resolve_feature_files",
    "save_class_map",
    "validate_cohort",
]
