"""The RUN and COMPARE directories of ``tcssa train`` / ``tcssa compare``: one schema, its writers
and its readers.

A run directory holds, as the project's shared contract fixes (docs: common contracts, "Run
directories")::

    config.json  class_map.json  splits.csv  summary.csv  fold_{k}_predictions.csv
    fold_{k}/model.safetensors  fold_{k}/model_config.json  fold_{k}/metrics.jsonl
    slot_utilisation.csv (models with slots)

plus ``fold_{k}/result.json`` once a fold is done; a compare directory holds ``comparison.csv``,
``comparison.md`` and one run directory per model. ``tcssa eval`` writes ``predictions.csv``,
``metrics.json`` and a ``slot_utilisation.csv`` without the fold column.

Reading, a compare directory must hold ``comparison.csv``; everything else is optional: what is
missing becomes a note in the report instead of an error, because a user may rebuild the report
from a partial or older run. A file that is present but malformed is an error naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tcssa.io.checkpoints import MODEL_WEIGHTS
from tcssa.io.files import json_safe, read_csv_rows, read_json, write_text

CONFIG_FILE = "config.json"
CLASS_MAP_FILE = "class_map.json"
SPLITS_FILE = "splits.csv"
SUMMARY_FILE = "summary.csv"
SLOT_FILE = "slot_utilisation.csv"
RESULT_FILE = "result.json"  # fold_{k}/result.json: a finished fold's metrics
METRICS_LOG = "metrics.jsonl"  # fold_{k}/metrics.jsonl: one line per epoch
RESUME_STATE = "resume.safetensors"  # fold_{k}/resume.safetensors: a fold in progress
PREDICTIONS_FILE = "predictions.csv"  # tcssa eval's
EVAL_METRICS_FILE = "metrics.json"  # tcssa eval's
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
_FOLD_PREDICTIONS = re.compile(r"^fold_(\d+)_predictions\.csv$")

#: Metric names, in the order the summary files list them (tcssa.train.metrics computes them).
METRIC_NAMES = ("auc", "acc", "bacc", "f1", "kappa")
SUMMARY_COLUMNS = [
    "fold",
    *(f"test_{m}" for m in METRIC_NAMES),
    "val_auc",
    "val_loss",
    "epochs",
    "train_seconds",
]
COMPARISON_COLUMNS = [
    "model",
    "auc_mean",
    "auc_std",
    "bacc_mean",
    "bacc_std",
    "f1_mean",
    "f1_std",
    "tokens",
    "train_seconds",
]
#: slot_utilisation.csv: assignments per slot on each fold's test set; ``share`` of all assignments
#: (sums to 1, the contract's column), ``patch_share`` of the patches (sums to top-k = 2; older runs
#: lack it, so a reader requires only the others).
SLOT_COLUMNS = ["fold", "slot", "count", "share", "patch_share"]
_SLOT_COLUMNS_REQUIRED = ("fold", "slot", "count", "share")
_COMPARISON_COLUMNS_REQUIRED = ("model", "auc_mean", "auc_std")


def _metrics_line(record: dict[str, Any]) -> str:
    return json.dumps(json_safe(record)) + "\n"  # strict JSON: a NaN AUC is written as null


def write_metrics_log(fold_folder: Path, history: Sequence[dict[str, Any]]) -> None:
    """``fold_{k}/metrics.jsonl`` holding ``history``, one epoch per line (rewritten on --resume)."""
    write_text(fold_folder / METRICS_LOG, "".join(_metrics_line(record) for record in history))


def append_metrics_log(fold_folder: Path, record: dict[str, Any]) -> None:
    """One more epoch's line in ``fold_{k}/metrics.jsonl`` (appended: a line per epoch stays cheap)."""
    with open(fold_folder / METRICS_LOG, "a", encoding="utf-8") as log:
        log.write(_metrics_line(record))


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    """The folder of fold ``fold``'s model, metrics log and result."""
    return Path(run_dir) / f"fold_{fold}"


def fold_predictions_file(fold: int) -> str:
    return f"fold_{fold}_predictions.csv"


# ------------------------------------------------------------------------------------- CSV cells
# How the run directory writes numbers (6 significant digits, ``nan``) and reads them back.
def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV: floats with 6 significant digits, None and NaN as ``nan``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def to_float(value: str | None) -> float:
    """A CSV cell as float; empty, 'nan' or 'None' become NaN."""
    if value is None or value.strip() in ("", "None", "none", "nan", "NaN", "null"):
        return math.nan
    return float(value)


