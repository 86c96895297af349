"""Where did the slots go on a real slide? Slot tokens drawn on the tissue, beside the tissue classes.

``tcssa slotmap SLIDE`` extracts the slide's tiles and features (``tcssa.wsi.extract``, the default
encoder is the capricorn DenseNet121, whose 9 PathMNIST tissue-class probabilities are stored with
the features), routes every tile through a TC-SSA compressor (a trained ``tcssa train`` checkpoint,
or, without one, a freshly initialised compressor: its gate is a random linear map, so the picture
then shows the routing's geometry, not a learned model), and draws each tile's top-1 slot on the
slide thumbnail beside each tile's most likely tissue class.

How well the slots follow the tissue classes is measured by the normalised mutual information and
the adjusted Rand index between top-1 slot and tissue class, against random routing: the same slot
sizes dealt to the tiles at random (a permutation of the slot labels), repeated, so the baseline has
a mean and a spread. A score is worth reading only as far above that baseline as the spread allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from tcssa.method.compressor import TCSSA


@dataclass(frozen=True)
class Agreement:
    """Top-1 slot against tissue class over a slide's tiles, and the same under random routing."""

    nmi: float
    ari: float
    random_nmi_mean: float
    random_nmi_std: float
    random_ari_mean: float
    random_ari_std: float
    num_tiles: int
    slots_used: int
    classes_present: int
    permutations: int

    def text(self) -> str:
        return (
            f"NMI {self.nmi:.3f} (random routing {self.random_nmi_mean:.3f} ± {self.random_nmi_std:.3f}), "
            f"ARI {self.ari:.3f} (random {self.random_ari_mean:.3f} ± {self.random_ari_std:.3f}) over "
            f"{self.num_tiles:,} tiles, {self.slots_used} slots used, {self.classes_present} tissue classes "
            f"present; random routing: the same slot sizes dealt at random, {self.permutations} times"
        )


def top1_slots(model: TCSSA, features: torch.Tensor) -> np.ndarray:
    """Each tile's most probable slot (eval mode: no noise), N int64."""
    model.eval()
    with torch.inference_mode():
        out = model(features.to(model.gate.weight.dtype).unsqueeze(0))
    return out.topk_index[0, :, 0].cpu().numpy().astype(np.int64)


def slot_class_agreement(
    slots: np.ndarray, classes: np.ndarray, *, permutations: int = 200, seed: int = 0
) -> Agreement:
    """NMI and ARI of ``slots`` against ``classes`` (both N ints), and their random-routing baseline."""
    slots, classes = np.asarray(slots), np.asarray(classes)
    if slots.shape != classes.shape or slots.ndim != 1:
        raise ValueError(
            f"slots and classes must be two 1-D arrays of one length, got {slots.shape}, {classes.shape}"
        )
    if len(slots) < 2:
        raise ValueError(f"slot-class agreement needs at least 2 tiles, got {len(slots)}")
    if permutations < 2:
        raise ValueError(f"permutations must be >= 2 (the baseline reports a spread), got {permutations}")
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(slots) for _ in range(permutations)]
    random_nmi = np.array([normalized_mutual_info_score(classes, s) for s in shuffled])
    random_ari = np.array([adjusted_rand_score(classes, s) for s in shuffled])
    return Agreement(
        nmi=float(normalized_mutual_info_score(classes, slots)),
        ari=float(adjusted_rand_score(classes, slots)),
        random_nmi_mean=float(random_nmi.mean()),
        random_nmi_std=float(random_nmi.std(ddof=1)),
        random_ari_mean=float(random_ari.mean()),
        random_ari_std=float(random_ari.std(ddof=1)),
        num_tiles=len(slots),
        slots_used=int(len(np.unique(slots))),
        classes_present=int(len(np.unique(classes))),
        permutations=permutations,
    )
