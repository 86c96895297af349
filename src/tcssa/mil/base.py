"""The interface every slide classifier shares, its input checks, and the METHOD.md classifier head.

A model takes patch features ``x`` (B x N x D, or N x D for one slide), an
optional ``mask`` (B x N, True for real patches) and optional ``coords``
(B x N x 2):

- ``forward(x, mask, coords) -> (logits B x C, {name: extra loss})``: the
  model's own extra losses (e.g. TC-SSA's routing terms), already weighted;
- ``compute_loss(labels, x, mask, coords, reduction) -> (logits, losses)``:
  the same plus the task loss, cross-entropy, under ``"task"``; the training
  objective is ``training_objective(losses)``: ``task + sum(extra losses)``;
- ``predict(x, mask, coords) -> B x C`` class probabilities, in eval mode.

Padded patches (mask False) never change a result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASK_LOSS = "task"


class MILModel(nn.Module):
    """Base class of the slide classifiers built by ``tcssa.mil.build_model``.

    Subclasses set ``name``, ``num_tokens`` (tokens per slide the classifier head
    sees: K for token-budget models, 1 for mean/max pooling, None for models that
    attend over the whole bag) and
    ``requires_coords``, and implement ``forward`` starting with
    ``self.check_input``. ``config`` holds the ``build_model`` arguments that
    rebuild the model (JSON-serialisable; set by ``build_model``).
    """

    name: str = "mil"
    num_tokens: int | None = None
    requires_coords: bool = False
    #: Patches, pooled from the training slides, that ``initialise_from_patches`` wants before
    #: training starts (0: the model has no data-dependent initialisation).
    init_patches: int = 0

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"{self.name}: in_dim must be >= 1, got {in_dim}")
        if num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be >= 2, got {num_classes}")
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.config: dict[str, Any] = {}

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def initialise_from_patches(self, patches: Tensor, seed: int) -> None:
        """Data-dependent initialisation from M x D patches pooled from the training slides, called
        by the trainer once before the first epoch when ``init_patches`` > 0 (never on resume)."""

    def compute_loss(
        self,
        labels: Tensor,
        x: Tensor,
        mask: Tensor | None = None,
        coords: Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the named losses: ``"task"``, the cross-entropy of the float32 logits with
        ``labels`` (B class indices) reduced over the slides by ``reduction`` (``"mean"``, ``"sum"``,
        or ``"none"``: one per slide), then the model's weighted extra losses as ``forward`` returns
        them: means over the slides of the call whatever ``reduction`` is (see ``training_objective``).
        """
        logits, extra = self(x, mask, coords)
        if TASK_LOSS in extra:
            raise ValueError(f"{self.name}: an extra loss may not be named {TASK_LOSS!r}")
        task = F.cross_entropy(logits.float(), labels, reduction=reduction)
        return logits, {TASK_LOSS: task, **extra}

    @torch.no_grad()
    def predict(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None) -> Tensor:
        """Class probabilities (B x C, float32) in eval mode: no dropout, no routing noise, so the
        same slides always give the same numbers. The model's training mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            logits, _ = self(x, mask, coords)
        finally:
            self.train(was_training)
        return class_probabilities(logits)

    # ------------------------------------------------------------ input checks
    def check_input(
        self, x: Tensor, mask: Tensor | None, coords: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate and normalise the inputs: batch dimension, dtype, mask, finiteness.

        Returns ``x`` (B x N x D in the parameters' dtype), ``mask`` (B x N bool,
        every slide with at least one real patch) and ``coords`` (B x N x 2 or None).
        """
        name = self.name
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}: expects a torch.Tensor of patch features, got {type(x).__name__}")
        if x.dim() == 2:
            x = x.unsqueeze(0)
            if mask is not None and mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if coords is not None and coords.dim() == 2:
                coords = coords.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"{name}: expects features of shape B x N x D or N x D, got {tuple(x.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"{name}: model was built for feature dimension D={self.in_dim}, got features of "
                f"dimension {x.shape[-1]} (shape {tuple(x.shape)}); "
                "was the slide encoded with another encoder?"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{name}: got a slide with no patches (N = 0)")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expects floating-point features, got dtype {x.dtype}")
        dtype = self.parameter_dtype()
        if x.dtype != dtype:
            x = x.to(dtype)
        # A sum per patch is non-finite whenever one of its features is: one pass and no B x N x D
        # temporary (the full check cost a quarter of a tcssa training step); only a hit (or a
        # sum that overflows) pays for finding the patch.
        if not bool(torch.isfinite(x.sum(dim=-1)).all()):
            finite = torch.isfinite(x).all(dim=-1)
            if not bool(finite.all()):
                bad = (~finite).nonzero()
                b, n = bad[0].tolist()
                raise ValueError(
                    f"{name}: features contain NaN or Inf: {len(bad)} patch(es), first at batch index {b}, "
                    f"patch {n}. Padded positions must hold finite values too."
                )
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"{name}: mask must have shape B x N = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
                )
            mask = mask.to(device=x.device, dtype=torch.bool)
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"{name}: slide(s) at batch index {empty} have no real patch (mask all False)"
                )
        if coords is not None:
            if tuple(coords.shape) != (*x.shape[:2], 2):
                raise ValueError(
                    f"{name}: coords must have shape B x N x 2 = {(*x.shape[:2], 2)}, "
                    f"got {tuple(coords.shape)}"
                )
            coords = coords.to(x.device)
            if coords.is_floating_point() and not bool(torch.isfinite(coords[mask]).all()):
                raise ValueError(f"{name}: coords contain NaN or Inf at real patches")
        elif self.requires_coords:
            raise ValueError(
                f"{name}: needs patch coordinates (coords, B x N x 2), but none were given; "
                "use feature files that store coords (e.g. TRIDENT/CLAM h5)"
            )
        return x, mask, coords

    def parameter_dtype(self) -> torch.dtype:
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.get_default_dtype()


def class_probabilities(logits: Tensor) -> Tensor:
    """Softmax of the logits, computed in float32 whatever the model's dtype."""
    return logits.float().softmax(dim=-1)


def training_objective(losses: dict[str, Tensor], extra_weight: float = 1) -> Tensor:
    """The loss to minimise from ``compute_loss``'s named losses: the task loss plus
    ``extra_weight`` times the sum of the extra losses.

    The extra losses are means over the slides of a call; with ``reduction="sum"`` (a task loss
    summed over n slides, e.g. to accumulate over passes) ``extra_weight = n`` keeps their weight.
    """
    task = losses[TASK_LOSS]
    extra = sum((v for k, v in losses.items() if k != TASK_LOSS), torch.zeros((), device=task.device))
    return task + extra_weight * extra


class ClassifierHead(nn.Module):
    """METHOD.md's MIL head: LayerNorm -> Linear(D, 512) -> GELU -> Dropout(0.3) -> Linear(512, C)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"head hidden size must be >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of ``values`` (B x N x D) at positions where ``mask`` (B x N) is True."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Feature-wise max over dim 1 of ``values`` (B x N x D) at positions where ``mask`` is True."""
    return values.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def compact(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each slide's real patches to the front, in their original order.

    For order-aware models (TransMIL): a slide then reads the same sequence
    whatever padding surrounds it. Returns ``(x, mask)`` with ``mask`` a prefix mask.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    counts = mask.sum(dim=1, keepdim=True)
    prefix = positions.unsqueeze(0) < counts
    if torch.equal(prefix, mask):
        return x, mask
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # real first, order kept
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))
    return x, prefix
