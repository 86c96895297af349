"""Slide question-answering file formats, read into two plain records.

- ``VQAItem``: one question about one slide (multiple choice when it has options, open otherwise).
- ``Conversation``: one training sample, a slide plus alternating human / assistant turns with the
  single ``<image>`` placeholder in a human turn.

Readers (one per published format):

- SlideBench-VQA CSV   ``ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer``
  (UTF-8 with BOM; empty options allowed; ``Slide`` may be a feature-file path whose stem is the id)
- SlideBench caption CSV  ``ID,Slide,Tumor,Question,Caption``
- WSI-VQA JSON   ``[{Id, Question, Choice?, Answer}]`` (open questions have no ``Choice``)
- SlideInstruct JSON   ``[{id, image: [...], conversations: [{from, value}, ...]}]``

A record that cannot be used (e.g. a WSI-VQA answer that is none of its choices) is never dropped
silently: it goes to ``skipped`` with the reason, and callers report the count. A file that cannot be
read as its format says is refused with an error naming the file and the line or item: a file that is
not UTF-8, two SlideBench rows with one ``ID``, a WSI-VQA ``Choice`` that is not a list.

Question ids: SlideBench's ``ID`` column numbers the questions and must be unique in a file. WSI-VQA's
``Id`` is the slide (TCGA case), shared by all the questions about it (the release even repeats a
question about a case, with its choices, a few times), so a WSI-VQA question is ``Id#position``.
"""

from __future__ import annotations

import csv
import io
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath

from tcssa.io.files import read_csv_rows, read_json, read_text

IMAGE_PLACEHOLDER = "<image>"
OPTION_LETTERS = tuple(string.ascii_uppercase)

# Suffixes that name a feature or slide file; anything else in an id (e.g. the ".d4ff32cd-..." UUID of a
# TCGA slide name) is part of the id and must not be cut off as if it were an extension.
_FILE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth", ".npy", ".npz", ".csv", ".svs", ".tif", ".tiff", ".ndpi")


def slide_id_from_reference(reference: str) -> str:
    """The slide id named by a ``Slide`` / ``image`` field: a bare id or a path whose stem is the id."""
    name = PurePath(reference.strip().replace("\\", "/")).name
    for suffix in _FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class VQAItem:
    """One question about one slide. ``options`` is empty for an open question."""

    question_id: str
    slide_id: str
    question: str
    options: tuple[tuple[str, str], ...] = ()  # (letter, text), only non-empty options, in file order
    answer: str = ""  # the correct letter for multiple choice, the answer text for an open question
    broad_category: str = ""
    narrow_category: str = ""

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)

    @property
    def answer_text(self) -> str:
        return dict(self.options).get(self.answer, self.answer)


@dataclass(frozen=True)
class Conversation:
    """A slide and its turns: (role, text) with role "human" or "gpt", starting with human."""

    sample_id: str
    slide_id: str
    turns: tuple[tuple[str, str], ...]


@dataclass
class VQASet:
    """What a reader returns: the usable items and, for each unusable record, why it was skipped."""

    items: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        text = f"{len(self.items)} items from {self.source}"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return text


# ----------------------------------------------------------------------------- SlideBench
SLIDEBENCH_VQA_COLUMNS = ("ID", "Slide", "Question", "Answer")


def _question_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    return path


def _read_question_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    return read_csv_rows(_question_file(Path(path)), required)


def _refuse_duplicate_ids(path: Path, rows: list[dict[str, str]], column: str = "ID") -> None:
    """Each row's ``column`` (stripped) must be unique: results are reported by id."""
    lines: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):
        lines.setdefault((row[column] or "").strip(), []).append(line)
    duplicated = {key: at for key, at in lines.items() if len(at) > 1}
    if duplicated:
        shown = "; ".join(
            f"{key!r} on lines {', '.join(map(str, at))}" for key, at in list(duplicated.items())[:10]
        )
        more = f" and {len(duplicated) - 10} more" if len(duplicated) > 10 else ""
        raise ValueError(
            f"{path}: {len(duplicated)} duplicated {column}(s): {shown}{more}; each {column} must be unique"
        )


