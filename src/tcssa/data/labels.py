"""Slide labels: the ``slide_id,label[,case_id]`` CSV and the class map saved with every run."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tcssa.io.files import read_json, read_text, write_json

REQUIRED_COLUMNS = ("slide_id", "label")
# A TCGA slide barcode starts with the patient's: TCGA-<site>-<participant> (e.g. TCGA-50-5055).
TCGA_CASE_PATTERN = r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-"


@dataclass(frozen=True)
class LabelTable:
    """Rows of a labels CSV with labels as class indices into ``class_names``."""

    slide_ids: list[str]
    labels: list[int]
    case_ids: list[str] | None
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save_class_map(self, path: str | Path) -> Path:
        return save_class_map(self.class_names, path)


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _class_key(label: str):
    """What two spellings of one class share: the number for numeric labels ("1", "1.0", "01"),
    else the text with case and whitespace ignored ("Positive", "positive ", "posi tive")."""
    try:
        value = float(label)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return ("number", value)
    return ("text", "".join(label.split()).casefold())


def check_class_spellings(path: str | Path, labels: list[str], lines: dict[str, int] | None = None) -> None:
    """Refuse labels that would become separate classes but differ only in spelling (case,
    whitespace, or the same number written twice: 1 and 1.0), naming both spellings and the file."""
    by_key: dict[tuple, list[str]] = {}
    for label in dict.fromkeys(labels):  # distinct, first appearance first
        by_key.setdefault(_class_key(label), []).append(label)
    clashes = [names for names in by_key.values() if len(names) > 1]
    if not clashes:
        return
    where = lambda name: f"{name!r} (line {lines[name]})" if lines and name in lines else repr(name)
    details = "; ".join(" and ".join(where(n) for n in names) for names in clashes[:5])
    raise ValueError(
        f"{path}: labels that differ only in case, whitespace or number format would become separate "
        f"classes: {details}. Spell each class one way (tcssa keeps labels exactly as written)."
    )


def class_order(raw_labels: list[str]) -> list[str]:
    """Deterministic class order: numeric for integer labels ("2" before "10"), else alphabetical."""
    distinct = set(raw_labels)
    if all(_is_integer(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def read_labels(
    path: str | Path, class_names: list[str] | None = None, *, case_id_pattern: str | None = None
) -> LabelTable:
    """Read a labels CSV: columns ``slide_id`` and ``label`` (``case_id`` optional, others ignored).

    A UTF-8 byte-order mark is tolerated. Labels may be strings ("Tumor") or integers; they become
    class indices in the order of ``class_order`` unless ``class_names`` fixes the order (e.g. the
    map saved with a training run, to read a test list the same way). Slide ids stay strings.
    ``case_id_pattern``: for a file without a ``case_id`` column, a regular expression whose first
    group, matched at the start of each slide id, is its case (``TCGA_CASE_PATTERN`` for TCGA
    barcodes), so that splits can keep a patient's slides together.
    Raises ValueError naming the file for a missing column, an empty cell, a duplicate slide id,
    a label outside ``class_names``, or fewer than two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'nothing'})"
            )
        reader.fieldnames = columns
        has_cases = "case_id" in columns
        slide_ids, raw_labels, case_ids = [], [], []
        first_line: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if all(not (v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            wanted = ["slide_id", "label"] + (["case_id"] if has_cases else [])
            values = {c: (row.get(c) or "").strip() for c in wanted}
            empty = [c for c, v in values.items() if not v]
            if empty:
                raise ValueError(f"{path}: line {line} has an empty {', '.join(empty)}")
            slide_ids.append(values["slide_id"])
            raw_labels.append(values["label"])
            first_line.setdefault(values["label"], line)
            if has_cases:
                case_ids.append(values["case_id"])
    if not slide_ids:
        raise ValueError(f"{path}: no slides listed")
    if case_id_pattern is not None:
        if has_cases:
            raise ValueError(f"{path}: has a case_id column; case_id_pattern would override it")
        case_ids = _case_ids_from_pattern(path, slide_ids, case_id_pattern)
        has_cases = True
    duplicates = sorted(s for s, n in Counter(slide_ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"{path}: duplicate slide ids ({len(duplicates)}): {', '.join(duplicates[:20])}")
    if class_names is None:
        check_class_spellings(path, raw_labels, first_line)
        class_names = class_order(raw_labels)
        if len(class_names) < 2:
            raise ValueError(
                f"{path}: only one class ({class_names[0]!r}) among {len(slide_ids)} slides; "
                "a classifier needs at least two (pass class_names to read a one-class list)"
            )
    else:
        class_names = [str(c) for c in class_names]
        unknown = sorted(set(raw_labels) - set(class_names))
        if unknown:
            near = {_class_key(c): c for c in class_names}
            hints = [f"{u!r} looks like {near[_class_key(u)]!r}" for u in unknown if _class_key(u) in near]
            hint = f" ({'; '.join(hints[:5])}: spell it as the class map does)" if hints else ""
            raise ValueError(f"{path}: labels {unknown} are not among the classes {class_names}{hint}")
    index = {name: i for i, name in enumerate(class_names)}
    return LabelTable(
        slide_ids=slide_ids,
        labels=[index[v] for v in raw_labels],
        case_ids=case_ids if has_cases else None,
        class_names=list(class_names),
    )


def _case_ids_from_pattern(path: Path, slide_ids: list[str], pattern: str) -> list[str]:
    regex = re.compile(pattern)
    cases, unmatched = [], []
    for slide in slide_ids:
        match = regex.match(slide)
        if match is None or not match.groups():
            unmatched.append(slide)
        else:
            cases.append(match.group(1))
    if unmatched:
        raise ValueError(
            f"{path}: {len(unmatched)} slide id(s) do not match the case pattern {pattern!r}: "
            + ", ".join(unmatched[:10])
        )
    return cases


def save_class_map(class_names: list[str], path: str | Path) -> Path:
    """Write ``{"class_names": [...]}`` (index i is class i), the file every run keeps."""
    path = Path(path)
    write_json(path, {"class_names": list(class_names)})
    return path


def load_class_map(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        names = read_json(path)["class_names"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a class map ({err})") from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: class_names must be a list of strings")
    return names
