"""The main job, ``tcssa demo``: what TC-SSA does to a slide, and whether it keeps rare evidence.

One command, no user data: it writes a synthetic gigapixel cohort (the ``rare`` task: positive slides
hold a lesion in 0.2% to 5% of their patches), trains TC-SSA and the baselines on the same folds,
runs two sweeps, prints the headline table and writes ``DIR/report.html``:

- comparison: TC-SSA (K = 32), random-k (K = 32), kmeans-k, mean pooling, ABMIL, TransMIL;
- token budget sweep: AUC against K in {8, 16, 32, 64, 128} for TC-SSA and random-k;
- lesion size sweep: AUC against the lesion fraction of the positive slides at K = 32 for TC-SSA,
  random-k and ABMIL. The models of the comparison are trained once on the whole cohort (lesions of
  every size); each fold's test set is then split by the lesion fraction of its positive slides
  (ground truth from ``truth.csv``), and the AUC of each size band is that of its positives against all
  of the fold's negatives. The sweep therefore costs no training.

Compute (2 CPU cores is the target): the cohort is read once into memory (``MemoryCohort``) and
serves every fold of every model. Training slides are capped at ``train_patches`` random patches
per epoch (validation slides at a fixed subset of as many); test slides are always whole. The
fixed token-budget baselines see exactly the tokens they would compute themselves, precomputed once
per slide: the K k-means centroids (``kmeans-k``), the K patches random-k's evaluation picks by
content hash, and the slide mean (``mean``). Each is exact: the model applied to its precomputed
tokens gives the same output as on the whole slide (k-means of K points returns them, a K-sample of
K patches takes them all, the mean of one mean is itself). random-k trains on K random patches per
slide and epoch, the same distribution as sampling K from the whole slide.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from tcssa.apps.slide_slots import real_slide_figures
from tcssa.apps.slot_analysis import choose_slide, slide_figures
from tcssa.data import Cohort, Split, SyntheticCohort, make_kfold_splits, make_synthetic_cohort, save_splits
from tcssa.data.memory import MemoryCohort
from tcssa.io.bag import Bag
from tcssa.io.files import read_csv_rows
from tcssa.io.runs import SPLITS_FILE, fold_dir, load_compare_run, load_model_run, to_float, write_comparison
from tcssa.method import budget
from tcssa.method.compressor import TCSSA
from tcssa.train import TrainConfig
from tcssa.train.metrics import mean_std
from tcssa.train.runs import RunResult, comparison_row, load_checkpoint, train_run
from tcssa.viz import build_report
from tcssa.viz.report import (
    DEMO_INFO,
    LESION_FRACTION_CSV,
    SWEEP_DIR,
    TOKEN_BUDGET_CSV,
    SlideFigures,
    Uncertainty,
    comparison_uncertainty,
    verdict_lines,
)

COHORT_DIR = "cohort"
SLIDE_DIR = "real_slide"  # the real slide's features, thumbnails and slot map
BUDGET_RUNS_DIR = "token_budget"
MAIN_MODELS = ("tcssa", "random-k", "kmeans-k", "mean", "abmil", "transmil")


@dataclass(frozen=True)
class DemoConfig:
    """Everything ``tcssa demo`` runs; ``FULL`` and ``QUICK`` are the two presets of the command."""

    # the synthetic cohort (tcssa.data.make_synthetic_cohort, task "rare")
    num_slides: int = 200
    min_patches: int = 2000
    max_patches: int = 30000
    dim: int = 512
    lesion_fraction: tuple[float, float] = (0.002, 0.05)
    # the comparison
    models: tuple[str, ...] = MAIN_MODELS
    num_slots: int = 32
    folds: int = 5
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    train_patches: int = 512  # random patches per training slide and epoch (validation: a fixed subset)
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs_by_model: dict[str, int] = field(default_factory=dict)  # fewer epochs for a costly model
    # the sweeps: every model with a token budget is swept over K (the others are drawn as level
    # lines), and every model of the comparison is scored per lesion size (that costs no training)
    budget_models: tuple[str, ...] = ("tcssa", "random-k", "kmeans-k")
    budgets: tuple[int, ...] = (8, 16, 32, 64, 128)
    sweep_folds: int | None = None  # the token budget sweep runs on the first folds only (None: all)
    lesion_models: tuple[str, ...] = MAIN_MODELS
    lesion_edges: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05)
    # the report
    embedding: str = "pca"
    seed: int = 0
    slide: str | None = None  # a real slide file drawn in the report's "A real slide" section
    # the cohort seeds the training settings were chosen on (scripts/demo_settings.py); a demo run
    # on one of them is not a held-out result, and its report says so
    tuning_seeds: tuple[int, ...] = ()
    tuning_note: str = ""  # the settings that were not chosen on those seeds, if any

    def settings_provenance(self) -> str:
        """Where this run's training settings came from, for the report's header."""
        if not self.tuning_seeds:
            return "not recorded"
        seeds = ", ".join(map(str, self.tuning_seeds))
        note = f"; {self.tuning_note}" if self.tuning_note else ""
        if self.seed in self.tuning_seeds:
            return (
                f"cohorts of seeds {seeds}, which include this run's seed {self.seed}: its numbers are "
                f"not held out from that choice (optimistic){note}"
            )
        return f"cohorts of seeds {seeds} (scripts/demo_settings.py), not this run's seed {self.seed}{note}"

    def __post_init__(self) -> None:
        unknown = [m for m in (*self.budget_models, *self.lesion_models) if m not in self.models]
        if unknown:
            raise ValueError(
                f"sweep model(s) {unknown} must also be in the comparison's models {self.models}"
            )
        if self.num_slots not in self.budgets and self.budgets:
            raise ValueError(f"the token budgets {self.budgets} must include K = {self.num_slots}")
        if self.sweep_folds is not None and not 2 <= self.sweep_folds <= self.folds:
            raise ValueError(f"sweep_folds must be between 2 and folds={self.folds}, got {self.sweep_folds}")
        edges = self.lesion_edges
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"lesion_edges must be increasing, at least two, got {edges}")


FULL = DemoConfig(
    epochs=5,
    lr=3e-3,
    batch_size=4,
    train_patches=384,
    sweep_folds=2,  # 3 folds put the full demo at 9 min 52 s on 2 cores; 2 keep it near 8.5
    # ABMIL and TransMIL at their published widths would take most of the time budget of a CPU;
    # these narrower versions keep their architecture (attention pooling; Nystrom attention + PPEG).
    # TC-SSA's slot experts at METHOD.md's hidden size 512 (16.8M parameters at D = 512) memorise
    # the demo's ~144 training slides. Hidden size, slides per step and lr were chosen with
    # scripts/demo_settings.py on full-size cohorts of seeds 101 and 102, never the reported seed 0:
    # H = 16 / 64 / 512 gave TC-SSA AUC 0.973 / 0.936 / 0.658 (seed 101) and 0.906 / 0.904 / 0.639
    # (seed 102); then 4 or 16 slides per step at lr 1e-3 or 3e-3 (H = 16), mean over the two seeds
    # 0.975 (4, 1e-3), 0.982 (4, 3e-3), 0.940 (16, 1e-3), 0.950 (16, 3e-3). Epochs (5) and the
    # 384-patch training cap were set in earlier runs on seed 0 (docs/RESULTS.md "Demo").
    # The compressor's default stays 512.
    model_options={
        "tcssa": {"expert_hidden": 16},
        "abmil": {"embed_dims": [128], "attention_dim": 64},
        "transmil": {"dim": 64, "heads": 2, "num_landmarks": 32},
        "kmeans-k": {"iterations": 3},
    },
    tuning_seeds=(101, 102),
    tuning_note="the 5 epochs and the 384-patch training cap were set earlier on seed 0 itself",
)
# The smallest run that still exercises every part (the test suite's smoke test).
TINY = replace(
    FULL,
    num_slides=24,
    min_patches=150,
    max_patches=500,
    dim=32,
    folds=3,
    epochs=2,
    batch_size=8,
    train_patches=64,
    budgets=(8, 32),
    sweep_folds=2,
    lesion_edges=(0.002, 0.01, 0.05),
)
# Under 3 minutes on 2 CPU cores, and still the full demo's point: lesions of 1% to 4% of a slide,
# which 32 random patches miss most of the time (0.99^32 = 72% at 1%) and aggregation keeps.
# Its cohort and training settings (lesion range, D = 256, 4 slides per step, lr 3e-3, 12 epochs,
# expert hidden size 16) were chosen with scripts/demo_settings.py on cohorts of seeds 101 and
# 102, never on the seed the demo reports (0): docs/RESULTS.md "Demo".
QUICK = replace(
    FULL,
    num_slides=80,
    min_patches=1000,
    max_patches=4000,
    dim=256,
    lesion_fraction=(0.01, 0.04),
    epochs=12,
    lr=3e-3,
    batch_size=4,
    budgets=(8, 32, 64),
    sweep_folds=2,
    lesion_edges=(0.01, 0.02, 0.04),
    # TransMIL, the costliest model here (62 of the 164 s of training at 12 epochs), stays at chance
    # on this cohort either way (0.528 at 12 epochs); 6 epochs keep --quick clear of 3 minutes
    epochs_by_model={"transmil": 6},
    tuning_seeds=(101, 102),
    tuning_note="",  # every setting of the quick preset was chosen there (docs/RESULTS.md "Demo")
)


# --------------------------------------------------------------------------- the token budget lines


@dataclass
class BudgetReport:
    """What TC-SSA does to one slide's token budget."""

    num_patches: int
    dim: int
    num_slots: int
    seconds: float
    slots_used: int
    largest_slot_share: float
    slide_id: str = ""

    @property
    def ratio(self) -> float:
        return self.num_patches / self.num_slots

    def lines(self) -> list[str]:
        name = f"slide {self.slide_id}" if self.slide_id else "slide"
        return [
            f"{name}: {self.num_patches:,} patches x {self.dim}-d features",
            f"TC-SSA: {self.num_patches:,} patches -> {self.num_slots} slot tokens "
            f"({self.ratio:,.0f}x fewer tokens, "
            f"{100 * self.num_slots / self.num_patches:.3f}% of the sequence)",
            f"every patch feeds its top-2 slots; {self.slots_used}/{self.num_slots} slots used, "
            f"the largest slot receives {100 * self.largest_slot_share:.1f}% of the slide's patches",
            f"compression time (CPU, eval, float32): {1000 * self.seconds:.1f} ms",
        ]


