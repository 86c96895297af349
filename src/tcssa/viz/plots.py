"""Figures for the report: each function draws results it is given and returns a ``Plot``.

Nothing here trains, evaluates or reads run directories; the numbers come from the caller. Figures are
built on ``matplotlib.figure.Figure`` directly (no pyplot), so they render with Agg, keep no global state
and never open a window. Every figure has a title, labelled axes with units, and a one-line caption that
tells the reader what to look for.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from sklearn.metrics import auc, roc_curve
from sklearn.preprocessing import label_binarize

from tcssa.io.runs import FoldPredictions
from tcssa.train.metrics import collapse_threshold, mean_std

TITLE_SIZE = 13
CHANCE_STYLE = {"color": "0.55", "linestyle": ":", "linewidth": 1.2}

# Fixed colours per model name so that a model looks the same in every figure of a report.
MODEL_COLOURS = {
    "tcssa": "#d62728",
    "random-k": "#1f77b4",
    "kmeans-k": "#9467bd",
    "grid-k": "#8c564b",
    "mean": "#7f7f7f",
    "max": "#bcbd22",
    "abmil": "#2ca02c",
    "abmil-gated": "#17becf",
    "transmil": "#ff7f0e",
}
_SPARE_COLOURS = ["#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354"]


@dataclass
class Plot:
    """A finished figure with the sentence that tells a reader what to look for."""

    figure: Figure
    title: str
    caption: str

    def to_png(self, dpi: int = 110) -> bytes:
        buffer = io.BytesIO()
        # The constrained layout already fits every label; bbox_inches="tight" would draw twice.
        self.figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
        return buffer.getvalue()

    def save(self, path: str | Path, dpi: int = 110) -> Path:
        path = Path(path)
        path.write_bytes(self.to_png(dpi))
        return path


def model_colour(name: str, order: Sequence[str] = ()) -> str:
    """The colour of a model in every figure; unknown names get spare colours by their position."""
    if name in MODEL_COLOURS:
        return MODEL_COLOURS[name]
    unknown = [n for n in order if n not in MODEL_COLOURS]
    index = unknown.index(name) if name in unknown else sum(map(ord, name))
    return _SPARE_COLOURS[index % len(_SPARE_COLOURS)]


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] to CIE L*a*b* (D65), where Euclidean distance approximates perceived difference."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]]
    )  # fmt: skip
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=8)
def _farthest_point_palette(num_colours: int) -> np.ndarray:
    # Candidates: a grid of hues x lightness x saturation, minus near-greys (they read as background).
    hues = np.arange(48) / 48
    candidates = np.array(
        [
            colorsys.hls_to_rgb(h, light, sat)
            for h in hues
            for light in (0.28, 0.42, 0.56, 0.70)
            for sat in (0.6, 0.95)
        ]
    )
    lab = _rgb_to_lab(candidates)
    chosen = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]  # start at the most saturated colour
    nearest = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    # Glasbey-style greedy choice: each new colour is the candidate farthest from all chosen so far,
    # so consecutive slot indices get very different colours and no two slots look alike.
    for _ in range(num_colours - 1):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    return candidates[chosen]


def slot_palette(num_slots: int) -> np.ndarray:
    """``num_slots`` x 3 RGB colours that stay distinguishable for K = 32 slots (and more).

    Up to 10 slots use matplotlib's tab10, which readers already know; beyond that, colours are picked
    greedily to be as far apart as possible in CIE Lab (perceptual) space.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if num_slots <= 10:
        return np.array(colormaps["tab10"].colors[:num_slots])
    return _farthest_point_palette(num_slots).copy()


RARE_PHENOTYPE_COLOUR = "#e00000"  # the rarest phenotype of a slide (e.g. a small lesion) stands out


def phenotype_palette(num_phenotypes: int, highlight: int | None = None) -> np.ndarray:
    """Colours for ground-truth tissue phenotypes; ``highlight`` (e.g. the rarest) gets a strong red.

    Dark2 holds no pure red, so the highlighted phenotype cannot be confused with another.
    """
    base = colormaps["Dark2"].colors if num_phenotypes <= 8 else colormaps["tab20"].colors
    colours = np.array([to_rgb(base[i % len(base)]) for i in range(num_phenotypes)])
    if highlight is not None:
        colours[highlight] = to_rgb(RARE_PHENOTYPE_COLOUR)
    return colours


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure


