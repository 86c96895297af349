"""Patient-level splits: stratified by label, grouped by case, deterministic by seed, saved as CSV.

The splits CSV has one row per slide and fold, so it diffs line by line and can be committed:

    fold,split,slide_id
    0,train,slide_0001
    0,val,slide_0007
    0,test,slide_0003
    1,train,...

``split`` is ``train``, ``val`` or ``test``; rows are ordered by fold, then split, then slide id.

Cases (patients) come from the labels' ``case_id`` column; without one, a slide id that is a TCGA
barcode belongs to its patient (``TCGA_CASE_PATTERN``, e.g. TCGA-50-5055), and any other slide
is its own case. No case may have slides on two sides of one fold, in made or loaded splits.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tcssa.data.cohort import Cohort
from tcssa.data.labels import TCGA_CASE_PATTERN
from tcssa.io.files import read_text

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """One fold: disjoint train, val and test slide ids.

    ``left_out``: slides of the cohort in none of the three parts; ``load_splits(path, cohort)``
    fills it (and logs a warning) so a run can record them. It takes no part in equality.
    """

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    left_out: list[str] = field(default_factory=list, compare=False)

    def parts(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def cases_from_slide_ids(slide_ids: Iterable[str]) -> dict[str, str]:
    """Each slide's case when nothing else says: the patient of a TCGA barcode, else the slide."""
    pattern = re.compile(TCGA_CASE_PATTERN)
    cases = {}
    for slide in slide_ids:
        match = pattern.match(slide)
        cases[slide] = match.group(1) if match else slide
    return cases


def cohort_cases(cohort: Cohort) -> dict[str, str]:
    """The case of every slide of ``cohort``: its ``case_ids`` when the labels had them, else
    ``cases_from_slide_ids`` (TCGA barcodes grouped by patient, other slides alone)."""
    if cohort.case_ids is not None:
        return dict(cohort.case_ids)
    return cases_from_slide_ids(cohort.slide_ids)


def _groups(cohort: Cohort, slide_ids: list[str]) -> np.ndarray:
    """The case of each slide (see ``cohort_cases``)."""
    cases = cohort_cases(cohort)
    return np.array([cases[s] for s in slide_ids])


def _per_class(
    labels: np.ndarray, groups: np.ndarray, class_names: list[str] | None
) -> dict[str, tuple[int, int]]:
    """class name -> (cases, slides)."""
    cases: dict[int, set] = defaultdict(set)
    slides: Counter = Counter()
    for label, group in zip(labels.tolist(), groups.tolist(), strict=True):
        cases[label].add(group)
        slides[label] += 1
    name = lambda c: class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
    return {name(c): (len(cases[c]), slides[c]) for c in sorted(cases)}


def _counts_text(per_class: dict[str, tuple[int, int]], grouped: bool) -> str:
    if grouped:
        return ", ".join(f"{name} {cases} ({slides} slides)" for name, (cases, slides) in per_class.items())
    return ", ".join(f"{name} {slides}" for name, (_, slides) in per_class.items())


