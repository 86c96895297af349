"""Batches of slides with similar patch counts, so that a batch wastes little on padding.

Slides differ in N by 10x and more; padding a random batch to its longest slide
can double the work. Sorting by N and cutting the sorted list into batches keeps
each batch's padding small, and a batch of B slides reads the 32 experts' weights
once instead of B times (see docs/RESULTS.md, "Speed and memory"). For training
(padded batches with masks). Compressing a cohort needs no padding at all:
``TCSSA.compress_slides``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


def bucket_by_length(
    lengths: Sequence[int],
    batch_size: int,
    max_patches: int | None = None,
    order: Sequence[int] | None = None,
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of similar length, shortest first.

    A batch holds at most ``batch_size`` slides and, when ``max_patches`` is given, at most
    that many padded patches (B x longest N; a slide longer than that goes alone).
    ``order`` restricts and orders the indices considered (ties keep that order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    indices = sorted(range(len(lengths)) if order is None else order, key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in indices:
        # Sorted by length, so slide i would be the longest of the batch if it joined.
        too_many = len(current) == batch_size
        too_big = max_patches is not None and (len(current) + 1) * lengths[i] > max_patches
        if current and (too_many or too_big):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class LengthBucketSampler(Sampler[list[int]]):
    """A ``batch_sampler`` for DataLoader: batches of similar N, different ones each epoch.

    Each epoch the slides are shuffled (seed + epoch, see ``set_epoch``) and cut into pools of
    ``pool_batches`` batches; each pool is bucketed by length and the batches of all pools are
    shuffled. A larger pool pads less; a smaller one mixes slides more.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        max_patches: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_batches: int = 8,
    ) -> None:
        bucket_by_length([1], batch_size, max_patches)  # validates the sizes early
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_patches = max_patches
        self.shuffle = shuffle
        self.seed = seed
        self.pool = max(1, pool_batches) * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if not self.shuffle:
            return bucket_by_length(self.lengths, self.batch_size, self.max_patches)
        rng = random.Random(self.seed + self.epoch)
        indices = list(range(len(self.lengths)))
        rng.shuffle(indices)
        batches = []
        for start in range(0, len(indices), self.pool):
            pool = indices[start : start + self.pool]
            batches += bucket_by_length(self.lengths, self.batch_size, self.max_patches, order=pool)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def pad_slides(slides: Sequence[Tensor], buffer: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stack n_i x D slides into B x max(n) x D (zeros after each slide) and a B x max(n) mask.

    ``buffer``: a flat tensor of the slides' dtype to pad into when it is large enough, so that
    a loop over batches reuses one block of memory instead of faulting in a fresh one per batch
    (the batch is then a view of it: finish with one batch before padding the next).
    """
    batch, longest, dim = len(slides), max(len(s) for s in slides), slides[0].shape[-1]
    size = batch * longest * dim
    if buffer is not None and buffer.numel() >= size and buffer.dtype == slides[0].dtype:
        x = buffer[:size].view(batch, longest, dim)
    else:
        x = slides[0].new_empty(batch, longest, dim)  # not zeros: every element is written below
    mask = torch.zeros(batch, longest, dtype=torch.bool, device=x.device)
    for i, s in enumerate(slides):
        x[i, : len(s)] = s
        x[i, len(s) :] = 0
        mask[i, : len(s)] = True
    return x, mask