def read_slidebench_vqa(path: str | Path) -> VQASet:
    """SlideBench-VQA CSV. Options are the single-letter columns (A, B, C, D, ...) that are non-empty."""
    path = Path(path)
    rows = _read_question_rows(path, SLIDEBENCH_VQA_COLUMNS)
    _refuse_duplicate_ids(path, rows)
    header = list(rows[0]) if rows else []
    option_columns = [c for c in header if len(c) == 1 and c in OPTION_LETTERS]
    result = VQASet(source=str(path))
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line} (ID {row['ID']})"
        options = tuple((c, row[c].strip()) for c in option_columns if row[c] and row[c].strip())
        answer = row["Answer"].strip().upper()
        if not row["Slide"].strip():
            raise ValueError(f"{where}: empty Slide")
        if not options:
            raise ValueError(f"{where}: no non-empty option among {option_columns}")
        if answer not in dict(options):
            result.skipped.append(f"{where}: answer {row['Answer']!r} is not one of the non-empty options")
            continue
        result.items.append(
            VQAItem(
                question_id=row["ID"].strip(),
                slide_id=slide_id_from_reference(row["Slide"]),
                question=row["Question"].strip(),
                options=options,
                answer=answer,
                broad_category=(row.get("Broad Category") or "").strip(),
                narrow_category=(row.get("Narrow Category") or "").strip(),
            )
        )
    return result


def read_slidebench_captions(path: str | Path) -> VQASet:
    """SlideBench caption CSV -> Conversations (instruction + report caption)."""
    path = Path(path)
    rows = _read_question_rows(path, ("ID", "Slide", "Caption"))
    _refuse_duplicate_ids(path, rows)
    result = VQASet(source=str(path))
    for line, row in enumerate(rows, start=2):
        caption = row["Caption"].strip()
        if not caption:
            result.skipped.append(f"{path.name} line {line} (ID {row['ID']}): empty caption")
            continue
        instruction = (row.get("Question") or "").strip() or "Describe this slide."
        result.items.append(
            Conversation(
                sample_id=row["ID"].strip(),
                slide_id=slide_id_from_reference(row["Slide"]),
                turns=(("human", f"{IMAGE_PLACEHOLDER}\n{instruction}"), ("gpt", caption)),
            )
        )
    return result


# ----------------------------------------------------------------------------- WSI-VQA
def _normalise_answer(text: str) -> str:
    return " ".join(str(text).strip().lower().rstrip(".").split())


def read_wsi_vqa(path: str | Path) -> VQASet:
    """WSI-VQA JSON. ``Id`` is the slide (TCGA case) id; ``Choice`` makes a question multiple choice.

    ``Choice`` is a JSON list of the choices; absent, null, ``[]`` or ``""`` make an open question. A
    non-empty string is refused rather than guessed at: read as a sequence it would become one option
    per character, and a list written as text (JSON, or a Python repr from a CSV round trip) means the
    file was converted wrongly, which is better fixed once at the source than half-parsed here.

    The answer is matched to a choice after trimming, lower-casing and dropping a final full stop
    (the release writes e.g. ``"grade 3."`` for the choice ``"grade 3"``); a closed question whose answer
    still matches no choice is skipped and reported.
    """
    path = Path(path)
    records = _read_json_list(path)
    result = VQASet(source=str(path))
    for index, record in enumerate(records):
        record_id = record.get("Id") if isinstance(record, dict) else None
        where = f"{path.name} item {index} (Id {record_id!r})"
        if not isinstance(record, dict) or not {"Id", "Question", "Answer"} <= set(record):
            raise ValueError(f"{where}: expected keys Id, Question, Answer")
        choices = record.get("Choice")
        if choices is None or (isinstance(choices, str) and not choices.strip()):
            choices = []
        if isinstance(choices, str):
            raise ValueError(
                f"{where}: Choice is a string ({_shorten(choices)}), not a list of choices; if it is a "
                "list written as text, convert the file so that Choice is a JSON list"
            )
        if not isinstance(choices, list) or any(isinstance(c, (list, dict)) or c is None for c in choices):
            raise ValueError(f"{where}: Choice must be a list of choice texts, got {_shorten(choices)}")
        if len(choices) > len(OPTION_LETTERS):
            raise ValueError(f"{where}: {len(choices)} choices, more than {len(OPTION_LETTERS)} letters")
        options = tuple((OPTION_LETTERS[i], str(c).strip()) for i, c in enumerate(choices))
        answer = str(record["Answer"]).strip()
        if options:
            matches = [
                letter for letter, text in options if _normalise_answer(text) == _normalise_answer(answer)
            ]
            if len(matches) != 1:
                reason = "matches none of" if not matches else "matches several of"
                result.skipped.append(f"{where}: answer {answer!r} {reason} its choices {list(choices)}")
                continue
            answer = matches[0]
        result.items.append(
            VQAItem(
                question_id=f"{record['Id']}#{index}",
                slide_id=slide_id_from_reference(str(record["Id"])),
                question=str(record["Question"]).strip(),
                options=options,
                answer=answer,
                broad_category="closed" if options else "open",
            )
        )
    return result