def _grouped_folds(
    slide_ids,
    labels,
    groups,
    folds: int,
    seed: int,
    what: str,
    *,
    class_names: list[str] | None = None,
    every_class_in_each_fold: bool = False,
):
    """StratifiedGroupKFold with the errors a user can act on.

    ``every_class_in_each_fold``: each of the ``folds`` held-out parts must get at least one case
    of every class (k-fold test parts: a test set without a class has no AUC), so every class
    needs at least ``folds`` cases; otherwise the error says how many each class has.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # heavy import, only when splitting

    distinct = len(set(groups.tolist()))
    grouped = distinct < len(slide_ids)
    unit = "cases" if grouped else "slides"
    per_class = _per_class(labels, groups, class_names)
    if distinct < folds:
        raise ValueError(
            f"{what}: {folds} folds need at least {folds} cases, got {distinct} "
            f"({unit} per class: {_counts_text(per_class, grouped)})"
        )
    if every_class_in_each_fold:
        short = {name: n for name, (n, _) in per_class.items() if n < folds}
        if short:
            fewest = min(n for n, _ in per_class.values())
            advice = (
                f"use at most {fewest} folds, or add {unit}"
                if fewest >= 2
                else f"a class with fewer than 2 {unit} cannot be both trained and tested on"
            )
            raise ValueError(
                f"{what}: {folds} folds need at least {folds} {unit} of every class (each fold's test "
                f"part needs one {unit[:-1]} of each class), but "
                + ", ".join(f"{name} has {n}" for name, n in short.items())
                + f"; {unit} per class: {_counts_text(per_class, grouped)}. {advice[0].upper()}{advice[1:]}."
            )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer cases than folds; the split is still valid and
        # the small class simply misses some folds, which check_splits / the caller can see
        warnings.simplefilter("ignore", UserWarning)
        try:
            return list(splitter.split(np.zeros(len(slide_ids)), labels, groups))
        except ValueError as err:  # e.g. every class smaller than the number of parts
            raise ValueError(
                f"{what}: cannot cut {folds} stratified parts from {distinct} {unit} "
                f"({unit} per class: {_counts_text(per_class, grouped)}); use fewer folds, a larger "
                f"val_fraction (fewer validation parts) or val_fraction=0 (scikit-learn: {err})"
            ) from err


def _carve_val(
    cohort: Cohort, train: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Take about ``val_fraction`` of ``train`` (whole cases, stratified) as validation."""
    if val_fraction <= 0:
        return train, []
    groups = _groups(cohort, train)
    parts = max(2, int(round(1 / val_fraction)))
    cases = len(set(groups.tolist()))
    labels = np.array([cohort.labels[s] for s in train])
    if cases < parts:
        grouped = cases < len(train)
        raise ValueError(
            f"val_fraction={val_fraction} needs at least {parts} training cases, got {cases} "
            f"({'cases' if grouped else 'slides'} per class in this training part: "
            f"{_counts_text(_per_class(labels, groups, cohort.class_names), grouped)}); "
            "use a larger val_fraction, fewer folds, or val_fraction=0"
        )
    fit, held = _grouped_folds(
        train, labels, groups, parts, seed, "validation split", class_names=cohort.class_names
    )[0]
    return [train[i] for i in fit], [train[i] for i in held]


def make_kfold_splits(
    cohort: Cohort, folds: int = 5, seed: int = 0, val_fraction: float = 0.15
) -> list[Split]:
    """``folds`` folds whose test parts partition the cohort; val carved from each fold's train.

    Stratified by label and grouped by case (``cohort_cases``: the ``case_id`` column, else TCGA
    barcodes; a patient's slides are never on two sides), with scikit-learn's
    StratifiedGroupKFold. Every class needs at least ``folds`` cases, so that each test part has
    one of each; the error otherwise gives the counts. The same cohort and seed always give the
    same splits.
    """
    return _kfold(cohort, folds, seed, val_fraction, every_class_in_each_fold=True)


def _kfold(
    cohort: Cohort, folds: int, seed: int, val_fraction: float, *, every_class_in_each_fold: bool
) -> list[Split]:
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    slide_ids = sorted(cohort.slide_ids)  # independent of the labels file's row order
    labels = np.array([cohort.labels[s] for s in slide_ids])
    parts = _grouped_folds(
        slide_ids,
        labels,
        _groups(cohort, slide_ids),
        folds,
        seed,
        "k-fold split",
        class_names=cohort.class_names,
        every_class_in_each_fold=every_class_in_each_fold,
    )
    splits = []
    for fold, (train_idx, test_idx) in enumerate(parts):
        train, val = _carve_val(cohort, [slide_ids[i] for i in train_idx], val_fraction, seed + fold)
        splits.append(Split(fold, sorted(train), sorted(val), sorted(slide_ids[i] for i in test_idx)))
    check_splits(splits, cohort_cases(cohort))
    return splits


