"""Patient-level splits: stratified, grouped by case, deterministic, and saved as diffable CSV."""

import random
from collections import Counter
from pathlib import Path

import pytest

from tcssa.data import (
    Cohort,
    Split,
    check_splits,
    load_splits,
    make_kfold_splits,
    make_train_val_test_split,
    save_splits,
)


def _cohort(num_cases=60, with_cases=True, seed=0):
    """Cases with 1-3 slides each; label per case, 1/3 positive."""
    rng = random.Random(seed)
    slide_ids, labels, cases = [], {}, {}
    for case in range(num_cases):
        for k in range(rng.choice([1, 1, 2, 3])):
            slide = f"c{case:03d}_s{k}"
            slide_ids.append(slide)
            labels[slide] = int(case % 3 == 0)
            cases[slide] = f"c{case:03d}"
    return Cohort(
        slide_ids=slide_ids,
        paths={s: Path(f"{s}.h5") for s in slide_ids},
        labels=labels,
        class_names=["neg", "pos"],
        case_ids=cases if with_cases else None,
    )


def _sides_per_case(split, cohort):
    sides = {}
    for name, ids in split.parts().items():
        for slide in ids:
            sides.setdefault(cohort.case_ids[slide], set()).add(name)
    return sides


def test_kfold_test_parts_partition_the_cohort_and_no_patient_spans_two_sides():
    cohort = _cohort()
    splits = make_kfold_splits(cohort, folds=5, seed=0)
    assert [s.fold for s in splits] == [0, 1, 2, 3, 4]
    tested = Counter(slide for s in splits for slide in s.test)
    assert set(tested) == set(cohort.slide_ids) and set(tested.values()) == {1}
    for split in splits:
        assert sorted(split.train + split.val + split.test) == sorted(cohort.slide_ids)
        assert all(len(sides) == 1 for sides in _sides_per_case(split, cohort).values())
        assert split.val, "validation carved from train"


def test_folds_are_stratified_and_val_is_about_the_asked_share():
    cohort = _cohort(num_cases=150)
    overall = sum(cohort.labels.values()) / len(cohort.slide_ids)
    for split in make_kfold_splits(cohort, folds=5, seed=1, val_fraction=0.15):
        share = sum(cohort.labels[s] for s in split.test) / len(split.test)
        assert abs(share - overall) < 0.1
        assert 0.08 < len(split.val) / (len(split.train) + len(split.val)) < 0.22
        assert {cohort.labels[s] for s in split.val} == {0, 1}


def test_splits_are_deterministic_by_seed_and_ignore_row_order():
    cohort = _cohort()
    first = make_kfold_splits(cohort, seed=7)
    assert make_kfold_splits(cohort, seed=7) == first
    shuffled = cohort.subset(list(reversed(cohort.slide_ids)))
    assert make_kfold_splits(shuffled, seed=7) == first
    assert make_kfold_splits(cohort, seed=8) != first


def test_without_case_ids_each_slide_is_its_own_group():
    cohort = _cohort(with_cases=False)
    splits = make_kfold_splits(cohort, folds=3, val_fraction=0)
    assert all(s.val == [] for s in splits)
    assert sum(len(s.test) for s in splits) == len(cohort.slide_ids)


def test_train_val_test_split():
    cohort = _cohort(num_cases=100)
    split = make_train_val_test_split(cohort, test_fraction=0.25, val_fraction=0.2, seed=0)
    assert 0.18 < len(split.test) / len(cohort.slide_ids) < 0.32
    assert all(len(sides) == 1 for sides in _sides_per_case(split, cohort).values())