def _finish(figure: Figure, title: str, caption: str) -> Plot:
    figure.suptitle(title, fontsize=TITLE_SIZE)
    return Plot(figure, title, caption)


def _display_name(name: str) -> str:
    return {"tcssa": "TC-SSA"}.get(name, name)


# --- the comparison ----------------------------------------------------------------------------------


@dataclass
class ModelScore:
    """One model's test AUC over the folds, as the comparison table reports it."""

    model: str
    auc_mean: float
    auc_std: float
    tokens: str = ""  # tokens per slide the head sees ("" / "all" for full-bag models)


def comparison_bars(scores: Sequence[ModelScore], metric: str = "ROC AUC", caption: str = "") -> Plot:
    """Horizontal bars of mean test AUC per model with the fold-to-fold std (ddof 1) as error bars.

    ``caption`` is the sentence computed from this run's numbers (the report's verdict); without one
    the caption only says how to read the bars.
    """
    if not scores:
        raise ValueError("comparison_bars needs at least one model")
    order = [s.model for s in scores]
    figure = _new_figure(8.0, 0.55 * len(scores) + 1.6)
    ax = figure.subplots()
    positions = np.arange(len(scores))[::-1]
    means = np.array([s.auc_mean for s in scores], dtype=float)
    stds = np.nan_to_num(np.array([s.auc_std for s in scores], dtype=float))
    colours = [model_colour(s.model, order) for s in scores]
    ax.barh(positions, means, xerr=stds, color=colours, alpha=0.85, capsize=4, height=0.6)
    for y, mean, std in zip(positions, means, stds, strict=True):
        if np.isfinite(mean):  # the value sits right of the error bar, never on it
            ax.text(mean + std + 0.015, y, f"{mean:.3f} ± {std:.3f}", va="center", fontsize=9)
    labels = [_display_name(s.model) + (f"  ({s.tokens} tokens)" if s.tokens else "") for s in scores]
    ax.set_yticks(positions, labels)
    ax.axvline(0.5, **CHANCE_STYLE)
    # the axis holds every whole error bar (a bar of 0.30 ± 0.35 reaches below 0) and its label
    left = min(0.0, float(np.nanmin(means - stds)) - 0.03) if np.isfinite(means).any() else 0.0
    ax.set_xlim(left, max(1.2, float(np.nanmax(means + stds)) + 0.3))
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel(f"test {metric} (mean ± std over folds; 0.5 = chance)")
    ax.set_ylabel("model (tokens per slide)")
    ax.grid(axis="x", alpha=0.3)
    how = "Longer bars are better; error bars are the fold-to-fold std."
    return _finish(figure, f"Slide classification: test {metric} per model", f"{caption} {how}".strip())


