"""Slide-classification metrics (scikit-learn), per fold and as mean +- std over folds.

``classification_metrics`` takes true labels and predicted class probabilities
and returns AUC (binary, or macro one-vs-rest for several classes), accuracy,
balanced accuracy, macro F1 and quadratic-weighted Cohen's kappa (meaningful
when class indices are ordered, e.g. ISUP grades; for two classes it equals
plain kappa). A class missing from the evaluated slides does not crash: the
AUC is taken over the classes present, with a warning that says so, and is
NaN (again with a warning) when fewer than two classes are present.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from tcssa.io.runs import SlotUse


class MissingClassWarning(UserWarning):
    """A class has no slide in the set being evaluated, so some metrics cover fewer classes."""


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str] | None = None,
    where: str = "",
) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy, macro F1 and quadratic kappa of one set of predictions.

    ``probs`` is N x C (rows sum to 1); the prediction is its argmax. ``where``
    names the set (e.g. "fold 2 test") in warnings.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be N x C with N = {y.shape[0]} labels, got shape {p.shape}")
    if y.size == 0:
        raise ValueError(f"no slides to evaluate{_at(where)}")
    num_classes = p.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got {sorted(set(y.tolist()))}{_at(where)}"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"predicted probabilities contain NaN or Inf{_at(where)}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    all_classes = list(range(num_classes))
    pred = p.argmax(axis=1)

    present = sorted(set(y.tolist()))
    absent = [c for c in all_classes if c not in present]
    if absent and len(present) >= 2:
        warnings.warn(
            f"class(es) {[names[c] for c in absent]} have no slide{_at(where)}: AUC is averaged over the "
            f"{len(present)} classes present and balanced accuracy over those classes only",
            MissingClassWarning,
            stacklevel=2,
        )
    return {
        "auc": _auc(y, p, present, names, where),
        "acc": float(accuracy_score(y, pred)),
        # Balanced accuracy = mean recall over the classes present in y (scikit-learn's definition).
        "bacc": float(_quiet(balanced_accuracy_score, y, pred)),
        # Macro F1 over the classes that are present or predicted (scikit-learn's default label
        # set): a class predicted but absent scores 0, a class neither present nor predicted is left out.
        "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "kappa": _kappa(y, pred, all_classes),
    }


def _auc(y: np.ndarray, p: np.ndarray, present: list[int], names: list[str], where: str) -> float:
    if len(present) < 2:
        warnings.warn(
            f"only class {names[present[0]]!r} is present{_at(where)}: AUC is undefined (NaN)",
            MissingClassWarning,
            stacklevel=3,
        )
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    # Macro one-vs-rest over the classes present: the same as scikit-learn's multi_class="ovr"
    # when every class is present, and still defined when one is not.
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))


def _kappa(y: np.ndarray, pred: np.ndarray, classes: list[int]) -> float:
    if len(set(y.tolist()) | set(pred.tolist())) < 2:
        return 1.0 if (y == pred).all() else 0.0  # scikit-learn returns NaN with a warning here
    return float(cohen_kappa_score(y, pred, labels=classes, weights="quadratic"))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _at(where: str) -> str:
    return f" in {where}" if where else ""


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as pandas and CLAM report) ignoring NaN.

    One value gives std 0; no finite value gives (NaN, NaN).
    """
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size == 1:
        return float(arr[0]), 0.0
    return float(arr.mean()), float(arr.std(ddof=1))


def summarize_folds(rows: Sequence[Mapping[str, float]], keys: Iterable[str]) -> dict[str, float]:
    """``{key_mean, key_std}`` over the fold rows for each key."""
    out: dict[str, float] = {}
    for key in keys:
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(float(r[key]) for r in rows)
    return out


# ------------------------------------------------------------------ slot collapse
#: A slot that receives more than this share of a fold's test-set patches counts as collapse. With
#: top-2 routing every patch is assigned to two slots, so one slot can hold at most half of the
#: assignments; the share of patches (the paper: "one slot taking > 60% of patches") can reach 1.
COLLAPSE_SHARE = 0.5


class SlotCollapseWarning(UserWarning):
    """One slot receives more than half of a fold's test-set patches."""


def collapse_threshold(of_patches: bool, top_k: int = 2) -> float:
    """The collapse line on the scale of the shares given.

    Collapse means one slot receives more than ``COLLAPSE_SHARE`` of the patches. Shares of the
    patches (they sum to top-k) are compared with it directly; shares of all routing assignments
    (they sum to 1, the older ``share`` column) can never exceed 1/top-k, so the same rule reads
    ``COLLAPSE_SHARE / top_k`` there.
    """
    return COLLAPSE_SHARE if of_patches else COLLAPSE_SHARE / top_k


def slot_utilisation(use: SlotUse) -> dict[str, float]:
    """How evenly the slots are used (issue 15, collapse control), from one set of slot counts.

    ``slot_entropy``: the entropy of the slots' shares of all assignments over log K (1 = every slot
    alike, 0 = one slot takes everything); ``slot_gini``: the Gini coefficient of the counts (0 =
    even, (K-1)/K = one slot); ``top_slot_share``: the largest slot's share of the patches (the
    collapse rule compares it with ``COLLAPSE_SHARE``); ``slots_used``: slots that got a patch.
    """
    counts = np.asarray(use.counts, dtype=np.float64)
    k = len(counts)
    total = counts.sum()
    if k == 0 or total == 0:
        return {"slot_entropy": float("nan"), "slot_gini": float("nan"), "top_slot_share": 0.0,
                "slots_used": 0}  # fmt: skip
    shares = np.asarray(use.shares)
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(k)) if k > 1 else 1.0
    ordered = np.sort(counts)
    gini = float((2 * np.arange(1, k + 1) - k - 1).dot(ordered) / (k * total))
    return {"slot_entropy": entropy, "slot_gini": gini, "top_slot_share": float(max(use.patch_shares)),
            "slots_used": int((counts > 0).sum())}  # fmt: skip


def suggested_aux_weight(current: float | None) -> float:
    """A lambda to try after a collapse: ten times the current one, and at least the paper's 0.1."""
    return max(0.1, 10 * current) if current else 0.1


def warn_if_collapsed(use: SlotUse, where: str, aux_weight: float | None = None) -> bool:
    """Warn (SlotCollapseWarning) when one slot receives more than COLLAPSE_SHARE of the patches,
    suggesting a lambda (``suggested_aux_weight`` of the model's ``aux_weight`` when known). Returns
    whether it warned."""
    patch_shares = use.patch_shares
    top = int(np.argmax(patch_shares))
    if patch_shares[top] > COLLAPSE_SHARE:
        used = sum(c > 0 for c in use.counts)
        now = f" (now {aux_weight:g})" if aux_weight is not None else ""
        warnings.warn(
            f"slot collapse on {where}: slot {top} receives {patch_shares[top]:.0%} of the "
            f"patches ({use.shares[top]:.0%} of all routing assignments; {used} of {len(use.counts)} "
            "slots used). The paper sees this when the auxiliary loss weight lambda is too low; try "
            f"the model option aux_weight = {suggested_aux_weight(aux_weight):g}{now}.",
            SlotCollapseWarning,
            stacklevel=2,
        )
        return True
    return False
