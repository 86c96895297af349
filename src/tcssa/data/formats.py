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
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from tcssa.data.bag import Bag, all_finite, check_coords, check_features, to_bag

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
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    extras = tuple(extras)
    if suffix in H5_EXTENSIONS:
        features, coords, attrs, extra_arrays = _read_h5(path, extras)
    elif suffix in TORCH_EXTENSIONS:
        features, coords, attrs, extra_arrays = _read_torch(path, extras)
    elif suffix in NUMPY_EXTENSIONS:
        features, coords, attrs, extra_arrays = _read_numpy(path, extras)
    elif suffix in CSV_EXTENSIONS:
        features, coords, attrs, extra_arrays = _read_csv(path, extras)
    else:
        raise ValueError(
            f"{path}: unknown feature file extension {path.suffix!r} (known: {', '.join(FEATURE_EXTENSIONS)})"
        )
    return to_bag(features, coords, path.stem, path, attrs=attrs, extras=extra_arrays, dtype=dtype)


def peek_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a feature file, reading only the header where the format allows it (h5, npy)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in H5_EXTENSIONS:
        with _open_h5(path) as f:
            shape = _features_dataset(f, path).shape
    elif suffix == ".npy" and path.is_file():
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except ValueError as err:
            raise ValueError(f"{path}: not a readable numeric .npy array ({err})") from err
    else:
        bag = read_bag(path, dtype=None)
        return bag.num_patches, bag.dim
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ValueError(f"{path}: features must be N x D (2-D), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{path}: empty bag (0 patches)")
    return int(shape[0]), int(shape[1])


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


def _read_h5(path: Path, extras: tuple[str, ...]):
    with _open_h5(path) as f:
        try:
            features_node = _features_dataset(f, path)
            features = features_node[()]
            attrs = _plain_attrs(f.attrs)
            attrs.update(_plain_attrs(features_node.attrs))
            coords = None
            if isinstance(f.get("coords"), h5py.Dataset):
                coords = f["coords"][()]
                attrs.update(_plain_attrs(f["coords"].attrs))
            extra_arrays = {}
            for name in extras:
                if not isinstance(f.get(name), h5py.Dataset):
                    raise ValueError(f"{path}: no '{name}' dataset (asked for as an extra)")
                extra_arrays[name] = f[name][()]
        except OSError as err:  # truncated or damaged file: h5py opens it, reading fails
            raise ValueError(f"{path}: HDF5 file is damaged ({err})") from err
    _derive_level0_patch_size(attrs)
    return features, coords, attrs, extra_arrays


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
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            f.create_dataset("features", data=features)
            attrs_home = f.create_dataset("coords", data=coords) if coords is not None else f
            for key, value in (attrs or {}).items():
                attrs_home.attrs[key] = _h5_attr(value)
            for key, value in (file_attrs or {}).items():
                f.attrs[key] = _h5_attr(value)
            for name, values in (extra or {}).items():
                if name in ("features", "coords"):
                    raise ValueError(f"{path}: extra dataset may not be called {name!r}")
                f.create_dataset(name, data=_as_numpy(values))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
