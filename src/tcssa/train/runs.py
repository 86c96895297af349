"""Run directories: train a model on every fold of a cohort, evaluate a checkpoint, compare models.

What a run directory (``tcssa train``) and a comparison directory (``tcssa compare``) hold, and
how their files are written and read, is ``tcssa.io.runs``. Besides those files, while a fold is
in progress, ``fold_{k}/resume.safetensors``; once it is done, ``fold_{k}/result.json`` (its
metrics; a finished fold is skipped on ``--resume``); and ``.tcssa.lock``, locked while a run is in
progress there (``tcssa.io.run_guard``). config.json records, under ``inputs``, sha256
fingerprints of the labels and split files, the cohort and the folds;
``--resume`` refuses to continue when one changed. A comparison directory
(``tcssa compare``) holds ``comparison.csv``, ``comparison.md`` and one run
directory per model, all on the same folds. Under torchrun every process trains
and evaluates; rank 0 alone writes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from tcssa.data import (
    BagDataset,
    Cohort,
    Split,
    load_splits,
    make_kfold_splits,
    save_class_map,
    save_splits,
    validate_cohort,
)
from tcssa.io.checkpoints import load_weights, read_model_config, resolve_checkpoint
from tcssa.io.files import json_safe, read_json, write_json, write_text
from tcssa.io.run_guard import (
    RunLock,
    check_inputs,
    clear_untrained_folds,
    input_fingerprints,
    lock_run_dir,
    nothing_trained,
)
from tcssa.io.runs import (
    CLASS_MAP_FILE,
    CONFIG_FILE,
    EVAL_METRICS_FILE,
    METRIC_NAMES,
    PREDICTIONS_FILE,
    RESULT_FILE,
    RESUME_STATE,
    SPLITS_FILE,
    SlotUse,
    fold_dir,
    fold_predictions_file,
    predictions_csv,
    write_comparison,
    write_eval_slot_use,
    write_summary,
)
from tcssa.mil import build_model, parse_model_spec
from tcssa.runtime import process_state
from tcssa.train.config import TrainConfig
from tcssa.train.engine import derived_seed, evaluate, fit, process_device
from tcssa.train.metrics import summarize_folds, warn_if_collapsed

# Options that change how a run executes, not what it computes: they may differ on --resume.
_RUNTIME_OPTIONS = {"device", "num_workers", "cache_gb"}


#: Builds one part of a fold: (part "train" | "val" | "test", slide ids, fold seed) -> a dataset
#: whose items are (Bag, label), with ``set_epoch`` for training parts that draw patch subsets.
DatasetFactory = Callable[[str, list[str], int], Any]


@dataclass
class RunResult:
    out_dir: Path | None
    rows: list[dict[str, Any]]  # one per fold, tcssa.io.runs.SUMMARY_COLUMNS
    model: str
    tokens: int | None  # tokens per slide the classifier head sees (None: the whole bag)
    slot_use: dict[int, SlotUse] = field(default_factory=dict)  # fold -> test-set routing

    @property
    def summary(self) -> dict[str, float]:
        return summarize_folds(self.rows, [f"test_{m}" for m in METRIC_NAMES])

    @property
    def train_seconds(self) -> float:
        return float(sum(r["train_seconds"] for r in self.rows))


# ------------------------------------------------------------------ folds
def splits_for_cohort(splits: Sequence[Any], cohort: Any, skip_missing: bool = False) -> list[Any]:
    """Splits restricted to the cohort's slides, with every class present in every training set.

    A slide of the split file without a feature file is an error unless
    ``skip_missing`` (then it is dropped, and counted in the error-free path by
    the cohort's ``missing`` list); a slide in the split that the labels do not
    list is always an error.
    """
    known = set(cohort.slide_ids)
    missing = set(cohort.missing)
    checked = []
    for split in splits:
        parts = {}
        for part in ("train", "val", "test"):
            ids = list(getattr(split, part))
            unknown = [s for s in ids if s not in known and s not in missing]
            if unknown:
                raise ValueError(
                    f"fold {split.fold}: {len(unknown)} {part} slide(s) of the split are not in the labels: "
                    f"{', '.join(unknown[:10])}"
                )
            absent = [s for s in ids if s in missing]
            if absent and not skip_missing:
                raise ValueError(
                    f"fold {split.fold}: {len(absent)} {part} slide(s) have no feature file: "
                    f"{', '.join(absent[:10])} (pass --skip-missing to leave them out)"
                )
            parts[part] = [s for s in ids if s in known]
        if not parts["train"] or not parts["test"]:
            raise ValueError(f"fold {split.fold}: the training or test set is empty")
        present = {cohort.labels[s] for s in parts["train"]}
        lacking = [cohort.class_names[c] for c in range(cohort.num_classes) if c not in present]
        if lacking:
            counts = cohort.label_counts()
            raise ValueError(
                f"fold {split.fold}: class(es) {lacking} have no training slide "
                f"(cohort counts: {', '.join(f'{k}={counts[k]}' for k in lacking)}); the model could never "
                "predict them. Use fewer folds, or a split file where every class is in each training set."
            )
        checked.append(Split(fold=split.fold, **parts))
    return checked


def make_splits(cohort: Any, config: TrainConfig, split_csv: str | Path | None) -> list[Any]:
    if split_csv is not None:
        # with the cohort: its case ids for the leak check, and a warning naming left-out slides
        return load_splits(split_csv, cohort)
    return make_kfold_splits(cohort, folds=config.folds, seed=config.seed, val_fraction=config.val_fraction)


# ------------------------------------------------------------------ train
def train_run(
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    split_csv: str | Path | None = None,
    splits: Sequence[Any] | None = None,
    skip_missing: bool = False,
    resume: bool = False,
    datasets: DatasetFactory | None = None,
    verbose: bool = True,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
    resumable: bool = True,
    check_values: bool | None = None,
) -> RunResult:
    """Train ``config.model`` on every fold and write the run directory ``out_dir``.

    Folds come from ``splits`` if given, else from ``split_csv``, else from a
    stratified, patient-grouped ``config.folds``-fold split of the cohort.
    ``datasets`` replaces the default ``BagDataset`` of each fold's part (e.g.
    slides held in memory across many runs, see ``tcssa.data.memory``).
    ``verbose=False`` hides the per-epoch progress; ``on_fold`` is called with
    each finished fold's summary row (for a caller's own progress display).
    ``resumable=False`` skips the per-epoch resume state (see ``fit``); a fold
    already finished is still skipped on ``resume``.

    Before anything is written the cohort is checked: every file's header and D and, with
    ``check_values`` (default: unless ``datasets`` supplies the slides), every feature value, so a
    bad file is an error naming it, not a run directory that needs ``--resume`` after the fix.
    ``out_dir`` is locked for the life of the run (a second run into it is refused), and its
    config.json records sha256 fingerprints of the inputs, which ``resume`` requires unchanged. A
    run that stopped before any fold finished an epoch is started again in place, resume or not.
    """
    process = process_state(config.device)
    if check_values is None:
        check_values = datasets is None  # slides supplied by the caller were read by the caller
    # With check_values every file is read once, headers and values together (the header-only check
    # of from_folder would read .pt/.npz/.csv files whole a second time). verbose=False: the caller
    # shows its own progress (the demo's runs), so no header-check bar.
    cohort = Cohort.from_folder(
        features_dir,
        labels_csv,
        skip_missing=skip_missing,
        check_files=not check_values,
        progress=None if verbose else False,
    )
    if check_values:
        _validate_values(cohort, process, progress=None if verbose else False)
    if splits is None:
        splits = make_splits(cohort, config, split_csv)
    splits = splits_for_cohort(splits, cohort, skip_missing)
    in_folds = {s for split in splits for ids in split.parts().values() for s in ids}
    left_out = [s for s in cohort.slide_ids if s not in in_folds]
    out_dir = Path(out_dir)
    run_config = {
        **config.to_dict(),
        "features_dir": str(Path(features_dir).resolve()),
        "labels_csv": str(Path(labels_csv).resolve()),
        "split_csv": None if split_csv is None else str(Path(split_csv).resolve()),
        "skip_missing": skip_missing,
        "num_slides": len(cohort.slide_ids) - len(left_out),  # in at least one fold
        "num_slides_left_out": len(left_out),  # labelled, with features, but in no fold of the split
        "slides_left_out": left_out,
        "missing_slides": list(cohort.missing),
        "class_names": list(cohort.class_names),
        "in_dim": cohort.dim,
        "world_size": process.num_processes,
        "inputs": input_fingerprints(labels_csv, split_csv, cohort, splits),
    }
    lock = _prepare_out_dir(out_dir, run_config, resume, process)
    try:
        if process.is_main_process:
            save_class_map(cohort.class_names, out_dir / CLASS_MAP_FILE)
            save_splits(splits, out_dir / SPLITS_FILE)
            if cohort.missing:
                print(
                    f"note: {len(cohort.missing)} labelled slide(s) have no feature file and are left out: "
                    f"{_first(cohort.missing)}"
                )
            if left_out and split_csv is None:  # load_splits has warned about a split file's
                print(
                    f"note: {len(left_out)} labelled slide(s) are in no fold of the given splits and take "
                    f"no part in the run: {_first(left_out)}"
                )
        return _run_folds(
            cohort, splits, config, out_dir, resume, process, datasets, verbose, on_fold, resumable
        )
    finally:
        if lock is not None:
            lock.release()


def _first(ids: Sequence[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f" ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _validate_values(cohort: Any, process: PartialState, progress: bool | None = None) -> None:
    """Every feature file's header and values checked: readable, one D, finite and in range (rank 0
    reads, all raise alike)."""
    problem = None
    if process.is_main_process:
        try:
            validate_cohort(cohort, values=True, progress=progress)
        except ValueError as err:
            problem = str(err)
    [problem] = broadcast_object_list([problem])
    if problem:
        raise ValueError(problem)


def _lock_out_dir(out_dir: Path, process: PartialState, check: Callable[[], None] | None = None):
    """Rank 0 locks ``out_dir`` (creating it) and runs ``check``; every process raises its error.

    Rank 0 decides and tells the others: were every process to look for config.json itself, one
    could find the file rank 0 has just written and refuse a fresh run.
    """
    problem, lock, error = None, None, None
    if process.is_main_process:
        try:
            lock = lock_run_dir(out_dir)
            if check is not None:
                check()
        except ValueError as err:
            problem, error = str(err), err
            if lock is not None:
                lock.release()
                lock = None
    [problem] = broadcast_object_list([problem])
    if problem:
        raise error if error is not None else ValueError(problem)
    return lock


def _prepare_out_dir(
    out_dir: Path, run_config: dict[str, Any], resume: bool, process: PartialState
) -> RunLock | None:
    """Lock the run directory, check it may take this run, write config.json; the lock (rank 0)."""
    lock = _lock_out_dir(out_dir, process, lambda: _check_out_dir(out_dir, run_config, resume))
    try:
        if process.is_main_process:
            write_json(out_dir / CONFIG_FILE, run_config)
        process.wait_for_everyone()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


# Entries of config.json that older versions did not write: a run without them is not held to them.
_ADDED_LATER = {"inputs", "num_slides_left_out", "slides_left_out"}


def _check_out_dir(out_dir: Path, run_config: dict[str, Any], resume: bool) -> None:
    saved_path = out_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    if nothing_trained(out_dir):
        # it stopped (a bad input, say) before any fold finished an epoch: nothing to resume
        print(f"note: {out_dir} holds a run that stopped before its first epoch ended; starting it again")
        clear_untrained_folds(out_dir)
        return
    if not resume:
        raise ValueError(
            f"{out_dir} already holds a run (config.json); pass --resume to continue it, "
            "or choose another --out"
        )
    saved = read_json(saved_path)
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_path}: not a run config (a JSON object); cannot resume {out_dir}")
    check_inputs(out_dir, saved, run_config)
    ignored = _RUNTIME_OPTIONS | {"world_size"}
    changed = sorted(
        k
        for k in set(saved) | set(run_config)
        if k not in ignored
        and not (k in _ADDED_LATER and k not in saved)
        and saved.get(k) != run_config.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {out_dir}: the settings differ from the saved run ({details})")


def _run_folds(
    cohort: Any,
    splits: Sequence[Any],
    config: TrainConfig,
    out_dir: Path | None,
    resume: bool,
    process: PartialState,
    datasets: DatasetFactory | None = None,
    verbose: bool = True,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
    resumable: bool = True,
) -> RunResult:
    rows: list[dict[str, Any]] = []
    slot_use: dict[int, SlotUse] = {}
    tokens = None
    for split in splits:
        fold = split.fold
        fold_folder = fold_dir(out_dir, fold) if out_dir is not None else None
        model = build_model(
            config.model,
            cohort.dim,
            cohort.num_classes,
            num_slots=config.num_slots,
            seed=derived_seed(config.seed, fold) >> 1,
            **config.model_options,
        )
        tokens = model.num_tokens
        if resume and fold_folder is not None and (fold_folder / RESULT_FILE).is_file():
            result = read_json(fold_folder / RESULT_FILE)
            rows.append({k: math.nan if v is None else v for k, v in result["row"].items()})
            if result.get("slot_use") is not None:
                slot_use[fold] = SlotUse(**result["slot_use"])
            continue
        seed = derived_seed(config.seed, fold)
        if datasets is not None:
            train_set = datasets("train", list(split.train), seed)
            val_set = datasets("val", list(split.val), seed) if split.val else None
            test_set = datasets("test", list(split.test), seed)
        else:
            cache = int(config.cache_gb * 2**30)
            train_set = BagDataset(cohort, split.train, config.max_patches, seed=seed, cache_bytes=cache)
            val_set = BagDataset(cohort, split.val, cache_bytes=cache) if split.val else None
            test_set = BagDataset(cohort, split.test)
        model_config = {"model": model.config, "class_names": list(cohort.class_names), "fold": fold}
        fitted = fit(
            model,
            train_set,
            val_set,
            config,
            fold=fold,
            out_dir=fold_folder,
            model_config=model_config,
            resume=resume,
            class_names=cohort.class_names,
            verbose=verbose,
            resumable=resumable,
        )
        preds = evaluate(
            model,
            test_set,
            batch_size=config.eval_batch_size,
            device=process_device(config.device),
            with_routing=True,
            num_workers=config.num_workers,
            desc=f"fold {fold} test",
        )
        with warnings.catch_warnings():
            if not process.is_main_process:
                warnings.simplefilter("ignore")
            test = preds.metrics(cohort.class_names, where=f"fold {fold} test set")
        best = fitted.history[fitted.best_epoch - 1] if fitted.best_epoch else {}
        row = {
            "fold": fold,
            **{f"test_{k}": v for k, v in test.items()},
            "val_auc": best.get("val_auc", math.nan),
            "val_loss": best.get("val_loss", math.nan),
            "epochs": fitted.epochs_run,
            "train_seconds": round(fitted.train_seconds, 3),
        }
        rows.append(row)
        if on_fold is not None:
            on_fold(row)
        if preds.slot_counts is not None:
            slot_use[fold] = SlotUse(preds.slot_counts.tolist(), preds.num_patches)
            if process.is_main_process:
                warn_if_collapsed(slot_use[fold], f"fold {fold} test set", getattr(model, "aux_weight", None))
        if process.is_main_process and fold_folder is not None:
            write_text(out_dir / fold_predictions_file(fold), predictions_csv(preds))
            write_json(
                fold_folder / RESULT_FILE,
                {
                    "row": json_safe(row),
                    "best_epoch": fitted.best_epoch,
                    "stopped_early": fitted.stopped_early,
                    "slot_use": vars(slot_use[fold]) if fold in slot_use else None,
                },
            )
            (fold_folder / RESUME_STATE).unlink(missing_ok=True)
            write_summary(out_dir, rows, slot_use)
        process.wait_for_everyone()
    if process.is_main_process and out_dir is not None:
        write_summary(out_dir, rows, slot_use)
    return RunResult(out_dir=out_dir, rows=rows, model=config.model, tokens=tokens, slot_use=slot_use)


# ------------------------------------------------------------------- eval
def evaluate_checkpoint(
    checkpoint: str | Path,
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    *,
    skip_missing: bool = False,
    batch_size: int = 1,
    device: str = "auto",
) -> dict[str, float]:
    """Evaluate a saved model on a labelled set; writes predictions.csv, metrics.json (+ slot use).

    Labels are read with the checkpoint's class names, so a test list with the
    classes in another order (or a subset of them) maps onto the same indices.
    """
    model, model_config = load_checkpoint(checkpoint)
    class_names = model_config["class_names"]
    cohort = Cohort.from_folder(features_dir, labels_csv, skip_missing=skip_missing, class_names=class_names)
    if cohort.dim != model.in_dim:
        raise ValueError(
            f"{features_dir}: features have D={cohort.dim}, but the checkpoint {checkpoint} was trained "
            f"on D={model.in_dim}"
        )
    started = time.perf_counter()
    preds = evaluate(
        model,
        BagDataset(cohort, cohort.slide_ids),
        batch_size=batch_size,
        device=process_device(device),
        with_routing=True,
        desc="evaluating",
    )
    metrics = preds.metrics(class_names, where=str(labels_csv))
    out_dir = Path(out_dir)
    if not process_state(device).is_main_process:  # under torchrun every rank holds the gathered result
        return metrics
    write_text(out_dir / PREDICTIONS_FILE, predictions_csv(preds))
    report = {
        **json_safe(metrics),
        "loss": preds.loss,
        "num_slides": len(preds.slide_ids),
        "missing_slides": list(cohort.missing),
        "checkpoint": str(Path(checkpoint).resolve()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(out_dir / EVAL_METRICS_FILE, report)
    if preds.slot_counts is not None:
        use = SlotUse(preds.slot_counts.tolist(), preds.num_patches)
        warn_if_collapsed(use, str(labels_csv))
        write_eval_slot_use(out_dir, use)
    return metrics


def load_checkpoint(checkpoint: str | Path):
    """(model in eval mode, its model_config.json) from a checkpoint folder or .safetensors file."""

    weights, config_path = resolve_checkpoint(checkpoint)
    model_config = read_model_config(config_path)
    build_args = dict(model_config["model"])
    try:
        model = build_model(build_args.pop("name"), **build_args)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"checkpoint config {config_path}: cannot rebuild the model from it ({err})"
        ) from err
    load_weights(model, weights)
    return model.eval(), model_config


# ---------------------------------------------------------------- compare
def compare(
    features_dir: str | Path,
    labels_csv: str | Path,
    models: Sequence[str],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    split_csv: str | Path | None = None,
    skip_missing: bool = False,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Train every model on the same folds; write comparison.csv/.md; return the table's rows.

    Each row: model, auc_mean, auc_std, bacc_mean, bacc_std, f1_mean, f1_std
    (test-set metrics over folds, std with ddof=1), tokens (what the head sees
    per slide: K, or "all" for full-bag models), train_seconds (summed over folds).
    """

    config = config or TrainConfig()
    process = process_state(config.device)
    models = list(dict.fromkeys(models))
    if not models:
        raise ValueError("no models to compare")
    specs = {spec: parse_model_spec(spec) for spec in models}  # "tcssa:aux_weight=0.01" too
    out_dir = Path(out_dir)
    # headers and values read once, for all models, before anything is written
    cohort = Cohort.from_folder(features_dir, labels_csv, skip_missing=skip_missing, check_files=False)
    _validate_values(cohort, process)
    splits = splits_for_cohort(make_splits(cohort, config, split_csv), cohort, skip_missing)
    lock = _lock_out_dir(out_dir, process, lambda: _check_compare_dir(out_dir, splits))
    try:
        if process.is_main_process:
            save_splits(splits, out_dir / SPLITS_FILE)
        rows = []
        for spec, (name, options) in specs.items():
            if process.is_main_process:
                print(f"== {spec} ==", flush=True)
            run_config = config.override(model=name, model_options={**config.model_options, **options})
            result = train_run(
                features_dir,
                labels_csv,
                out_dir / spec,
                run_config,
                split_csv=split_csv,
                splits=splits,
                skip_missing=skip_missing,
                resume=resume,
                check_values=False,
            )
            rows.append({**comparison_row(result), "model": spec})
            if process.is_main_process:
                write_comparison(out_dir, rows)
        return rows
    finally:
        if lock is not None:
            lock.release()


