"""The HTML report of a ``tcssa compare`` run: one self-contained file a person can mail around.

Figures are embedded as base64 PNG and the CSS is inline, so ``report.html`` opens anywhere without
the run directory beside it. Everything that comes from the user or the run (slide ids, model names,
class names, paths, notes) is HTML-escaped. What the run lacks (no sweeps, no checkpoint, no features
on this machine) becomes a visible note instead of an error.

Optional extras the report picks up from the compare directory:
- ``sweeps/token_budget.csv`` (model,num_tokens,auc_mean,auc_std,n_folds) and
  ``sweeps/lesion_fraction.csv`` (model,lesion_fraction,auc_mean,auc_std,n_folds[,...]): the two sweeps
  of ``tcssa demo``;
- ``demo.json``: what the demo ran (cohort, timings, headline lines), shown in the report's header.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tcssa import __version__
from tcssa.io.files import read_csv_rows, read_json, write_text
from tcssa.io.runs import CompareRun, load_compare_run, to_float
from tcssa.train.bootstrap import compare_aucs, fold_scores
from tcssa.train.metrics import collapse_threshold
from tcssa.viz import plots

SWEEP_DIR = "sweeps"
TOKEN_BUDGET_CSV = "token_budget.csv"
LESION_FRACTION_CSV = "lesion_fraction.csv"
DEMO_INFO = "demo.json"
REPORT_NAME = "report.html"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d232a;
       margin: 0; background: #f4f5f7; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: white; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 2px solid #e1e4e8; padding-bottom: 0.2em; }
.subtitle { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { padding: 6px 12px; border-bottom: 1px solid #e1e4e8; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; border-bottom: 2px solid #d0d7de; }
td:first-child, th:first-child { text-align: left; }
tr.best td { font-weight: 600; background: #fff8e6; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaecef; }
figcaption { color: #3b434b; margin-top: 0.4em; }
figcaption b { color: #1d232a; }
.note { background: #f6f8fa; border-left: 4px solid #8c959f; padding: 8px 12px; margin: 0.8em 0; }
.warn { background: #fff1f0; border-left: 4px solid #cf222e; padding: 8px 12px; margin: 0.8em 0; }
.ok { background: #effaf1; border-left: 4px solid #2da44e; padding: 8px 12px; margin: 0.8em 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
pre { background: #f6f8fa; padding: 10px 12px; overflow-x: auto; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dt { color: #57606a; } dd { margin: 0; }
footer { color: #6e7781; font-size: 0.85em; margin-top: 3em; }
"""


def esc(value: object) -> str:
    """HTML-escape any value that came from a user or a run (quotes too, safe in attributes)."""
    return html.escape(str(value), quote=True)


