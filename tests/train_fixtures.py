"""Small stand-ins for the training-engine tests: a tiny MIL model and in-memory bags.

The models are ``tcssa.mil.base.MILModel``s (``forward(x, mask, coords) -> (logits, {name: loss})``,
and the inherited ``compute_loss`` / ``predict``) and mask-aware, so padded batches give the same
result as slides one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tcssa import TCSSA
from tcssa.mil.base import MILModel


@dataclass
class TinyBag:
    features: Tensor
    slide_id: str
    coords: Tensor | None = None


@dataclass
class TinyBatch:
    features: Tensor
    mask: Tensor
    coords: Tensor | None
    labels: Tensor
    slide_ids: list[str]


def pad_collate(items: list[tuple[TinyBag, int]]) -> TinyBatch:
    longest = max(bag.features.shape[0] for bag, _ in items)
    dim = items[0][0].features.shape[1]
    features = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        features[i, : bag.features.shape[0]] = bag.features
        mask[i, : bag.features.shape[0]] = True
    labels = torch.tensor([label for _, label in items])
    return TinyBatch(features, mask, None, labels, [bag.slide_id for bag, _ in items])


def make_bags(num_slides: int, dim: int = 8, seed: int = 0, num_classes: int = 2, signal: float = 2.0):
    """Bags of 3..12 patches; positive slides hold a few patches shifted along the first axis."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(num_slides):
        label = i % num_classes
        n = int(torch.randint(3, 13, (1,), generator=g))
        x = torch.randn(n, dim, generator=g)
        x[: max(1, n // 4), 0] += signal * label
        items.append((TinyBag(x, f"slide_{i:03d}"), label))
    return items


class TinyMIL(MILModel):
    """Masked mean pooling -> dropout -> linear; an "l2" extra loss so that named extras are exercised."""

    num_tokens = None

    def __init__(self, dim: int = 8, num_classes: int = 2, dropout: float = 0.0, seed: int = 0):
        super().__init__(dim, num_classes)
        torch.manual_seed(seed)
        self.proj = nn.Linear(dim, 16)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        h = torch.relu(self.proj(x))
        w = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1)
        logits = self.head(self.dropout(pooled))
        return logits, {"l2": 1e-3 * pooled.pow(2).mean(dim=1).mean()}


class TinySlotMIL(MILModel):
    """A TC-SSA compressor -> mean of slot tokens -> linear, with ``routing`` like tcssa.mil's model."""

    def __init__(self, dim: int = 8, num_classes: int = 2, num_slots: int = 4, seed: int = 0):
        super().__init__(dim, num_classes)
        torch.manual_seed(seed)
        self.compressor = TCSSA(dim, num_slots=num_slots, expert_hidden=16)
        self.head = nn.Linear(dim, num_classes)
        self.num_tokens = num_slots

    def forward(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None):
        out = self.compressor(x, mask)
        return self.head(out.tokens.mean(dim=1)), {"aux": 0.1 * out.aux_loss}

    def routing(self, x: Tensor, mask: Tensor | None = None):
        return self.compressor(x, mask)


def write_cohort(root, num_slides: int = 24, dim: int = 16, seed: int = 0, num_classes: int = 2):
    """A tiny cohort on disk: ``root/features/*.h5`` (with coords) and ``root/labels.csv`` (with cases).

    Positive slides hold a few patches shifted along feature 0, so a model can learn the task.
    """
    import numpy as np

    from tcssa.io.features import write_h5

    rng = np.random.default_rng(seed)
    features_dir = root / "features"
    features_dir.mkdir(parents=True)
    rows = ["slide_id,label,case_id"]
    for i in range(num_slides):
        label = i % num_classes
        n = int(rng.integers(20, 60))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x[: max(2, n // 5), 0] += 3.0 * label
        coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], axis=1) * 256
        write_h5(features_dir / f"slide_{i:03d}.h5", x, coords)
        rows.append(f"slide_{i:03d},class_{label},case_{i:03d}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return features_dir, root / "labels.csv"