def test_save_and_load_round_trip(tmp_path):
    splits = make_kfold_splits(_cohort(), folds=3, seed=0)
    path = save_splits(splits, tmp_path / "splits.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "fold,split,slide_id"
    assert lines[1].startswith("0,train,")
    assert len(lines) == 1 + sum(len(s.train) + len(s.val) + len(s.test) for s in splits)
    assert load_splits(path) == splits
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM from a spreadsheet round trip
    assert load_splits(path) == splits


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,fold,split\na,0,train\n", "expected columns fold,split,slide_id"),
        ("fold,split,slide_id\n0,training,a\n", "line 2: split must be train, val or test"),
        ("fold,split,slide_id\nx,train,a\n", "line 2: fold must be an integer"),
        ("fold,split,slide_id\n0,train,a\n0,test,a\n", "slide a is in both train and test"),
        ("fold,split,slide_id\n", "no splits listed"),
    ],
)
def test_bad_splits_files(tmp_path, text, message):
    path = tmp_path / "bad_splits.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad_splits.csv.*{message}"):
        load_splits(path)


def test_check_splits_catches_a_patient_on_both_sides():
    leaky = [Split(0, train=["p1_a", "p2_a"], val=[], test=["p1_b"])]
    cases = {"p1_a": "p1", "p1_b": "p1", "p2_a": "p2"}
    with pytest.raises(ValueError, match=r"fold 0: 1 case\(s\) have slides on more than one side: p1"):
        check_splits(leaky, cases)
    check_splits(leaky)  # without case ids only slide overlaps count


def test_too_few_cases_and_bad_arguments():
    cohort = _cohort(num_cases=4)
    with pytest.raises(ValueError, match="5 folds need at least 5 cases, got 4"):
        make_kfold_splits(cohort, folds=5)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        make_kfold_splits(cohort, folds=1)
    with pytest.raises(ValueError, match="val_fraction"):
        make_kfold_splits(cohort, folds=2, val_fraction=1.0)


# ------------------------------------------------------------------ split files against the cohort


def _write_splits(path, rows):
    path.write_text("fold,split,slide_id\n" + "".join(f"{f},{part},{s}\n" for f, part, s in rows))
    return path


def test_a_split_file_with_a_patient_on_both_sides_is_refused(tmp_path):
    cohort = Cohort(
        slide_ids=["p1_a", "p1_b", "p2_a", "p3_a"],
        paths={},
        labels={"p1_a": 0, "p1_b": 0, "p2_a": 1, "p3_a": 1},
        class_names=["neg", "pos"],
        case_ids={"p1_a": "p1", "p1_b": "p1", "p2_a": "p2", "p3_a": "p3"},
    )
    path = _write_splits(
        tmp_path / "leaky.csv",
        [(0, "train", "p1_a"), (0, "train", "p1_b"), (0, "train", "p2_a"), (0, "test", "p3_a")]  # fine
        + [(1, "train", "p1_a"), (1, "train", "p3_a"), (1, "val", "p2_a"), (1, "test", "p1_b")],  # p1 leaks
    )
    with pytest.raises(
        ValueError,
        match=r"leaky.csv: fold 1: 1 case\(s\) have slides on more than one side: "
        r"p1 \(train: p1_a; test: p1_b\)",
    ):
        load_splits(path, cohort)
    assert len(load_splits(path)) == 2  # without the cohort the case ids are unknown


def test_a_split_file_with_a_tcga_patient_on_both_sides_is_refused_without_case_ids(tmp_path):
    a, b = "TCGA-50-5055-01Z-00-DX1.0c9d", "TCGA-50-5055-01Z-00-DX2.aa1f"
    path = _write_splits(
        tmp_path / "tcga.csv", [(0, "train", a), (0, "val", b), (0, "test", "TCGA-MP-A4TA-01Z")]
    )
    with pytest.raises(
        ValueError, match=rf"tcga.csv: fold 0: 1 case\(s\) .*TCGA-50-5055 \(train: {a}; val: {b}\)"
    ):
        load_splits(path)  # TCGA barcodes name their patient


def test_kfold_groups_tcga_barcodes_by_patient_without_a_case_column():
    slide_ids, labels = [], {}
    for patient in range(20):
        for k in range(2):
            slide = f"TCGA-AA-{patient:04d}-01Z-00-DX{k + 1}"
            slide_ids.append(slide)
            labels[slide] = patient % 2
    cohort = Cohort(slide_ids, {}, labels, ["a", "b"])
    for split in make_kfold_splits(cohort, folds=4, seed=0, val_fraction=0.25):
        sides = {}
        for name, ids in split.parts().items():
            for slide in ids:
                sides.setdefault(slide[:12], set()).add(name)
        assert all(len(s) == 1 for s in sides.values())


