"""Slides as a torch Dataset, and the padding collate that turns several into one masked batch."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tcssa.data.cohort import Cohort
from tcssa.io.bag import Bag
from tcssa.io.features import read_bag


class BagDataset(Dataset):
    """Items are ``(Bag, label)`` for the given slides of a cohort.

    max_patches: cap on patches per slide (for training): a random subset, seeded by
        ``(seed, epoch, slide id)`` so a run is reproducible yet each epoch sees other patches
        (call ``set_epoch``). Kept patches stay in file order. None keeps every patch.
    cache_bytes: keep bags in memory as float16 up to this many bytes (0: no cache). Bags are added
        until the budget is spent and never evicted: with the epoch-long cyclic access of training, an
        evicting cache would throw out each bag just before it is needed again. Each DataLoader
        worker holds its own cache, so the budget applies per worker.

    Files are opened only when an item is read, so each DataLoader worker opens its own handles
    (HDF5 handles must not cross a fork).
    """

    def __init__(
        self,
        cohort: Cohort,
        slide_ids: list[str] | None = None,
        max_patches: int | None = None,
        seed: int = 0,
        cache_bytes: int = 0,
        *,
        extras: tuple[str, ...] = (),
    ) -> None:
        self.slide_ids = list(cohort.slide_ids if slide_ids is None else slide_ids)
        unknown = [s for s in self.slide_ids if s not in cohort.paths]
        if unknown:
            raise ValueError(f"slides not in the cohort ({len(unknown)}): {', '.join(unknown[:20])}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.paths = {s: cohort.paths[s] for s in self.slide_ids}
        self.labels = {s: cohort.labels[s] for s in self.slide_ids}
        self.dim = cohort.dim
        self.max_patches = max_patches
        self.seed = seed
        self.epoch = 0
        self.cache_bytes = cache_bytes
        self.extras = tuple(extras)
        self._cache: dict[str, Bag] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.slide_ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw other patch subsets from now on (only matters with ``max_patches``)."""
        self.epoch = int(epoch)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    @contextlib.contextmanager
    def caching_paused(self):
        """Reads inside add nothing to the cache: a one-off pass over the slides (the k-means init's
        sample) leaves training to read, and cache, exactly what it would have without it."""
        budget, self.cache_bytes = self.cache_bytes, 0
        try:
            yield self
        finally:
            self.cache_bytes = budget

    def _load(self, slide_id: str) -> Bag:
        bag = self._cache.get(slide_id)
        if bag is not None:
            return Bag(bag.features.float(), bag.coords, bag.slide_id, bag.attrs, bag.extras)
        bag = read_bag(self.paths[slide_id], extras=self.extras)
        if self.dim is not None and bag.dim != self.dim:
            raise ValueError(
                f"{self.paths[slide_id]}: feature dimension {bag.dim} differs from the cohort's {self.dim}"
            )
        if self.cache_bytes:
            self._maybe_cache(bag)
        return bag

    def _maybe_cache(self, bag: Bag) -> None:
        half = bag.features.half()
        if not torch.isfinite(half).all():
            return  # values beyond float16's range: keep reading this bag from disk instead
        size = half.numel() * half.element_size()
        size += 0 if bag.coords is None else bag.coords.numel() * bag.coords.element_size()
        if self._cached_bytes + size > self.cache_bytes:
            return
        self._cache[bag.slide_id] = Bag(half, bag.coords, bag.slide_id, bag.attrs, bag.extras)
        self._cached_bytes += size

    def __getitem__(self, index: int) -> tuple[Bag, int]:
        slide_id = self.slide_ids[index]
        bag = self._load(slide_id)
        if self.max_patches is not None and bag.num_patches > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(slide_id.encode())])
            keep = torch.from_numpy(np.sort(rng.choice(bag.num_patches, self.max_patches, replace=False)))
            bag = Bag(
                bag.features[keep],
                None if bag.coords is None else bag.coords[keep],
                bag.slide_id,
                bag.attrs,
                {name: values[keep.numpy()] for name, values in bag.extras.items()},
            )
        return bag, self.labels[slide_id]


@dataclass
class BagBatch:
    """Several slides padded to the longest: ``mask`` is True for real patches, False for padding."""

    features: Tensor  # B x Nmax x D float32
    mask: Tensor  # B x Nmax bool
    coords: Tensor | None  # B x Nmax x 2 int64, None unless every bag has coords
    labels: Tensor  # B int64
    slide_ids: list[str]

    def __len__(self) -> int:
        return len(self.slide_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return BagBatch(
            move(self.features), move(self.mask), move(self.coords), move(self.labels), self.slide_ids
        )

    def pin_memory(self) -> BagBatch:
        """Called by DataLoader(pin_memory=True)."""
        pin = lambda t: None if t is None else t.pin_memory()
        return BagBatch(
            pin(self.features), pin(self.mask), pin(self.coords), pin(self.labels), self.slide_ids
        )


def collate_bags(items: list[tuple[Bag, int]]) -> BagBatch:
    """Pad bags to the longest one in the batch (zeros) and return the mask that marks real patches."""
    if not items:
        raise ValueError("collate_bags needs at least one bag")
    bags = [bag for bag, _ in items]
    dims = {bag.dim for bag in bags}
    if len(dims) > 1:
        raise ValueError(
            "bags in one batch have different feature dimensions: "
            + ", ".join(f"{b.slide_id} (D={b.dim})" for b in bags)
        )
    lengths = [bag.num_patches for bag in bags]
    longest, dim = max(lengths), dims.pop()
    features = torch.zeros(len(bags), longest, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    with_coords = all(bag.coords is not None for bag in bags)
    coords = torch.zeros(len(bags), longest, 2, dtype=torch.int64) if with_coords else None
    for row, bag in enumerate(bags):
        n = bag.num_patches
        features[row, :n] = bag.features
        mask[row, :n] = True
        if coords is not None:
            coords[row, :n] = bag.coords
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    return BagBatch(features, mask, coords, labels, [bag.slide_id for bag in bags])


def pooled_patches(
    dataset: Dataset,
    total: int,
    seed: int,
    progress: bool = True,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """About ``total`` patch features (M x D float32) pooled from every slide of ``dataset`` (items
    ``(Bag, label)``): the same number drawn at random from each slide (all of a smaller slide), so
    each slide counts alike whatever its size. The same ``seed`` and slides give the same sample.
    ``transform`` maps each whole slide's N x D features first (e.g. centring on the slide's mean).
    """
    if total < 1:
        raise ValueError(f"pooled_patches: total must be >= 1, got {total}")
    count = len(dataset)
    if count == 0:
        raise ValueError("pooled_patches: the dataset holds no slide")
    per_slide = -(-total // count)
    parts = []
    paused = getattr(dataset, "caching_paused", None)
    with paused() if paused is not None else contextlib.nullcontext():
        for index in tqdm(range(count), desc="pooling training patches", disable=None if progress else True):
            bag = dataset[index][0]
            features = bag.features.float()
            if transform is not None:
                features = transform(features)
            n = features.shape[0]
            if n > per_slide:
                rng = np.random.default_rng([seed, zlib.crc32(bag.slide_id.encode())])
                features = features[torch.from_numpy(np.sort(rng.choice(n, per_slide, replace=False)))]
            parts.append(features)
    return torch.cat(parts)