def make_train_val_test_split(
    cohort: Cohort, test_fraction: float = 0.2, val_fraction: float = 0.15, seed: int = 0
) -> Split:
    """One split: about ``test_fraction`` of cases for test, ``val_fraction`` of the rest for val."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    folds = max(2, int(round(1 / test_fraction)))
    # only the first of the folds is used, so a class need not have a case for each of them
    return _kfold(cohort, folds, seed, val_fraction, every_class_in_each_fold=False)[0]


def check_splits(splits: list[Split], case_ids: dict[str, str] | None = None) -> None:
    """Raise ValueError if a slide, or a case's slides, sit on two sides of one fold.

    ``case_ids`` maps slides to cases (a slide it lacks is its own case); the error names the
    fold, each leaking case and its slides on every side, e.g.
    ``fold 0: 1 case(s) have slides on more than one side: p1 (train: p1_a; test: p1_b)``.
    """
    for split in splits:
        seen: dict[str, str] = {}
        for name, ids in split.parts().items():
            for slide in ids:
                if slide in seen:
                    raise ValueError(f"fold {split.fold}: slide {slide} is in both {seen[slide]} and {name}")
                seen[slide] = name
        if case_ids is None:
            continue
        sides: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for slide, name in seen.items():
            sides[case_ids.get(slide, slide)][name].append(slide)
        leaks = sorted(case for case, names in sides.items() if len(names) > 1)
        if leaks:
            raise ValueError(
                f"fold {split.fold}: {len(leaks)} case(s) have slides on more than one side: "
                + ", ".join(f"{case} ({_sides_text(sides[case])})" for case in leaks[:10])
                + (f", ... ({len(leaks) - 10} more)" if len(leaks) > 10 else "")
                + ". A patient's slides must stay on one side (train, val or test) of each fold."
            )


def _sides_text(sides: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(sorted(sides[name]))}" for name in SPLIT_NAMES if name in sides)


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


def load_splits(path: str | Path, cohort: Cohort | None = None) -> list[Split]:
    """Read a splits CSV written by ``save_splits`` (BOM tolerated; other bytes that are not
    UTF-8 are an error naming the line); checks it for overlaps.

    A slide on two sides of a fold is an error, and so is a case with slides on two sides: cases
    from ``cohort`` (``cohort_cases``: its case_id column, else TCGA barcodes), or without a cohort
    from the TCGA barcodes among the file's slide ids. With ``cohort``, labelled slides that a fold
    lists nowhere are logged as a warning (count and first ids) and kept in each ``Split.left_out``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file not found: {path}")
    parts: dict[int, dict[str, list[str]]] = defaultdict(lambda: {name: [] for name in SPLIT_NAMES})
    with io.StringIO(read_text(path), newline="") as handle:
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
    listed = {slide for split in splits for ids in split.parts().values() for slide in ids}
    cases = cohort_cases(cohort) if cohort is not None else {}
    cases.update(cases_from_slide_ids(listed - set(cases)))  # slides the cohort does not know
    try:
        check_splits(splits, cases)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if cohort is not None:
        _note_left_out(path, splits, cohort)
    return splits


def _note_left_out(path: Path, splits: list[Split], cohort: Cohort) -> None:
    """Fill ``Split.left_out`` and warn (count, first ids, which folds) about cohort slides a fold
    does not list: they would silently take no part in that fold."""
    left: dict[str, list[int]] = defaultdict(list)
    for split in splits:
        listed = {slide for ids in split.parts().values() for slide in ids}
        split.left_out = [s for s in cohort.slide_ids if s not in listed]
        for slide in split.left_out:
            left[slide].append(split.fold)
    if not left:
        return
    ids = list(left)
    every = all(len(folds) == len(splits) for folds in left.values())
    folds = sorted({f for fs in left.values() for f in fs})
    where = f"any of its {len(splits)} fold(s)" if every else f"fold(s) {', '.join(map(str, folds))}"
    log.warning(
        "%s: %d of %d labelled slides with feature files are not listed in %s and take no part in it: %s",
        path,
        len(ids),
        len(cohort.slide_ids),
        where,
        ", ".join(ids[:10]) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else ""),
    )