# ------------------------------------------------------------------------------------- writing
@dataclass
class SlotUse:
    """How one fold's test set was routed: patches assigned to each slot (top-k) and patches in all.

    What result.json keeps (``counts``, ``num_patches``) and what one fold's rows of
    slot_utilisation.csv are made of.
    """

    counts: list[int]
    num_patches: int

    @property
    def shares(self) -> list[float]:
        """Each slot's share of all assignments (sums to 1)."""
        total = float(sum(self.counts))
        return [c / total if total else 0.0 for c in self.counts]

    @property
    def patch_shares(self) -> list[float]:
        """Share of the patches routed to each slot (sums to top-k)."""
        return [c / self.num_patches if self.num_patches else 0.0 for c in self.counts]

    def rows(self, **key: Any) -> list[dict[str, Any]]:
        return [
            {**key, "slot": k, "count": int(c), "share": s, "patch_share": p}
            for k, (c, s, p) in enumerate(zip(self.counts, self.shares, self.patch_shares, strict=True))
        ]


def predictions_csv(preds: Any) -> str:
    """``slide_id,label,pred,p_0..p_{C-1}``, one row per slide of ``preds`` (``slide_ids``,
    ``labels``, ``preds``, ``probs``: tcssa.train.engine.Predictions)."""
    num_classes = preds.probs.shape[1]
    columns = ["slide_id", "label", "pred", *(f"p_{c}" for c in range(num_classes))]
    rows = [
        {
            "slide_id": sid,
            "label": int(label),
            "pred": int(pred),
            **{f"p_{c}": float(p) for c, p in enumerate(probs)},
        }
        for sid, label, pred, probs in zip(
            preds.slide_ids, preds.labels, preds.preds, preds.probs, strict=True
        )
    ]
    return csv_text(rows, columns)


def write_summary(out_dir: Path, rows: Sequence[Mapping[str, Any]], slot_use: Mapping[int, SlotUse]) -> None:
    """summary.csv (one row per fold) and, for a model with slots, slot_utilisation.csv."""
    write_text(out_dir / SUMMARY_FILE, csv_text(rows, SUMMARY_COLUMNS))
    if slot_use:
        util = [row for fold, use in sorted(slot_use.items()) for row in use.rows(fold=fold)]
        write_text(out_dir / SLOT_FILE, csv_text(util, SLOT_COLUMNS))


def write_eval_slot_use(out_dir: Path, use: SlotUse) -> None:
    """``tcssa eval``'s slot_utilisation.csv: one set of slides, so no fold column."""
    write_text(out_dir / SLOT_FILE, csv_text(use.rows(), SLOT_COLUMNS[1:]))