def _roc_points(fold: FoldPredictions) -> tuple[np.ndarray, np.ndarray, float] | None:
    labels = np.asarray(fold.labels)
    probs = np.asarray(fold.probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return None  # a ROC curve needs both classes in the fold
    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
    else:  # micro-average one-vs-rest: every (slide, class) pair is one decision
        onehot = label_binarize(labels, classes=np.arange(probs.shape[1]))
        fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    return fpr, tpr, float(auc(fpr, tpr))


def roc_curves(predictions: Mapping[str, Sequence[FoldPredictions]], columns: int = 3) -> Plot:
    """One panel per model: each fold's test ROC curve (thin) and their vertical mean (thick)."""
    models = [m for m, folds in predictions.items() if folds]
    if not models:
        raise ValueError("roc_curves needs predictions of at least one model")
    columns = min(columns, len(models))
    rows = math.ceil(len(models) / columns)
    figure = _new_figure(3.6 * columns + 0.4, 3.5 * rows + 0.6)
    axes = np.atleast_1d(figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    grid = np.linspace(0.0, 1.0, 201)
    multiclass = False
    for ax, model in zip(axes, models, strict=False):
        colour = model_colour(model, models)
        curves, aucs = [], []
        for fold in predictions[model]:
            multiclass |= np.asarray(fold.probs).shape[1] > 2
            points = _roc_points(fold)
            if points is None:
                continue
            fpr, tpr, value = points
            ax.plot(fpr, tpr, color=colour, alpha=0.35, linewidth=1)
            curves.append(np.interp(grid, fpr, tpr))
            aucs.append(value)
        if curves:
            mean, std = mean_std(aucs)  # the comparison table's definition (ddof 1)
            ax.plot(grid, np.mean(curves, axis=0), color=colour, linewidth=2.4)
            ax.set_title(
                f"{_display_name(model)}: AUC {mean:.3f} ± {std:.3f}",
                fontsize=10.5,
            )
        else:
            ax.set_title(f"{_display_name(model)}: no fold with both classes", fontsize=10.5)
        ax.plot([0, 1], [0, 1], **CHANCE_STYLE)
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    for ax in axes[: len(models)]:
        ax.set_xlabel("false positive rate (fraction of negatives)")
        ax.set_ylabel("true positive rate (fraction of positives)")
        ax.label_outer()
    legend = [
        Line2D([], [], color="0.3", alpha=0.4, linewidth=1, label="one test fold"),
        Line2D([], [], color="0.3", linewidth=2.4, label="mean over folds"),
        Line2D([], [], label="chance", **CHANCE_STYLE),
    ]
    figure.legend(handles=legend, loc="outside lower center", ncols=3, frameon=False)
    kind = " (micro-averaged one-vs-rest)" if multiclass else ""
    return _finish(
        figure,
        f"ROC curves on the test folds{kind}",
        "Curves hugging the top-left corner are better; the spread of the thin lines shows how much "
        "the result depends on the fold.",
    )


# --- the two sweeps ----------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """Mean and std of the test AUC over folds of one model at one setting of the swept variable."""

    model: str
    x: float
    auc_mean: float
    auc_std: float


@dataclass
class Reference:
    """A model that has no token budget (it sees every patch), drawn as a level line with its std band."""

    model: str
    auc_mean: float
    auc_std: float


def _sweep_axes(
    points: Sequence[SweepPoint],
    references: Sequence[Reference] = (),
    width: float = 8.5,
    height: float = 4.6,
):
    if not points:
        raise ValueError("a sweep plot needs at least one point")
    figure = _new_figure(width, height)
    ax = figure.subplots()
    order = list(dict.fromkeys([p.model for p in points] + [r.model for r in references]))
    for index, model in enumerate(order):
        mine = sorted((p for p in points if p.model == model), key=lambda p: p.x)
        if not mine:
            continue
        # Shift each model a little along the (log) x axis so that error bars at one x do not overlap.
        dodge = 1.0 + 0.02 * (index - (len(order) - 1) / 2)
        ax.errorbar(
            [p.x * dodge for p in mine],
            [p.auc_mean for p in mine],
            yerr=np.nan_to_num([p.auc_std for p in mine]),
            color=model_colour(model, order),
            marker="o",
            markersize=6,
            linewidth=2,
            capsize=4,
            label=_display_name(model),
        )
    for ref in references:  # a level line; its fold std goes in the legend (a band would hide the data)
        spread = f" ± {ref.auc_std:.2f}" if np.isfinite(ref.auc_std) else ""
        ax.axhline(ref.auc_mean, color=model_colour(ref.model, order), linestyle="--", linewidth=1.4,
                   label=f"{_display_name(ref.model)}, all patches ({ref.auc_mean:.2f}{spread})")  # fmt: skip
    ax.axhline(0.5, **CHANCE_STYLE, label="chance")
    lows = [p.auc_mean - np.nan_to_num(p.auc_std) for p in points]
    highs = [p.auc_mean + np.nan_to_num(p.auc_std) for p in points]
    lows += [r.auc_mean for r in references]
    highs += [r.auc_mean for r in references]
    # every error bar whole: the axis is not cut at 0 or at 1
    ax.set_ylim(min(0.45, float(np.nanmin(lows)) - 0.03), max(1.02, float(np.nanmax(highs)) + 0.02))
    ax.grid(alpha=0.3)
    # the legend stands under the axes, never over the data
    figure.legend(loc="outside lower center", ncols=4, frameon=False, fontsize=9)
    return figure, ax


def token_budget_sweep(
    points: Sequence[SweepPoint], references: Sequence[Reference] = (), caption: str = ""
) -> Plot:
    """Test AUC against the token budget K (tokens per slide), log2 x axis; full-bag models as lines."""
    figure, ax = _sweep_axes(points, references)
    budgets = sorted({int(p.x) for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(k) for k in budgets])
    ax.minorticks_off()
    ax.set_xlabel("token budget K (tokens per slide, log2 scale)")
    ax.set_ylabel("test ROC AUC (mean ± std over folds)")
    how = "Dashed lines: models without a token budget (they see every patch); error bars: fold std."
    return _finish(
        figure, "How many tokens does a slide need? AUC vs token budget K", f"{caption} {how}".strip()
    )


def tokens_vs_auc(
    points: Sequence[SweepPoint], labels: Mapping[tuple[str, float], str] | None = None, caption: str = ""
) -> Plot:
    """Test AUC against the tokens a slide really uses (mean per slide, log2 x axis): one point per
    routing-coverage threshold of an adaptive budget (``token_budget``), one line per model.
    ``labels`` names a point ((model, x) -> text, e.g. "c=0.9")."""
    figure, ax = _sweep_axes(points)
    for (model, x), text in (labels or {}).items():
        match = [p for p in points if p.model == model and p.x == x]
        if match:
            ax.annotate(text, (x, match[0].auc_mean), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    low, high = min(p.x for p in points), max(p.x for p in points)
    ticks = [2**e for e in range(int(np.floor(np.log2(low))), int(np.ceil(np.log2(high))) + 1)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tokens the head sees (mean per slide, log2 scale)")
    ax.set_ylabel("test ROC AUC (mean ± std over folds)")
    how = (
        "Each point: the fewest slots covering a share c of each slide's routing mass; error bars: fold std."
    )
    return _finish(figure, "Adaptive budget: AUC vs tokens used per slide", f"{caption} {how}".strip())


def lesion_fraction_sweep(points: Sequence[SweepPoint], num_tokens: int = 32, caption: str = "") -> Plot:
    """Test AUC against the fraction of lesion patches in positive slides (%, log x axis)."""
    figure, ax = _sweep_axes(points)
    fractions = sorted({p.x for p in points})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:.2g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("lesion fraction of positive slides (% of patches, log scale)")
    ax.set_ylabel("test ROC AUC (mean ± std over folds)")
    how = "Each point: one band's positive slides against all negatives; error bars: fold std."
    return _finish(
        figure, f"Unsafe pruning: AUC vs lesion size at K = {num_tokens}", f"{caption} {how}".strip()
    )


# --- slots -------------------------------------------------------------------------------------------


def slot_utilisation(
    shares: np.ndarray,
    counts: np.ndarray | None = None,
    folds: Sequence[int] | None = None,
    *,
    of_patches: bool = True,
    top_k: int = 2,
) -> Plot:
    """How much each slot receives: mean over folds (bars, whiskers from the lowest to the highest
    fold, so they never pass below 0) and every fold (heat map).

    ``shares`` is folds x K: with ``of_patches`` the share of each fold's test patches routed to the
    slot (sums to top-k over the slots), else its share of all routing assignments (sums to 1).
    ``counts`` are the matching numbers of assignments, used for the caption's totals.
    """
    shares = np.atleast_2d(np.asarray(shares, dtype=float))
    num_folds, num_slots = shares.shape
    percent = 100 * shares
    threshold = 100 * collapse_threshold(of_patches, top_k)
    figure = _new_figure(max(8.0, 0.28 * num_slots + 2.0), 6.2)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1.5, 1])
    slots = np.arange(num_slots)
    colours = slot_palette(num_slots)
    mean = percent.mean(axis=0)
    whiskers = np.stack([mean - percent.min(axis=0), percent.max(axis=0) - mean])
    top.bar(slots, mean, yerr=whiskers, color=colours, capsize=2, width=0.8)
    top.axhline(threshold, color="#b30000", linestyle="--", linewidth=1.2,
                label=f"collapse threshold ({threshold:.0f}%)")  # fmt: skip
    uniform = 100 * float(shares.sum(axis=1).mean()) / num_slots  # whether shares sum to 1 or to top-k
    top.axhline(uniform, color="0.3", linestyle=":", linewidth=1.4, label=f"uniform ({uniform:.2g}%)")
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=9, frameon=False)
    top.set_ylim(0, max(threshold * 1.15, float(np.nanmax(percent)) * 1.1))
    what = "test patches routed to it (%)" if of_patches else "share of assignments (%)"
    top.set_ylabel(f"{what}\nmean, range over folds")
    top.grid(axis="y", alpha=0.3)
    image = bottom.imshow(percent, aspect="auto", cmap="viridis", interpolation="nearest")
    fold_names = list(folds) if folds is not None else list(range(num_folds))
    bottom.set_yticks(np.arange(num_folds), [f"fold {f}" for f in fold_names])
    bottom.set_xlabel("slot index k")
    bottom.set_ylabel("test fold")
    tick_step = 1 if num_slots <= 16 else 2 if num_slots <= 40 else 8
    bottom.set_xticks(slots[::tick_step])
    colourbar = figure.colorbar(image, ax=bottom, pad=0.01)
    colourbar.set_label("share (%)")
    fold, slot = np.unravel_index(int(np.nanargmax(percent)), percent.shape)
    largest = float(percent[fold, slot])
    verdict = "above" if largest > threshold else "below"
    unit = "of its test patches" if of_patches else "of its routing assignments"
    caption = (
        f"The largest slot (slot {slot} in fold {fold_names[fold]}) receives {largest:.1f}% {unit}, "
        f"{verdict} the collapse line at {threshold:.0f}%; "
        f"{int((mean > 0).sum())} of {num_slots} slots receive patches on average."
    )
    if counts is not None:
        total = int(np.asarray(counts).sum())
        caption += f" ({total:,} test-set assignments over {num_folds} folds.)"
    return _finish(figure, "TC-SSA slot utilisation on the test slides", caption)


def _grid_image(coords: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, float, tuple[float, ...]]:
    """Place one value per patch on the patch grid (NaN where there is no patch) for ``imshow``."""
    coords = np.asarray(coords, dtype=np.int64)
    steps = [np.diff(np.unique(coords[:, axis])) for axis in range(2)]
    steps = [int(np.gcd.reduce(s)) if len(s) else 1 for s in steps]
    step = max(1, min(steps))
    origin = coords.min(axis=0)
    cells = (coords - origin) // step
    image = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), np.nan)
    image[cells[:, 1], cells[:, 0]] = values
    extent = (
        origin[0] - step / 2,
        origin[0] + (image.shape[1] - 0.5) * step,
        origin[1] + (image.shape[0] - 0.5) * step,
        origin[1] - step / 2,
    )
    return image, step, extent


