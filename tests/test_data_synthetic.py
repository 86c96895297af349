"""The synthetic gigapixel cohort: layout, labels, ground truth, determinism and the rare-lesion design."""

import csv
import json

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tcssa.data import Cohort, read_labels
from tcssa.data.synthetic import SyntheticConfig, make_synthetic_cohort
from tcssa.io.features import read_bag

SMALL = dict(num_slides=16, dim=32, min_patches=300, max_patches=1500, progress=False)


@pytest.fixture(scope="module")
def rare(tmp_path_factory):
    return make_synthetic_cohort(tmp_path_factory.mktemp("rare"), task="rare", lesion_fraction=0.02, **SMALL)


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _bags(cohort):
    return {s: read_bag(cohort.features_dir / f"{s}.h5", extras=["phenotype"]) for s in cohort.slide_ids}


def test_files_labels_and_cases(rare):
    labels = _rows(rare.labels_csv)
    assert list(labels[0]) == ["slide_id", "label", "case_id"]
    assert [r["slide_id"] for r in labels] == rare.slide_ids == sorted(rare.slide_ids)
    assert sorted(p.name for p in rare.features_dir.iterdir()) == [f"{s}.h5" for s in rare.slide_ids]
    by_case = {}
    for row in labels:
        by_case.setdefault(row["case_id"], []).append(row["label"])
    assert any(len(v) == 2 for v in by_case.values()), "some cases hold two slides"
    assert all(len(set(v)) == 1 for v in by_case.values()), "slides of a case share its label"
    case_labels = [v[0] for v in by_case.values()]
    assert case_labels.count("positive") == round(len(by_case) / 2)
    table = read_labels(rare.labels_csv)
    assert table.class_names == ["negative", "positive"]
    assert (rare.root / "synthetic_config.json").is_file()


def test_h5_layout_and_ground_truth(rare):
    path = rare.features_dir / f"{rare.slide_ids[0]}.h5"
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
        assert f["phenotype"].shape == (f["features"].shape[0],)
    bags = _bags(rare)
    truth = {r["slide_id"]: r for r in _rows(rare.truth_csv)}
    for slide, bag in bags.items():
        assert 300 <= bag.num_patches <= 1500 and bag.dim == 32
        assert bag.attrs["phenotype_names"] == rare.config.phenotype_names
        assert bag.attrs["task"] == "rare" and bag.attrs["label"] == rare.labels[slide]
        assert bag.attrs["patch_size_level0"] == 256
        coords = bag.coords.numpy()
        assert (coords % 256 == 0).all() and len(np.unique(coords, axis=0)) == bag.num_patches
        phenotype = bag.extras["phenotype"]
        lesion = int((phenotype == bag.attrs["phenotype_names"].index("lesion")).sum())
        assert int(truth[slide]["num_patches"]) == bag.num_patches
        if rare.labels[slide] == "positive":
            assert lesion == round(0.02 * bag.num_patches)  # the fixed lesion fraction
            assert float(truth[slide]["lesion_fraction"]) == pytest.approx(lesion / bag.num_patches, abs=1e-6)
        else:
            assert lesion == 0
    sizes = {bag.num_patches for bag in bags.values()}
    assert len(sizes) > 1, "slides differ in size"


