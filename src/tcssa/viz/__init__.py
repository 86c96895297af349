"""Plots and the HTML report: they draw results computed elsewhere (matplotlib, Agg, no pyplot).

Run directories are read by ``tcssa.io.runs``; this package only draws what it is given.
"""

from tcssa.viz.plots import (
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
    tokens_vs_auc,
)
from tcssa.viz.report import build_report

__all__ = [
    "ModelScore",
    "Plot",
    "SweepPoint",
    "build_report",
    "comparison_bars",
    "lesion_fraction_sweep",
    "roc_curves",
    "slot_embedding",
    "slot_map",
    "slot_palette",
    "slot_utilisation",
    "token_budget_sweep",
    "tokens_vs_auc",
]
