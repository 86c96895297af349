"""Slide data: feature files, labels, cohorts, splits, batches, a synthetic cohort and MIL benchmarks."""

from tcssa.data.bag import Bag
from tcssa.data.cohort import Cohort, resolve_feature_files
from tcssa.data.dataset import BagBatch, BagDataset, collate_bags
from tcssa.data.formats import FEATURE_EXTENSIONS, peek_shape, read_bag, write_h5
from tcssa.data.labels import LabelTable, load_class_map, read_labels, save_class_map

__all__ = [
    "Bag",
    "BagBatch",
    "BagDataset",
    "Cohort",
    "FEATURE_EXTENSIONS",
    "LabelTable",
    "collate_bags",
    "load_class_map",
    "peek_shape",
    "read_bag",
    "read_labels",
    "resolve_feature_files",
    "save_class_map",
    "write_h5",
]