def token_budget(compressor: TCSSA, features: torch.Tensor, slide_id: str = "") -> BudgetReport:
    """Compress one slide (N x D) with ``compressor`` in eval mode and report the token budget."""
    compressor = compressor.eval()
    with torch.inference_mode():
        compressor(features[:100])  # warm-up so the timing is of the compression itself
        start = time.perf_counter()
        out = compressor(features)
        seconds = time.perf_counter() - start
    counts = out.slot_counts[0]
    return BudgetReport(
        num_patches=int(features.shape[0]),
        dim=int(features.shape[1]),
        num_slots=compressor.config.num_slots,
        seconds=seconds,
        slots_used=int((counts > 0).sum()),
        # a share of the slide's patches, the slot utilisation figure's unit (top-2: shares sum to 2)
        largest_slot_share=float(counts.max() / features.shape[0]),
        slide_id=slide_id,
    )


def token_budget_demo(
    num_patches: int = 20_000, dim: int = 512, num_slots: int = 32, seed: int = 0
) -> BudgetReport:
    """Compress one synthetic slide (clustered random features) with an untrained TC-SSA."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=gen) * 2.0
    phenotype = torch.randint(0, 8, (num_patches,), generator=gen)
    features = centres[phenotype] + torch.randn(num_patches, dim, generator=gen)
    torch.manual_seed(seed)
    return token_budget(TCSSA(dim, num_slots=num_slots), features)


# --------------------------------------------------------------------------- precomputed tokens


def _precomputed_stores(store, config: DemoConfig, progress: bool) -> dict[str, Any]:
    """The exact tokens of the fixed token-budget baselines, computed once per slide."""
    stores: dict[str, Any] = {}
    if "mean" in config.models:
        stores["mean"] = store.map(
            lambda bag: Bag(bag.features.mean(dim=0, keepdim=True), None, bag.slide_id),
            progress=progress,
            desc="slide means (mean)",
        )
    if "kmeans-k" in config.models:
        iterations = config.model_options.get("kmeans-k", {}).get("iterations", 10)
        ks = sorted({config.num_slots, *(config.budgets if "kmeans-k" in config.budget_models else ())})
        centroids = {k: {} for k in ks}
        # one farthest-point initialisation per slide serves every K (budget.kmeans_pools)
        for slide_id, bag in tqdm(
            store.bags.items(), desc="k-means centroids (kmeans-k)", unit="slide", disable=not progress
        ):
            pools = budget.kmeans_pools(bag.features.float()[None], None, ks, iterations)
            for k, tokens in pools.items():
                centroids[k][slide_id] = Bag(tokens.tokens[0][tokens.token_mask[0]], None, slide_id)
        for k in ks:
            stores[f"kmeans-k@{k}"] = MemoryCohort(store.cohort, centroids[k])
    if "random-k" in config.models:
        hash_seed = config.model_options.get("random-k", {}).get("hash_seed", 0)
        budgets = sorted({config.num_slots, *(config.budgets if "random-k" in config.budget_models else ())})
        # random-k's evaluation keeps the K patches with the lowest content hash: one hash per
        # slide serves every K
        order = {
            slide_id: budget.content_hash(bag.features.float()[None], hash_seed)[0].argsort()
            for slide_id, bag in tqdm(
                store.bags.items(), desc="evaluation samples (random-k)", unit="slide", disable=not progress
            )
        }
        for k in budgets:
            stores[f"random-k@{k}"] = MemoryCohort(
                store.cohort,
                {s: Bag(bag.features[order[s][:k]].float(), None, s) for s, bag in store.bags.items()},
            )
    return stores


def _datasets(model: str, num_slots: int, store, stores: dict[str, Any], config: DemoConfig):
    """The engine's dataset factory for ``model``: (part, slide ids, fold seed) -> dataset."""
    capped = config.train_patches

    def factory(part: str, slide_ids: list[str], seed: int):
        if model == "mean":
            return stores[model].dataset(slide_ids)
        if model == "kmeans-k":
            return stores[f"kmeans-k@{num_slots}"].dataset(slide_ids)
        if model == "random-k":
            if part == "train":  # K random patches per epoch, as random-k samples from a whole slide
                return store.dataset(slide_ids, num_slots, seed)
            return stores[f"random-k@{num_slots}"].dataset(slide_ids)
        if part == "train":
            return store.dataset(slide_ids, capped, seed)
        if part == "val":  # validation only steers early stopping: a fixed subset is enough
            return store.dataset(slide_ids, capped, seed, fixed_subset=True)
        return store.dataset(slide_ids)  # test: whole slides

    return factory


