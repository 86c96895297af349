"""Token-budget baselines: the METHOD.md head sees exactly K tokens chosen without TC-SSA's routing.

``random-k`` samples K patches, ``kmeans-k`` takes K k-means centroids,
``grid-k`` pools K spatial cells (the functions live in ``tcssa.method.budget``).
Like ``tcssa``, the head takes the mean of the K tokens; for a slide with
fewer than K patches the mean runs over its valid tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcssa.method import budget
from tcssa.mil.base import ClassifierHead, MILModel, masked_mean


class TokenBudgetMIL(MILModel):
    """K tokens per slide from ``select`` -> mean over valid tokens -> classifier head."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_slots: int = 32,
        head_hidden: int = 512,
        head_dropout: float = 0.3,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if num_slots < 1:
            raise ValueError(f"{self.name}: num_slots must be >= 1, got {num_slots}")
        self.num_tokens = num_slots
        self.head = ClassifierHead(in_dim, num_classes, head_hidden, head_dropout)

    def select(self, x: Tensor, mask: Tensor, coords: Tensor | None) -> budget.BudgetTokens:
        raise NotImplementedError

    def tokens(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> budget.BudgetTokens:
        """The K tokens (with token mask and patch assignment) the head would see."""
        x, mask, coords = self.check_input(x, mask, coords)
        return self.select(x, mask, coords)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        chosen = self.tokens(x, mask, coords)
        return self.head(masked_mean(chosen.tokens, chosen.token_mask)), {}


class RandomKMIL(TokenBudgetMIL):
    """K patches sampled per slide: fresh random samples in training, a fixed content-hash sample in eval."""

    name = "random-k"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_slots: int = 32,
        hash_seed: int = 0,
        head_hidden: int = 512,
        head_dropout: float = 0.3,
    ) -> None:
        super().__init__(in_dim, num_classes, num_slots, head_hidden, head_dropout)
        self.hash_seed = hash_seed
        # Drawn from the global generator, which build_model has seeded: the training samples
        # follow the model's seed without consuming the global random stream at forward time.
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))

    # The sampling generator's state travels in the state dict (as a uint8 tensor, so it fits in
    # safetensors): a run resumed from a checkpoint draws the same samples as one never stopped.
    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state.to(device="cpu", dtype=torch.uint8))

    def select(self, x: Tensor, mask: Tensor, coords: Tensor | None) -> budget.BudgetTokens:
        if self.training:
            return budget.select_random(x, mask, self.num_tokens, generator=self.generator)
        return budget.select_random(x, mask, self.num_tokens, seed=self.hash_seed)


class KMeansKMIL(TokenBudgetMIL):
    """The K k-means centroids of each slide (deterministic, so the same in training and eval)."""

    name = "kmeans-k"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_slots: int = 32,
        iterations: int = 10,
        head_hidden: int = 512,
        head_dropout: float = 0.3,
    ) -> None:
        super().__init__(in_dim, num_classes, num_slots, head_hidden, head_dropout)
        if iterations < 0:
            raise ValueError(f"kmeans-k: iterations must be >= 0, got {iterations}")
        self.iterations = iterations

    def select(self, x: Tensor, mask: Tensor, coords: Tensor | None) -> budget.BudgetTokens:
        return budget.kmeans_pool(x, mask, self.num_tokens, self.iterations)


class GridKMIL(TokenBudgetMIL):
    """K spatial cells per slide, pooled from the patch coordinates (needs coords)."""

    name = "grid-k"
    requires_coords = True

    def select(self, x: Tensor, mask: Tensor, coords: Tensor | None) -> budget.BudgetTokens:
        return budget.grid_pool(x, coords, mask, self.num_tokens)
