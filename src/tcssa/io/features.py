"""Patch-feature files on disk: one home for every format tcssa reads and the h5 it writes.

Formats, chosen by extension:

- ``.h5`` / ``.hdf5``: TRIDENT or CLAM output: dataset ``features`` (N x D, often float16) and
  optionally ``coords`` (N x 2, level-0 pixels). TRIDENT keeps the patching metadata as attributes
  of ``coords`` (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ...); CLAM's older layout has ``patch_size``, ``patch_level`` and
  ``downsample`` instead, from which ``patch_size_level0`` is derived.
- ``.pt`` / ``.pth``: a tensor (N x D), or a dict with ``features`` and optionally ``coords``.
  Loaded with ``weights_only=True``: a feature file can never run code.
- ``.npy``: an N x D array; ``.npz``: arrays ``features`` (and ``coords``), or a single array.
  Loaded without pickle.
- ``.csv``: DSMIL / SlideChat patch features: a header row ``0,1,...,D-1`` then one row per
  patch, no coords (a UTF-8 byte-order mark is tolerated).

``FeatureFileWriter`` writes what ``tcssa extract`` makes, one slide at a time, in TRIDENT's layout
(mahmoodlab/TRIDENT, ``trident/IO.py`` ``coords_to_h5``/``save_h5`` and
``trident/wsi_objects/WSI.py`` ``extract_patch_features``). Matched: dataset ``features`` (N x D)
and ``coords`` (N x 2 int64, level-0 x, y of each tile's top-left corner), both resizable along N
(maxshape None); on ``coords`` the attributes ``patch_size``, ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``,
``level0_width``, ``level0_height``; on ``features`` ``name``, ``savetodir`` and ``encoder``; a
slide without tiles is a file of ``features`` 0 x D float32 and ``coords`` 0 x 2 int64 with the same
attributes, and a warning. Where tcssa differs: the features are always float32 (TRIDENT stores
what the encoder returns, float16 under its half-precision autocast); the file is streamed in
chunks of ``chunk_rows`` rows (TRIDENT: one row per chunk, the whole slide written at once); it is
written to ``<name>.<pid>.partial`` and renamed when complete (TRIDENT writes the final name
directly); extra per-patch arrays (e.g. an encoder's class probabilities) are further N x C
datasets with their column names in the attribute ``columns``; and tcssa's own provenance (mpp and
where it came from, the slide reader, the read level, ``min_tissue``, the tcssa version) is on the
file root, where TRIDENT's readers do not look.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from tcssa.io.bag import Bag, all_finite, check_coords, check_features, to_bag, value_problem
from tcssa.io.files import atomic_output

H5_EXTENSIONS = (".h5", ".hdf5")
TORCH_EXTENSIONS = (".pt", ".pth")
NUMPY_EXTENSIONS = (".npy", ".npz")
CSV_EXTENSIONS = (".csv",)
FEATURE_EXTENSIONS = H5_EXTENSIONS + TORCH_EXTENSIONS + NUMPY_EXTENSIONS + CSV_EXTENSIONS


def read_bag(
    path: str | Path, dtype: torch.dtype | None = torch.float32, *, extras: Iterable[str] = ()
) -> Bag:
    """Read one slide's patch features; the format follows the extension, slide_id is the file stem.

    ``dtype``: the features' dtype in the Bag (cast once); None keeps the stored floating dtype.
    ``extras`` names further per-patch arrays to load into ``Bag.extras`` (e.g. ``phenotype``).
    Errors (missing file, corrupt file, bad shapes, NaN/Inf) name the file.
    """
    path = Path(path)
    features, coords, attrs, extra_arrays = read_stored(path, extras)
    return to_bag(features, coords, path.stem, path, attrs=attrs, extras=extra_arrays, dtype=dtype)


def read_stored(path: str | Path, extras: Iterable[str] = ()):
    """(features, coords, attrs, extras) as the file stores them, before any check or cast
    (``read_bag`` is this plus ``to_bag``); features keep their stored dtype (e.g. int64)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    extras = tuple(extras)
    if suffix in H5_EXTENSIONS:
        return _read_h5(path, extras)
    if suffix in TORCH_EXTENSIONS:
        return _read_torch(path, extras)
    if suffix in NUMPY_EXTENSIONS:
        return _read_numpy(path, extras)
    if suffix in CSV_EXTENSIONS:
        return _read_csv(path, extras)
    raise ValueError(
        f"{path}: unknown feature file extension {path.suffix!r} (known: {', '.join(FEATURE_EXTENSIONS)})"
    )


