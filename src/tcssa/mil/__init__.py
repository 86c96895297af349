"""Slide classifiers (MIL) behind one interface: TC-SSA and the baselines it is compared with.

``build_model(name, in_dim, num_classes, num_slots=32, seed=0, **options)``
returns a ``MILModel``: ``forward(x, mask=None, coords=None)`` gives
``(logits, {name: weighted extra loss})``, ``compute_loss(labels, x, ...)``
adds the task loss (cross-entropy) to those, ``predict(x, ...)`` gives class
probabilities. Names: see ``MODEL_NAMES``.
"""

from tcssa.mil.base import ClassifierHead, MILModel, training_objective
from tcssa.mil.registry import MODEL_NAMES, build_model, parse_model_spec

__all__ = [
    "MILModel",
    "ClassifierHead",
    "MODEL_NAMES",
    "build_model",
    "parse_model_spec",
    "training_objective",
]
