"""The file primitives every format builds on: reading UTF-8 text and JSON, writing atomically.

A file written through ``atomic_output`` goes to ``<name>.<pid>.partial`` beside its destination
and is moved into place with ``os.replace`` only when it is complete, so a run killed at any moment
leaves either the old file or the new one, never half of one; a full disk is one ``NoSpaceError``
naming the file. The process id keeps two processes writing the same file (torchrun ranks) from
sharing one partial file. Feature files, checkpoints and the run directory's files are written
this way.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------------- reading
class NotUtf8Error(ValueError):
    """A text file whose bytes are not UTF-8; ``reason`` says where, the message names the file too."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def read_text(path: str | Path) -> str:
    """A small text file (labels, splits, question files, JSON) decoded as UTF-8, a byte-order mark
    tolerated.

    Bytes that are not UTF-8 are a ``NotUtf8Error`` naming the file, the line and the bytes (a file
    saved as Latin-1 / Windows-1252 by a spreadsheet, say), not a bare UnicodeDecodeError.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise NotUtf8Error(
            path,
            "is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8 "
            "(e.g. 'CSV UTF-8' in a spreadsheet, or iconv -f utf-16 -t utf-8)",
        )
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        line = body.count(b"\n", 0, err.start) + 1
        column = err.start - (body.rfind(b"\n", 0, err.start) + 1) + 1
        bad = body[err.start : err.start + max(1, min(err.end - err.start, 4))]
        raise NotUtf8Error(
            path,
            f"line {line} (byte {column} of the line) has bytes {bad!r} that are not UTF-8; "
            "save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or "
            "iconv -f windows-1252 -t utf-8 for a Windows/Latin-1 file)",
        ) from None


def read_json(path: str | Path, hint: str = "") -> Any:
    """A JSON file's value; a missing file, or one that is not UTF-8 JSON, is an error naming it.

    ``hint`` ends the message of a file that is not JSON (e.g. "is the run complete?").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    suffix = f"; {hint}" if hint else ""
    try:
        return json.loads(read_text(path))
    except NotUtf8Error as err:
        raise ValueError(f"{path}: not a JSON text file ({err.reason}){suffix}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not readable JSON ({err}){suffix}") from err


def read_csv_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV as dicts (``read_text``); a missing required column or a row with more
    fields than the header is a ValueError naming the file."""
    path = Path(path)
    # newline="": the csv module sees the line endings as they are, as with open(..., newline="")
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        header = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in required if c not in header]
    if missing:
        found = ", ".join(header) or "none"
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise ValueError(f"{path}, line {line}: more fields than the header has")
    return rows


# ------------------------------------------------------------------------------------- writing
class NoSpaceError(OSError, ValueError):
    """The disk filled up while writing ``filename``; nothing half-written was left behind.

    An OSError (errno ENOSPC) and a ValueError, so the command line reports it as one clear line.
    """

    def __init__(self, path: str | Path, detail: str = "") -> None:
        message = f"no space left writing {path}" + (f" ({detail})" if detail else "")
        super().__init__(errno.ENOSPC, message, str(path))

    def __str__(self) -> str:
        return self.strerror


def _is_no_space(err: BaseException) -> bool:
    """Whether ``err``, or an error it wraps, is a full disk (h5py and safetensors report ENOSPC in
    their messages)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if (
            "No space left on device" in text
            or "errno = 28," in text
            or "os error 28" in text
            or "Disk quota exceeded" in text
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{free / 2**20:.1f} MiB free on {folder}"


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        folder = path.parent
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise ValueError(f"cannot write {path}: {blocker} is a file, not a folder") from None


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Write ``path`` through ``<name>.<pid>.partial`` beside it, renamed onto ``path`` only when the block
    succeeds; on any failure the partial file is removed, so a reader never finds a half-written file
    under the real name. The folder is created. A full disk becomes a ``NoSpaceError`` naming
    ``path``; another operating-system error about the partial file is raised naming ``path``.
    """
    path = Path(path)
    _make_parent(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        try:
            yield partial
            os.replace(partial, path)
        except Exception as err:
            if _is_no_space(err):
                raise NoSpaceError(path, _free_space(path.parent)) from err
            if isinstance(err, OSError) and err.errno is not None and err.filename in (None, str(partial)):
                raise OSError(err.errno, err.strerror or str(err), str(path)) from err
            raise
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as partial:
        partial.write_text(text, encoding="utf-8")


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` for strict JSON: a NaN or infinite float (e.g. the AUC of a one-class set) becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys (what config.json, result.json, ... hold)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