def peek_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a feature file, reading only the header where the format allows it (h5, npy)."""
    header = peek_header(path)
    return header.num_patches, header.dim


@dataclass(frozen=True)
class FeatureHeader:
    """What a feature file says about itself: shape, stored dtype, coords count.

    ``header_only``: True when read from the header alone (h5, npy), so no value was looked at;
    False when the format has no header and the file was read whole (and checked) to learn this.
    """

    path: Path
    num_patches: int
    dim: int
    dtype: str  # as stored: "float16", "int64", ...; "text" for a CSV
    coords: int | None  # number of coords rows, None without coords
    header_only: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the features as stored (``text``: as float32)."""
        size = 4 if self.dtype == "text" else np.dtype(self.dtype).itemsize
        return self.num_patches * self.dim * size


def _check_shape(path: Path, shape: tuple) -> tuple[int, int]:
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ValueError(f"{path}: features must be N x D (2-D), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{path}: empty bag (0 patches)")
    if shape[1] == 0:
        raise ValueError(f"{path}: features have dimension D = 0")
    return int(shape[0]), int(shape[1])


def _check_dtype(path: Path, dtype: np.dtype) -> str:
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"{path}: features have non-numeric dtype {dtype}")
    return str(dtype)


def peek_header(path: str | Path) -> FeatureHeader:
    """Shape, stored dtype and coords count, reading only the header where the format allows it
    (h5, npy: no feature value is read, whatever size the header claims); other formats are read
    whole. Raises ValueError naming the file for what the header alone shows is wrong: no features,
    not N x D, no patches, a non-numeric dtype, coords not N x 2, or an h5 dataset whose data was
    never written (an interrupted write reads back as zeros)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in H5_EXTENSIONS:
        with _open_h5(path) as f:
            node = _features_dataset(f, path)
            _check_written(node, path)
            num_patches, dim = _check_shape(path, node.shape)
            dtype = _check_dtype(path, node.dtype)
            coords = f.get("coords")
            count = None
            if isinstance(coords, h5py.Dataset):
                if len(coords.shape) != 2 or coords.shape[1] != 2:
                    raise ValueError(f"{path}: coords must be N x 2, got shape {tuple(coords.shape)}")
                if coords.shape[0] != num_patches:
                    raise ValueError(
                        f"{path}: {coords.shape[0]} coords for {num_patches} feature rows (counts must match)"
                    )
                _check_written(coords, path)
                count = int(coords.shape[0])
        return FeatureHeader(path, num_patches, dim, dtype, count, header_only=True)
    if suffix == ".npy" and path.is_file():
        array = _npy_memmap(path)
        num_patches, dim = _check_shape(path, array.shape)
        return FeatureHeader(path, num_patches, dim, _check_dtype(path, array.dtype), None, header_only=True)
    features, coords, _, _ = read_stored(path)
    bag = to_bag(features, coords, path.stem, path, dtype=None)
    dtype = "text" if suffix in CSV_EXTENSIONS else _stored_dtype(features)
    count = None if bag.coords is None else len(bag.coords)
    return FeatureHeader(path, bag.num_patches, bag.dim, dtype, count, header_only=False)


def _stored_dtype(features) -> str:
    if isinstance(features, Tensor):
        return str(features.dtype).removeprefix("torch.")
    return str(np.asarray(features).dtype)


def _npy_memmap(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a readable numeric .npy array ({err})") from err
    except OSError as err:
        raise ValueError(f"{path}: not a readable numpy file ({err})") from err


# Feature values are checked in blocks of about this many bytes, so no check holds a whole bag.
SCAN_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ValueScan:
    """What ``scan_values`` looked at: ``rows_checked`` of ``num_patches`` rows (all unless sampled)."""

    num_patches: int
    rows_checked: int
    coords_extent: tuple[int, int, int, int] | None = None  # over the checked rows

    @property
    def complete(self) -> bool:
        return self.rows_checked == self.num_patches


def scan_values(
    path: str | Path, *, max_bytes: int | None = None, block_bytes: int | None = None
) -> ValueScan:
    """Check a file's feature values (finite, within ``MAX_FEATURE_MAGNITUDE``) block by block.

    h5 and npy are read ``block_bytes`` (default ``SCAN_BLOCK_BYTES``) at a time, so memory stays
    bounded whatever N is; with ``max_bytes`` only that many bytes of rows are checked, spread over
    the start, the middle and the end of the file (a sample, for ``tcssa inspect`` on a huge file).
    Other formats are read whole and get every check of ``read_bag``. Raises ValueError naming
    the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in H5_EXTENSIONS and suffix != ".npy":
        bag = read_bag(path, dtype=None)
        extent = None
        if bag.coords is not None:
            low, high = bag.coords.min(0).values.tolist(), bag.coords.max(0).values.tolist()
            extent = (low[0], low[1], high[0], high[1])
        return ValueScan(bag.num_patches, bag.num_patches, extent)
    block_bytes = SCAN_BLOCK_BYTES if block_bytes is None else block_bytes
    header = peek_header(path)
    n, row_bytes = header.num_patches, max(1, header.nbytes // header.num_patches)
    rows_per_block = max(1, block_bytes // row_bytes)
    if max_bytes is None or header.nbytes <= max_bytes:
        ranges = [(start, min(n, start + rows_per_block)) for start in range(0, n, rows_per_block)]
    else:
        ranges = _sample_ranges(n, max(1, max_bytes // row_bytes), rows_per_block)
    if suffix == ".npy":
        array = _npy_memmap(path)
        array = array[0] if array.ndim == 3 else array
        for start, stop in ranges:
            _raise_on_values(np.asarray(array[start:stop]), path, start, n)
        return ValueScan(n, sum(stop - start for start, stop in ranges))
    low = high = None
    with _open_h5(path) as f:
        features = _features_dataset(f, path)
        coords = f["coords"] if header.coords is not None else None
        try:
            for start, stop in ranges:
                block = features[0, start:stop] if features.ndim == 3 else features[start:stop]
                _raise_on_values(block, path, start, n)
                if coords is not None:
                    part = coords[start:stop]
                    low = part.min(0) if low is None else np.minimum(low, part.min(0))
                    high = part.max(0) if high is None else np.maximum(high, part.max(0))
        except OSError as err:
            raise ValueError(f"{path}: HDF5 file is damaged ({err})") from err
    extent = None if low is None else (int(low[0]), int(low[1]), int(high[0]), int(high[1]))
    return ValueScan(n, sum(stop - start for start, stop in ranges), extent)


def _sample_ranges(n: int, rows: int, rows_per_block: int) -> list[tuple[int, int]]:
    """About ``rows`` rows in up to three runs (start, middle, end), each read in blocks."""
    runs, per_run = [], max(1, rows // 3)
    for start in (0, max(0, n // 2 - per_run // 2), max(0, n - per_run)):
        stop = min(n, start + per_run)
        if runs and start < runs[-1][1]:
            start = runs[-1][1]
        if start < stop:
            runs.append((start, stop))
    return [
        (begin, min(stop, begin + rows_per_block))
        for start, stop in runs
        for begin in range(start, stop, rows_per_block)
    ]


def _raise_on_values(block: np.ndarray, path: Path, row_offset: int, num_rows: int) -> None:
    problem = value_problem(block, path, row_offset, num_rows)
    if problem:
        raise ValueError(problem)


def _no_extras(path: Path, extras: tuple[str, ...], available: Mapping) -> dict:
    missing = [name for name in extras if name not in available]
    if missing:
        raise ValueError(f"{path}: no {', '.join(repr(m) for m in missing)} (asked for as extras)")
    return {name: np.asarray(available[name]) for name in extras}


# --------------------------------------------------------------------------------------- .pt / .pth


def _read_torch(path: Path, extras: tuple[str, ...]):
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, "
            f"which could run code (torch.load weights_only=True): {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable torch file ({err})") from err
    if isinstance(content, Tensor):
        return content, None, {}, _no_extras(path, extras, {})
    if isinstance(content, list | tuple):
        raise ValueError(
            f"{path}: holds a {type(content).__name__} of {len(content)} items, not an N x D tensor "
            "(ragged features?)"
        )
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: holds a {type(content).__name__}, not a tensor or a dict with 'features'")
    if "features" not in content:
        found = ", ".join(sorted(map(str, content))) or "nothing"
        raise ValueError(f"{path}: no 'features' key (found: {found})")
    features = content["features"]
    if not isinstance(features, Tensor):
        raise ValueError(
            f"{path}: 'features' is a {type(features).__name__}, not a tensor (ragged features?)"
        )
    attrs = {k: v for k, v in content.items() if isinstance(v, str | int | float | bool)}
    return features, content.get("coords"), attrs, _no_extras(path, extras, content)


# ------------------------------------------------------------------------------------- .npy / .npz


def _read_numpy(path: Path, extras: tuple[str, ...]):
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays (ragged lists) need pickle, which we never allow
        raise ValueError(
            f"{path}: features are ragged or not numeric (cannot load without pickle: {err})"
        ) from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable numpy file ({err})") from err
    if isinstance(loaded, np.ndarray):
        return loaded, None, {}, _no_extras(path, extras, {})
    with loaded:
        names = list(loaded.files)
        if "features" in names:
            key = "features"
        elif len(names) == 1:
            key = names[0]
        else:
            raise ValueError(f"{path}: no 'features' array (found: {', '.join(names) or 'nothing'})")
        try:
            arrays = {name: loaded[name] for name in names}
        except ValueError as err:
            raise ValueError(
                f"{path}: features are ragged or not numeric (cannot load without pickle)"
            ) from err
    return arrays[key], arrays.get("coords"), {}, _no_extras(path, extras, arrays)


# -------------------------------------------------------------------------------------------- .csv


def _read_csv(path: Path, extras: tuple[str, ...]):
    try:
        return _read_csv_text(path, extras)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (bytes {err.object[err.start : err.start + 4]!r} cannot be "
            "decoded); a feature CSV holds numbers only"
        ) from None


def _read_csv_text(path: Path, extras: tuple[str, ...]):
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline().strip()
        names = [c.strip().strip('"') for c in header.split(",")] if header else []
        if not names or names != [str(i) for i in range(len(names))]:
            shown = header[:60] + ("..." if len(header) > 60 else "")
            raise ValueError(
                f"{path}: expected a DSMIL/SlideChat feature CSV with header 0,1,...,D-1, got {shown!r}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "no data": reported as an empty bag below
                features = np.loadtxt(handle, delimiter=",", dtype=np.float32, ndmin=2)
        except ValueError as err:
            raise ValueError(f"{path}: feature rows are ragged or not numeric ({err})") from err
    if features.size == 0:
        raise ValueError(f"{path}: empty bag (0 patches)")
    if features.shape[1] != len(names):
        raise ValueError(f"{path}: rows have {features.shape[1]} values for a header of {len(names)} columns")
    return features, None, {}, _no_extras(path, extras, {})


# ---------------------------------------------------------------------------------------------- h5


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err


def _features_dataset(f: h5py.File, path: Path) -> h5py.Dataset:
    node = f.get("features")
    if not isinstance(node, h5py.Dataset):
        found = ", ".join(sorted(f.keys())) or "nothing"
        raise ValueError(f"{path}: no 'features' dataset (found: {found})")
    return node


def _check_written(node: h5py.Dataset, path: Path) -> None:
    """Refuse a dataset whose header promises data that was never stored.

    HDF5 allocates a dataset's storage when data is written and reads unwritten storage back as
    the fill value (zeros), so a file whose writer died after creating ``features`` would read as a
    bag of zeros. Two header-only checks catch it: a contiguous dataset with no storage at all, and
    a chunked one with fewer chunks stored than its shape needs.
    """
    if node.size == 0 or node.is_virtual or node.external:
        return
    what = f"{node.name.lstrip('/')} {'x'.join(map(str, node.shape))} {node.dtype}"
    expected = node.size * node.dtype.itemsize
    if node.chunks is None:
        if node.id.get_storage_size() < expected:
            raise ValueError(
                f"{path}: {what} ({_gigabytes(expected)}) is declared but its data was never written "
                f"({node.id.get_storage_size():,} bytes stored): an interrupted or unfinished write"
            )
        return
    needed = math.prod(math.ceil(s / c) for s, c in zip(node.shape, node.chunks, strict=True))
    stored = node.id.get_num_chunks()
    if stored < needed:
        raise ValueError(
            f"{path}: {what} ({_gigabytes(expected)}) has {stored} of its {needed} chunks stored; "
            "the rest were never written (an interrupted write reads back as zeros)"
        )


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes:,} bytes"


def _read_h5(path: Path, extras: tuple[str, ...]):
    with _open_h5(path) as f:
        try:
            features_node = _features_dataset(f, path)
            _check_written(features_node, path)
            features = features_node[()]
            attrs = _h5_file_attrs(f)
            coords = f["coords"][()] if isinstance(f.get("coords"), h5py.Dataset) else None
            extra_arrays = {}
            for name in extras:
                if not isinstance(f.get(name), h5py.Dataset):
                    raise ValueError(f"{path}: no '{name}' dataset (asked for as an extra)")
                extra_arrays[name] = f[name][()]
        except OSError as err:  # truncated or damaged file: h5py opens it, reading fails
            raise ValueError(f"{path}: HDF5 file is damaged ({err})") from err
    return features, coords, attrs, extra_arrays


def _h5_file_attrs(f: h5py.File) -> dict:
    """Root, features and coords attributes as plain values, with ``patch_size_level0`` derived."""
    attrs = _plain_attrs(f.attrs)
    for name in ("features", "coords"):
        if isinstance(f.get(name), h5py.Dataset):
            attrs.update(_plain_attrs(f[name].attrs))
    _derive_level0_patch_size(attrs)
    return attrs


def read_h5_metadata(path: str | Path) -> tuple[dict, dict[str, tuple]]:
    """(attrs, {dataset name: shape}) of an h5 feature file, reading no dataset's values."""
    path = Path(path)
    datasets: dict[str, tuple] = {}
    with _open_h5(path) as f:
        try:
            attrs = _h5_file_attrs(f)
            f.visititems(
                lambda name, node: (
                    datasets.__setitem__(name, node.shape) if isinstance(node, h5py.Dataset) else None
                )
            )
        except OSError as err:
            raise ValueError(f"{path}: HDF5 file is damaged ({err})") from err
    return attrs, datasets


def _derive_level0_patch_size(attrs: dict) -> None:
    """Fill ``patch_size_level0`` from CLAM's older attributes when TRIDENT's is absent.

    CLAM stores the patch size at the read level plus the level's downsample (and an optional
    custom downsample); the side of a patch in level-0 pixels is their product.
    """
    if "patch_size_level0" in attrs or "patch_size" not in attrs or "downsample" not in attrs:
        return
    downsample = attrs["downsample"]
    downsample = downsample[0] if isinstance(downsample, list | tuple) else downsample
    try:
        custom = float(attrs.get("custom_downsample", 1))
        attrs["patch_size_level0"] = int(round(float(attrs["patch_size"]) * float(downsample) * custom))
    except (TypeError, ValueError):
        return  # malformed metadata is kept as it is; only the derived value is skipped


def _plain(value):
    """h5py attribute values as plain Python (str, int, float, lists) so they serialise as JSON."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain_attrs(attrs: Mapping) -> dict:
    return {str(key): _plain(value) for key, value in attrs.items()}


def _h5_attr(value):
    """A Python value as something h5py can store (TRIDENT's conventions for dicts and None)."""
    if isinstance(value, Mapping):
        return json.dumps(value)
    if value is None:
        return "None"
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    return value


def _as_numpy(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return np.asarray(values)


def write_h5(
    path: str | Path,
    features: np.ndarray | Tensor,
    coords: np.ndarray | Tensor | None = None,
    attrs: Mapping | None = None,
    extra: Mapping[str, np.ndarray | Tensor] | None = None,
    *,
    file_attrs: Mapping | None = None,
    dtype: np.dtype | str | None = None,
) -> Path:
    """Write a TRIDENT-style feature file: ``features`` (N x D), ``coords`` (N x 2 int64) and more.

    attrs:      patching metadata (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
                ``target_magnification``, ...), stored on ``coords`` as TRIDENT does (on the file
                root when there are no coords).
    extra:      further datasets, e.g. ``{"phenotype": labels}``; per-patch ones must have N rows.
    file_attrs: attributes of the file root (e.g. slide label, phenotype names).
    dtype:      storage dtype of the features (e.g. ``"float16"`` to halve the disk); default as given.

    The file is written beside its destination and renamed into place, so an interrupted write
    never leaves a half-written feature file behind.
    """
    path = Path(path)
    features = check_features(_as_numpy(features), path)
    if not all_finite(features):
        raise ValueError(f"{path}: refusing to write features that contain NaN or Inf")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.floating) and np.abs(features).max() > np.finfo(dtype).max:
            raise ValueError(
                f"{path}: feature values exceed the range of {dtype} (max {np.finfo(dtype).max})"
            )
        features = features.astype(dtype, copy=False)
    if coords is not None:
        coords = check_coords(_as_numpy(coords), len(features), path).astype(np.int64, copy=False)
    for name in extra or {}:
        if name in ("features", "coords"):
            raise ValueError(f"{path}: extra dataset may not be called {name!r}")
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        f.create_dataset("features", data=features)
        attrs_home = f.create_dataset("coords", data=coords) if coords is not None else f
        for key, value in (attrs or {}).items():
            attrs_home.attrs[key] = _h5_attr(value)
        for key, value in (file_attrs or {}).items():
            f.attrs[key] = _h5_attr(value)
        for name, values in (extra or {}).items():
            f.create_dataset(name, data=_as_numpy(values))
    return path


def write_h5_in_blocks(
    path: str | Path,
    num_patches: int,
    dim: int,
    blocks: Iterable[np.ndarray],
    *,
    dtype: str = "float16",
    chunk_rows: int = 1024,
) -> Path:
    """Write a ``features``-only h5 of ``num_patches`` x ``dim`` from consecutive row ``blocks``, so a
    slide larger than memory can be written (HDF5 chunks of ``chunk_rows`` rows, as TRIDENT's)."""
    path = Path(path)
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        features = f.create_dataset("features", (num_patches, dim), dtype=dtype, chunks=(chunk_rows, dim))
        start = 0
        for block in blocks:
            features[start : start + len(block)] = block
            start += len(block)
        if start != num_patches:  # inside the block: a short file is never renamed into place
            raise ValueError(f"{path}: {start} rows written for {num_patches} patches")
    return path


#: ``tcssa compress``'s h5 of one slide's slot tokens: K x D ``tokens`` (float32), N x top-k
#: ``topk_index`` (int64) and ``topk_weight`` (float32), K ``slot_counts`` (int64), K ``slot_mass``
#: (float32, each slot's routing mass sum_j P~_jk) and K ``token_mask`` (bool: the tokens a consumer
#: should use; all True unless a token budget dropped slots, issue 15).
SLOT_TOKEN_DATASETS = ("tokens", "topk_index", "topk_weight", "slot_counts", "slot_mass", "token_mask")


def write_slot_tokens(path: str | Path, arrays: Mapping[str, np.ndarray], attrs: Mapping) -> Path:
    """Write a slot-token h5: the ``SLOT_TOKEN_DATASETS`` of ``arrays`` and the file attributes ``attrs``
    (source file, checkpoint, K, ...)."""
    path = Path(path)
    with atomic_output(path) as partial, h5py.File(partial, "w") as f:
        for name in SLOT_TOKEN_DATASETS:
            f.create_dataset(name, data=arrays[name])
        f.attrs.update(attrs)
    return path


def slot_tokens_complete(
    path: str | Path,
    num_slots: int,
    dim: int,
    checkpoint: str | Path | None = None,
    attrs: Mapping | None = None,
) -> bool:
    """Whether ``path`` is a readable slot-token h5 with every dataset, K x D tokens, one top-2 row
    per patch, (given ``checkpoint``) written from that checkpoint and with these ``attrs`` values:
    what a resumed ``tcssa compress`` may keep. Anything else (a truncated file, another model or
    coverage) is written again."""
    try:
        with h5py.File(path, "r") as f:
            if any(name not in f for name in SLOT_TOKEN_DATASETS):
                return False
            if tuple(f["tokens"].shape) != (num_slots, dim) or tuple(f["slot_counts"].shape) != (num_slots,):
                return False
            patches = f.attrs.get("num_patches")
            if patches is not None and f["topk_index"].shape[0] != int(patches):
                return False
            if checkpoint is not None and f.attrs.get("checkpoint") != str(Path(checkpoint).resolve()):
                return False
            return all(f.attrs.get(name) == value for name, value in (attrs or {}).items())
    except (OSError, KeyError, ValueError, TypeError):
        return False


# ------------------------------------------------------------------------- streamed TRIDENT writer

#: The attributes TRIDENT stores on ``coords`` (trident/IO.py, ``coords_to_h5``), all required.
TRIDENT_COORDS_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
    "level0_width",
    "level0_height",
)
#: The attributes TRIDENT stores on ``features`` (trident/wsi_objects/WSI.py), all required.
TRIDENT_FEATURES_ATTRS = ("name", "savetodir", "encoder")


class EmptyFeatureFileWarning(UserWarning):
    """A feature file was written with no patches (a slide without tissue tiles)."""


class FeatureFileWriter:
    """Stream one slide's patch features into a TRIDENT-layout h5, as a context manager.

    ``with FeatureFileWriter(path, dim, coords_attrs=..., features_attrs=...) as writer:`` then
    ``writer.append(features, coords, extras)`` per batch. Rows are gathered into whole chunks of
    ``chunk_rows`` and written to resizable datasets, so memory holds one chunk and one batch,
    whatever the number of tiles. The file is ``<name>.<pid>.partial`` until the block ends without
    error; then it is renamed onto ``path``. On an error (or Ctrl-C) the partial file is removed and
    nothing appears under ``path``. Ending with no row written makes TRIDENT's empty file (0 x D
    features, 0 x 2 coords) and warns (``EmptyFeatureFileWarning``).

    coords_attrs:   TRIDENT's attributes of ``coords`` (``TRIDENT_COORDS_ATTRS``, all required).
    features_attrs: TRIDENT's attributes of ``features`` (``TRIDENT_FEATURES_ATTRS``, all required).
    extras:         further per-patch float32 arrays, name -> their column names (an N x C dataset
                    each, C = len(columns), the names in its ``columns`` attribute).
    file_attrs:     attributes of the file root (tcssa's provenance).
    """

    def __init__(
        self,
        path: str | Path,
        dim: int,
        *,
        coords_attrs: Mapping,
        features_attrs: Mapping,
        extras: Mapping[str, Sequence[str]] | None = None,
        file_attrs: Mapping | None = None,
        chunk_rows: int = 256,
    ) -> None:
        self.path = Path(path)
        if dim < 1:
            raise ValueError(f"{self.path}: feature dimension must be at least 1, got {dim}")
        for what, given, required in (
            ("coords", coords_attrs, TRIDENT_COORDS_ATTRS),
            ("features", features_attrs, TRIDENT_FEATURES_ATTRS),
        ):
            missing = [key for key in required if key not in given]
            if missing:
                raise ValueError(f"{self.path}: TRIDENT's {what} attributes {', '.join(missing)} not given")
        self.extras = {name: tuple(columns) for name, columns in (extras or {}).items()}
        for name in self.extras:
            if name in ("features", "coords"):
                raise ValueError(f"{self.path}: extra dataset may not be called {name!r}")
            if not self.extras[name]:
                raise ValueError(f"{self.path}: extra dataset {name!r} has no columns")
        self.dim, self.chunk_rows = int(dim), max(1, int(chunk_rows))
        self._attrs = (dict(coords_attrs), dict(features_attrs), dict(file_attrs or {}))
        self._stack: contextlib.ExitStack | None = None
        self._file: h5py.File | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_rows = 0
        self.num_rows = 0  # rows appended so far (written or waiting for a whole chunk)

    # -------------------------------------------------------------------- context manager
    def __enter__(self) -> FeatureFileWriter:
        stack = contextlib.ExitStack()
        try:
            partial = stack.enter_context(atomic_output(self.path))
            self._file = stack.enter_context(h5py.File(partial, "w"))
            self._create_datasets()
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:  # the partial file goes too: atomic_output sees the error
                if not stack.__exit__(type(err), err, err.__traceback__):
                    raise
                return False
        return bool(stack.__exit__(exc_type, exc, tb))

    @property
    def partial_path(self) -> Path:
        """Where the file is written until it is complete."""
        return self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")

    # -------------------------------------------------------------------- writing
    def append(
        self,
        features: np.ndarray | Tensor,
        coords: np.ndarray | Tensor,
        extras: Mapping[str, np.ndarray | Tensor] | None = None,
    ) -> None:
        """Add B patches: ``features`` B x D, ``coords`` B x 2 (level-0 x, y), each declared extra
        B x C. Bad shapes, missing extras and NaN/Inf are a ValueError naming the file."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: FeatureFileWriter.append outside its with block")
        features = np.asarray(_as_numpy(features), dtype=np.float32)
        coords = np.asarray(_as_numpy(coords))
        rows = len(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"{self.path}: features of a batch must be B x {self.dim}, got {tuple(features.shape)}"
            )
        if coords.shape != (rows, 2):
            raise ValueError(
                f"{self.path}: coords must be {rows} x 2 for {rows} features, got {coords.shape}"
            )
        problem = value_problem(features, self.path, self.num_rows)
        if problem:
            raise ValueError(f"refusing to write: {problem}")
        given = dict(extras or {})
        unknown = sorted(set(given) - set(self.extras))
        missing = sorted(set(self.extras) - set(given))
        if unknown or missing:
            raise ValueError(
                f"{self.path}: extras {unknown or missing} {'not declared' if unknown else 'missing'}"
            )
        batch_extras = {}
        for name, columns in self.extras.items():
            values = np.asarray(_as_numpy(given[name]), dtype=np.float32)
            if values.shape != (rows, len(columns)):
                raise ValueError(
                    f"{self.path}: extra {name!r} must be {rows} x {len(columns)}, got {values.shape}"
                )
            batch_extras[name] = values
        if not rows:
            return
        self._pending.append((features, coords.astype(np.int64, copy=False), batch_extras))
        self._pending_rows += rows
        self.num_rows += rows
        if self._pending_rows >= self.chunk_rows:
            self._flush(whole_chunks_only=True)

    def _create_datasets(self) -> None:
        f, chunk = self._file, self.chunk_rows
        f.create_dataset(
            "features", (0, self.dim), np.float32, maxshape=(None, self.dim), chunks=(chunk, self.dim)
        )
        f.create_dataset("coords", (0, 2), np.int64, maxshape=(None, 2), chunks=(chunk, 2))
        for name, columns in self.extras.items():
            width = len(columns)
            f.create_dataset(name, (0, width), np.float32, maxshape=(None, width), chunks=(chunk, width))

    def _flush(self, *, whole_chunks_only: bool) -> None:
        """Write the gathered rows (all of them, or as many whole chunks as they fill)."""
        if not self._pending:
            return
        features = np.concatenate([p[0] for p in self._pending])
        coords = np.concatenate([p[1] for p in self._pending])
        extras = {name: np.concatenate([p[2][name] for p in self._pending]) for name in self.extras}
        count = (len(features) // self.chunk_rows) * self.chunk_rows if whole_chunks_only else len(features)
        self._pending, self._pending_rows = [], 0
        if count < len(features):  # the rest waits for the next whole chunk
            rest = {name: values[count:] for name, values in extras.items()}
            self._pending.append((features[count:], coords[count:], rest))
            self._pending_rows = len(features) - count
        if count:
            for name, values in (("features", features), ("coords", coords), *extras.items()):
                dataset = self._file[name]
                start = dataset.shape[0]
                dataset.resize(start + count, axis=0)
                dataset[start:] = values[:count]

    def _finish(self) -> None:
        self._flush(whole_chunks_only=False)
        coords_attrs, features_attrs, file_attrs = self._attrs
        for node, attrs in (
            (self._file["coords"], coords_attrs),
            (self._file["features"], features_attrs),
            (self._file, file_attrs),
        ):
            for key, value in attrs.items():
                node.attrs[key] = _h5_attr(value)
        for name, columns in self.extras.items():
            self._file[name].attrs["columns"] = _h5_attr(list(columns))
        if self.num_rows == 0:
            warnings.warn(
                f"{self.path}: no patches; wrote an empty feature file (features 0 x {self.dim}, "
                "coords 0 x 2) as TRIDENT does for a slide without tissue tiles (tcssa's readers refuse "
                "it as an empty bag)",
                EmptyFeatureFileWarning,
                stacklevel=3,
            )
