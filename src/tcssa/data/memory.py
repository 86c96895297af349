"""A cohort held in memory: read every slide once, then serve any number of folds, models and epochs.

``BagDataset`` reads feature files lazily, which is right for a cohort larger than memory. When many
models are trained on the same folds (``tcssa demo``, sweeps), the same slides would be read and
converted again for every fold of every model; ``MemoryCohort`` reads each file once into float16
tensors (half the bytes of float32) and hands out datasets with the same items and the same per-epoch
patch subsets as ``BagDataset``. A patch subset is cut before the cast to float32, so a capped
training slide costs only its kept patches.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tcssa.data.cohort import Cohort
from tcssa.io.bag import Bag
from tcssa.io.features import read_bag


class MemoryCohort:
    """Every slide of ``cohort`` as a float16 ``Bag`` in memory, with its label."""

    def __init__(self, cohort: Cohort, bags: dict[str, Bag]) -> None:
        missing = [s for s in cohort.slide_ids if s not in bags]
        if missing:
            raise ValueError(f"no bag in memory for {len(missing)} slide(s): {', '.join(missing[:10])}")
        self.cohort = cohort
        self.bags = bags

    @classmethod
    def load(
        cls,
        cohort: Cohort,
        *,
        extras: Iterable[str] = (),
        progress: bool = True,
        desc: str = "loading slides",
    ) -> MemoryCohort:
        """Read every slide of ``cohort`` once (float16; ``extras`` such as ``phenotype`` kept too)."""
        bags = {}
        for slide_id in tqdm(cohort.slide_ids, desc=desc, unit="slide", disable=not progress):
            bag = read_bag(cohort.paths[slide_id], dtype=torch.float16, extras=tuple(extras))
            if cohort.dim is not None and bag.dim != cohort.dim:
                raise ValueError(
                    f"{cohort.paths[slide_id]}: feature dimension {bag.dim} differs from the "
                    f"cohort's {cohort.dim}"
                )
            bags[slide_id] = bag
        return cls(cohort, bags)

    @property
    def slide_ids(self) -> list[str]:
        return list(self.cohort.slide_ids)

    @property
    def nbytes(self) -> int:
        return sum(b.features.numel() * b.features.element_size() for b in self.bags.values())

    def num_patches(self, slide_ids: Sequence[str] | None = None) -> list[int]:
        return [self.bags[s].num_patches for s in (slide_ids or self.cohort.slide_ids)]

    def map(
        self, transform: Callable[[Bag], Bag], *, progress: bool = True, desc: str = "precomputing"
    ) -> MemoryCohort:
        """A new MemoryCohort whose bags are ``transform(bag)``, e.g. a few precomputed tokens per slide.

        ``transform`` receives each bag in float32; what it returns is kept as it is (no float16
        rounding), so small precomputed bags stay exact.
        """
        bags = {}
        for slide_id in tqdm(self.cohort.slide_ids, desc=desc, unit="slide", disable=not progress):
            bag = self.bags[slide_id]
            bags[slide_id] = transform(
                Bag(bag.features.float(), bag.coords, bag.slide_id, bag.attrs, bag.extras)
            )
        return MemoryCohort(self.cohort, bags)

    def dataset(
        self,
        slide_ids: Sequence[str],
        max_patches: int | None = None,
        seed: int = 0,
        *,
        fixed_subset: bool = False,
    ) -> MemoryBagDataset:
        """A dataset over ``slide_ids``; see ``MemoryBagDataset``."""
        return MemoryBagDataset(self, slide_ids, max_patches, seed, fixed_subset=fixed_subset)


class MemoryBagDataset(Dataset):
    """Items ``(Bag float32, label)`` from a ``MemoryCohort``, like ``BagDataset``'s.

    max_patches: cap on patches per slide, a random subset seeded by ``(seed, epoch, slide id)`` as in
        ``BagDataset`` (``set_epoch`` draws new subsets); with ``fixed_subset`` the subset ignores the
        epoch, so every evaluation sees the same patches. Kept patches stay in file order.
    """

    def __init__(
        self,
        store: MemoryCohort,
        slide_ids: Sequence[str],
        max_patches: int | None = None,
        seed: int = 0,
        *,
        fixed_subset: bool = False,
    ) -> None:
        unknown = [s for s in slide_ids if s not in store.bags]
        if unknown:
            raise ValueError(f"slides not in the cohort ({len(unknown)}): {', '.join(unknown[:20])}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
        self.store = store
        self.slide_ids = list(slide_ids)
        self.max_patches = max_patches
        self.seed = seed
        self.fixed_subset = fixed_subset
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.slide_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[Bag, int]:
        slide_id = self.slide_ids[index]
        bag = self.store.bags[slide_id]
        label = self.store.cohort.labels[slide_id]
        if self.max_patches is None or bag.num_patches <= self.max_patches:
            return Bag(bag.features.float(), bag.coords, slide_id, bag.attrs, bag.extras), label
        epoch = 0 if self.fixed_subset else self.epoch
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(slide_id.encode())])
        keep = np.sort(rng.choice(bag.num_patches, self.max_patches, replace=False))
        index_tensor = torch.from_numpy(keep)
        return (
            Bag(
                bag.features[index_tensor].float(),
                None if bag.coords is None else bag.coords[index_tensor],
                slide_id,
                bag.attrs,
                {name: values[keep] for name, values in bag.extras.items()},
            ),
            label,
        )
