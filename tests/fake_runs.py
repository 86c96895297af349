"""Write small RUN/COMPARE directories that follow the shared run-directory contract, for report tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

MODELS = ("tcssa", "random-k", "abmil")
TOKENS = {"tcssa": 32, "random-k": 32, "kmeans-k": 32, "abmil": "", "mean": "", "transmil": ""}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_model_run(
    run: Path,
    model: str,
    *,
    folds: int = 3,
    slides_per_fold: int = 12,
    num_classes: int = 2,
    num_slots: int = 8,
    collapse: bool = False,
    seed: int = 0,
    slide_prefix: str = "slide",
) -> None:
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"model": model, "seed": seed, "folds": folds, "epochs": 2}))
    (run / "class_map.json").write_text(
        json.dumps({"class_names": [f"class-{c}" for c in range(num_classes)]})
    )
    summary, slot_rows = [], []
    for fold in range(folds):
        labels = np.arange(slides_per_fold) % num_classes
        logits = rng.normal(size=(slides_per_fold, num_classes)) + 1.5 * np.eye(num_classes)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        rows = [
            [f"{slide_prefix}-{fold}-{i}", int(labels[i]), int(probs[i].argmax()), *probs[i].round(5)]
            for i in range(slides_per_fold)
        ]
        _write_csv(
            run / f"fold_{fold}_predictions.csv",
            ["slide_id", "label", "pred"] + [f"p_{c}" for c in range(num_classes)],
            rows,
        )
        summary.append([fold, 0.8 + 0.02 * fold, 0.7, 0.7, 0.69, 0.4, 0.81, 0.5, 2, 1.5])
        if model == "tcssa":
            counts = rng.integers(10, 100, size=num_slots)
            if collapse and fold == 1:
                counts[3] = 10 * counts.sum()
            for slot, count in enumerate(counts):
                slot_rows.append([fold, slot, int(count), float(count / counts.sum())])
        (run / f"fold_{fold}").mkdir(exist_ok=True)
    _write_csv(
        run / "summary.csv",
        "fold,test_auc,test_acc,test_bacc,test_f1,test_kappa,val_auc,val_loss,epochs,train_seconds".split(
            ","
        ),
        summary,
    )
    if slot_rows:
        _write_csv(run / "slot_utilisation.csv", ["fold", "slot", "count", "share"], slot_rows)


def write_compare_run(root: Path, models=MODELS, **options) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, model in enumerate(models):
        write_model_run(root / model, model, seed=i, **options)
        rows.append(
            [model, 0.9 - 0.1 * i, 0.02, 0.8, 0.03, 0.79, 0.03, TOKENS.get(model, ""), 12.5 * (i + 1)]
        )
    _write_csv(
        root / "comparison.csv",
        "model,auc_mean,auc_std,bacc_mean,bacc_std,f1_mean,f1_std,tokens,train_seconds".split(","),
        rows,
    )
    (root / "comparison.md").write_text("| model |\n|---|\n")
    return root


def write_sweeps(root: Path) -> None:
    sweeps = root / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    _write_csv(
        sweeps / "token_budget.csv",
        ["model", "num_tokens", "auc_mean", "auc_std", "n_folds"],
        [[m, k, 0.6 + 0.05 * j if m == "random-k" else 0.95, 0.03, 3] for m in ("tcssa", "random-k")
         for j, k in enumerate((8, 16, 32, 64, 128))],
    )  # fmt: skip
    _write_csv(
        sweeps / "lesion_fraction.csv",
        ["model", "lesion_fraction", "auc_mean", "auc_std", "n_folds"],
        [
            [m, f, 0.55 + 5 * f, 0.04, 3]
            for m in ("tcssa", "random-k", "abmil")
            for f in (0.003, 0.008, 0.02, 0.04)
        ],
    )