def _fold_lists(splits: Sequence[Any]) -> list[tuple]:
    return [
        (s.fold, sorted(s.train), sorted(s.val), sorted(s.test)) for s in sorted(splits, key=lambda s: s.fold)
    ]


def _check_compare_dir(out_dir: Path, splits: Sequence[Any]) -> None:
    """A comparison directory that holds trained runs on other folds is refused (its splits.csv
    would no longer describe them); the model runs check their own inputs."""
    saved = out_dir / SPLITS_FILE
    if not saved.is_file() or _fold_lists(load_splits(saved)) == _fold_lists(splits):
        return
    if all(nothing_trained(d) for d in out_dir.iterdir() if d.is_dir()):
        return
    raise ValueError(
        f"{out_dir} holds a comparison trained on other folds ({saved}); its runs would not be "
        "comparable with these: restore the inputs, or choose another --out"
    )


def comparison_row(result: RunResult) -> dict[str, Any]:
    summary = result.summary
    row: dict[str, Any] = {"model": result.model}
    for metric in ("auc", "bacc", "f1"):
        row[f"{metric}_mean"] = summary[f"test_{metric}_mean"]
        row[f"{metric}_std"] = summary[f"test_{metric}_std"]
    row["tokens"] = result.tokens if result.tokens is not None else "all"
    row["train_seconds"] = round(result.train_seconds, 1)
    return row
