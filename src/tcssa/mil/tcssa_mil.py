"""The TC-SSA slide classifier (docs/METHOD.md, "Uses: MIL slide classification").

patch features -> TC-SSA compressor -> K slot tokens -> mean over slots -> METHOD.md head.
The three routing terms come back as separate named losses, each already
multiplied by lambda = 0.1 (and the entropy term by its 0.5), so that
``task + sum(losses.values()) = task + lambda * L_aux``.

Three options go beyond the paper (issue 15; the defaults are the paper's method exactly):
``gate_init="kmeans"`` starts the gate as nearest-centroid routing over k-means centroids of
training patches (``tcssa.method.gate_init``); ``head="attention"`` pools the slot tokens with
gated attention over the occupied slots instead of their mean, so that one slot holding a rare
lesion is not 1/K of what the head sees; ``center=True`` subtracts each slide's mean patch feature
before the compressor, so that a shift shared by every patch of a slide (stain, scanner, batch)
moves neither the routing nor the tokens, and the k-means centroids are drawn from centred patches.

One option changes only the speed (issue 17): ``unpadded=True`` compresses a padded, masked batch
slide by slide from views of its real rows (``TCSSA.forward_slides``): the same tokens, losses and
gradients, with the routing noise drawn per slide. A list of slides is always compressed that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tcssa.method import gate_init as centroid_gate
from tcssa.method import routing_loss
from tcssa.method.compressor import TCSSA, CompressorOutput
from tcssa.mil.attention import attention_scores
from tcssa.mil.base import ClassifierHead, MILModel, masked_mean

#: How the K slot tokens become one slide embedding: METHOD.md's mean, or attention over slots.
SLOT_HEADS = ("mean", "attention")
#: Training patches pooled for the k-means gate init: enough for every phenotype above ~0.1% of
#: the pooled patches to be sampled tens of times, few enough for k-means to take seconds.
KMEANS_INIT_PATCHES = 32_768


class SlotAttentionPool(nn.Module):
    """Gated attention (Ilse et al., 2018) over a slide's slot tokens: sum_k a_k y_k with
    a = softmax_k(w^T (tanh(V y_k) * sigmoid(U y_k))) over the slots that received a patch."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)

    def weights(self, tokens: Tensor, occupied: Tensor) -> Tensor:
        """B x K attention weights, 0 at empty slots (``occupied`` False), summing to 1."""
        scores = attention_scores(tokens, self.attention_v, self.attention_u, self.attention_w).float()
        # A slide always has a patch, so some slot is occupied and the softmax is defined.
        return scores.masked_fill(~occupied, float("-inf")).softmax(dim=-1).to(tokens.dtype)

    def forward(self, tokens: Tensor, occupied: Tensor) -> Tensor:
        return (self.weights(tokens, occupied).unsqueeze(-1) * tokens).sum(dim=1)