def model_train_config(model: str, num_slots: int, config: DemoConfig) -> TrainConfig:
    """The training settings of one demo run: ``model`` at ``num_slots`` tokens, on CPU."""
    max_patches = {"mean": None, "kmeans-k": None, "random-k": num_slots}.get(model, config.train_patches)
    return TrainConfig(
        model=model,
        num_slots=num_slots,
        model_options=dict(config.model_options.get(model, {})),
        lr=config.lr,
        epochs=config.epochs_by_model.get(model, config.epochs),
        batch_size=config.batch_size,
        max_patches=max_patches,
        folds=config.folds,
        seed=config.seed,
        device="cpu",
    )


# --------------------------------------------------------------------------- the lesion-size sweep


def lesion_fraction_auc(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], edges: Sequence[float]
) -> list[dict[str, float]]:
    """AUC per lesion-size band: each band's positives against all negatives of the same test fold.

    ``predictions``: per fold, (labels 0/1, positive-class probability, lesion fraction per slide).
    Returns one row per band (lesion_fraction = geometric middle of the band): mean and std over the
    folds whose test set holds both a positive of the band and a negative.
    """
    rows = []
    for low, high in zip(edges, edges[1:], strict=False):
        last = high == edges[-1]
        aucs, positives = [], 0
        for labels, scores, fractions in predictions:
            in_band = (fractions >= low) & ((fractions <= high) if last else (fractions < high))
            chosen = (labels == 0) | ((labels == 1) & in_band)
            band_labels = labels[chosen]
            positives += int((band_labels == 1).sum())
            if 0 < band_labels.sum() < len(band_labels):
                aucs.append(roc_auc_score(band_labels, scores[chosen]))
        auc_mean, auc_std = mean_std(aucs)
        rows.append(
            {
                "lesion_fraction": math.sqrt(low * high),
                "lesion_low": low,
                "lesion_high": high,
                "auc_mean": auc_mean,
                "auc_std": auc_std,
                "n_folds": len(aucs),
                "n_positive": positives,
            }
        )
    return rows