def write_comparison(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_text(out_dir / COMPARISON_CSV, csv_text(rows, COMPARISON_COLUMNS))
    write_text(out_dir / COMPARISON_MD, comparison_markdown(rows))


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    fmt = lambda m, s: "n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"
    lines = [
        "| model | AUC | balanced acc. | macro F1 | tokens | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {fmt(r['auc_mean'], r['auc_std'])} | {fmt(r['bacc_mean'], r['bacc_std'])} "
            f"| {fmt(r['f1_mean'], r['f1_std'])} | {r['tokens']} | {r['train_seconds']:.0f} |"
        )
    lines.append("")
    lines.append("Test-set metrics, mean ± standard deviation over folds; train s summed over folds.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- reading
@dataclass
class FoldPredictions:
    """Test-set predictions of one fold: true class index and class probabilities per slide."""

    fold: int
    labels: np.ndarray  # n (int)
    probs: np.ndarray  # n x C


@dataclass
class SlotShares:
    """slot_utilisation.csv read back, each fold's ``SlotUse`` as it was stored: ``shares`` and
    ``counts`` are folds x K."""

    folds: list[int]
    shares: np.ndarray
    counts: np.ndarray
    of_patches: bool  # shares of the patches (sum to top-k) rather than of all assignments (sum to 1)


@dataclass
class ModelRun:
    """One model's RUN directory, as much of it as exists."""

    name: str
    path: Path
    config: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    summary: list[dict[str, str]] = field(default_factory=list)
    predictions: list[FoldPredictions] = field(default_factory=list)
    prediction_slide_ids: dict[int, list[str]] = field(default_factory=dict)
    slot_rows: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fold_checkpoint(self, fold: int) -> Path | None:
        path = fold_dir(self.path, fold) / MODEL_WEIGHTS
        return path if path.is_file() else None

    def slot_shares(self) -> SlotShares | None:
        """Each fold's use of each slot from slot_utilisation.csv; None without one.

        The share of the test patches a slot receives (``patch_share``; with top-2 routing these sum
        to 2) when the file has it, as the collapse rule ("one slot takes more than half of the
        patches") needs; otherwise the contract's ``share`` of all assignments (sums to 1).
        """
        if not self.slot_rows:
            return None
        column = "patch_share" if "patch_share" in self.slot_rows[0] else "share"
        folds = sorted({int(r["fold"]) for r in self.slot_rows})
        num_slots = max(int(r["slot"]) for r in self.slot_rows) + 1
        shares = np.zeros((len(folds), num_slots))
        counts = np.zeros((len(folds), num_slots), dtype=np.int64)
        for row in self.slot_rows:
            f, k = folds.index(int(row["fold"])), int(row["slot"])
            shares[f, k] = to_float(row[column])
            counts[f, k] = int(float(row["count"]))
        return SlotShares(folds, shares, counts, of_patches=column == "patch_share")


def load_model_run(path: str | Path, name: str | None = None) -> ModelRun:
    """Read one RUN directory (``summary.csv``, predictions, config, slot utilisation)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    run = ModelRun(name=name or path.name, path=path)
    if (path / CONFIG_FILE).is_file():
        run.config = read_json(path / CONFIG_FILE)
    else:
        run.notes.append(f"{run.name}: no {CONFIG_FILE}")
    if (path / CLASS_MAP_FILE).is_file():
        run.class_names = [str(c) for c in read_json(path / CLASS_MAP_FILE).get("class_names", [])]
    if (path / SUMMARY_FILE).is_file():
        run.summary = read_csv_rows(path / SUMMARY_FILE, required=("fold", "test_auc"))
    else:
        run.notes.append(f"{run.name}: no {SUMMARY_FILE}")
    prediction_files = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := _FOLD_PREDICTIONS.match(p.name))
    )
    for fold, file in prediction_files:
        rows = read_csv_rows(file, required=("slide_id", "label"))
        prob_columns = sorted(
            (c for c in (rows[0].keys() if rows else []) if re.fullmatch(r"p_\d+", c)),
            key=lambda c: int(c[2:]),
        )
        if rows and len(prob_columns) < 2:
            raise ValueError(f"{file} needs class probability columns p_0..p_(C-1), found {prob_columns}")
        try:
            labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
            probs = np.array([[to_float(r[c]) for c in prob_columns] for r in rows], dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: a label or probability is not a number ({err})") from err
        run.predictions.append(FoldPredictions(fold=fold, labels=labels, probs=probs.reshape(len(rows), -1)))
        run.prediction_slide_ids[fold] = [r["slide_id"] for r in rows]
    if not prediction_files:
        run.notes.append(f"{run.name}: no fold_*_predictions.csv, so no ROC curve")
    if (path / SLOT_FILE).is_file():
        run.slot_rows = read_csv_rows(path / SLOT_FILE, required=_SLOT_COLUMNS_REQUIRED)
    return run


@dataclass
class CompareRun:
    """A COMPARE directory: the comparison table and each model's RUN directory."""

    path: Path
    rows: list[dict[str, str]]
    models: dict[str, ModelRun]
    notes: list[str] = field(default_factory=list)

    @property
    def model_names(self) -> list[str]:
        return [row["model"] for row in self.rows]


def load_compare_run(path: str | Path) -> CompareRun:
    """Read a COMPARE directory (``comparison.csv`` plus one RUN directory per model)."""
    path = Path(path)
    table = path / COMPARISON_CSV
    if not path.is_dir():
        raise FileNotFoundError(f"compare directory not found: {path}")
    if not table.is_file():
        raise FileNotFoundError(
            f"{table} not found: `tcssa report` needs a directory written by `tcssa compare`"
        )
    rows = read_csv_rows(table, required=_COMPARISON_COLUMNS_REQUIRED)
    if not rows:
        raise ValueError(f"{table} has no model rows")
    compare = CompareRun(path=path, rows=rows, models={})
    for row in rows:
        model_dir = path / row["model"]
        if model_dir.is_dir():
            run = load_model_run(model_dir, name=row["model"])
            compare.models[row["model"]] = run
            compare.notes.extend(run.notes)
        else:
            compare.notes.append(f"{row['model']}: no run directory {model_dir.name}/ (table row only)")
    return compare