# ----------------------------------------------------------------------------- SlideInstruct
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def read_slideinstruct(path: str | Path) -> VQASet:
    """SlideInstruct JSON -> Conversations. One slide per sample and one ``<image>`` per conversation."""
    path = Path(path)
    records = _read_json_list(path)
    result = VQASet(source=str(path))
    for index, record in enumerate(records):
        where = f"{path.name} item {index} (id {record.get('id')!r})"
        images = record.get("image")
        if isinstance(images, str):
            images = [images]
        if not images:
            raise ValueError(f"{where}: no 'image'")
        if len(images) != 1:
            raise ValueError(f"{where}: {len(images)} images; a sample must name exactly one slide")
        turns = []
        for turn in record.get("conversations") or []:
            role = _ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise ValueError(f"{where}: unknown speaker {turn.get('from')!r} (expected human or gpt)")
            turns.append((role, str(turn.get("value", ""))))
        if not turns or turns[0][0] != "human" or turns[-1][0] != "gpt":
            raise ValueError(f"{where}: conversations must start with human and end with gpt")
        if any(a[0] == b[0] for a, b in zip(turns, turns[1:], strict=False)):
            raise ValueError(f"{where}: turns must alternate between human and gpt")
        count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
        if count != 1 or IMAGE_PLACEHOLDER not in turns[0][1]:
            raise ValueError(
                f"{where}: the first human turn must hold the one {IMAGE_PLACEHOLDER} placeholder "
                f"(found {count} in the conversation)"
            )
        result.items.append(
            Conversation(
                sample_id=str(record.get("id", index)),
                slide_id=slide_id_from_reference(str(images[0])),
                turns=tuple(turns),
            )
        )
    ids = Counter(str(r.get("id")) for r in records if r.get("id") is not None)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        # training conversations: a repeated id is suspicious (a file concatenated twice?) but not
        # wrong in itself, as the id only labels the sample, so it is reported, not refused
        warnings.warn(
            f"{path}: {len(repeated)} sample id(s) occur more than once: {', '.join(repeated[:10])}"
            + (" ..." if len(repeated) > 10 else ""),
            stacklevel=2,
        )
    return result


def _shorten(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_list(path: Path) -> list:
    records = read_json(_question_file(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


# ----------------------------------------------------------------------------- dispatch
FORMATS = {
    "slidebench-vqa": read_slidebench_vqa,
    "slidebench-caption": read_slidebench_captions,
    "wsi-vqa": read_wsi_vqa,
    "slideinstruct": read_slideinstruct,
}


def detect_format(path: str | Path) -> str:
    """Tell the format from the header (CSV) or the keys of the first record (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(io.StringIO(read_text(_question_file(path)), newline="")), [])
        if "Caption" in header:
            return "slidebench-caption"
        if set(SLIDEBENCH_VQA_COLUMNS) <= set(header):
            return "slidebench-vqa"
        raise ValueError(f"{path}: unknown CSV header {header}")
    if path.suffix.lower() == ".json":
        records = _read_json_list(path)
        first = records[0] if records else {}
        if "conversations" in first:
            return "slideinstruct"
        if {"Id", "Question", "Answer"} <= set(first):
            return "wsi-vqa"
        raise ValueError(f"{path}: unknown JSON record keys {sorted(first)}")
    raise ValueError(f"{path}: unknown question file type (expected .csv or .json)")


def load_questions(path: str | Path, fmt: str | None = None) -> VQASet:
    """Read any supported file; ``fmt`` is one of FORMATS or None to detect it."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown question format {fmt!r}; choose from {sorted(FORMATS)}")
    return FORMATS[fmt](path)


def read_slide_map(path: str | Path) -> dict[str, str]:
    """A CSV ``key,slide_id`` naming the feature file of each slide key used in a question file (WSI-VQA
    names TCGA cases, e.g. ``TCGA-PL-A8LZ``, while features are usually stored per slide)."""
    rows = _read_question_rows(Path(path), ("key", "slide_id"))
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        key, slide = row["key"].strip(), row["slide_id"].strip()
        if not key or not slide:
            raise ValueError(f"{path}, line {line}: empty key or slide_id")
        if mapping.get(key, slide) != slide:
            raise ValueError(f"{path}, line {line}: key {key!r} is mapped to two slides")
        mapping[key] = slide
    return mapping


def apply_slide_map(items: list, mapping: dict[str, str] | None) -> list:
    """Items with their slide ids replaced through ``mapping`` (ids not in it stay as they are)."""
    if not mapping:
        return list(items)
    return [replace(item, slide_id=mapping.get(item.slide_id, item.slide_id)) for item in items]