def _read_truth(truth_csv: Path) -> dict[str, float]:
    rows = read_csv_rows(truth_csv, required=("slide_id", "lesion_fraction"))
    return {r["slide_id"]: to_float(r["lesion_fraction"]) for r in rows}


def _fold_predictions(run_dir: Path, lesion: dict[str, float]):
    run = load_model_run(run_dir)
    folds = []
    for fold in run.predictions:
        ids = run.prediction_slide_ids[fold.fold]
        fractions = np.array([lesion[s] for s in ids])
        folds.append((fold.labels, fold.probs[:, 1], fractions))
    return folds


# --------------------------------------------------------------------------- the demo


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    rows: list[dict[str, Any]]
    budget: BudgetReport | None
    seconds: dict[str, float]
    verdicts: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        return headline_lines(self.rows, self.budget, self.verdicts)


def claim(uncertainty: Uncertainty) -> str:
    """The demo's one sentence on its question, as strong as this run's paired interval allows."""
    diff = uncertainty.difference("tcssa", "random-k")
    if diff is None:
        return f"No paired interval for TC-SSA against random-k ({uncertainty.reason or 'model missing'})."
    numbers = (
        f"TC-SSA − random-k AUC {diff.difference.mean:+.3f}, 95% paired bootstrap interval "
        f"[{diff.difference.low:+.3f}, {diff.difference.high:+.3f}]"
    )
    if diff.supported:
        return f"On these test slides TC-SSA keeps rare evidence that random-k loses: {numbers}."
    return (
        f"This run does not support that TC-SSA keeps more rare evidence than random-k: {numbers} "
        "includes 0 (too few slides or too little training to tell)."
    )


