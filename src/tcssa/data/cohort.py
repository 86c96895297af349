"""A cohort: labelled slides, each resolved to exactly one feature file in a folder."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from tcssa.data.labels import read_labels
from tcssa.io.features import FEATURE_EXTENSIONS, peek_header, peek_shape, scan_values

log = logging.getLogger(__name__)

# Slide-image extensions people leave on slide ids ("slide_01.svs"); only used to hint in errors.
_SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".czi")


def _feature_files_by_stem(features_dir: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(features_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in FEATURE_EXTENSIONS:
            by_stem[path.stem].append(path)
    return by_stem


def _listing(ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def resolve_feature_files(
    features_dir: str | Path, slide_ids: list[str], skip_missing: bool = False
) -> tuple[dict[str, Path], list[str]]:
    """Map each slide id to the one feature file in ``features_dir`` whose stem equals it.

    Returns (found, missing). A slide with no file is an error listing every such slide unless
    ``skip_missing``, in which case the missing slides are returned and reported (count and ids)
    in the log. A slide with two files (``a.h5`` and ``a.pt``) is always an error: which one is
    meant cannot be guessed.
    """
    found, missing, _ = _resolve(Path(features_dir), slide_ids, skip_missing)
    return found, missing


def _resolve(
    features_dir: Path, slide_ids: list[str], skip_missing: bool
) -> tuple[dict[str, Path], list[str], dict[str, list[Path]]]:
    """``resolve_feature_files`` plus every feature file of the folder by stem."""
    if not features_dir.is_dir():
        raise FileNotFoundError(f"features folder not found: {features_dir}")
    by_stem = _feature_files_by_stem(features_dir)
    ambiguous = [s for s in slide_ids if len(by_stem.get(s, ())) > 1]
    if ambiguous:
        details = "; ".join(f"{s}: {', '.join(p.name for p in by_stem[s])}" for s in ambiguous[:10])
        raise ValueError(
            f"{features_dir}: {len(ambiguous)} slide(s) have more than one feature file: {details}"
        )
    found = {s: by_stem[s][0] for s in slide_ids if s in by_stem}
    missing = [s for s in slide_ids if s not in by_stem]
    if missing and not skip_missing:
        hint = ""
        with_ext = [s for s in missing if Path(s).suffix.lower() in _SLIDE_EXTENSIONS]
        if with_ext and any(Path(s).stem in by_stem for s in with_ext):
            hint = " (some slide ids end in a slide-image extension; the stems match files: drop it)"
        raise ValueError(
            f"{features_dir}: no feature file for {len(missing)} of {len(slide_ids)} slides: "
            f"{_listing(missing)}{hint} (pass skip_missing / --skip-missing to leave them out)"
        )
    if missing:
        log.warning(
            "skipping %d of %d slides with no feature file in %s: %s",
            len(missing),
            len(slide_ids),
            features_dir,
            _listing(missing),
        )
    return found, missing, by_stem


@dataclass
class Cohort:
    """Labelled slides with their feature files; the unit every split and dataset works on."""

    slide_ids: list[str]
    paths: dict[str, Path]
    labels: dict[str, int]
    class_names: list[str]
    case_ids: dict[str, str] | None = None
    dim: int | None = None
    missing: list[str] = field(default_factory=list)  # labelled slides without a feature file
    unlabelled: list[str] = field(default_factory=list)  # feature files (names) without a label row

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_folder(
        cls,
        features_dir: str | Path,
        labels_csv: str | Path,
        skip_missing: bool = False,
        *,
        class_names: list[str] | None = None,
        case_id_pattern: str | None = None,
        check_files: bool = True,
        progress: bool | None = None,
    ) -> Cohort:
        """Labels from ``labels_csv``, files from ``features_dir`` (exact stem match).

        ``class_names`` and ``case_id_pattern`` are passed to ``read_labels``; ``progress`` to
        ``validate_cohort`` (a bar for 200 files or more by default). With ``check_files`` every
        file's header is read once, so an unreadable file or a feature
        dimension that differs across the cohort fails here, naming the file, not mid-training.
        Feature files in the folder that the labels do not list are left out with a logged warning
        (count and first names) and kept in ``unlabelled``.
        """
        table = read_labels(labels_csv, class_names=class_names, case_id_pattern=case_id_pattern)
        found, missing, by_stem = _resolve(Path(features_dir), table.slide_ids, skip_missing)
        labelled = set(table.slide_ids)
        unlabelled = [p.name for stem, paths in by_stem.items() if stem not in labelled for p in paths]
        if unlabelled:
            log.warning(
                "%d feature file(s) in %s have no row in %s and are left out: %s",
                len(unlabelled),
                features_dir,
                labels_csv,
                _listing(unlabelled, 10),
            )
        kept = [s for s in table.slide_ids if s in found]
        if not kept:
            raise ValueError(f"{features_dir}: none of the {len(table.slide_ids)} slides has a feature file")
        labels = dict(zip(table.slide_ids, table.labels, strict=True))
        cases = dict(zip(table.slide_ids, table.case_ids, strict=True)) if table.case_ids else None
        cohort = cls(
            slide_ids=kept,
            paths={s: found[s] for s in kept},
            labels={s: labels[s] for s in kept},
            class_names=table.class_names,
            case_ids={s: cases[s] for s in kept} if cases else None,
            missing=missing,
            unlabelled=unlabelled,
        )
        if check_files:
            cohort.check_files(progress=progress)
        else:
            cohort.dim = peek_shape(cohort.paths[kept[0]])[1]
        return cohort

    def check_files(self, progress: bool | None = None) -> None:
        """Read every file's header; set ``dim``; fail, listing every bad file, on a file that is
        unreadable or whose D differs (``validate`` without reading values)."""
        validate_cohort(self, values=False, progress=progress)

    def validate(self, values: bool = True) -> None:
        """``validate_cohort(self, values=values)``."""
        validate_cohort(self, values=values)

    def subset(self, slide_ids: list[str]) -> Cohort:
        unknown = [s for s in slide_ids if s not in self.paths]
        if unknown:
            raise ValueError(f"slides not in the cohort ({len(unknown)}): {_listing(unknown)}")
        return replace(
            self,
            slide_ids=list(slide_ids),
            paths={s: self.paths[s] for s in slide_ids},
            labels={s: self.labels[s] for s in slide_ids},
            case_ids={s: self.case_ids[s] for s in slide_ids} if self.case_ids else None,
            missing=list(self.missing),
            unlabelled=list(self.unlabelled),
        )

    def label_counts(self) -> dict[str, int]:
        counts = {name: 0 for name in self.class_names}
        for slide in self.slide_ids:
            counts[self.class_names[self.labels[slide]]] += 1
        return counts


def validate_cohort(cohort: Cohort, *, values: bool = True, progress: bool | None = None) -> None:
    """Check every feature file of ``cohort`` before anything is written; one ValueError lists
    every bad file (one line each, naming it), not just the first.

    Per file: the header (readable, features N x D with N > 0, a numeric dtype, coords N x 2, h5
    data actually written), the same D across the cohort (sets ``cohort.dim``) and, with
    ``values``, every feature value finite and within ``MAX_FEATURE_MAGNITUDE``. h5 and npy files
    are scanned in blocks of ``SCAN_BLOCK_BYTES`` (memory stays bounded, cost is one read of the
    cohort); files without a header (pt, npz, csv) are read whole once, which checks them fully.
    ``progress``: a progress bar (default: for 200 files or more).
    """
    slides = cohort.slide_ids
    if not slides:
        raise ValueError("the cohort has no slides to check")
    problems: list[str] = []
    dims: dict[int, list[str]] = defaultdict(list)  # in slide order: the first key is the first good file's
    show = len(slides) >= 200 if progress is None else progress
    what = "checking feature files" + (" (values)" if values else "")
    for slide in tqdm(slides, desc=what, unit="file", disable=not show):
        path = cohort.paths[slide]
        try:
            header = peek_header(path)
            if values and header.header_only:
                scan_values(path)
        except (ValueError, FileNotFoundError) as err:
            message = str(err)
            problems.append(message if str(path) in message else f"{path}: {message}")
            continue
        dims[header.dim].append(slide)
    if len(dims) > 1:
        first_dim = next(iter(dims))
        first_slide = dims[first_dim][0]
        odd = [(d, ids) for d, ids in dims.items() if d != first_dim]
        details = "; ".join(f"D={d}: {_listing([str(cohort.paths[s]) for s in ids], 5)}" for d, ids in odd)
        problems.append(
            f"feature dimension differs across the cohort: {cohort.paths[first_slide]} has "
            f"D={first_dim}, but {details}"
        )
    if problems:
        if len(problems) == 1:
            raise ValueError(problems[0])
        bad = len(slides) - sum(len(ids) for ids in dims.values())
        raise ValueError(
            f"{len(problems)} problem(s) with the cohort's feature files ({bad} of {len(slides)} files "
            "unusable"
            + (", and differing feature dimensions" if len(dims) > 1 else "")
            + "):\n  "
            + "\n  ".join(problems)
        )
    cohort.dim = next(iter(dims))
