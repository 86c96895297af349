"""Patch-feature files on disk: one home for every format tcssa reads and the h5 it writes.

Formats, chosen by extension:

- ``.h5`` / ``.hdf5``: TRIDENT or CLAM output: dataset ``features`` (N x D, often float16) and
  optionally ``coords`` (N x 2, level-0 pixels). TRIDENT keeps the patching metadata as attributes
  of ``coords`` (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ...); CLAM's older layout has ``patch_size``, ``patch_level`` and
  ``downsample`` instead, from which ``patch_size_level0`` is derived.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from tcssa.data.bag import Bag, check_coords, check_features, to_bag

H5_EXTENSIONS = (".h5", ".hdf5")
FEATURE_EXTENSIONS = H5_EXTENSIONS


def read_bag(path: str | Path, dtype: torch.dtype = torch.float32, *, extras: Iterable[str] = ()) -> Bag:
    """Read one slide's patch features; the format follows the extension, slide_id is the file stem.

    ``extras`` names further per-patch arrays to load into ``Bag.extras`` (e.g. ``phenotype``).
    Errors (missing file, corrupt file, bad shapes, NaN/Inf) name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in H5_EXTENSIONS:
        return _read_h5(path, dtype, tuple(extras))
    raise ValueError(
        f"{path}: unknown feature file extension {path.suffix!r} (known: {', '.join(FEATURE_EXTENSIONS)})"
    )


def peek_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a feature file, reading only the header where the format allows it."""
    path = Path(path)
    if path.suffix.lower() in H5_EXTENSIONS:
        with _open_h5(path) as f:
            shape = _features_dataset(f, path).shape
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise ValueError(f"{path}: features must be N x D (2-D), got shape {tuple(shape)}")
        return int(shape[0]), int(shape[1])
    bag = read_bag(path)
    return bag.num_patches, bag.dim


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


def _read_h5(path: Path, dtype: torch.dtype, extras: tuple[str, ...]) -> Bag:
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
    return to_bag(features, coords, path.stem, path, attrs=attrs, extras=extra_arrays, dtype=dtype)


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
    if not np.isfinite(features).all():
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