def test_labelled_slides_left_out_of_a_split_file_are_reported(tmp_path, caplog):
    import logging

    cohort = _cohort(num_cases=20)
    splits = make_kfold_splits(cohort, folds=3, seed=0, val_fraction=0)
    kept = set(cohort.slide_ids) - {"c003_s0", "c007_s0"}
    for split in splits:
        split.train, split.test = [s for s in split.train if s in kept], [s for s in split.test if s in kept]
    path = save_splits(splits, tmp_path / "partial.csv")
    with caplog.at_level(logging.WARNING, logger="tcssa.data.splits"):
        loaded = load_splits(path, cohort)
    assert loaded == splits
    assert [s.left_out for s in loaded] == [["c003_s0", "c007_s0"]] * 3
    assert f"partial.csv: 2 of {len(cohort.slide_ids)} labelled slides" in caplog.text
    assert "not listed in any of its 3 fold(s)" in caplog.text and "c003_s0, c007_s0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert all(
            s.left_out == [] for s in load_splits(save_splits(make_kfold_splits(cohort, 3), path), cohort)
        )
    assert caplog.text == ""


def test_non_utf8_split_file_names_the_line(tmp_path):
    path = tmp_path / "cp1252.csv"
    path.write_bytes(b"fold,split,slide_id\n0,train,a\n0,test,caf\xe9\n")
    with pytest.raises(
        ValueError, match=r"cp1252.csv: line 3 \(byte 11 of the line\) has bytes b'\\xe9' that are not UTF-8"
    ):
        load_splits(path)


def test_a_class_with_fewer_cases_than_folds_says_what_each_class_has():
    cohort = _cohort(num_cases=60)
    rare = sorted({c for s, c in cohort.case_ids.items() if cohort.labels[s] == 1})[:3]
    slides = [s for s in cohort.slide_ids if cohort.labels[s] == 0 or cohort.case_ids[s] in rare]
    small = cohort.subset(slides)
    positives = sum(small.labels[s] for s in slides)
    with pytest.raises(
        ValueError,
        match=rf"k-fold split: 5 folds need at least 5 cases of every class .* but pos has 3; "
        rf"cases per class: neg 40 \(\d+ slides\), pos 3 \({positives} slides\)\. Use at most 3 folds",
    ):
        make_kfold_splits(small, folds=5)
    assert len(make_kfold_splits(small, folds=3, val_fraction=0)) == 3
    without_cases = Cohort(["a", "b", "c", "d"], {}, {"a": 0, "b": 0, "c": 0, "d": 1}, ["neg", "pos"])
    with pytest.raises(
        ValueError, match=r"slides per class: neg 3, pos 1\. A class with fewer than 2 slides"
    ):
        make_kfold_splits(without_cases, folds=2, val_fraction=0)


def test_a_validation_carve_too_fine_for_the_training_part_says_so_not_sklearn():
    # 12 one-slide cases, 6 per class: 3 folds leave 8 training slides (4 per class), which a
    # val_fraction of 0.15 (7 parts) cannot stratify
    slide_ids = [f"s{i}" for i in range(12)]
    cohort = Cohort(
        slide_ids=slide_ids,
        paths={s: Path(f"{s}.h5") for s in slide_ids},
        labels={s: int(i >= 6) for i, s in enumerate(slide_ids)},
        class_names=["neg", "pos"],
    )
    with pytest.raises(
        ValueError, match=r"validation split: cannot cut 7 stratified parts from 8 slides"
    ) as err:
        make_kfold_splits(cohort, folds=3, val_fraction=0.15)
    assert "neg 4, pos 4" in str(err.value) and "val_fraction=0" in str(err.value)
    assert len(make_kfold_splits(cohort, folds=3, val_fraction=0)) == 3
