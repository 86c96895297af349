"""The interface every slide classifier shares, its input checks, and the METHOD.md classifier head.

A model takes patch features ``x`` (B x N x D, or N x D for one slide), an
optional ``mask`` (B x N, True for real patches) and optional ``coords``
(B x N x 2), and returns ``(logits B x C, {name: loss})``. The named losses
are already weighted: the training objective is ``task + sum(losses.values())``.
Padded patches (mask False) never change a result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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
