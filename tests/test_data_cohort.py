"""Labels CSVs, feature-file resolution and cohorts."""

import logging

import numpy as np
import pytest

from tcssa.data import Cohort, load_class_map, read_labels, resolve_feature_files, write_h5


def _write_csv(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _write_slides(folder, ids, dim=8, ext=".h5"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for slide in ids:
        write_h5(folder / f"{slide}{ext}", rng.normal(size=(5, dim)).astype(np.float32))
    return folder


def test_labels_with_bom_and_string_labels(tmp_path):
    csv = _write_csv(
        tmp_path / "l.csv", "slide_id,label,conch_feature\n007,Tumor,x\n008,Normal,y\n", bom=True
    )
    table = read_labels(csv)
    assert table.slide_ids == ["007", "008"]  # strings, zeros kept
    assert table.class_names == ["Normal", "Tumor"]
    assert table.labels == [1, 0]
    assert table.case_ids is None


def test_integer_labels_sort_numerically(tmp_path):
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,10\nb,2\nc,2\n")
    table = read_labels(csv)
    assert table.class_names == ["2", "10"] and table.labels == [1, 0, 0]


def test_case_ids_and_class_map_round_trip(tmp_path):
    csv = _write_csv(tmp_path / "l.csv", "case_id,slide_id,label\np1,a,1\np1,b,1\np2,c,0\n")
    table = read_labels(csv)
    assert table.case_ids == ["p1", "p1", "p2"]
    saved = table.save_class_map(tmp_path / "run" / "class_map.json")
    assert load_class_map(saved) == ["0", "1"]


def test_class_names_fix_the_order_and_refuse_unknown_labels(tmp_path):
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,Tumor\nb,Tumor\n")
    table = read_labels(csv, class_names=["Tumor", "Normal"])  # one class is fine when the map is given
    assert table.labels == [0, 0] and table.class_names == ["Tumor", "Normal"]
    with pytest.raises(ValueError, match=r"l.csv: labels \['Tumor'\] are not among"):
        read_labels(csv, class_names=["Normal", "Other"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,label\na,x\na,y\nb,x\n", "duplicate slide ids \\(1\\): a"),
        ("slide_id,label\na,x\nb,x\n", "only one class \\('x'\\)"),
        ("slide,label\na,x\n", "missing column\\(s\\) slide_id \\(found: slide, label\\)"),
        ("slide_id,label\na,x\nb,\n", "line 3 has an empty label"),
        ("slide_id,label\n", "no slides listed"),
    ],
)
def test_bad_labels_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=f"bad.csv: {message}"):
        read_labels(_write_csv(tmp_path / "bad.csv", text))


def test_real_label_lists_parse(shared_data):
    for name, classes in [("Camelyon16", ["Normal", "Tumor"]), ("TCGA_NSCLC", ["TCGA-LUAD", "TCGA-LUSC"])]:
        train = read_labels(shared_data / "labels" / f"{name}_train.csv")
        test = read_labels(shared_data / "labels" / f"{name}_test.csv", class_names=train.class_names)
        assert train.class_names == classes
        assert not train.slide_ids[0].startswith("\ufeff")
        assert set(train.labels) == {0, 1} and set(test.labels) == {0, 1}
        assert not set(train.slide_ids) & set(test.slide_ids)
    nsclc = read_labels(shared_data / "labels" / "TCGA_NSCLC_train.csv")
    assert len(nsclc.slide_ids) == 841 and nsclc.labels.count(0) == 432


def test_cohort_from_folder(tmp_path):
    features = _write_slides(tmp_path / "feats", ["007", "008", "009", "extra"])
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label,case_id\n007,a,p1\n008,b,p1\n009,a,p2\n")
    cohort = Cohort.from_folder(features, csv)
    assert cohort.slide_ids == ["007", "008", "009"]
    assert cohort.paths["008"] == features / "008.h5"
    assert cohort.labels == {"007": 0, "008": 1, "009": 0}
    assert cohort.case_ids == {"007": "p1", "008": "p1", "009": "p2"}
    assert cohort.dim == 8 and cohort.num_classes == 2 and cohort.missing == []
    sub = cohort.subset(["009", "007"])
    assert sub.slide_ids == ["009", "007"] and set(sub.paths) == {"007", "009"}
    assert cohort.label_counts() == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="not in the cohort"):
        cohort.subset(["nope"])


def test_missing_slides_are_an_error_listing_them(tmp_path):
    features = _write_slides(tmp_path / "feats", ["a", "b"])
    with pytest.raises(ValueError, match=r"no feature file for 2 of 4 slides: c, d"):
        resolve_feature_files(features, ["a", "b", "c", "d"])