def headline_lines(
    rows: Sequence[dict[str, Any]], budget: BudgetReport | None, verdicts: Sequence[str] = ()
) -> list[str]:
    """The printed headline: the comparison table, the run's verdicts, what TC-SSA does to one slide."""
    lines = [f"{'model':<10} {'AUC':>15} {'bal. acc.':>15} {'macro F1':>15} {'tokens':>7}"]
    fmt = lambda m, s: "n/a" if not math.isfinite(m) else f"{m:.3f} ± {s:.3f}"
    for r in rows:
        lines.append(
            f"{r['model']:<10} {fmt(r['auc_mean'], r['auc_std']):>15} "
            f"{fmt(r['bacc_mean'], r['bacc_std']):>15} {fmt(r['f1_mean'], r['f1_std']):>15} "
            f"{r['tokens']!s:>7}"
        )
    if verdicts:
        lines += ["", *verdicts]
    if budget is not None:
        lines += ["", *budget.lines()]
    return lines


def _prepare(out_dir: Path) -> None:
    """An empty folder, or the folder of an earlier demo (whose outputs are replaced)."""
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    entries = list(out_dir.iterdir())
    if entries and not (out_dir / DEMO_INFO).is_file():
        raise ValueError(
            f"{out_dir} is not empty and holds no earlier demo ({DEMO_INFO}); choose another --out"
        )
    for entry in entries:  # an earlier demo: start over
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def run_demo(out_dir: str | Path, config: DemoConfig = FULL, *, progress: bool = True) -> DemoResult:
    """Run the whole demo into ``out_dir`` and return where the report is and the headline numbers."""
    stages = _Stages(progress)
    say = stages.say
    out_dir = Path(out_dir)
    _prepare(out_dir)

    say(f"[1/5] synthetic cohort: {_cohort_text(config)}")
    synthetic = write_cohort(out_dir / COHORT_DIR, config, progress)
    stages.done("cohort")

    say("[2/5] reading the cohort into memory and precomputing the baselines' tokens")
    slides = load_slides(synthetic, config, progress)
    splits = make_folds(slides.cohort, config, out_dir)
    stages.done("load")

    runs = plan_runs(config, splits, out_dir)
    say(
        f"[3/5] {len(runs)} models x {len(splits)} folds: the comparison at K = {config.num_slots}, "
        f"then the token budget sweep"
    )
    results, rows = train_models(runs, synthetic, slides, config, out_dir, say, progress)
    stages.done("training")

    say("[4/5] sweeps")
    write_sweeps(out_dir, results, sweep_splits(config, splits), synthetic.truth_csv, config)
    budget = shown_slide_budget(out_dir, slides.store, config)
    stages.done("sweeps")

    say("[5/5] report")
    uncertainty = comparison_uncertainty(load_compare_run(out_dir))
    verdicts = [claim(uncertainty), *verdict_lines(uncertainty)[:1]]
    info = demo_info(config, slides.patches, splits, budget, verdicts, stages.seconds)
    _write_demo_info(out_dir, info)  # the report's header is read from it
    report = write_report(out_dir, synthetic, config, uncertainty, info["mean_patches"])
    stages.done("report")
    stages.finish()
    info["seconds"] = dict(stages.seconds)
    _write_demo_info(out_dir, info)  # again, now with the report's seconds and the total
    return DemoResult(
        out_dir=out_dir, report=report, rows=rows, budget=budget, seconds=stages.seconds, verdicts=verdicts
    )


