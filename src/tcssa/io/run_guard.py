"""What keeps a run directory consistent: one process at a time, and the same inputs on ``--resume``.

- ``lock_run_dir``: an exclusive ``flock`` on ``RUN/.tcssa.lock``, held for the life of the run.
  A second training or ``--resume`` into the folder while a run is in progress is refused. The
  operating system drops the lock when the process ends however it ends (``kill -9`` too), so a
  killed run can always be resumed; the file itself stays and means nothing on its own.
- ``input_fingerprints``: sha256 of the labels CSV, of the split CSV, of the resolved cohort
  (slide, feature file, label) and of the folds, recorded in ``config.json``; ``check_inputs``
  refuses a resume whose inputs changed, naming what changed.
- ``nothing_trained``: no fold of the run has a checkpoint yet (the run stopped before its first
  epoch ended), so it may be started again in place instead of resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tcssa.io.checkpoints import MODEL_WEIGHTS
from tcssa.io.runs import METRICS_LOG, RESULT_FILE, RESUME_STATE

try:  # POSIX; elsewhere a run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".tcssa.lock"
#: Files of a fold that mean it has trained at least one epoch (or finished).
_TRAINED_MARKERS = (RESULT_FILE, RESUME_STATE, MODEL_WEIGHTS)


class RunDirError(ValueError):
    """The run directory cannot be used: not a folder, not writable, or in use by another run."""


class RunLock:
    """An exclusive lock on a run directory; ``release`` (or the end of the process) drops it."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def make_run_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents), or raise a RunDirError that names the path and why."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} exists and is a file, not a folder: choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), out_dir)
        raise RunDirError(
            f"cannot create the run directory {out_dir}: {blocker} is a file, not a folder"
        ) from None
    except OSError as err:
        raise RunDirError(
            f"cannot create the run directory {out_dir}: {err.strerror or err} ({err.filename or out_dir})"
        ) from None


def lock_run_dir(out_dir: str | Path) -> RunLock:
    """Create ``out_dir`` if needed and lock it for this process; a RunDirError if another holds it."""
    out_dir = Path(out_dir)
    make_run_dir(out_dir)
    path = out_dir / LOCK_FILE
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise RunDirError(
            f"cannot write in the run directory {out_dir}: {err.strerror or err} ({path})"
        ) from None
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunDirError(
                f"{out_dir} is in use by another tcssa run ({holder or 'unknown process'}; lock file "
                f"{path}): wait for it to finish, or choose another --out"
            ) from None
        except OSError as err:  # a file system without locks: run, but say so
            warnings.warn(
                f"cannot lock the run directory {out_dir} ({err.strerror}); not locked", stacklevel=2
            )
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return RunLock(path, handle)


def nothing_trained(out_dir: Path) -> bool:
    """True when no ``fold_*`` folder of ``out_dir`` holds a checkpoint, resume state or result."""
    for fold_dir in out_dir.glob("fold_*"):
        if fold_dir.is_dir() and any((fold_dir / name).exists() for name in _TRAINED_MARKERS):
            return False
    return True


def clear_untrained_folds(out_dir: Path) -> None:
    """Remove what a run that trained nothing left in its ``fold_*`` folders (epoch logs)."""
    for fold_dir in out_dir.glob("fold_*"):
        if not fold_dir.is_dir():
            continue
        (fold_dir / METRICS_LOG).unlink(missing_ok=True)
        try:
            fold_dir.rmdir()  # only if nothing else is in it
        except OSError:
            pass


# ------------------------------------------------------------------ fingerprints
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_fingerprints(
    labels_csv: str | Path, split_csv: str | Path | None, cohort: Any, splits: Sequence[Any]
) -> dict[str, str | None]:
    """sha256 of what a run is computed from: the labels and split files' bytes, the resolved
    cohort (slide, feature file name, label index, in order) and the folds (fold, part, slide)."""
    slides = [[s, cohort.paths[s].name, int(cohort.labels[s])] for s in cohort.slide_ids]
    folds = [
        [split.fold, part, sorted(ids)]
        for split in sorted(splits, key=lambda s: s.fold)
        for part, ids in split.parts().items()
    ]
    return {
        "labels_csv_sha256": file_sha256(labels_csv),
        "split_csv_sha256": None if split_csv is None else file_sha256(split_csv),
        "cohort_sha256": _text_sha256(json.dumps(slides)),
        "splits_sha256": _text_sha256(json.dumps(folds)),
    }


def check_inputs(out_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume ``out_dir`` when the inputs recorded in its config.json differ from now.

    ``saved`` and ``current`` are run configs (config.json's content). A run written before the
    fingerprints were recorded has none, and is not checked.
    """
    before, now = saved.get("inputs"), current.get("inputs")
    if not isinstance(before, dict) or not isinstance(now, dict):
        return
    advice = (
        "resuming would mix folds trained on the old and the new content. Restore it, or train "
        "afresh in another --out"
    )

    def changed(key: str) -> bool:  # both recorded (a split file given then and now) and different
        return before.get(key) is not None and now.get(key) is not None and before[key] != now[key]

    for key, path_key, what in (
        ("labels_csv_sha256", "labels_csv", "the labels file"),
        ("split_csv_sha256", "split_csv", "the split file"),
    ):
        if changed(key):
            then, path = saved.get(path_key), current.get(path_key)
            hashes = f"sha256 {_short_hash(before[key])} then, {_short_hash(now.get(key))} now"
            if then is not None and path is not None and then != path:
                problem = f"{what} is now {path}, the run used {then}, and their content differs"
            else:
                problem = f"{what} {path or then} changed since the run started"
            raise ValueError(f"cannot resume {out_dir}: {problem} ({hashes}); {advice}")
    if changed("cohort_sha256"):
        counts = f"{saved.get('num_slides')} -> {current.get('num_slides')} slides in the run"
        raise ValueError(
            f"cannot resume {out_dir}: the cohort changed since the run started (the slides with a "
            f"feature file in {current.get('features_dir')}, their files or labels; {counts}); {advice}"
        )
    if changed("splits_sha256"):
        raise ValueError(
            f"cannot resume {out_dir}: the folds differ from the run's ({out_dir / 'splits.csv'}); {advice}"
        )


def _short_hash(value: Any) -> str:
    return f"{value[:12]}..." if isinstance(value, str) else "none"
