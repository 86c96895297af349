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

Two more (issue 15, items 3 and 4), also off by default: ``token_budget`` ("auto", or a coverage
share in (0, 1]) keeps, per slide, the fewest slots whose routing mass covers that share of the
slide's (``tcssa.method.budget.coverage_mask``; "auto" = 0.99) and hides the others from the head;
``spatial=True`` adds a gate on Fourier features of the slide-normalised patch coordinates to the
gate logits (zero-initialised) and a zero-initialised linear map of each slot's spatial summary
(centroid, spread, mean radius: ``tcssa.method.spatial``) to its token, so that training starts
from the plain method and learns where to use position.

One option changes only the speed (issue 17): ``unpadded=True`` compresses a padded, masked batch
slide by slide from views of its real rows (``TCSSA.forward_slides``): the same tokens, losses and
gradients, with the routing noise drawn per slide. A list of slides is always compressed that way
(padded first with ``spatial`` or ``token_budget``, whose outputs are per padded batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tcssa.method import gate_init as centroid_gate
from tcssa.method import routing_loss
from tcssa.method import spatial as spatial_cues
from tcssa.method.budget import AUTO_COVERAGE, coverage_mask, slot_mass
from tcssa.method.compressor import TCSSA, CompressorOutput
from tcssa.mil.attention import attention_scores
from tcssa.mil.base import ClassifierHead, MILModel, masked_mean

#: How the K slot tokens become one slide embedding: METHOD.md's mean, or attention over slots.
SLOT_HEADS = ("mean", "attention")
#: Training patches pooled for the k-means gate init: enough for every phenotype above ~0.1% of
#: the pooled patches to be sampled tens of times, few enough for k-means to take seconds.
KMEANS_INIT_PATCHES = 32_768
#: Octaves of the Fourier features of the patch coordinates fed to the spatial gate: the finest
#: wavelength is 2/2^(F-1) of the slide's radius, a few patches on a slide of a few thousand.
SPATIAL_FREQUENCIES = 6


def budget_coverage(token_budget: float | str | None) -> float | None:
    """The routing coverage a ``token_budget`` option asks for: None (every one of the K tokens, the
    paper), "auto" (``AUTO_COVERAGE``) or a share in (0, 1]; anything else raises ValueError."""
    if token_budget is None or token_budget == "all":
        return None
    if token_budget == "auto":
        return AUTO_COVERAGE
    if isinstance(token_budget, int | float) and not isinstance(token_budget, bool):
        if 0 < token_budget <= 1:
            return float(token_budget)
    raise ValueError(
        f"tcssa: token_budget must be null (all K tokens), 'auto' (routing coverage {AUTO_COVERAGE}) "
        f"or a routing coverage in (0, 1], got {token_budget!r}"
    )


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
        token_budget: float | str | None = None,
        spatial: bool = False,
        spatial_frequencies: int = SPATIAL_FREQUENCIES,
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
        self.coverage = budget_coverage(token_budget)
        # Issue 17: a padded, masked batch goes through the compressor slide by slide, as views
        # of its rows (forward_slides), never touching the padding; same numbers, other noise draws.
        self.unpadded = bool(unpadded)
        self.spatial = bool(spatial)
        self.requires_coords = self.spatial
        self.spatial_gate = self.spatial_token = None
        if self.spatial:
            if spatial_frequencies < 1:
                raise ValueError(f"tcssa: spatial_frequencies must be >= 1, got {spatial_frequencies}")
            self.spatial_frequencies = int(spatial_frequencies)
            # Built last, so every other parameter is drawn as without spatial; both start at zero,
            # so the untrained model computes exactly what the plain one does.
            self.spatial_gate = nn.Linear(4 * self.spatial_frequencies, num_slots, bias=False)
            self.spatial_token = nn.Linear(spatial_cues.SUMMARY_SIZE, in_dim)
            for param in (*self.spatial_gate.parameters(), *self.spatial_token.parameters()):
                nn.init.zeros_(param)
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
        exploration noise), so validation can report them; coords are used only with ``spatial``.
        """
        if self.unpadded and mask is not None and self._can_unpad():
            out = self._unpadded(x, mask)
        else:
            out = self.routing(x, mask, coords)
        logits = self.head(self.pool(out))
        losses = {name: weight * out.losses[name] for name, weight in self.loss_weights.items()}
        return logits, losses

    def token_mask(self, out: CompressorOutput) -> Tensor | None:
        """B x K: the slot tokens the head sees under ``token_budget`` (the fewest slots covering the
        asked share of each slide's routing mass); None without a budget (all K, the paper)."""
        if self.coverage is None:
            return None
        mass = slot_mass(out.topk_weight, out.topk_index, self.num_tokens)
        return coverage_mask(mass, self.coverage)

    def pool(self, out: CompressorOutput) -> Tensor:
        """The slide embedding the head sees (B x D): the mean of the K slot tokens (METHOD.md), or
        attention over the occupied ones (``head="attention"``); with ``token_budget``, over the
        kept tokens only."""
        keep = self.token_mask(out)
        if self.slot_pool is None:
            if keep is None:
                return out.tokens.mean(dim=1)
            weights = keep.to(out.tokens.dtype).unsqueeze(-1)
            return (out.tokens * weights).sum(dim=1) / weights.sum(dim=1)
        occupied = out.slot_counts > 0
        return self.slot_pool(out.tokens, occupied if keep is None else occupied & keep)

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

    def _spatial_unit(self, coords: Tensor | None, mask: Tensor) -> Tensor | None:
        """The slide-normalised coordinates (B x N x 2) with ``spatial``; None without."""
        if not self.spatial:
            return None
        return spatial_cues.normalise_coords(coords, mask).to(self.parameter_dtype())

    def _check(self, x: Tensor, mask: Tensor | None, coords: Tensor | None):
        if self.spatial and coords is None:
            raise ValueError(
                f"{self.name}: spatial=True routes with the patch coordinates, but none were given "
                "(coords, B x N x 2); use feature files that store coords (e.g. TRIDENT/CLAM h5), or "
                "a model without spatial"
            )
        return self.check_input(x, mask, coords)

    def _gate_offset(self, unit: Tensor | None) -> Tensor | None:
        if unit is None:
            return None
        return self.spatial_gate(spatial_cues.fourier_features(unit, self.spatial_frequencies))

    def slot_counts(self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None) -> Tensor:
        """B x K patches assigned to each slot (``routing(x, mask, coords).slot_counts`` at a fraction
        of the cost: routing only); use in eval mode."""
        x, mask, coords = self._check(x, mask, coords)
        offset = self._gate_offset(self._spatial_unit(coords, mask))
        return self.compressor.slot_counts(self._centred(x, mask), mask, logit_offset=offset)

    def routing(
        self, x: Tensor | Sequence[Tensor], mask: Tensor | None = None, coords: Tensor | None = None
    ) -> CompressorOutput:
        """The compressor's full output (tokens, top-2 routing, slot counts) for ``x``; with
        ``spatial``, the tokens include their spatial summary (what the head sees). Use in eval mode.

        ``x`` may also be a list of n_i x D slides (no mask, no coords): then they go through the
        compressor's unpadded ``forward_slides``, in training too, and the top-2 outputs are packed
        (N_total x top_k); with ``spatial`` or ``token_budget`` the list is padded first."""
        if isinstance(x, list | tuple):
            if mask is not None or coords is not None:
                raise ValueError(f"{self.name}: a list of slides takes no mask or coords")
            slides = [self.check_input(s, None, None)[0][0] for s in x]
            if not self._can_unpad():
                return self.routing(*_padded(slides))
            return self.compressor.forward_slides([self.patch_transform(s) for s in slides])
        x, mask, coords = self._check(x, mask, coords)
        unit = self._spatial_unit(coords, mask)
        out = self.compressor(self._centred(x, mask), mask, logit_offset=self._gate_offset(unit))
        if unit is None:
            return out
        summary = spatial_cues.slot_spatial_summary(unit, out.topk_weight, out.topk_index, self.num_tokens)
        return dataclasses.replace(out, tokens=out.tokens + self.spatial_token(summary.to(out.tokens.dtype)))

    def _can_unpad(self) -> bool:
        """Whether ``forward_slides`` gives what the head needs: not with ``spatial`` (coordinates
        per patch) or ``token_budget`` (slot masses from B x N top-2 outputs)."""
        return not self.spatial and self.coverage is None

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


def _padded(slides: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """n_i x D slides as a zero-padded B x max(n) x D batch and its B x max(n) mask."""
    x = nn.utils.rnn.pad_sequence(list(slides), batch_first=True)
    lengths = torch.tensor([len(s) for s in slides], device=x.device)
    return x, torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
