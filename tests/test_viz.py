import base64
import re
import shutil

import numpy as np
import pytest

from fake_runs import write_compare_run, write_model_run, write_sweeps
from tcssa.io.runs import FoldPredictions, load_compare_run
from tcssa.train.metrics import collapse_threshold
from tcssa.viz import (
    SweepPoint,
    build_report,
    plots,
    roc_curves,
    slot_embedding,
    slot_map,
    slot_palette,
    slot_utilisation,
    token_budget_sweep,
)
from tcssa.viz.report import SlideFigures, comparison_table_html
from tcssa.viz.slides import slot_map_on_slide

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labelled(plot: plots.Plot) -> None:
    """Every figure: a title, a caption, and every visible axes with both axis labels."""
    assert plot.title and plot.caption
    for ax in plot.figure.axes:
        if not ax.get_visible() or ax.get_label() in ("<colorbar>", plots.LEGEND_AXES):
            continue
        # panels sharing an axis label it once (on the outer panel)
        assert any(a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax))
        assert any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax))
    assert plot.to_png().startswith(PNG_MAGIC)


@pytest.mark.parametrize("num_slots", [8, 32, 64])
def test_slot_palette_tells_slots_apart(num_slots):
    colours = slot_palette(num_slots)
    assert colours.shape == (num_slots, 3) and colours.min() >= 0 and colours.max() <= 1
    lab = plots._rgb_to_lab(colours)
    distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(num_slots) * 1e3
    # CIE Lab distance (Delta E): ~2 is barely visible, > 15 is an obviously different colour
    assert distances.min() > 15
    assert len({tuple(c) for c in np.round(colours, 3)}) == num_slots


def test_rgb_to_lab_matches_known_values():
    lab = plots._rgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.1)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.1)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.2)  # sRGB red, a standard reference


def test_grid_image_puts_each_patch_in_its_cell():
    coords = np.array([[512, 256], [768, 256], [512, 768]])
    image, step, extent = plots._grid_image(coords, np.array([1.0, 2.0, 3.0]))
    assert step == 256
    assert image.shape == (3, 2)
    assert image[0, 0] == 1.0 and image[0, 1] == 2.0 and image[2, 0] == 3.0
    assert np.isnan(image[1]).all()  # no patch in that row: background, not zero
    assert extent[0] == 512 - 128 and extent[3] == 256 - 128  # y axis points down, as on the slide


def test_every_figure_is_titled_and_labelled():
    rng = np.random.default_rng(0)
    folds = [FoldPredictions(f, np.arange(10) % 2, rng.dirichlet([1, 1], size=10)) for f in range(3)]
    _labelled(roc_curves({"tcssa": folds, "abmil": folds}))
    _labelled(token_budget_sweep([SweepPoint("tcssa", k, 0.9, 0.02) for k in (8, 16, 32)]))
    _labelled(plots.lesion_fraction_sweep([SweepPoint("abmil", f, 0.7, 0.1) for f in (0.003, 0.01)]))
    shares = rng.dirichlet(np.ones(32), size=4)
    _labelled(slot_utilisation(shares, (shares * 1000).astype(int)))
    coords = np.stack(np.meshgrid(np.arange(20), np.arange(10)), -1).reshape(-1, 2) * 256
    slots = rng.integers(0, 32, len(coords))
    _labelled(slot_map(coords, slots, 32, slots % 4, ["a", "b", "c", "d"], "s1"))
    _labelled(slot_embedding(rng.normal(size=(len(coords), 2)), slots, 32, "PCA", slots % 3))


def test_roc_curves_handle_multiclass_and_single_class_folds():
    rng = np.random.default_rng(1)
    three = FoldPredictions(0, np.arange(12) % 3, rng.dirichlet([1, 1, 1], size=12))
    one_class = FoldPredictions(1, np.zeros(5, dtype=int), rng.dirichlet([1, 1, 1], size=5))
    plot = roc_curves({"mean": [three, one_class]})
    assert "micro-averaged" in plot.title


def test_slot_map_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one slot per patch"):
        slot_map(np.zeros((5, 2)), np.zeros(4, dtype=int), 32)