class _Stages:
    """The demo's progress lines, and the seconds each stage took (``demo.json``'s ``seconds``)."""

    def __init__(self, progress: bool) -> None:
        self.say: Callable[[str], None] = tqdm.write if progress else (lambda _text: None)
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._stage_started = self.started

    def done(self, name: str) -> None:
        """Stage ``name`` ran from the end of the previous stage until now."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._stage_started, 1)
        self.say(f"  {name}: {self.seconds[name]:.0f} s (total {now - self.started:.0f} s)")
        self._stage_started = now

    def finish(self) -> None:
        self.seconds["total"] = round(time.perf_counter() - self.started, 1)


# --------------------------------------------------------------------------- steps 1-2: the cohort and folds


def _cohort_text(config: DemoConfig) -> str:
    return (
        f"{config.num_slides} slides, {config.min_patches:,} to {config.max_patches:,} patches of "
        f"{config.dim}-d features, lesions in {100 * config.lesion_fraction[0]:.1f}% to "
        f"{100 * config.lesion_fraction[1]:.0f}% of positive slides"
    )


def write_cohort(cohort_dir: Path, config: DemoConfig, progress: bool) -> SyntheticCohort:
    """The synthetic cohort of the ``rare`` task that ``config`` describes, written to ``cohort_dir``."""
    return make_synthetic_cohort(
        cohort_dir,
        task="rare",
        num_slides=config.num_slides,
        dim=config.dim,
        seed=config.seed,
        min_patches=config.min_patches,
        max_patches=config.max_patches,
        lesion_fraction=config.lesion_fraction,
        progress=progress,
    )


@dataclass
class SlidesInMemory:
    """The cohort read once into memory, serving every fold of every model."""

    cohort: Cohort
    store: MemoryCohort  # every slide's patch features
    stores: dict[str, Any]  # the fixed token-budget baselines' precomputed tokens (_precomputed_stores)
    patches: list[int]  # patches per slide


def load_slides(synthetic: SyntheticCohort, config: DemoConfig, progress: bool) -> SlidesInMemory:
    """Every slide of ``synthetic`` in memory, and the baselines' tokens precomputed from them."""
    cohort = Cohort.from_folder(synthetic.features_dir, synthetic.labels_csv)
    store = MemoryCohort.load(cohort, progress=progress)
    stores = _precomputed_stores(store, config, progress)
    return SlidesInMemory(cohort, store, stores, store.num_patches())


def make_folds(cohort: Cohort, config: DemoConfig, out_dir: Path) -> list[Split]:
    """The patient-grouped folds every model trains on, saved as ``out_dir/splits.csv``."""
    splits = make_kfold_splits(cohort, folds=config.folds, seed=config.seed)
    save_splits(splits, out_dir / SPLITS_FILE)
    return splits


def sweep_splits(config: DemoConfig, splits: list[Split]) -> list[Split]:
    """The folds the token budget sweep runs on: the first ``config.sweep_folds`` (None: all)."""
    return splits[: config.sweep_folds or len(splits)]