def _same_neighbour_share(bag):
    """Share of 4-neighbour patch pairs with the same phenotype."""
    cells = {tuple(c): p for c, p in zip(bag.coords.numpy() // 256, bag.extras["phenotype"], strict=True)}
    same = total = 0
    for (x, y), p in cells.items():
        for neighbour in ((x + 1, y), (x, y + 1)):
            if neighbour in cells:
                total += 1
                same += cells[neighbour] == p
    return same / total


def test_tissue_regions_are_spatially_coherent(rare):
    for bag in list(_bags(rare).values())[:4]:
        phenotype = bag.extras["phenotype"]
        shares = np.bincount(phenotype) / len(phenotype)
        chance = float((shares**2).sum())  # same-neighbour share if phenotypes were scattered
        assert _same_neighbour_share(bag) > max(0.6, chance + 0.2)


def test_lesion_is_separable_per_patch_yet_a_small_part_of_each_slide(rare):
    bags = _bags(rare)
    lesion = rare.config.phenotype_names.index("lesion")
    features = np.vstack([b.features.numpy() for b in bags.values()])
    is_lesion = np.concatenate([b.extras["phenotype"] == lesion for b in bags.values()])
    assert 0 < is_lesion.mean() < 0.02
    half = len(features) // 2
    order = np.random.default_rng(0).permutation(len(features))
    train, test = order[:half], order[half:]
    probe = LogisticRegression(max_iter=2000).fit(features[train], is_lesion[train])
    assert roc_auc_score(is_lesion[test], probe.decision_function(features[test])) > 0.99


def test_same_seed_same_files_whatever_the_workers(tmp_path):
    one = make_synthetic_cohort(tmp_path / "a", seed=3, workers=1, **SMALL)
    two = make_synthetic_cohort(tmp_path / "b", seed=3, workers=2, **SMALL)
    other = make_synthetic_cohort(tmp_path / "c", seed=4, workers=2, **SMALL)
    assert one.labels_csv.read_text() == two.labels_csv.read_text()
    assert one.truth_csv.read_text() == two.truth_csv.read_text()
    for slide in one.slide_ids[:4]:
        a, b = read_bag(one.features_dir / f"{slide}.h5"), read_bag(two.features_dir / f"{slide}.h5")
        assert np.array_equal(a.features.numpy(), b.features.numpy())
    assert one.truth_csv.read_text() != other.truth_csv.read_text()


def test_subtype_classes_differ_in_the_tumour_phenotype(tmp_path):
    cohort = make_synthetic_cohort(tmp_path, task="subtype", num_subtypes=3, subtype_shift=1.0, **SMALL)
    assert sorted(set(cohort.labels.values())) == ["subtype_A", "subtype_B", "subtype_C"]
    assert "lesion" not in cohort.config.phenotype_names
    tumour = cohort.config.phenotype_names.index("tumour")
    means = {}
    for slide, bag in _bags(cohort).items():
        rows = bag.features.numpy()[bag.extras["phenotype"] == tumour]
        means.setdefault(cohort.labels[slide], []).append(rows.mean(0))
    centres = {label: np.mean(v, axis=0) for label, v in means.items()}
    # tumour centres of two classes lie subtype_shift * sqrt(2) apart (up to slide nuisance)
    gap = np.linalg.norm(centres["subtype_A"] - centres["subtype_B"])
    assert 1.0 < gap < 2.0


def test_composition_label_follows_the_immune_to_tumour_ratio(tmp_path):
    cohort = make_synthetic_cohort(tmp_path, task="composition", **SMALL)
    config = cohort.config
    assert set(cohort.labels.values()) == {"cold", "hot"}
    for row in _rows(cohort.truth_csv):
        ratio = float(row["immune_ratio"])
        immune, tumour = float(row["share_immune"]), float(row["share_tumour"])
        assert ratio == pytest.approx(immune / (immune + tumour), abs=1e-5)
        assert (ratio > config.composition_threshold) == (row["label"] == "hot")


def test_float32_option_and_cohort_integration(tmp_path):
    cohort = make_synthetic_cohort(tmp_path, feature_dtype="float32", **SMALL)
    with h5py.File(cohort.features_dir / f"{cohort.slide_ids[0]}.h5") as f:
        assert f["features"].dtype == np.float32
    loaded = Cohort.from_folder(cohort.features_dir, cohort.labels_csv)
    assert loaded.dim == 32 and loaded.slide_ids == cohort.slide_ids and loaded.case_ids is not None


def test_lesion_fraction_range_is_respected(tmp_path):
    cohort = make_synthetic_cohort(tmp_path, lesion_fraction=(0.01, 0.03), **SMALL)
    fractions = [float(r["lesion_fraction"]) for r in _rows(cohort.truth_csv) if r["label"] == "positive"]
    assert fractions and all(0.009 <= f <= 0.031 for f in fractions)
    assert len(set(fractions)) > 1


def test_refuses_to_overwrite_and_bad_options(tmp_path):
    make_synthetic_cohort(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic_cohort(tmp_path, **SMALL)
    make_synthetic_cohort(tmp_path, overwrite=True, **SMALL)
    with pytest.raises(ValueError, match="unknown option"):
        make_synthetic_cohort(tmp_path / "x", lesion_size=3, **SMALL)
    with pytest.raises(ValueError, match="task must be one of"):
        SyntheticConfig(task="survival")
    with pytest.raises(ValueError, match="lesion_fraction"):
        SyntheticConfig(lesion_fraction=(0.05, 0.01))
    with pytest.raises(ValueError, match="num_subtypes"):
        SyntheticConfig(task="subtype", num_subtypes=4)


def test_synth_command(tmp_path, capsys):
    from tcssa.cli import main

    out = tmp_path / "cohort"
    args = ["synth", "--out", str(out), "--slides", "8", "--dim", "16", "--min-patches", "100"]
    args += ["--max-patches", "200", "--lesion-fraction", "0.05", "--set", "stain_std=0.5", "--workers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 8 slides" in printed and "negative 4, positive 4" in printed
    config = SyntheticConfig(**json.loads((out / "synthetic_config.json").read_text()))
    assert config.stain_std == 0.5 and config.lesion_fraction == (0.05, 0.05) and config.dim == 16
    assert main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--set", "dim=8"]) == 2
    assert "use --dim instead" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--set", "stain_std=lots"]) == 2
    assert "cannot read 'lots' as float" in capsys.readouterr().err


@pytest.mark.slow
def test_rare_design_at_full_scale(tmp_path):
    """The stress-test claims at D = 512 and 1% lesion, with probes that need no slide model.

    Prints the table recorded in docs/RESULTS.md (run: pytest -m slow -s -k rare_design).
    """
    from sklearn.cluster import KMeans
    from sklearn.model_selection import cross_val_predict

    cohort = make_synthetic_cohort(
        tmp_path,
        num_slides=120,
        dim=512,
        min_patches=2000,
        max_patches=8000,
        lesion_fraction=0.01,
        progress=False,
    )
    y = np.array(read_labels(cohort.labels_csv).labels)
    lesion = cohort.config.phenotype_names.index("lesion")
    rng = np.random.default_rng(0)
    bags = [(b.features.numpy(), b.extras["phenotype"]) for b in _bags(cohort).values()]
    sample = [rng.choice(len(f), 200, replace=False) for f, _ in bags]
    X = np.vstack([np.vstack([f[i], f[p == lesion][:20]]) for (f, p), i in zip(bags, sample, strict=True)])
    Y = np.concatenate(
        [
            np.r_[p[i] == lesion, np.ones(min(20, (p == lesion).sum()), bool)]
            for (_, p), i in zip(bags, sample, strict=True)
        ]
    )
    half = len(X) // 2
    probe = LogisticRegression(max_iter=3000).fit(X[:half], Y[:half])
    means = np.array([f.mean(0) for f, _ in bags])
    auc = {
        "patch probe, held-out patches": roc_auc_score(Y[half:], probe.decision_function(X[half:])),
        "max patch-probe score per slide": roc_auc_score(y, [(f @ probe.coef_[0]).max() for f, _ in bags]),
        "mean pooling + logistic regression, 5-fold CV": roc_auc_score(
            y,
            cross_val_predict(LogisticRegression(max_iter=5000), means, y, cv=5, method="decision_function"),
        ),
        "mean pooling on the patch probe's direction (oracle)": roc_auc_score(y, means @ probe.coef_[0]),
        "32 random patches, perfect lesion detector": roc_auc_score(
            y, [float((p[rng.choice(len(p), 32, replace=False)] == lesion).any()) for _, p in bags]
        ),
    }
    purity, recall = [], []
    for (f, p), label in zip(bags, y, strict=True):
        if label and len(purity) < 20:
            clusters = KMeans(32, n_init=1, random_state=0).fit_predict(f)
            best = np.bincount(clusters[p == lesion], minlength=32).argmax()
            purity.append((p[clusters == best] == lesion).mean())
            recall.append((clusters[p == lesion] == best).mean())
    for name, value in auc.items():
        print(f"| {name} | {value:.2f} |")
    print(
        f"k-means (K=32) on a positive slide: the lesion's cluster is {np.mean(purity):.2f} pure, "
        f"holds {np.mean(recall):.2f} of the lesion"
    )
    assert auc["patch probe, held-out patches"] > 0.99
    assert auc["mean pooling + logistic regression, 5-fold CV"] < 0.8
    assert auc["32 random patches, perfect lesion detector"] < 0.8
    assert np.mean(purity) > 0.9


def test_synth_into_a_full_disk_is_one_clear_error_with_no_partial_files(tmp_path, monkeypatch, capsys):
    """The disk fills up while the 6th slide's phenotype dataset is written (monkeypatched h5py)."""
    import errno
    import threading

    from tcssa.cli import main
    from tcssa.io.files import NoSpaceError

    original, lock, calls = h5py.Group.create_dataset, threading.Lock(), {"phenotype": 0}

    def create_dataset(self, name, *args, **kwargs):
        if name == "phenotype":
            with lock:
                calls["phenotype"] += 1
                full = calls["phenotype"] >= 6
            if full:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    out = tmp_path / "cohort"
    options = dict(num_slides=12, dim=8, min_patches=50, max_patches=80, workers=2, progress=False)
    with pytest.raises(NoSpaceError, match=r"^no space left writing .*features/slide_00\d\d\.h5") as caught:
        make_synthetic_cohort(out, **options)
    assert caught.value.errno == errno.ENOSPC
    written = sorted(p.name for p in (out / "features").iterdir())
    assert all(name.endswith(".h5") for name in written), written  # no *.partial left behind
    assert 5 <= len(written) < 12
    for name in written:  # every file under a real name is complete
        assert read_bag(out / "features" / name, extras=["phenotype"]).num_patches >= 50
    assert not (out / "labels.csv").exists()  # the cohort was not finished: no labels, no config
    calls["phenotype"] = 0
    args = ["synth", "--out", str(out), "--slides", "12", "--dim", "8", "--min-patches", "50"]
    assert main(args + ["--max-patches", "80", "--overwrite"]) != 0  # one line, no traceback
    err = capsys.readouterr().err
    assert "tcssa synth: error: no space left" in err and "slide_00" in err and "Traceback" not in err


def test_synth_labels_csv_is_never_left_truncated(tmp_path, monkeypatch):
    import errno

    from tcssa.data import synthetic
    from tcssa.io.files import NoSpaceError

    def full(path, header, rows):
        with synthetic.atomic_output(path) as partial:
            partial.write_text("slide_id,label,case_id\nslide_0000,neg")  # half a file, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "_write_csv", full)
    with pytest.raises(NoSpaceError, match=r"no space left writing .*labels.csv"):
        make_synthetic_cohort(tmp_path, **SMALL)
    assert not (tmp_path / "labels.csv").exists() and not list(tmp_path.glob("*.partial"))