def _images(document: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', document)]


def test_report_from_a_compare_run(tmp_path):
    root = write_compare_run(tmp_path / "cmp", num_slots=16, collapse=True)
    write_sweeps(root)
    out = build_report(root)
    assert out == root / "report.html"
    document = out.read_text()
    images = _images(document)
    # AUC bars, ROC, two sweeps, slot utilisation
    assert len(images) == 5 and all(i.startswith(PNG_MAGIC) for i in images)
    for heading in ("Comparison", "Sweeps", "Slot utilisation", "Inside one slide", "A real slide"):
        assert f"<h2>{heading}</h2>" in document
    assert "No real slide was given" in document
    assert "Slot collapse in tcssa" in document and "fold 1: slot 3 receives 100%" in document
    assert "<link" not in document and "<script" not in document  # self-contained, no external resources
    assert document.count("<figcaption>") == len(images)


def test_report_escapes_user_text(tmp_path):
    root = tmp_path / "cmp"
    write_compare_run(root, models=("tcssa",), slide_prefix="<img src=x onerror=alert(1)>")
    evil = "<script>alert('x')</script>"

    def analysis(compare):
        return SlideFigures(notes=[f"slide {evil} has no coords"])

    document = build_report(root, slide_analysis=analysis, title=f"report {evil}").read_text()
    assert "<script>" not in document
    assert "No slot collapse in tcssa" in document
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in document
    table = comparison_table_html(
        [{"model": "<b>m</b>", "auc_mean": "0.9", "auc_std": "0.1", "tokens": "32"}]
    )
    assert "<b>m</b>" not in table and "&lt;b&gt;m&lt;/b&gt;" in table


def test_report_degrades_gracefully_when_parts_are_missing(tmp_path):
    root = write_compare_run(tmp_path / "cmp", models=("tcssa", "abmil"))
    shutil.rmtree(root / "abmil")
    for file in (root / "tcssa").glob("fold_*_predictions.csv"):
        file.unlink()

    def failing(compare):
        raise FileNotFoundError("features folder /nowhere not found")

    document = build_report(root, slide_analysis=failing).read_text()
    assert "abmil: no run directory" in document
    assert "no fold_*_predictions.csv" in document
    assert "This run has no sweeps" in document
    assert "features folder /nowhere not found" in document


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="comparison.csv"):
        build_report(tmp_path)
    root = write_compare_run(tmp_path / "cmp", models=("tcssa",))
    (root / "comparison.csv").write_text("model,auc\ntcssa,0.9\n")
    with pytest.raises(ValueError, match=r"comparison\.csv: missing column\(s\) auc_mean"):
        load_compare_run(root)
    root = write_compare_run(tmp_path / "cmp2", models=("tcssa",))
    (root / "tcssa" / "fold_0_predictions.csv").write_text("slide_id,label,pred,p_0,p_1\ns1,one,0,0.5,0.5\n")
    with pytest.raises(ValueError, match="fold_0_predictions.csv"):
        load_compare_run(root)


def test_model_run_reads_slot_shares(tmp_path):
    write_model_run(tmp_path / "run", "tcssa", folds=2, num_slots=4)
    run = load_compare_run(write_compare_run(tmp_path / "cmp", models=("tcssa",), num_slots=4)).models[
        "tcssa"
    ]
    use = run.slot_shares()
    assert use.folds == [0, 1, 2] and use.shares.shape == (3, 4) and use.of_patches
    # shares of the patches: with top-2 routing they sum to 2
    np.testing.assert_allclose(use.shares.sum(axis=1), 2.0, atol=1e-6)
    np.testing.assert_allclose(use.shares, 2 * use.counts / use.counts.sum(axis=1, keepdims=True), atol=1e-6)
    # a file with the contract's columns only: shares of all assignments
    rows = (tmp_path / "cmp" / "tcssa" / "slot_utilisation.csv").read_text().splitlines()
    old = ["fold,slot,count,share"] + [",".join(r.split(",")[:4]) for r in rows[1:]]
    (tmp_path / "cmp" / "tcssa" / "slot_utilisation.csv").write_text("\n".join(old) + "\n")
    use = load_compare_run(tmp_path / "cmp").models["tcssa"].slot_shares()
    assert not use.of_patches
    np.testing.assert_allclose(use.shares.sum(axis=1), 1.0, atol=1e-6)


def test_report_command(tmp_path, capsys):
    from tcssa.cli import main

    root = write_compare_run(tmp_path / "cmp", models=("tcssa",), folds=2)
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(root), "--out", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    document = out.read_text()
    assert "--features DIR" in document or "checkpoint" in document  # slide figures explained, not crashed
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "compare directory not found" in capsys.readouterr().err


def _make_perfect(run_dir, folds=3):
    """Rewrite a fake run's predictions so that it ranks every positive above every negative."""
    import csv

    for fold in range(folds):
        path = run_dir / f"fold_{fold}_predictions.csv"
        rows = list(csv.DictReader(path.open()))
        for r in rows:
            r["p_1"] = str(0.9 if r["label"] == "1" else 0.1)
            r["p_0"] = str(1 - float(r["p_1"]))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_best_is_highlighted_only_when_the_paired_interval_supports_it(tmp_path):
    from tcssa.viz.report import comparison_uncertainty

    # three models of the same strength on 12 slides per fold: intervals overlap, nobody is best
    root = write_compare_run(tmp_path / "even")
    uncertainty = comparison_uncertainty(load_compare_run(root))
    assert uncertainty.best is None and set(uncertainty.intervals) == {"tcssa", "random-k", "abmil"}
    document = build_report(root).read_text()
    assert "class=best" not in document and "none is highlighted as best" in document
    assert "AUC 95% CI" in document and "TC-SSA − random-k: AUC" in document
    # one model that ranks every slide right, on enough slides: it is best beyond the interval
    root = write_compare_run(tmp_path / "clear", slides_per_fold=40)
    _make_perfect(root / "tcssa")
    uncertainty = comparison_uncertainty(load_compare_run(root))
    assert uncertainty.best == "tcssa"
    assert uncertainty.difference("tcssa", "random-k").supported
    document = build_report(root).read_text()
    assert document.count("class=best") == 1 and "<tr class=best><td>tcssa</td>" in document


