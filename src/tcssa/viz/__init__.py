"""Plots and the HTML report: they draw results computed elsewhere (matplotlib, Agg, no pyplot)."""

from tcssa.viz.plots import (
    FoldPredictions,
    ModelScore,
    Plot,
    SweepPoint,
    comparison_bars,
    lesion_fraction_sweep,
    roc_curves,
    slot_embedding,
    slot_map,
    slot_palette,
    slot_utilisation,
    token_budget_sweep,
)
from tcssa.viz.report import build_report
from tcssa.viz.runs import CompareRun, ModelRun, load_compare_run, load_model_run

__all__ = [
    "CompareRun",
    "FoldPredictions",
    "ModelRun",
    "ModelScore",
    "Plot",
    "SweepPoint",
    "build_report",
    "comparison_bars",
    "lesion_fraction_sweep",
    "load_compare_run",
    "load_model_run",
    "roc_curves",
    "slot_embedding",
    "slot_map",
    "slot_palette",
    "slot_utilisation",
    "token_budget_sweep",
]