LEGEND_SLOTS = 16  # slots named in a legend: the most used ones; the rest hold few patches


def _slot_legend(ax, slot: np.ndarray, colours: np.ndarray, what: str) -> None:
    used, counts = np.unique(slot, return_counts=True)
    shown = used[np.argsort(-counts, kind="stable")][:LEGEND_SLOTS]
    title = f"{len(used)} slots {what}" + (f"; the {len(shown)} largest:" if len(shown) < len(used) else "")
    _category_legend(ax, [f"slot {k}" for k in shown], colours[shown], title, columns=8)


LEGEND_AXES = "<legend>"  # label of the axes that only hold a legend (no data, no axis labels)


def _panels(
    figure: Figure, panels: int, height_ratios: Sequence[float], share: bool = False
) -> tuple[list, list]:
    """A row of data panels, each above an axes of its own that holds its legend.

    Legends in their own axes take part in the constrained layout, so a long legend under a tall
    panel gets room instead of being cut off at the figure's edge.
    """
    grid = figure.add_gridspec(2, panels, height_ratios=height_ratios)
    axes: list = []
    for i in range(panels):
        shared = axes[0] if share and axes else None
        axes.append(figure.add_subplot(grid[0, i], sharex=shared, sharey=shared))
    legends = [figure.add_subplot(grid[1, i], label=LEGEND_AXES) for i in range(panels)]
    for ax in legends:
        ax.axis("off")
    return axes, legends