def test_collapse_threshold_reads_the_same_on_either_share_column():
    # a slot that takes 60% of the patches holds 30% of the top-2 assignments: both are collapse
    assert collapse_threshold(of_patches=True) == 0.5
    assert collapse_threshold(of_patches=False) == 0.25
    assert 0.30 > collapse_threshold(of_patches=False)


def test_sweep_axes_hold_every_error_bar_and_the_legend_is_outside():
    points = [SweepPoint("tcssa", 8, 0.95, 0.10), SweepPoint("random-k", 8, 0.20, 0.30)]
    plot = token_budget_sweep(points, [plots.Reference("abmil", 0.9, 0.05)], caption="computed.")
    ax = plot.figure.axes[0]
    low, high = ax.get_ylim()
    assert low <= 0.20 - 0.30 and high >= 0.95 + 0.10  # not cut at 0 or at 1
    assert ax.get_legend() is None and plot.figure.legends  # the legend is the figure's, beside the axes
    labels = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert "abmil, all patches (0.90 ± 0.05)" in labels
    assert plot.caption.startswith("computed.")


def test_comparison_bars_axis_holds_error_bars_below_zero():
    plot = plots.comparison_bars([plots.ModelScore("tcssa", 0.30, 0.35)], caption="c.")
    assert plot.figure.axes[0].get_xlim()[0] <= 0.30 - 0.35


def test_roc_titles_use_the_tables_std():
    rng = np.random.default_rng(1)
    folds = [FoldPredictions(f, np.arange(10) % 2, rng.dirichlet([1, 1], size=10)) for f in range(3)]
    plot = roc_curves({"tcssa": folds})
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(f.labels, f.probs[:, 1]) for f in folds]
    title = plot.figure.axes[0].get_title()
    assert f"± {np.std(aucs, ddof=1):.3f}" in title


def test_slot_utilisation_caption_and_whiskers_come_from_the_shares():
    shares = np.array([[0.9, 0.6, 0.5], [0.1, 0.9, 1.0]])
    plot = slot_utilisation(shares, of_patches=True)
    assert "slot 2 in fold 1" in plot.caption and "100.0%" in plot.caption and "above" in plot.caption
    bars = plot.figure.axes[0]
    assert bars.get_ylim()[0] == 0
    for line in bars.lines:  # the whiskers (and reference lines) never pass below 0
        assert np.nanmin(line.get_ydata()) >= 0


def test_the_reports_collapse_line_follows_the_runs_top_k(tmp_path):
    import csv
    import json

    root = write_compare_run(tmp_path / "cmp", num_slots=8)
    run = root / "tcssa"
    # the older share column only (of all assignments), from a top-1 run: one slot with 40%
    rows = [
        {"fold": 0, "slot": k, "count": 40 if k == 0 else 10, "share": 0.4 if k == 0 else 0.6 / 7}
        for k in range(8)
    ]
    with (run / "slot_utilisation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fold", "slot", "count", "share"])
        writer.writeheader()
        writer.writerows(rows)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model_options": {"top_k": 1}}))
    assert "No slot collapse in tcssa" in build_report(root).read_text()  # 40% < 50% at top-1
    (run / "config.json").write_text(json.dumps(config))  # top-2: 40% of assignments > 25%
    assert "Slot collapse in tcssa" in build_report(root).read_text()


def test_report_real_slide_section_shows_its_figures_and_notes(tmp_path):
    root = write_compare_run(tmp_path)
    thumbnail = np.full((40, 30, 3), 230, np.uint8)
    coords = np.array([[0, 0], [10, 0], [0, 10]])
    picture = slot_map_on_slide(thumbnail, 1.0, coords, 10, np.array([0, 1, 1]), 4, title="slots on a slide")
    shown = SlideFigures(plots=[picture], notes=["agreement: NMI 0.5 <b>"])
    document = build_report(root, real_slide=lambda: shown).read_text()
    section = document.split("<h2>A real slide</h2>", 1)[1]
    assert "slots on a slide" in section and "NMI 0.5 &lt;b&gt;" in section
    failing = build_report(root, real_slide=lambda: (_ for _ in ()).throw(ValueError("no tissue here")))
    assert "the real slide could not be drawn: no tissue here" in failing.read_text()

    def without_the_extra():
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    missing = build_report(root, real_slide=without_the_extra).read_text()
    assert "the real slide needs the optional package &#x27;skimage&#x27;" in missing
