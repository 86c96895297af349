"""Adaptive token budget (issue 15, item 3): AUC against the tokens a slide really uses.

For each trained TC-SSA run given (a model folder of `tcssa compare` or a `tcssa train` run), every
fold's checkpoint reads its test slides with the head seeing only the fewest slots that cover a share
c of each slide's routing mass, for c in {0.5, 0.8, 0.9, 0.95, 0.99, 1} and for all K tokens; then a
table and a figure of mean tokens per slide against test AUC.

    python scripts/adaptive_budget.py --features COHORT/features --out /tmp/budget \\
        --runs COHORT/compare/tcssa COHORT/compare/tcssa-centred-kmeans-attn

Several cohorts: repeat --runs with --features per cohort in separate calls and merge the csv files.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tcssa.apps.adaptive_budget import DEFAULT_COVERAGES, coverage_sweep
from tcssa.viz import SweepPoint, tokens_vs_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="trained tcssa run folders")
    parser.add_argument("--features", required=True, help="the cohort's feature folder")
    parser.add_argument("--out", required=True, help="output folder (csv, md, png)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [p for run in args.runs for p in coverage_sweep(run, args.features, DEFAULT_COVERAGES)]
    columns = ["model", "coverage", "auc_mean", "auc_std", "tokens_mean", "tokens_min", "tokens_max"]
    with (out / "adaptive_budget.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for p in points:
            writer.writerow([getattr(p, c) if c != "coverage" else (p.coverage or "all") for c in columns])
    lines = [
        "| model | coverage c | tokens per slide (mean, min-max) | test AUC |",
        "|---|---|---|---|",
        *(
            f"| {p.model} | {'all K' if p.coverage is None else p.coverage} | {p.tokens_mean:.1f} "
            f"({p.tokens_min}-{p.tokens_max}) | {p.auc_mean:.3f} ± {p.auc_std:.3f} |"
            for p in points
        ),
    ]
    (out / "adaptive_budget.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    sweep = [SweepPoint(p.model, p.tokens_mean, p.auc_mean, p.auc_std) for p in points]
    first = points[0].model  # the coverages named on the first model's line only, to stay legible
    labels = {
        (p.model, p.tokens_mean): f"c={'all' if p.coverage is None else p.coverage}"
        for p in points
        if p.model == first
    }
    tokens_vs_auc(sweep, labels, caption=f"Test slides of {Path(args.features).parent.name}.").save(
        out / "adaptive_budget.png"
    )


if __name__ == "__main__":
    main()
