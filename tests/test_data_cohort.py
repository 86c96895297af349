"""Labels CSVs, feature-file resolution and cohorts."""

import logging
import re

import numpy as np
import pytest
import torch

from tcssa.data import Cohort, load_class_map, read_labels, resolve_feature_files
from tcssa.io.features import write_h5


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


# ------------------------------------------------------------------ near-duplicate classes, encodings


@pytest.mark.parametrize(
    "labels, first, second",
    [
        (["Positive", "negative", "positive"], "'Positive' (line 2)", "'positive' (line 4)"),
        (["Tumor", "Normal", "Tu mor"], "'Tumor' (line 2)", "'Tu mor' (line 4)"),
        (["1", "0", "1.0"], "'1' (line 2)", "'1.0' (line 4)"),
        (["0", "01", "1"], "'01' (line 3)", "'1' (line 4)"),
    ],
)
def test_near_duplicate_class_names_are_refused_naming_both_spellings(tmp_path, labels, first, second):
    rows = "".join(f"s{i},{label}\n" for i, label in enumerate(labels))
    csv = _write_csv(tmp_path / "spelling.csv", "slide_id,label\n" + rows)
    with pytest.raises(
        ValueError,
        match=rf"spelling.csv: labels that differ only in .*{re.escape(first)} and {re.escape(second)}",
    ):
        read_labels(csv)


def test_a_label_spelled_unlike_the_class_map_gets_a_hint(tmp_path):
    csv = _write_csv(tmp_path / "test.csv", "slide_id,label\na,Positive\nb,negative\n")
    with pytest.raises(
        ValueError, match=r"test.csv: labels \['Positive'\] .*'Positive' looks like 'positive'"
    ):
        read_labels(csv, class_names=["negative", "positive"])


def test_non_utf8_labels_name_the_file_and_line(tmp_path):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("slide_id,label\na,Tumor\nb,Normal\nc,Läsion\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"latin1.csv: line 4 \(byte 4 of the line\) has bytes b'\\xe4' that are not UTF-8"
    ):
        read_labels(csv)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("slide_id,label\na,x\nb,y\n".encode("utf-16"))
    with pytest.raises(ValueError, match="utf16.csv: is UTF-16 text"):
        read_labels(utf16)
    ok = _write_csv(tmp_path / "bom.csv", "slide_id,label\na,Läsion\nb,Normal\n", bom=True)  # BOM: still fine
    assert read_labels(ok).class_names == ["Läsion", "Normal"]


# ------------------------------------------------------------------ unlabelled files, validate_cohort


def test_feature_files_without_a_label_row_are_reported(tmp_path, caplog):
    features = _write_slides(tmp_path / "feats", ["a", "b", "c", "x1", "x2"])
    np.save(features / "x3.npy", np.ones((2, 8), dtype=np.float32))
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nc,0\n")
    with caplog.at_level(logging.WARNING, logger="tcssa.data.cohort"):
        cohort = Cohort.from_folder(features, csv)
    assert cohort.slide_ids == ["a", "b", "c"]
    assert cohort.unlabelled == ["x1.h5", "x2.h5", "x3.npy"]
    assert "3 feature file(s) in" in caplog.text and "have no row in" in caplog.text
    assert "l.csv" in caplog.text and "x1.h5, x2.h5, x3.npy" in caplog.text
    assert cohort.subset(["a"]).unlabelled == cohort.unlabelled


def test_no_note_when_every_file_is_labelled(tmp_path, caplog):
    features = _write_slides(tmp_path / "feats", ["a", "b"])
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\n")
    with caplog.at_level(logging.WARNING):
        assert Cohort.from_folder(features, csv).unlabelled == []
    assert "no row in" not in caplog.text


