"""Patient-level splits: stratified by label, grouped by case, deterministic by seed, saved as CSV.

The splits CSV has one row per slide and fold, so it diffs line by line and can be committed:

    fold,split,slide_id
    0,train,slide_0001
    0,val,slide_0007
    0,test,slide_0003
    1,train,...

``split`` is ``train``, ``val`` or ``test``; rows are ordered by fold, then split, then slide id.
"""

from __future__ import annotations

import csv
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tcssa.data.cohort import Cohort

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """One fold: disjoint train, val and test slide ids."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    def parts(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _groups(cohort: Cohort, slide_ids: list[str]) -> np.ndarray:
    """The case of each slide; a slide without a case id is its own case."""
    if cohort.case_ids is None:
        return np.array(slide_ids)
    return np.array([cohort.case_ids[s] for s in slide_ids])


def _grouped_folds(slide_ids, labels, groups, folds: int, seed: int, what: str):
    """StratifiedGroupKFold with the errors a user can act on."""
    from sklearn.model_selection import StratifiedGroupKFold  # heavy import, only when splitting

    distinct = len(set(groups.tolist()))
    if distinct < folds:
        raise ValueError(f"{what}: {folds} folds need at least {folds} cases, got {distinct}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer cases than folds; the split is still valid and
        # the small class simply misses some folds, which check_splits / the caller can see
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(slide_ids)), labels, groups))


def _carve_val(
    cohort: Cohort, train: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Take about ``val_fraction`` of ``train`` (whole cases, stratified) as validation."""
    if val_fraction <= 0:
        return train, []
    groups = _groups(cohort, train)
    parts = max(2, int(round(1 / val_fraction)))
    cases = len(set(groups.tolist()))
    if cases < parts:
        raise ValueError(f"val_fraction={val_fraction} needs at least {parts} training cases, got {cases}")
    labels = np.array([cohort.labels[s] for s in train])
    fit, held = _grouped_folds(train, labels, groups, parts, seed, "validation split")[0]
    return [train[i] for i in fit], [train[i] for i in held]


def make_kfold_splits(
    cohort: Cohort, folds: int = 5, seed: int = 0, val_fraction: float = 0.15
) -> list[Split]:
    """``folds`` folds whose test parts partition the cohort; val carved from each fold's train.

    Stratified by label and grouped by ``case_id`` when the cohort has one (a patient's slides are
    never on two sides), with scikit-learn's StratifiedGroupKFold. The same cohort and seed always
    give the same splits.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    slide_ids = sorted(cohort.slide_ids)  # independent of the labels file's row order
    labels = np.array([cohort.labels[s] for s in slide_ids])
    splits = []
    for fold, (train_idx, test_idx) in enumerate(
        _grouped_folds(slide_ids, labels, _groups(cohort, slide_ids), folds, seed, "k-fold split")
    ):
        train, val = _carve_val(cohort, [slide_ids[i] for i in train_idx], val_fraction, seed + fold)
        splits.append(Split(fold, sorted(train), sorted(val), sorted(slide_ids[i] for i in test_idx)))
    check_splits(splits, cohort.case_ids)
    return splits


def make_train_val_test_split(
    cohort: Cohort, test_fraction: float = 0.2, val_fraction: float = 0.15, seed: int = 0
) -> Split:
    """One split: about ``test_fraction`` of cases for test, ``val_fraction`` of the rest for val."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    folds = max(2, int(round(1 / test_fraction)))
    return make_kfold_splits(cohort, folds=folds, seed=seed, val_fraction=val_fraction)[0]


def check_splits(splits: list[Split], case_ids: dict[str, str] | None = None) -> None:
    """Raise ValueError if a slide, or a case's slides, sit on two sides of one fold."""
    for split in splits:
        seen: dict[str, str] = {}
        for name, ids in split.parts().items():
            for slide in ids:
                if slide in seen:
                    raise ValueError(f"fold {split.fold}: slide {slide} is in both {seen[slide]} and {name}")
                seen[slide] = name
        if case_ids is None:
            continue
        sides: dict[str, set[str]] = defaultdict(set)
        for slide, name in seen.items():
            sides[case_ids.get(slide, slide)].add(name)
        leaks = sorted(case for case, names in sides.items() if len(names) > 1)
        if leaks:
            raise ValueError(
                f"fold {split.fold}: {len(leaks)} case(s) have slides on more than one side: "
                + ", ".join(leaks[:10])
            )


def save_splits(splits: list[Split], path: str | Path) -> Path:
    """Write the splits as ``fold,split,slide_id`` rows (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fold", "split", "slide_id"])
        for split in sorted(splits, key=lambda s: s.fold):
            for name, ids in split.parts().items():
                writer.writerows([split.fold, name, slide] for slide in sorted(ids))
    return path


def load_splits(path: str | Path) -> list[Split]:
    """Read a splits CSV written by ``save_splits`` (BOM tolerated); checks it for overlaps."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file not found: {path}")
    parts: dict[int, dict[str, list[str]]] = defaultdict(lambda: {name: [] for name in SPLIT_NAMES})
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if columns[:3] != ["fold", "split", "slide_id"]:
            raise ValueError(
                f"{path}: expected columns fold,split,slide_id, found {','.join(columns) or 'nothing'}"
            )
        reader.fieldnames = columns
        for line, row in enumerate(reader, start=2):
            fold_text, name, slide = ((row.get(c) or "").strip() for c in ("fold", "split", "slide_id"))
            if name not in SPLIT_NAMES:
                raise ValueError(f"{path}: line {line}: split must be train, val or test, got {name!r}")
            try:
                fold = int(fold_text)
            except ValueError:
                raise ValueError(f"{path}: line {line}: fold must be an integer, got {fold_text!r}") from None
            if not slide:
                raise ValueError(f"{path}: line {line}: empty slide_id")
            parts[fold][name].append(slide)
    if not parts:
        raise ValueError(f"{path}: no splits listed")
    splits = [Split(fold, p["train"], p["val"], p["test"]) for fold, p in sorted(parts.items())]
    try:
        check_splits(splits)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return splits
