"""Read a slide's patch features from a TRIDENT/CLAM h5 file a chunk at a time.

A 10^6 x 1024 slide is 2 GiB as float16 on disk and 4 GiB as float32 in memory;
``compress_h5`` walks it chunk by chunk instead (through ``TCSSA.compress_chunks``),
so memory holds one chunk whatever N is. Each chunk is converted from the
on-disk dtype straight to the requested one (float16 -> bfloat16 never passes
through float32 for the whole slide). Reading a whole slide at once is ``tcssa.io.features.read_bag``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tcssa.method.compressor import TCSSA, CompressorOutput

FEATURES = "features"


@contextmanager
def open_features(path: str | Path, dataset: str = FEATURES) -> Iterator[h5py.Dataset]:
    """Open ``path`` and yield its N x D ``features`` dataset (a leading 1 x N x D is accepted),
    with clear errors for a missing file, a file that is not HDF5, or a dataset that is not features."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file ({err})") from err
    with handle:
        if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
            raise ValueError(f"{path} has no '{dataset}' dataset (found: {sorted(handle.keys())})")
        features = handle[dataset]
        shape = features.shape
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise ValueError(f"{path}: '{dataset}' must be N x D, got shape {features.shape}")
        if shape[0] == 0:
            raise ValueError(f"{path}: '{dataset}' has no patches (N = 0)")
        if not np.issubdtype(features.dtype, np.floating):
            raise ValueError(f"{path}: '{dataset}' must hold floating-point features, got {features.dtype}")
        yield features


def feature_shape(path: str | Path, dataset: str = FEATURES) -> tuple[int, int]:
    """(N, D) of the features in ``path`` without reading them."""
    with open_features(path, dataset) as features:
        return tuple(features.shape[-2:])


def iter_h5_chunks(
    path: str | Path,
    chunk_size: int = 16_384,
    dtype: torch.dtype = torch.float32,
    dataset: str = FEATURES,
    progress: bool = False,
) -> Iterator[Tensor]:
    """Yield the features of ``path`` as consecutive chunk_size x D tensors of ``dtype``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with open_features(path, dataset) as features:
        squeeze = features.ndim == 3
        num_patches = features.shape[-2]
        starts = range(0, num_patches, chunk_size)
        for start in tqdm(starts, desc=Path(path).name, unit="chunk", disable=not progress, leave=False):
            stop = min(start + chunk_size, num_patches)
            block = features[0, start:stop] if squeeze else features[start:stop]
            yield torch.from_numpy(block).to(dtype)


def compress_h5(
    model: TCSSA,
    path: str | Path,
    chunk_size: int = 16_384,
    *,
    keep_probs: bool = False,
    progress: bool = False,
) -> CompressorOutput:
    """Compress the ``features`` of one TRIDENT/CLAM h5 file, read ``chunk_size`` patches at a time.

    Eval mode only. Peak memory is the model plus about one chunk (in the model's dtype),
    whatever N is; float16 features on disk go straight to the model's dtype, chunk by chunk.
    """
    if model.training:
        raise ValueError("compress_chunks/compress_h5 stream in eval mode only: call model.eval() first")
    chunks = iter_h5_chunks(path, chunk_size, dtype=model.gate.weight.dtype, progress=progress)
    device = model.gate.weight.device
    if device.type != "cpu":  # read on the host, compressed on the model's device (a GPU)
        chunks = (chunk.to(device, non_blocking=True) for chunk in chunks)
    return model.compress_chunks(chunks, keep_probs=keep_probs, source=str(path))