def _damage(features):
    """One bad file of each kind beside good ones; returns the bad names."""
    import h5py

    with h5py.File(features / "nan.h5", "r+") as f:
        f["features"][2, 3] = np.nan
    with h5py.File(features / "huge.h5", "r+") as f:
        f["features"][4, 0] = 3e38
    (features / "junk.h5").write_bytes(b"not hdf5")
    with h5py.File(features / "unwritten.h5", "w") as f:
        f.create_dataset("features", shape=(1000, 8), dtype="float32")
    np.save(features / "inf.npy", np.array([[1.0] * 8, [np.inf] * 8], dtype=np.float32))
    torch.save(torch.full((3, 8), float("nan")), features / "nan.pt")
    _write_slides(features, ["wide"], dim=16)


def test_validate_lists_every_bad_file_in_one_error(tmp_path):
    from tcssa.data import validate_cohort

    good = ["g1", "g2", "nan", "huge", "junk", "unwritten"]
    features = _write_slides(tmp_path / "feats", good)
    _damage(features)
    slides = good + ["inf", "nan_pt", "wide"]
    (features / "nan.pt").rename(features / "nan_pt.pt")
    csv = _write_csv(
        tmp_path / "l.csv", "slide_id,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(slides))
    )
    with pytest.raises(ValueError) as caught:
        Cohort.from_folder(features, csv)  # header checks: the unreadable, unwritten and odd-D files
    header_error = str(caught.value)
    assert "junk.h5: not a readable HDF5 file" in header_error
    assert "unwritten.h5: features 1000x8 float32" in header_error and "never written" in header_error
    assert "nan_pt.pt: features contain NaN or Inf" in header_error  # a .pt has no header: read whole
    assert "g1.h5 has D=8, but D=16: " in header_error and "wide.h5" in header_error
    assert "nan.h5" not in header_error  # values of h5 files are not read by the header check
    cohort = Cohort.from_folder(features, csv, check_files=False)
    with pytest.raises(ValueError) as caught:
        validate_cohort(cohort)
    message = str(caught.value)
    assert message.startswith("7 problem(s) with the cohort's feature files (6 of 9 files unusable")
    for name, what in [
        ("junk.h5", "not a readable HDF5 file"),
        ("unwritten.h5", "never written"),
        ("nan.h5", "NaN or Inf in 1 of 5 patches (first rows: [2])"),
        ("huge.h5", "feature values reach 3e+38"),
        ("inf.npy", "NaN or Inf in 1 of 2 patches (first rows: [1])"),
        ("nan_pt.pt", "NaN or Inf"),
    ]:
        line = next(line for line in message.splitlines() if f"{name}:" in line)
        assert what in line, line
    assert "feature dimension differs across the cohort" in message and "wide.h5" in message
    good_only = cohort.subset(["g1", "g2"])
    good_only.dim = None
    validate_cohort(good_only)
    assert good_only.dim == 8


def test_validate_scans_h5_in_bounded_blocks(tmp_path, monkeypatch):
    from tcssa.data import validate_cohort
    from tcssa.io import features as formats

    features = _write_slides(tmp_path / "feats", ["a", "b"])
    write_h5(features / "long.h5", np.ones((5000, 8), dtype=np.float32))
    import h5py

    with h5py.File(features / "long.h5", "r+") as f:
        f["features"][4321, 7] = -2e7
    blocks = []
    original = formats._raise_on_values

    def counting(block, *args):
        blocks.append(len(block))
        return original(block, *args)

    monkeypatch.setattr(formats, "_raise_on_values", counting)
    monkeypatch.setattr(formats, "SCAN_BLOCK_BYTES", 32 * 100)  # 100 rows of 8 float32 per block
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nlong,0\n")
    cohort = Cohort.from_folder(features, csv)
    with pytest.raises(ValueError, match=r"long.h5: feature values reach 2e\+07.*first rows: \[4321\]"):
        validate_cohort(cohort)
    assert max(blocks) == 100


def test_validate_passes_a_good_cohort_unchanged(tmp_path):
    features = _write_slides(tmp_path / "feats", ["a", "b", "c"])
    csv = _write_csv(tmp_path / "l.csv", "slide_id,label\na,0\nb,1\nc,0\n")
    cohort = Cohort.from_folder(features, csv)
    cohort.validate()
    assert cohort.dim == 8
