"""What is in a feature file or a folder of them: the ``tcssa inspect`` report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tcssa.io.bag import to_bag
from tcssa.io.features import (
    CSV_EXTENSIONS,
    FEATURE_EXTENSIONS,
    H5_EXTENSIONS,
    peek_header,
    read_h5_metadata,
    read_stored,
    scan_values,
)

# An h5 or npy file whose features take at most this many bytes is read whole, so every check of
# ``read_bag`` runs. A larger one is described from its header (shape, dtype, attributes: no value
# is read, whatever size the header claims) and its values are checked on a sample of at most
# INSPECT_SAMPLE_BYTES of rows from its start, middle and end: ``inspect`` never allocates more.
INSPECT_READ_BYTES = 256 * 2**20
INSPECT_SAMPLE_BYTES = 64 * 2**20


@dataclass
class FileSummary:
    path: Path
    num_patches: int | None = None
    dim: int | None = None
    dtype: str | None = None  # the features' dtype as stored in the file ("text" for a CSV)
    coords_extent: tuple[int, int, int, int] | None = None  # x_min, y_min, x_max, y_max
    attrs: dict = field(default_factory=dict)
    datasets: dict[str, tuple] = field(default_factory=dict)  # h5: every dataset and its shape
    error: str | None = None
    rows_checked: int | None = None  # rows whose values were checked; None: every row
    feature_bytes: int | None = None  # size of the features as stored

    @property
    def sampled(self) -> bool:
        return self.rows_checked is not None and self.rows_checked != self.num_patches


def summarize_file(path: str | Path) -> FileSummary:
    """Describe one feature file; errors raise (ValueError naming the file).

    A file up to ``INSPECT_READ_BYTES`` of features is read completely, so every check runs; a
    larger h5 or npy file is described from its header, with its values checked on a bounded
    sample (``rows_checked``), so a header claiming 25 GB allocates nothing of the sort.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in H5_EXTENSIONS or suffix == ".npy":
        header = peek_header(path)  # the header alone: shape, dtype, and that the data was written
        if header.nbytes > INSPECT_READ_BYTES:
            scan = scan_values(path, max_bytes=INSPECT_SAMPLE_BYTES)
            summary = FileSummary(path, header.num_patches, header.dim, header.dtype)
            summary.feature_bytes, summary.rows_checked = header.nbytes, scan.rows_checked
            summary.coords_extent = scan.coords_extent
            if suffix in H5_EXTENSIONS:
                summary.attrs, summary.datasets = read_h5_metadata(path)
            return summary
    features, coords, attrs, extras = read_stored(path)
    stored = "text" if suffix in CSV_EXTENSIONS else _dtype_name(features)
    bag = to_bag(features, coords, path.stem, path, attrs=attrs, extras=extras, dtype=None)
    summary = FileSummary(path, bag.num_patches, bag.dim, stored)
    summary.feature_bytes = features.nbytes if hasattr(features, "nbytes") else None
    summary.attrs = bag.attrs
    if bag.coords is not None:
        low, high = bag.coords.min(0).values.tolist(), bag.coords.max(0).values.tolist()
        summary.coords_extent = (low[0], low[1], high[0], high[1])
    if suffix in H5_EXTENSIONS:
        _, summary.datasets = read_h5_metadata(path)
    return summary


def _dtype_name(values) -> str:
    return str(values.dtype).removeprefix("torch.")


def inspect_folder(folder: str | Path) -> list[FileSummary]:
    """Summaries of every feature file in ``folder`` (not recursive); unreadable ones carry ``error``."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FEATURE_EXTENSIONS)
    summaries = []
    for path in tqdm(files, desc="inspecting", unit="file", disable=len(files) < 50):
        try:
            summaries.append(summarize_file(path))
        except (ValueError, FileNotFoundError) as err:
            message = str(err).removeprefix(f"{path}: ")
            summaries.append(FileSummary(path, error=message))
    return summaries


def file_report(summary: FileSummary) -> str:
    lines = [
        f"file:     {summary.path}",
        f"slide_id: {summary.path.stem}",
        f"patches:  N = {summary.num_patches:,}",
        f"features: D = {summary.dim}, stored as {summary.dtype}",
    ]
    if summary.sampled:
        lines.append(
            f"values:   checked on a sample of {summary.rows_checked:,} of {summary.num_patches:,} rows "
            f"(the features take {summary.feature_bytes / 1e9:.3g} GB; "
            "only the header and the sample were read)"
        )
    if summary.coords_extent is None:
        lines.append("coords:   none")
    else:
        x0, y0, x1, y1 = summary.coords_extent
        of = " (of the sampled rows)" if summary.sampled else ""
        lines.append(f"coords:   x {x0}..{x1}, y {y0}..{y1} (level-0 pixels){of}")
    if summary.datasets:
        shown = ", ".join(f"{name} {tuple(shape)}" for name, shape in summary.datasets.items())
        lines.append(f"datasets: {shown}")
    if summary.attrs:
        lines.append("attrs:")
        width = max(len(k) for k in summary.attrs)
        for key, value in summary.attrs.items():
            text = repr(value) if not isinstance(value, str) else value
            lines.append(f"  {key:<{width}}  {text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)


def folder_report(folder: str | Path, summaries: list[FileSummary]) -> str:
    """One row per file, then totals; unreadable files are rows marked ERROR."""
    if not summaries:
        return f"{folder}: no feature files ({', '.join(FEATURE_EXTENSIONS)})"
    name_width = min(max(len(s.path.name) for s in summaries), 60)
    header = f"{'file':<{name_width}}  {'N':>9}  {'D':>6}  {'dtype':<8}  coords  status"
    lines = [header, "-" * len(header)]
    for s in summaries:
        if s.error:
            lines.append(
                f"{s.path.name:<{name_width}}  {'-':>9}  {'-':>6}  {'-':<8}  {'-':<6}  ERROR: {s.error}"
            )
        else:
            coords = "yes" if s.coords_extent else "no"
            lines.append(
                f"{s.path.name:<{name_width}}  {s.num_patches:>9,}  {s.dim:>6}  {s.dtype:<8}  {coords:<6}  "
                + (f"ok (values sampled: {s.rows_checked:,} rows)" if s.sampled else "ok")
            )
    good = [s for s in summaries if not s.error]
    errors = len(summaries) - len(good)
    lines.append("")
    lines.append(f"{len(summaries)} files: {len(good)} readable, {errors} with errors")
    if good:
        sizes = [s.num_patches for s in good]
        lines.append(
            f"patches: {sum(sizes):,} in all; per file min {min(sizes):,}, "
            f"median {int(statistics.median(sizes)):,}, max {max(sizes):,}"
        )
        dims = sorted({s.dim for s in good})
        if len(dims) == 1:
            lines.append(f"feature dimension: D = {dims[0]} in every readable file")
        else:
            by_dim = {d: [s.path.name for s in good if s.dim == d] for d in dims}
            detail = "; ".join(f"D={d}: {len(names)} files (e.g. {names[0]})" for d, names in by_dim.items())
            lines.append(f"feature dimension DIFFERS across files: {detail}")
    return "\n".join(lines)