# --------------------------------------------------------------------------- step 3: training


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the demo: ``model`` with ``num_slots`` tokens on ``splits``, into ``run_dir``."""

    model: str
    num_slots: int
    run_dir: Path
    splits: list[Split]
    in_comparison: bool  # one of the headline comparison's models (else a point of the token budget sweep)


def plan_runs(config: DemoConfig, splits: list[Split], out_dir: Path) -> list[PlannedRun]:
    """Every model of the comparison on every fold, then every other token budget on the sweep's folds."""
    runs = [PlannedRun(m, config.num_slots, out_dir / m, splits, True) for m in config.models]
    sweep_dir = out_dir / SWEEP_DIR / BUDGET_RUNS_DIR
    runs += [
        PlannedRun(m, k, sweep_dir / f"{m}-k{k}", sweep_splits(config, splits), False)
        for m in config.budget_models
        for k in config.budgets
        if k != config.num_slots
    ]
    return runs


def train_models(
    runs: Sequence[PlannedRun],
    synthetic: SyntheticCohort,
    slides: SlidesInMemory,
    config: DemoConfig,
    out_dir: Path,
    say: Callable[[str], None],
    progress: bool,
) -> tuple[dict[tuple[str, int], RunResult], list[dict[str, Any]]]:
    """Train every run in turn: results by (model, K), and the comparison's rows.

    ``comparison.csv`` is rewritten after each model of the comparison, so an interrupted demo still
    leaves the rows it has.
    """
    bar = tqdm(total=sum(len(run.splits) for run in runs), desc="training", unit="fold", disable=not progress)
    results: dict[tuple[str, int], RunResult] = {}
    rows: list[dict[str, Any]] = []
    for run in runs:
        swept = run.model in config.budget_models
        bar.set_postfix_str(f"{run.model} K={run.num_slots}" if swept else run.model)
        result = train_run(
            synthetic.features_dir,
            synthetic.labels_csv,
            run.run_dir,
            model_train_config(run.model, run.num_slots, config),
            splits=run.splits,
            datasets=_datasets(run.model, run.num_slots, slides.store, slides.stores, config),
            verbose=False,
            on_fold=lambda _row: bar.update(1),
            resumable=False,  # a demo is rerun, not resumed: skip writing optimizer state every epoch
        )
        results[(run.model, run.num_slots)] = result
        if run.in_comparison:
            rows.append(comparison_row(result))
            write_comparison(out_dir, rows)
            say(f"  {run.model}: AUC {rows[-1]['auc_mean']:.3f} ± {rows[-1]['auc_std']:.3f}")
    bar.close()
    return results, rows


# --------------------------------------------------------------------------- step 4: sweeps, the shown slide


def write_sweeps(
    out_dir: Path,
    results: dict[tuple[str, int], RunResult],
    splits: Sequence[Split],
    truth_csv: Path,
    config: DemoConfig,
) -> None:
    """The token budget sweep (over ``splits``) and the lesion size sweep, as CSVs under ``sweeps/``."""
    sweep_dir = out_dir / SWEEP_DIR
    sweep_dir.mkdir(exist_ok=True)
    sweep_folds = {split.fold for split in splits}
    _write_rows(sweep_dir / TOKEN_BUDGET_CSV, token_budget_rows(results, sweep_folds, config))
    # The sweep's own checkpoints are not needed by anything the demo shows (up to 270 MB per fold
    # at K = 128); its predictions and summaries stay.
    for weights in (sweep_dir / BUDGET_RUNS_DIR).glob("*/fold_*/model.safetensors"):
        weights.unlink()
    _write_rows(sweep_dir / LESION_FRACTION_CSV, lesion_size_rows(out_dir, truth_csv, config))


def token_budget_rows(
    results: dict[tuple[str, int], RunResult], folds: set[int], config: DemoConfig
) -> list[dict[str, Any]]:
    """Test AUC against K for every model with a token budget, each point over the same ``folds``."""
    rows = []
    for (model, k), result in sorted(results.items()):
        if model in config.budget_models and k in config.budgets:
            # K = 32 comes from the comparison, which ran on every fold: keep the sweep's folds only
            aucs = [row["test_auc"] for row in result.rows if row["fold"] in folds]
            auc_mean, auc_std = mean_std(aucs)
            rows.append(
                {
                    "model": model,
                    "num_tokens": k,
                    "auc_mean": auc_mean,
                    "auc_std": auc_std,
                    "n_folds": len(aucs),
                }
            )
    return rows