class TCSSAMIL(MILModel):
    """TC-SSA compressor followed by the mean of the K slot tokens and the classifier head; with the
    defaults, exactly the paper's model (``gate_init``, ``head`` and ``center``: the module docstring)."""

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
        gate_init: str = "random",
        gate_temperature: float | str = "auto",
        head: str = "mean",
        center: bool = False,
        unpadded: bool = False,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if aux_weight < 0:
            raise ValueError(f"tcssa: aux_weight (lambda) must be >= 0, got {aux_weight}")
        if gate_init not in centroid_gate.GATE_INITS:
            raise ValueError(f"tcssa: gate_init must be one of {centroid_gate.GATE_INITS}, got {gate_init!r}")
        if head not in SLOT_HEADS:
            raise ValueError(f"tcssa: head must be one of {SLOT_HEADS}, got {head!r}")
        if gate_temperature != "auto" and not (
            isinstance(gate_temperature, int | float) and 0 < gate_temperature < float("inf")
        ):
            raise ValueError(
                f"tcssa: gate_temperature must be 'auto' or a positive number, got {gate_temperature!r}"
            )
        self.compressor = TCSSA(
            in_dim,
            num_slots=num_slots,
            top_k=top_k,
            expert_hidden=expert_hidden,
            expert_dropout=expert_dropout,
            noise_std=noise_std,
        )
        self.head = ClassifierHead(in_dim, num_classes, head_hidden, head_dropout)
        self.slot_pool = SlotAttentionPool(in_dim) if head == "attention" else None
        self.aux_weight = aux_weight
        self.num_tokens = num_slots
        self.gate_init = gate_init
        self.gate_temperature = gate_temperature
        self.init_patches = KMEANS_INIT_PATCHES if gate_init == "kmeans" else 0
        self.center = bool(center)
        # Issue 17: a padded, masked batch goes through the compressor slide by slide, as views
        # of its rows (forward_slides), never touching the padding; same numbers, other noise draws.
        self.unpadded = bool(unpadded)
        # Weight of each named routing term in the objective: lambda * (1, 0.5, 1).
        self.loss_weights = {
            "switch": aux_weight,
            "entropy": aux_weight * routing_loss.ENTROPY_WEIGHT,
            "z": aux_weight,
        }

    def forward(
        self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the weighted routing terms ``switch``, ``entropy``, ``z``; ``x`` a B x N x D
        batch (``mask``) or a list of n_i x D slides, compressed without padding (``routing``).

        The terms are returned in eval mode too (then computed without
        exploration noise), so validation can report them; coords are ignored.
        """
        out = self._unpadded(x, mask) if self.unpadded and mask is not None else self.routing(x, mask)
        logits = self.head(self.pool(out))
        losses = {name: weight * out.losses[name] for name, weight in self.loss_weights.items()}
        return logits, losses

    def pool(self, out: CompressorOutput) -> Tensor:
        """The slide embedding the head sees (B x D): the mean of the K slot tokens (METHOD.md), or
        attention over the occupied ones (``head="attention"``)."""
        if self.slot_pool is None:
            return out.tokens.mean(dim=1)
        return self.slot_pool(out.tokens, out.slot_counts > 0)

    def initialise_from_patches(self, patches: Tensor, seed: int) -> None:
        """``gate_init="kmeans"``: the gate becomes nearest-centroid routing over K k-means centroids
        of ``patches`` (M x D, pooled from the training slides); otherwise nothing changes."""
        if self.gate_init != "kmeans":
            return
        centroids, auto = centroid_gate.kmeans_centroids(patches, self.num_tokens, seed)
        temperature = auto if self.gate_temperature == "auto" else float(self.gate_temperature)
        centroid_gate.set_nearest_centroid_gate(self.compressor.gate, centroids, temperature)

    def patch_transform(self, features: Tensor) -> Tensor:
        """One slide's N x D features as the compressor sees them (centred with ``center``); the
        trainer draws the k-means init's patches through it."""
        return features - features.mean(dim=0, keepdim=True) if self.center else features

    def _centred(self, x: Tensor, mask: Tensor) -> Tensor:
        if not self.center:
            return x
        # The mean over real patches only: padding never changes a result.
        return x - masked_mean(x, mask).to(x.dtype).unsqueeze(1)

    def slot_counts(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """B x K patches assigned to each slot (``routing(x, mask).slot_counts`` at a fraction of the
        cost: routing only); use in eval mode."""
        x, mask, _ = self.check_input(x, mask, None)
        return self.compressor.slot_counts(self._centred(x, mask), mask)

    def routing(self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> CompressorOutput:
        """The compressor's full output (tokens, top-2 routing, slot counts) for ``x``; use in eval mode.

        ``x`` may also be a list of n_i x D slides (no mask): then they go through the compressor's
        unpadded ``forward_slides``, in training too, and the top-2 outputs are packed."""
        if isinstance(x, list | tuple):
            if mask is not None:
                raise ValueError(f"{self.name}: a list of slides takes no mask")
            slides = [self.patch_transform(self.check_input(s, None, None)[0][0]) for s in x]
            return self.compressor.forward_slides(slides)
        x, mask, _ = self.check_input(x, mask, None)
        return self.compressor(self._centred(x, mask), mask)

    def _unpadded(self, x: Tensor, mask: Tensor) -> CompressorOutput:
        """``unpadded``: the slides of a batch whose mask is a prefix (real patches first, as
        ``tcssa.data`` pads) as views of their real rows, through ``forward_slides``; another mask
        takes the padded path."""
        if isinstance(x, list | tuple):
            return self.routing(x, mask)  # rejects the mask
        x, mask, _ = self.check_input(x, mask, None)
        lengths = mask.sum(dim=1)
        prefix = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(prefix, mask):
            return self.compressor(self._centred(x, mask), mask)
        slides = [self.patch_transform(x[i, :n]) for i, n in enumerate(lengths.tolist())]
        return self.compressor.forward_slides(slides)
