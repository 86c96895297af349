"""Rare evidence (issue 15): AUC against the lesion share, for TC-SSA, its options and the baselines.

For every lesion share and cohort seed: `tcssa synth` writes a `rare` cohort whose positive slides
hold the lesion in exactly that share of their patches, and `tcssa compare` trains every model on
the same patient-grouped folds. Then one table (mean and standard deviation over the seeds of each
seed's AUC, itself the mean over folds), the semantic-slot measures of the TC-SSA models (NMI and ARI
of top-1 slot against the true phenotype, the lesion slot's purity; `phenotype_agreement`), and a
figure of AUC against the share.

    python scripts/rare_evidence.py --out /tmp/rare_report --seeds 201 202 203 \\
        --shares 0.001 0.003 0.01 0.03 --jobs 2

Runs are resumable: a cohort or comparison already written is kept. Options were chosen on seed
100, so report seeds other than 100. `--jobs 2` runs two comparisons side by side, one torch thread
each; on 2 cores that beats one comparison on two threads.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_MODELS = "tcssa,tcssa:center=true,tcssa-centred-kmeans,tcssa-centred-kmeans-attn,kmeans-k,abmil"


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")


def cell_folder(args: argparse.Namespace, share: float, seed: int) -> Path:
    return Path(args.out) / f"share_{share:g}" / f"seed_{seed}"


def one_cohort(args: argparse.Namespace, share: float, seed: int) -> Path:
    folder = cell_folder(args, share, seed)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    tcssa = [sys.executable, "-m", "tcssa"]
    if not (folder / "labels.csv").is_file():
        run(
            [*tcssa, "synth", "--out", str(folder), "--task", "rare", "--slides", str(args.slides),
             "--dim", str(args.dim), "--seed", str(seed), "--min-patches", str(args.min_patches),
             "--max-patches", str(args.max_patches), "--lesion-fraction", str(share), "--overwrite"],
            log,
        )  # fmt: skip
    compare = folder / "compare"
    done = read_aucs(folder) if (compare / "comparison.csv").is_file() else {}
    if any(model not in done for model in args.models.split(",")):
        # --resume keeps every model and fold already trained there and trains the rest.
        resume = ["--resume"] if compare.is_dir() else []
        run(
            [*tcssa, "compare", "--models", args.models, "--features", str(folder / "features"),
             "--labels", str(folder / "labels.csv"), "--out", str(compare), "--folds", str(args.folds),
             "--epochs", str(args.epochs), "--seed", str(seed), "--device", "cpu", "--cache-gb", "2",
             *resume],
            log,
        )  # fmt: skip
    return folder


def read_aucs(folder: Path) -> dict[str, float]:
    with (folder / "compare" / "comparison.csv").open() as handle:
        return {row["model"]: float(row["auc_mean"]) for row in csv.DictReader(handle)}


def semantic(folder: Path, models: list[str]) -> dict[str, dict[str, float]]:
    from tcssa.apps.slot_analysis import phenotype_agreement
    from tcssa.io.runs import load_model_run

    return {
        m: phenotype_agreement(load_model_run(folder / "compare" / m), folder / "features")
        for m in models
        if m.startswith("tcssa") and (folder / "compare" / m / "summary.csv").is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03])
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--slides", type=int, default=120)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--min-patches", type=int, default=1500)
    parser.add_argument("--max-patches", type=int, default=6000)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="only tabulate the comparisons already there")
    args = parser.parse_args()
    models = args.models.split(",")

    cells = [(share, seed) for share in args.shares for seed in args.seeds]
    if args.no_run:  # tabulate what is there: cells without a comparison are left out, and said so
        folders = {c: cell_folder(args, *c) for c in cells}
        missing = [c for c, f in folders.items() if not (f / "compare" / "comparison.csv").is_file()]
        for cell in missing:
            print(f"not run: lesion share {cell[0]:g}, seed {cell[1]}", file=sys.stderr)
            del folders[cell]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            folders = dict(zip(cells, pool.map(lambda cell: one_cohort(args, *cell), cells), strict=True))

    out = Path(args.out)
    rows, lines = [], []
    header = "| lesion share | " + " | ".join(models) + " |"
    lines += [header, "|---" * (len(models) + 1) + "|"]
    aucs = {cell: read_aucs(folder) for cell, folder in folders.items()}
    for share in args.shares:
        seeds_here = [seed for seed in args.seeds if (share, seed) in aucs]
        cells_here = [aucs[(share, seed)] for seed in seeds_here]
        row = [f"{100 * share:g}% (seeds {', '.join(map(str, seeds_here))})"]
        for model in models:
            values = np.array([cell.get(model, np.nan) for cell in cells_here])
            values = values[~np.isnan(values)]
            if len(values) == 0:
                row.append("n/a")
                continue
            rows.append({"share": share, "model": model, "auc_mean": values.mean(),
                         "auc_std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                         "seeds": " ".join(str(s) for s in seeds_here),
                         "per_seed": " ".join(f"{v:.3f}" for v in values)})  # fmt: skip
            spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
            row.append(f"{values.mean():.3f}{spread}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"AUC, mean ± sd over the cohort seeds named (each the mean over {args.folds} folds)."]

    sem_rows = []
    for (share, seed), folder in folders.items():
        for model, values in semantic(folder, models).items():
            sem_rows.append({"share": share, "seed": seed, "model": model, **values})
    keys = ["nmi", "nmi_shuffled", "ari", "lesion_purity", "lesion_recall", "effective_k"]
    lines += ["", "| lesion share | model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for share in args.shares:
        for model in [m for m in models if m.startswith("tcssa")]:
            mine = [r for r in sem_rows if r["share"] == share and r["model"] == model]
            cells = [f"{np.mean([r.get(k, np.nan) for r in mine]):.3f}" for k in keys]
            lines.append(f"| {100 * share:g}% | {model} | " + " | ".join(cells) + " |")
    lines += ["", "Top-1 slot against the true phenotype of the test patches, mean over folds and seeds."]

    with (out / "rare_evidence.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "semantic_slots.csv").open("w", newline="") as handle:
        first = ("share", "seed", "model")
        fields = sorted({k for r in sem_rows for k in r}, key=lambda k: (k not in first, k))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(sem_rows)
    (out / "rare_evidence.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, models, out / "rare_evidence.png")
    print("\n".join(lines))


def plot(rows: list[dict], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for model in models:
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["share"])
        shares = [100 * r["share"] for r in mine]
        means = np.array([r["auc_mean"] for r in mine])
        stds = np.nan_to_num(np.array([r["auc_std"] for r in mine]))
        axis.errorbar(shares, means, yerr=stds, marker="o", capsize=3, label=model)
    axis.set_xscale("log")
    axis.set_xlabel("lesion share of a positive slide's patches (%)")
    axis.set_ylabel("test AUC (mean ± sd over cohort seeds)")
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_ylim(0.3, 1.02)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title("Rare evidence: AUC against lesion share")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    main()
