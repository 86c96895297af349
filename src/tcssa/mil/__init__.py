"""Slide classifiers (MIL) behind one interface: TC-SSA and the baselines it is compared with.

``build_model(name, in_dim, num_classes, num_slots=32, seed=0, **options)``
returns a ``MILModel`` whose ``forward(x, mask=None, coords=None)`` gives
``(logits, {name: weighted loss})``. Names: see ``MODEL_NAMES``.
"""

from tcssa.mil.base import ClassifierHead, MILModel
from tcssa.mil.registry import MODEL_NAMES, build_model

__all__ = ["MILModel", "ClassifierHead", "MODEL_NAMES", "build_model"]