def _category_legend(ax, names: Sequence[str], colours: np.ndarray, title: str, columns: int) -> None:
    handles = [Patch(facecolor=colours[i], edgecolor="none", label=name) for i, name in enumerate(names)]
    ax.legend(
        handles=handles,
        title=title,
        loc="upper center",
        ncols=columns,
        fontsize=8,
        title_fontsize=9,
        frameon=False,
        handlelength=1.0,
        columnspacing=0.9,
    )


def _phenotype_names_colours(
    phenotype: np.ndarray, names: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    count = int(phenotype.max()) + 1
    names = list(names) if names is not None else []
    names += [f"phenotype {i}" for i in range(len(names), count)]
    counts = np.bincount(phenotype, minlength=len(names)).astype(float)
    counts[counts == 0] = np.inf
    rarest = int(np.argmin(counts)) if len(np.unique(phenotype)) > 1 else None
    return names, phenotype_palette(len(names), highlight=rarest)


def slot_map(
    coords: np.ndarray,
    top1_slot: np.ndarray,
    num_slots: int,
    phenotype: np.ndarray | None = None,
    phenotype_names: Sequence[str] | None = None,
    slide_label: str = "",
    facts: str = "",
) -> Plot:
    """Each patch of one slide at its coordinates, coloured by its top-1 slot, beside its phenotype map.

    ``facts`` (the caller's numbers on this slide's routing) lead the caption."""
    coords = np.asarray(coords)
    top1_slot = np.asarray(top1_slot)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(top1_slot):
        raise ValueError(
            f"slot_map needs coords N x 2 and one slot per patch, got {coords.shape} and {top1_slot.shape}"
        )
    panels = 2 if phenotype is not None else 1
    slot_image, step, extent = _grid_image(coords, top1_slot)
    panel_width = 6.0
    panel_height = float(np.clip(panel_width * slot_image.shape[0] / slot_image.shape[1], 2.5, 9.0))
    figure = _new_figure(panel_width * panels + 0.5, panel_height + 2.6)
    axes, legends = _panels(figure, panels, [panel_height, 1.3])
    slot_colours = slot_palette(num_slots)
    axes[0].imshow(
        slot_image, cmap=ListedColormap(slot_colours), vmin=-0.5, vmax=num_slots - 0.5,
        extent=extent, interpolation="nearest",
    )  # fmt: skip
    axes[0].set_title("top-1 TC-SSA slot of each patch", fontsize=11)
    _slot_legend(legends[0], top1_slot, slot_colours, "used")
    if phenotype is not None:
        phenotype = np.asarray(phenotype)
        names, colours = _phenotype_names_colours(phenotype, phenotype_names)
        pheno_image, _, _ = _grid_image(coords, phenotype)
        axes[1].imshow(
            pheno_image, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5,
            extent=extent, interpolation="nearest",
        )  # fmt: skip
        axes[1].set_title("ground-truth tissue phenotype", fontsize=11)
        present = np.unique(phenotype)
        fractions = {p: float(np.mean(phenotype == p)) for p in present}
        _category_legend(
            legends[1],
            [f"{names[p]} ({100 * fractions[p]:.2g}%)" for p in present],
            colours[present],
            "phenotype (share of patches)",
            columns=3,
        )
    for ax in axes:
        ax.set_xlabel("x (level-0 pixels)")
        ax.set_ylabel("y (level-0 pixels)")
        ax.set_facecolor("white")
    caption = f"{facts} " if facts else ""
    caption += "Slots should follow tissue regions"
    caption += (
        ": regions of one phenotype on the right should share a colour on the left, and a small lesion "
        "should keep slots of its own instead of being averaged into its surroundings."
        if phenotype is not None
        else " (no ground-truth phenotype in this slide's file to compare with)."
    )
    return _finish(figure, f"Slot map of {slide_label or 'one slide'} ({len(coords):,} patches)", caption)


def slot_embedding(
    points: np.ndarray,
    slot: np.ndarray,
    num_slots: int,
    method: str = "PCA",
    phenotype: np.ndarray | None = None,
    phenotype_names: Sequence[str] | None = None,
    axis_notes: Sequence[str] = ("", ""),
    sample_note: str = "",
) -> Plot:
    """A 2-D embedding of patch features coloured by top-1 slot (and by ground-truth phenotype).

    ``sample_note`` (e.g. how the points were sampled from the slide) is appended to the caption.
    """
    points = np.asarray(points, dtype=float)
    slot = np.asarray(slot)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(slot):
        raise ValueError(f"slot_embedding needs points N x 2 and one slot per point, got {points.shape}")
    panels = 2 if phenotype is not None else 1
    figure = _new_figure(6.0 * panels + 0.3, 7.2)
    axes, legends = _panels(figure, panels, [5.4, 1.3], share=True)
    marker = max(1.0, min(12.0, 6000 / max(len(points), 1)))
    slot_colours = slot_palette(num_slots)
    axes[0].scatter(points[:, 0], points[:, 1], c=slot_colours[slot], s=marker, linewidths=0, alpha=0.8)
    axes[0].set_title("coloured by top-1 slot", fontsize=11)
    _slot_legend(legends[0], slot, slot_colours, "among these patches")
    if phenotype is not None:
        phenotype = np.asarray(phenotype)
        names, colours = _phenotype_names_colours(phenotype, phenotype_names)
        # Draw rare phenotypes last so that a small lesion is not buried under the common tissue.
        order = np.argsort(-np.bincount(phenotype)[phenotype], kind="stable")
        axes[1].scatter(
            points[order, 0], points[order, 1], c=colours[phenotype[order]], s=marker, linewidths=0, alpha=0.8
        )
        axes[1].set_title("coloured by ground-truth phenotype", fontsize=11)
        present = np.unique(phenotype)
        _category_legend(legends[1], [names[p] for p in present], colours[present], "phenotype", columns=3)
    for ax in axes:
        ax.set_xlabel(f"{method} 1 (a.u.){axis_notes[0]}")
        ax.set_ylabel(f"{method} 2 (a.u.){axis_notes[1]}")
        ax.grid(alpha=0.2)
    caption = "Each slot should claim a compact region of feature space"
    caption += (
        ", and the regions should line up with the phenotypes on the right."
        if phenotype is not None
        else " (a slot scattered all over the plot is not semantic)."
    )
    if sample_note:
        caption += " " + sample_note
    return _finish(figure, f"Semantic slots: {method} of {len(points):,} patch features", caption)


# --- slide question answering --------------------------------------------------------------------------


def vqa_accuracy(rows: Sequence[Mapping], caption: str = "") -> Plot:
    """Grouped bars: accuracy per category (overall, then each broad and narrow one) for each variant,
    with the Wilson 95% interval as error bars. ``rows``: vqa_results.csv rows (variant, category,
    accuracy, n, ci95_low, ci95_high); rows without an interval (uniform random) are drawn as a line."""
    if not rows:
        raise ValueError("vqa_accuracy needs at least one row")
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "uniform-random"]
    categories = list(dict.fromkeys(r["category"] for r in rows))
    value = {(r["variant"], r["category"]): r for r in rows}
    figure = _new_figure(max(8.0, 1.2 * len(categories) + 2), 4.6)
    ax = figure.subplots()
    width = 0.8 / max(1, len(variants))
    for index, variant in enumerate(variants):
        x, heights, below, above = [], [], [], []
        for position, category in enumerate(categories):
            row = value.get((variant, category))
            if row is None:
                continue
            accuracy = float(row["accuracy"])
            x.append(position - 0.4 + width * (index + 0.5))
            heights.append(accuracy)
            low, high = row.get("ci95_low", ""), row.get("ci95_high", "")
            below.append(accuracy - float(low) if low != "" else 0.0)
            above.append(float(high) - accuracy if high != "" else 0.0)
        ax.bar(x, heights, width * 0.92, yerr=[below, above], capsize=2, label=variant,
               color=model_colour(variant, variants), alpha=0.85)  # fmt: skip
    for position, category in enumerate(categories):
        chance = value.get(("uniform-random", category))
        if chance is not None:
            ax.hlines(float(chance["accuracy"]), position - 0.45, position + 0.45, **CHANCE_STYLE)
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (Wilson 95% interval)")
    ax.set_xlabel("question category")
    ax.legend(fontsize=8, ncol=min(4, len(variants)), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    how = "Dotted lines: uniform random choice. Bars whose intervals overlap are not told apart."
    return _finish(figure, "Slide VQA: accuracy per question category", f"{caption}. {how}".strip())