def lesion_size_rows(out_dir: Path, truth_csv: Path, config: DemoConfig) -> list[dict[str, Any]]:
    """Test AUC per lesion size band for every model of ``config.lesion_models`` (no training)."""
    lesion = _read_truth(truth_csv)
    rows = []
    for model in config.lesion_models:
        for row in lesion_fraction_auc(_fold_predictions(out_dir / model, lesion), config.lesion_edges):
            rows.append({"model": model, **row})
    return rows


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["model"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def shown_slide_budget(out_dir: Path, store: MemoryCohort, config: DemoConfig) -> BudgetReport | None:
    """The token budget lines of the slide the report's slot map shows (None without a TC-SSA run).

    That slide is a test slide of its fold's checkpoint, so the printed lines and the figures speak
    of one slide in one unit.
    """
    if "tcssa" not in config.models:
        return None
    fold, shown = choose_slide(load_model_run(out_dir / "tcssa"))
    model, _ = load_checkpoint(fold_dir(out_dir / "tcssa", fold))
    return token_budget(model.compressor, store.bags[shown].features.float(), shown)


# --------------------------------------------------------------------------- step 5: the report


def demo_info(
    config: DemoConfig,
    patches: Sequence[int],
    splits: list[Split],
    budget: BudgetReport | None,
    verdicts: Sequence[str],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """What ``demo.json`` holds: the report header's introduction and facts, and what the run did."""
    return {
        "intro": (
            "A synthetic cohort of gigapixel-like slides stands in for real patch features: positive "
            "slides hold a lesion phenotype in a small fraction of their patches. TC-SSA aggregates "
            "every patch into 32 slot tokens; random-k keeps 32 sampled patches. Does the rare "
            f"evidence survive the compression? {verdicts[0]}"
        ),
        "facts": {
            "cohort": f"{len(patches)} slides, {sum(patches):,} patches ({min(patches):,} to "
            f"{max(patches):,} per slide), D = {config.dim}, task rare",
            "lesions": f"{100 * config.lesion_fraction[0]:.1f}% to {100 * config.lesion_fraction[1]:.0f}% "
            "of the patches of positive slides",
            "token budget sweep": f"on the first {len(sweep_splits(config, splits))} of the "
            f"{len(splits)} folds",
            "training": f"{config.folds} folds (patient-grouped), up to {config.epochs} epochs, lr "
            f"{config.lr:g}, {config.batch_size} slides per step, {config.train_patches} random patches "
            "per training slide and epoch; test slides whole",
            "models sized for this CPU and cohort": "; ".join(
                f"{m}: {', '.join(f'{k}={v}' for k, v in o.items())}" for m, o in config.model_options.items()
            )
            or "none",
            "epochs": f"up to {config.epochs}"
            + "".join(f"; {m}: up to {e}" for m, e in config.epochs_by_model.items()),
            "training settings chosen on": config.settings_provenance(),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}",
        },
        "mean_patches": float(np.mean(patches)),
        "token_budget": budget.lines() if budget is not None else [],
        "lesion_sweep_note": (
            "Each point: the models of the comparison (trained on lesions of every size), evaluated on "
            "the positive slides whose lesion fraction falls in the band against all negative slides "
            "of the same test fold; mean ± std (ddof 1) over folds."
        ),
        "config": asdict(config),
        "seconds": dict(seconds),
    }


def _write_demo_info(out_dir: Path, info: dict[str, Any]) -> None:
    (out_dir / DEMO_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def write_report(
    out_dir: Path,
    synthetic: SyntheticCohort,
    config: DemoConfig,
    uncertainty: Uncertainty,
    mean_patches: float,
) -> Path:
    """``out_dir/report.html``, with the slot map and embedding of one TC-SSA test slide (and of
    ``config.slide``, a real slide file, when given)."""

    def real_slide() -> SlideFigures:
        return real_slide_figures(config.slide, out_dir / SLIDE_DIR)

    return build_report(
        out_dir,
        out_dir / "report.html",
        slide_analysis=lambda compare: slide_figures(
            compare, features_dir=synthetic.features_dir, embedding=config.embedding, seed=config.seed
        ),
        title="tcssa demo: does rare evidence survive 32 tokens?",
        mean_patches=mean_patches,
        uncertainty=uncertainty,
        real_slide=None if config.slide is None else real_slide,
    )
