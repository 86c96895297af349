"""Read the RUN and COMPARE directories written by ``tcssa train`` / ``tcssa compare`` for the report.

The layout is the project's shared contract (docs: common contracts, "Run directories"). A compare
directory must hold ``comparison.csv``; everything else is optional here: what is missing becomes a note
in the report instead of an error, because a user may rebuild the report from a partial or older run.
A file that is present but malformed is an error naming the file.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SLOT_COLUMNS = ("fold", "slot", "count", "share")
_PREDICTIONS_NAME = re.compile(r"^fold_(\d+)_predictions\.csv$")


def read_csv_rows(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; a missing required column is a ValueError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    absent = [c for c in required if c not in columns]
    if absent:
        have = ", ".join(columns) or "none"
        raise ValueError(f"{path} lacks the column(s) {', '.join(absent)} (has: {have})")
    return rows


def to_float(value: str | None) -> float:
    """A CSV cell as float; empty, 'nan' or 'None' become NaN."""
    if value is None or value.strip() in ("", "None", "none", "nan", "NaN", "null"):
        return math.nan
    return float(value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


@dataclass
class FoldPredictions:
    """Test-set predictions of one fold: true class index and class probabilities per slide."""

    fold: int
    labels: np.ndarray  # n (int)
    probs: np.ndarray  # n x C


@dataclass
class SlotUse:
    """Slot use per test fold: ``shares`` and ``counts`` are folds x K."""

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
        path = self.path / f"fold_{fold}" / "model.safetensors"
        return path if path.is_file() else None

    def slot_shares(self) -> SlotUse | None:
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
        return SlotUse(folds, shares, counts, of_patches=column == "patch_share")


def load_model_run(path: str | Path, name: str | None = None) -> ModelRun:
    """Read one RUN directory (``summary.csv``, predictions, config, slot utilisation)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    run = ModelRun(name=name or path.name, path=path)
    if (path / "config.json").is_file():
        run.config = _read_json(path / "config.json")
    else:
        run.notes.append(f"{run.name}: no config.json")
    if (path / "class_map.json").is_file():
        run.class_names = [str(c) for c in _read_json(path / "class_map.json").get("class_names", [])]
    if (path / "summary.csv").is_file():
        run.summary = read_csv_rows(path / "summary.csv", required=("fold", "test_auc"))
    else:
        run.notes.append(f"{run.name}: no summary.csv")
    prediction_files = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := _PREDICTIONS_NAME.match(p.name))
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
    if (path / "slot_utilisation.csv").is_file():
        run.slot_rows = read_csv_rows(path / "slot_utilisation.csv", required=SLOT_COLUMNS)
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


COMPARISON_COLUMNS = ("model", "auc_mean", "auc_std")


def load_compare_run(path: str | Path) -> CompareRun:
    """Read a COMPARE directory (``comparison.csv`` plus one RUN directory per model)."""
    path = Path(path)
    table = path / "comparison.csv"
    if not path.is_dir():
        raise FileNotFoundError(f"compare directory not found: {path}")
    if not table.is_file():
        raise FileNotFoundError(
            f"{table} not found: `tcssa report` needs a directory written by `tcssa compare`"
        )
    rows = read_csv_rows(table, required=COMPARISON_COLUMNS)
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