def test_skip_missing_reports_how_many_and_which(tmp_path, caplog):
    features = _write_slides(tmp_path / "feats", ["a", "b", "c"])
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nc,0\nd,1\n")
    with caplog.at_level(logging.WARNING):
        cohort = Cohort.from_folder(features, csv, skip_missing=True)
    assert cohort.slide_ids == ["a", "b", "c"] and cohort.missing == ["d"]
    assert "skipping 1 of 4 slides" in caplog.text and ": d" in caplog.text


def test_slide_ids_with_an_image_extension_get_a_hint(tmp_path):
    features = _write_slides(tmp_path / "feats", ["a", "b"])
    with pytest.raises(ValueError, match="slide-image extension"):
        resolve_feature_files(features, ["a.svs", "b"])


def test_duplicate_stems_across_extensions_are_ambiguous(tmp_path):
    features = _write_slides(tmp_path / "feats", ["a", "b"])
    (features / "a.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"more than one feature file: a: a.h5, a.pt"):
        resolve_feature_files(features, ["a", "b"], skip_missing=True)


def test_feature_dimension_must_agree_across_the_cohort(tmp_path):
    features = _write_slides(tmp_path / "feats", ["a", "b"], dim=8)
    _write_slides(features, ["c"], dim=16)
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nc,0\n")
    with pytest.raises(ValueError, match=r"a.h5 has D=8, but D=16: .*c.h5"):
        Cohort.from_folder(features, csv)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="features folder not found"):
        resolve_feature_files(tmp_path / "nowhere", ["a"])


def test_a_cohort_may_mix_file_formats(tmp_path):
    import torch

    from tcssa.data import BagDataset

    features = tmp_path / "feats"
    _write_slides(features, ["a"])
    torch.save(torch.ones(4, 8), features / "b.pt")
    np.save(features / "c.npy", np.zeros((6, 8), dtype=np.float32))
    (features / "d.csv").write_text(",".join(map(str, range(8))) + "\n" + ",".join(["0.5"] * 8) + "\n")
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nc,0\nd,1\n")
    cohort = Cohort.from_folder(features, csv)
    assert [cohort.paths[s].suffix for s in cohort.slide_ids] == [".h5", ".pt", ".npy", ".csv"]
    dataset = BagDataset(cohort)
    assert [dataset[i][0].num_patches for i in range(4)] == [5, 4, 6, 1]


def test_case_ids_from_tcga_barcodes(tmp_path):
    from tcssa.data import TCGA_CASE_PATTERN

    text = (
        "slide_id,label\nTCGA-50-5055-01Z-00-DX1.0c9d,LUAD\nTCGA-50-5055-01Z-00-DX2.aa1f,LUAD\n"
        "TCGA-MP-A4TA-01Z-00-DX1.11DD,LUSC\n"
    )
    table = read_labels(_write_csv(tmp_path / "l.csv", text), case_id_pattern=TCGA_CASE_PATTERN)
    assert table.case_ids == ["TCGA-50-5055", "TCGA-50-5055", "TCGA-MP-A4TA"]
    bad = _write_csv(tmp_path / "bad.csv", text + "normal_001,LUAD\n")
    with pytest.raises(
        ValueError, match=r"bad.csv: 1 slide id\(s\) do not match the case pattern.*normal_001"
    ):
        read_labels(bad, case_id_pattern=TCGA_CASE_PATTERN)
    both = _write_csv(tmp_path / "both.csv", "slide_id,label,case_id\na,0,p\nb,1,q\n")
    with pytest.raises(ValueError, match="both.csv: has a case_id column"):
        read_labels(both, case_id_pattern=TCGA_CASE_PATTERN)


def test_public_nsclc_split_puts_some_patients_on_both_sides(shared_data):
    """A finding worth knowing: the public TCGA-NSCLC train/test lists share patients."""
    from tcssa.data import TCGA_CASE_PATTERN, Split, check_splits

    tables = {
        part: read_labels(
            shared_data / "labels" / f"TCGA_NSCLC_{part}.csv", case_id_pattern=TCGA_CASE_PATTERN
        )
        for part in ("train", "test")
    }
    shared = set(tables["train"].case_ids) & set(tables["test"].case_ids)
    assert len(shared) == 17
    cases = {s: c for t in tables.values() for s, c in zip(t.slide_ids, t.case_ids, strict=True)}
    split = Split(0, tables["train"].slide_ids, [], tables["test"].slide_ids)
    with pytest.raises(ValueError, match="17 case"):
        check_splits([split], cases)


def test_skip_missing_with_no_slide_left(tmp_path):
    features = _write_slides(tmp_path / "feats", ["x"])
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match="none of the 2 slides has a feature file"):
        Cohort.from_folder(features, csv, skip_missing=True)
