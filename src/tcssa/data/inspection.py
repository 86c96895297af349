"""What is in a feature file or a folder of them: the ``tcssa inspect`` report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from tqdm.auto import tqdm

from tcssa.data.formats import FEATURE_EXTENSIONS, H5_EXTENSIONS, read_bag


@dataclass
class FileSummary:
    path: Path
    num_patches: int | None = None
    dim: int | None = None
    dtype: str | None = None
    coords_extent: tuple[int, int, int, int] | None = None  # x_min, y_min, x_max, y_max
    attrs: dict = field(default_factory=dict)
    datasets: dict[str, tuple] = field(default_factory=dict)  # h5: every dataset and its shape
    error: str | None = None


def summarize_file(path: str | Path) -> FileSummary:
    """Read one feature file completely (so every check runs) and describe it; errors raise."""
    path = Path(path)
    bag = read_bag(path, dtype=None)
    summary = FileSummary(path, bag.num_patches, bag.dim, str(bag.features.dtype).removeprefix("torch."))
    summary.attrs = bag.attrs
    if bag.coords is not None:
        low, high = bag.coords.min(0).values.tolist(), bag.coords.max(0).values.tolist()
        summary.coords_extent = (low[0], low[1], high[0], high[1])
    if path.suffix.lower() in H5_EXTENSIONS:
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, node: (
                    summary.datasets.__setitem__(name, node.shape) if isinstance(node, h5py.Dataset) else None
                )
            )
    return summary


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
    if summary.coords_extent is None:
        lines.append("coords:   none")
    else:
        x0, y0, x1, y1 = summary.coords_extent
        lines.append(f"coords:   x {x0}..{x1}, y {y0}..{y1} (level-0 pixels)")
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
                f"{s.path.name:<{name_width}}  {s.num_patches:>9,}  {s.dim:>6}  {s.dtype:<8}  {coords:<6}  ok"
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