@dataclass
class SlideFigures:
    """What the slide-level analysis produced: figures, or the reason there are none."""

    plots: list[plots.Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# A callable that computes the slide-level figures for a compare run (tcssa.apps.slot_analysis provides the
# default); kept injectable so that the report itself never loads a model.
SlideAnalysis = Callable[[CompareRun], SlideFigures]


def _figure_html(plot: plots.Plot) -> str:
    png = base64.b64encode(plot.to_png()).decode("ascii")
    plot.figure.clear()  # free the figure's memory once it is rendered
    return (
        f'<figure><img alt="{esc(plot.title)}" src="data:image/png;base64,{png}">'
        f"<figcaption><b>{esc(plot.title)}.</b> {esc(plot.caption)}</figcaption></figure>"
    )


def _fmt_mean_std(mean: str | None, std: str | None, digits: int = 3) -> str:
    m, s = to_float(mean), to_float(std)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def _fmt_seconds(value: str | None) -> str:
    seconds = to_float(value)
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _tokens(row: dict[str, str]) -> float:
    """Tokens per slide the head sees; NaN for full-bag models (written as "all" or left empty)."""
    try:
        return to_float(row.get("tokens"))
    except ValueError:
        return math.nan


@dataclass
class Uncertainty:
    """The bootstrap view of a comparison: each model's AUC interval and the paired differences.

    Built only when every model of the table has binary per-fold predictions on the same test slides;
    otherwise ``reason`` says why there is none.
    """

    intervals: dict = field(default_factory=dict)  # model -> AUCInterval
    against: dict = field(default_factory=dict)  # (a, b) -> PairedAUCDifference
    best: str | None = None  # the model that beats every other beyond the interval, if one does
    reason: str = ""

    def difference(self, a: str, b: str):
        return self.against.get((a, b))


def comparison_uncertainty(compare: CompareRun, *, replicates: int = 2000, seed: int = 0) -> Uncertainty:
    """Paired stratified bootstrap (``tcssa.train.bootstrap``) over the test slides of the run."""
    names = [n for n in compare.model_names if n in compare.models and compare.models[n].predictions]
    if len(names) < len(compare.model_names):
        return Uncertainty(reason="some models have no per-fold predictions")
    try:
        scores = {n: fold_scores(compare.models[n]) for n in names}
        intervals, against = compare_aucs(scores, replicates=replicates, seed=seed)
    except ValueError as err:  # multi-class runs, a fold with one class, different test slides
        return Uncertainty(reason=str(err))
    result = Uncertainty(intervals=intervals, against=against)
    top, *others = sorted(names, key=lambda n: -intervals[n].mean)
    if others and all(against[(top, other)].supported for other in others):
        result.best = top
    return result


def _tokens_text(row: dict[str, str]) -> str:
    tokens = _tokens(row)
    return f"{tokens:.0f}" if not math.isnan(tokens) else "all N"


def comparison_table_html(
    rows: Sequence[dict[str, str]], mean_patches: float | None = None, uncertainty: Uncertainty | None = None
) -> str:
    """The headline table: AUC (mean ± std, and its bootstrap interval), balanced accuracy, F1, tokens,
    compression N/K, train time. A row is highlighted only when its model beats every other beyond
    the paired bootstrap interval (never on the mean alone)."""
    intervals = uncertainty.intervals if uncertainty else {}
    head = (
        "<tr><th>model</th><th>ROC AUC (mean ± std)</th>"
        + ("<th>AUC 95% CI</th>" if intervals else "")
        + "<th>balanced accuracy</th><th>macro F1</th>"
        "<th>tokens per slide</th><th>compression N/K</th><th>train time</th></tr>"
    )
    body = []
    for row in rows:
        tokens = _tokens(row)
        if math.isnan(tokens) or not mean_patches:
            ratio = "1× (all patches)" if math.isnan(tokens) else "n/a"
        else:
            ratio = f"{mean_patches / tokens:,.0f}×"
        is_best = uncertainty is not None and uncertainty.best == row["model"]
        interval = intervals.get(row["model"])
        ci = (
            f"<td>{interval.low:.3f} – {interval.high:.3f}</td>"
            if interval
            else ("<td>n/a</td>" if intervals else "")
        )
        body.append(
            f"<tr{' class=best' if is_best else ''}><td>{esc(row['model'])}</td>"
            f"<td>{_fmt_mean_std(row.get('auc_mean'), row.get('auc_std'))}</td>{ci}"
            f"<td>{_fmt_mean_std(row.get('bacc_mean'), row.get('bacc_std'))}</td>"
            f"<td>{_fmt_mean_std(row.get('f1_mean'), row.get('f1_std'))}</td>"
            f"<td>{esc(_tokens_text(row))}</td><td>{esc(ratio)}</td>"
            f"<td>{_fmt_seconds(row.get('train_seconds'))}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def verdict_lines(uncertainty: Uncertainty, focus: str = "tcssa") -> list[str]:
    """Sentences computed from the run: does ``focus`` beat each other model beyond the interval?"""
    if uncertainty.reason:
        return [f"No bootstrap intervals: {uncertainty.reason}."]
    lines = []
    if uncertainty.best:
        lines.append(f"{plots._display_name(uncertainty.best)} has the highest AUC, beyond the 95% paired "
                     "bootstrap interval against every other model.")  # fmt: skip
    else:
        lines.append("No model beats every other beyond the 95% paired bootstrap interval, so none is "
                     "highlighted as best.")  # fmt: skip
    others = [b for (a, b) in uncertainty.against if a == focus]
    for other in others:
        d = uncertainty.against[(focus, other)]
        verdict = (
            "supported" if d.supported else "worse beyond noise" if d.difference.high < 0 else "not supported"
        )
        lines.append(
            f"{plots._display_name(focus)} − {plots._display_name(other)}: AUC {d.difference.mean:+.3f} "
            f"[95% CI {d.difference.low:+.3f}, {d.difference.high:+.3f}], {verdict}."
        )
    return lines


def _sweep_points(path: Path, x_column: str) -> list[plots.SweepPoint]:
    rows = read_csv_rows(path, required=("model", x_column, "auc_mean", "auc_std"))
    return [
        plots.SweepPoint(r["model"], to_float(r[x_column]), to_float(r["auc_mean"]), to_float(r["auc_std"]))
        for r in rows
    ]


def _at(points: Sequence[plots.SweepPoint], model: str, x: float) -> plots.SweepPoint | None:
    return next((p for p in points if p.model == model and p.x == x), None)


def _point_text(point: plots.SweepPoint | None) -> str:
    return "n/a" if point is None or math.isnan(point.auc_mean) else f"{point.auc_mean:.2f}"


def budget_caption(points: Sequence[plots.SweepPoint]) -> str:
    """What the token budget sweep of this run shows, in numbers: each model at its smallest and
    largest budget."""
    parts = []
    for model in dict.fromkeys(p.model for p in points):
        mine = sorted(
            (p for p in points if p.model == model and not math.isnan(p.auc_mean)), key=lambda p: p.x
        )
        if not mine:
            continue
        ends = [mine[0], mine[-1]] if len(mine) > 1 else mine
        values = " → ".join(f"{p.auc_mean:.2f} at K = {p.x:.0f}" for p in ends)
        parts.append(f"{plots._display_name(model)} {values}")
    return "Test AUC: " + "; ".join(parts) + "."


def lesion_caption(points: Sequence[plots.SweepPoint]) -> str:
    """What the lesion-size sweep of this run shows, in numbers: the smallest and largest lesions."""
    bands = sorted({p.x for p in points})
    models = list(dict.fromkeys(p.model for p in points))
    parts = []
    for x in [bands[0], bands[-1]] if len(bands) > 1 else bands:
        values = ", ".join(f"{plots._display_name(m)} {_point_text(_at(points, m, x))}" for m in models)
        parts.append(f"lesions around {100 * x:.2g}% of the patches: {values}")
    return "Test AUC — " + "; ".join(parts) + "."


def _note(text: str, kind: str = "note") -> str:
    return f'<div class="{kind}">{esc(text)}</div>'


class _Page:
    """Collects sections and notes while the report is assembled."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.notes: list[str] = []

    def section(self, title: str) -> None:
        self.parts.append(f"<h2>{esc(title)}</h2>")

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure(self, make: Callable[[], plots.Plot], what: str) -> None:
        """Draw one figure; a figure that cannot be drawn becomes a note, not a failed report."""
        try:
            self.parts.append(_figure_html(make()))
        except (ValueError, KeyError, IndexError) as err:
            self.parts.append(_note(f"{what}: not drawn ({err})"))
            self.notes.append(f"{what} not drawn: {err}")


_CONFIG_FACTS = ("features", "features_dir", "labels", "labels_csv", "folds", "epochs", "seed")


def _header_html(compare: CompareRun, demo: dict | None, title: str) -> str:
    items: list[tuple[str, str]] = [("run directory", str(compare.path))]
    first = next(iter(compare.models.values()), None)
    if first is not None and first.config:
        config = first.config
        for key in _CONFIG_FACTS:
            if key in config and config[key] not in (None, ""):
                items.append((key.replace("_", " "), str(config[key])))
        if first.class_names:
            items.append(("classes", ", ".join(first.class_names)))
    items.append(("models", ", ".join(compare.model_names)))
    if demo:
        for key, value in demo.get("facts", {}).items():
            items.append((str(key), str(value)))
    facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    intro = ""
    if demo and demo.get("intro"):
        intro = f"<p>{esc(demo['intro'])}</p>"
    return (
        f"<h1>{esc(title)}</h1>"
        f'<p class="subtitle">TC-SSA (token compression via semantic slot aggregation) against MIL '
        f"baselines, on the same folds.</p>{intro}<dl>{facts}</dl>"
    )


def build_report(
    compare_dir: str | Path,
    out: str | Path | None = None,
    *,
    slide_analysis: SlideAnalysis | None = None,
    title: str = "tcssa report",
    mean_patches: float | None = None,
    uncertainty: Uncertainty | None = None,
    real_slide: Callable[[], SlideFigures] | None = None,
) -> Path:
    """Write the HTML report of a compare run and return its path (default ``compare_dir/report.html``).

    ``slide_analysis`` computes the slot map and embedding figures (it needs a TC-SSA checkpoint and the
    slide features); without it, or when it cannot run, the report says so in a note. ``uncertainty``:
    the run's ``comparison_uncertainty`` when the caller has it already (computed here otherwise).
    ``real_slide`` draws a real slide file's slots (``tcssa.apps.slide_slots``); without it the section
    says how to ask for one.
    """
    compare = load_compare_run(compare_dir)
    out = Path(out) if out is not None else compare.path / REPORT_NAME
    demo_path = compare.path / DEMO_INFO
    demo = read_json(demo_path) if demo_path.is_file() else None
    if mean_patches is None and demo and demo.get("mean_patches"):
        mean_patches = float(demo["mean_patches"])

    page = _Page()
    page.add(_header_html(compare, demo, title))

    page.section("Comparison")
    if uncertainty is None:
        uncertainty = comparison_uncertainty(compare)
    page.add(comparison_table_html(compare.rows, mean_patches, uncertainty))
    page.add(
        "<p>Mean ± std (ddof 1) over the test folds"
        + (
            "; the 95% interval of the mean-over-folds AUC is a stratified bootstrap over each fold's "
            "test slides (2,000 resamples), and a row is highlighted only when its model beats every "
            "other beyond the paired interval"
            if uncertainty.intervals
            else ""
        )
        + ". Tokens per slide is what the classifier head sees; compression N/K divides the mean number "
        "of patches per slide" + (f" ({mean_patches:,.0f})" if mean_patches else "") + " by it.</p>"
    )
    verdicts = verdict_lines(uncertainty)
    page.add("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in verdicts) + "</ul>")
    if demo and demo.get("token_budget"):
        page.add("<p>What the trained TC-SSA does to the slide shown under \u201cInside one slide\u201d:</p>")
        page.add(f"<pre>{esc(chr(10).join(demo['token_budget']))}</pre>")
    scores = [
        plots.ModelScore(
            r["model"],
            to_float(r.get("auc_mean")),
            to_float(r.get("auc_std")),
            "" if math.isnan(_tokens(r)) else f"{_tokens(r):.0f}",
        )
        for r in compare.rows
    ]
    page.figure(lambda: plots.comparison_bars(scores, caption=" ".join(verdicts[:2])), "AUC per model")
    predictions = {name: run.predictions for name, run in compare.models.items() if run.predictions}
    if predictions:
        page.figure(lambda: plots.roc_curves(predictions), "ROC curves")
    else:
        page.add(_note("No per-fold predictions in the run directories, so no ROC curves."))

    page.section("Sweeps")
    sweep_dir = compare.path / SWEEP_DIR
    budget_csv, lesion_csv = sweep_dir / TOKEN_BUDGET_CSV, sweep_dir / LESION_FRACTION_CSV
    if budget_csv.is_file():
        budget_points = _sweep_points(budget_csv, "num_tokens")
        swept = {p.model for p in budget_points}
        # models without a token budget (they see every patch) are level lines at their comparison AUC
        references = [
            plots.Reference(r["model"], to_float(r.get("auc_mean")), to_float(r.get("auc_std")))
            for r in compare.rows
            if r["model"] not in swept and math.isnan(_tokens(r))
        ]
        # a model with a fixed budget that was not swept (mean pooling: 1 token) is one point at its K
        budget_points += [
            plots.SweepPoint(r["model"], _tokens(r), to_float(r.get("auc_mean")), to_float(r.get("auc_std")))
            for r in compare.rows
            if r["model"] not in swept and not math.isnan(_tokens(r))
        ]
        page.figure(
            lambda: plots.token_budget_sweep(budget_points, references, budget_caption(budget_points)),
            "token budget sweep",
        )
    if lesion_csv.is_file():
        lesion_points = _sweep_points(lesion_csv, "lesion_fraction")
        page.figure(
            lambda: plots.lesion_fraction_sweep(lesion_points, caption=lesion_caption(lesion_points)),
            "lesion fraction sweep",
        )
        if demo and demo.get("lesion_sweep_note"):
            page.add(f"<p>{esc(demo['lesion_sweep_note'])}</p>")
    if not budget_csv.is_file() and not lesion_csv.is_file():
        page.add(
            _note(
                "This run has no sweeps (they are part of `tcssa demo`; a sweep directory "
                f"{SWEEP_DIR}/ with {TOKEN_BUDGET_CSV} or {LESION_FRACTION_CSV} adds them)."
            )
        )

    page.section("Slot utilisation")
    slot_runs = [run for run in compare.models.values() if run.slot_shares() is not None]
    if not slot_runs:
        page.add(_note("No slot_utilisation.csv in this run (only TC-SSA runs write one)."))
    for run in slot_runs:
        use = run.slot_shares()
        folds, shares, counts = use.folds, use.shares, use.counts
        unit = "of the test patches" if use.of_patches else "of the routing assignments"
        top_k = int(run.config.get("model_options", {}).get("top_k", 2))  # tcssa's default: top-2
        threshold = collapse_threshold(use.of_patches, top_k)
        collapsed = [
            (fold, float(shares[i].max()), int(shares[i].argmax()))
            for i, fold in enumerate(folds)
            if shares[i].max() > threshold
        ]
        if collapsed:
            details = "; ".join(f"fold {f}: slot {k} receives {100 * s:.0f}%" for f, s, k in collapsed)
            page.add(
                _note(
                    f"Slot collapse in {run.name}: one slot receives more than "
                    f"{100 * threshold:.0f}% {unit} ({details}). Raise the routing "
                    "loss weight (model option aux_weight) or check the features.",
                    "warn",
                )
            )
        else:
            page.add(
                _note(
                    f"No slot collapse in {run.name}: the largest slot receives "
                    f"{100 * float(shares.max()):.1f}% {unit} (threshold "
                    f"{100 * threshold:.0f}%).",
                    "ok",
                )
            )
        page.figure(
            lambda shares=shares, counts=counts, folds=folds, of_patches=use.of_patches, top_k=top_k: (
                plots.slot_utilisation(shares, counts, folds, of_patches=of_patches, top_k=top_k)
            ),
            "slot utilisation",
        )

    page.section("Inside one slide")
    if slide_analysis is None:
        page.add(_note("Slide-level figures were not requested."))
    else:
        try:
            slide = slide_analysis(compare)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
            slide = SlideFigures(notes=[f"slide-level analysis failed: {err}"])
        for note in slide.notes:
            page.add(_note(note))
        for plot in slide.plots:
            page.figure(lambda plot=plot: plot, plot.title)

    page.section("A real slide")
    if real_slide is None:
        page.add(_note("No real slide was given: `tcssa demo --slide SLIDE.svs` draws its slots on it."))
    else:
        try:
            shown = real_slide()
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
            shown = SlideFigures(notes=[f"the real slide could not be drawn: {err}"])
        except ImportError as err:  # reading slides is an optional extra; the rest of the report stands
            shown = SlideFigures(
                notes=[f'the real slide needs the optional package {err.name!r}: pip install "tcssa[wsi]"']
            )
        for note in shown.notes:
            page.add(_note(note))
        for plot in shown.plots:
            page.figure(lambda plot=plot: plot, plot.title)

    notes = compare.notes + page.notes
    if notes:
        page.section("Notes")
        page.add("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page.add(
        f"<footer>Generated by tcssa {esc(__version__)} on {esc(stamp)} from {esc(compare.path)}. "
        f"Rebuild with <code>tcssa report {esc(compare.path)}</code>.</footer>"
    )
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(page.parts)}</main></body></html>\n"
    )
    write_text(out, document)
    return out
