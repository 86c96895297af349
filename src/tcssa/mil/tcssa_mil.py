"""The TC-SSA slide classifier (docs/METHOD.md, "Uses: MIL slide classification").

patch features -> TC-SSA compressor -> K slot tokens -> mean over slots -> METHOD.md head.
The three routing terms come back as separate named losses, each already
multiplied by lambda = 0.1 (and the entropy term by its 0.5), so that
``task + sum(losses.values()) = task + lambda * L_aux``.
"""

from __future__ import annotations

from torch import Tensor

from tcssa.method import routing_loss
from tcssa.method.compressor import TCSSA, CompressorOutput
from tcssa.mil.base import ClassifierHead, MILModel


class TCSSAMIL(MILModel):
    """TC-SSA compressor followed by the mean of the K slot tokens and the classifier head."""

    name = "tcssa"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_slots: int = 32,
        top_k: int = 2,
        expert_hidden: int = 512,
        expert_dropout: float = 0.25,
        noise_std: float = 0.1,
        aux_weight: float = routing_loss.AUX_LOSS_WEIGHT,
        head_hidden: int = 512,
        head_dropout: float = 0.3,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if aux_weight < 0:
            raise ValueError(f"tcssa: aux_weight (lambda) must be >= 0, got {aux_weight}")
        self.compressor = TCSSA(
            in_dim,
            num_slots=num_slots,
            top_k=top_k,
            expert_hidden=expert_hidden,
            expert_dropout=expert_dropout,
            noise_std=noise_std,
        )
        self.head = ClassifierHead(in_dim, num_classes, head_hidden, head_dropout)
        self.aux_weight = aux_weight
        self.num_tokens = num_slots
        # Weight of each named routing term in the objective: lambda * (1, 0.5, 1).
        self.loss_weights = {
            "switch": aux_weight,
            "entropy": aux_weight * routing_loss.ENTROPY_WEIGHT,
            "z": aux_weight,
        }

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the weighted routing terms ``switch``, ``entropy``, ``z``.

        The terms are returned in eval mode too (then computed without
        exploration noise), so validation can report them; coords are ignored.
        """
        out = self.routing(x, mask)
        logits = self.head(out.tokens.mean(dim=1))
        losses = {name: weight * out.losses[name] for name, weight in self.loss_weights.items()}
        return logits, losses

    def routing(self, x: Tensor, mask: Tensor | None = None) -> CompressorOutput:
        """The compressor's full output (tokens, top-2 routing, slot counts) for ``x``; use in eval mode."""
        x, mask, _ = self.check_input(x, mask, None)
        return self.compressor(x, mask)
