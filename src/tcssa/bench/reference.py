"""The published code's formulation of TC-SSA, kept as the benchmark's reference, and the two
training loops compared (one slide per optimizer step, as published, against bucketed batches).

``ReferenceTCSSA`` is written from docs/METHOD.md the way the published code does it: one slide
(N x D) at a time, a dense N x K top-2 mask, a dense bmm and a Python loop over the K experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcssa import routing_loss
from tcssa.bucketing import LengthBucketSampler, pad_slides
from tcssa.compressor import TCSSA


def _mil_model(name: str, dim: int, num_classes: int = 2, seed: int = 0) -> nn.Module | None:
    try:
        from tcssa.mil import build_model
    except ImportError:
        return None
    return build_model(name, dim, num_classes, seed=seed)


class ReferenceExpert(nn.Module):
    """One slot expert as the published code writes it: y = c + LN(W2 Dropout(GELU(W1 c)))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.LayerNorm(dim)
        )

    def forward(self, c: Tensor) -> Tensor:
        return c + self.net(c)


class ReferenceTCSSA(nn.Module):
    """TC-SSA in the published code's formulation (docs/METHOD.md, "Known weak points"):
    one slide (N x D) at a time, a dense N x K top-2 mask, a dense bmm for the aggregation
    and a Python loop over the K experts. Same parameter layout as the published checkpoints,
    so ``load_state_dict(TCSSA.reference_state_dict())`` gives it our weights."""

    def __init__(self, dim: int, num_slots: int = 32, hidden: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_slots)
        self.experts = nn.ModuleList(ReferenceExpert(dim, hidden, dropout) for _ in range(num_slots))
        self.noise_std = 0.1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.gate(x)
        if self.training:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = torch.softmax(logits, dim=-1)
        _, top_index = torch.topk(probs, 2, dim=-1)
        top_mask = torch.zeros_like(probs).scatter(1, top_index, 1.0)  # dense N x K
        truncated = probs * top_mask
        slot_sum = torch.bmm(truncated.t().unsqueeze(0), x.unsqueeze(0))[0]  # dense bmm, batch size 1
        slots = slot_sum / (truncated.sum(0).unsqueeze(1) + 1e-9)
        tokens = torch.stack([expert(slots[k]) for k, expert in enumerate(self.experts)])
        if not self.training:
            return tokens, logits.new_zeros(())
        num_slots = probs.shape[1]
        mean_prob, share = probs.mean(0), top_mask.mean(0)
        switch = num_slots * (mean_prob * share).sum()
        entropy = 1 - (-(mean_prob * torch.log(mean_prob + 1e-8)).sum()) / math.log(num_slots)
        z = 1e-4 * torch.logsumexp(logits, dim=-1).mean() ** 2
        return tokens, switch + 0.5 * entropy + z


class SlotClassifier(nn.Module):
    """The MIL head of docs/METHOD.md on slot tokens: mean -> LayerNorm -> Linear(D, 512) -> GELU
    -> Dropout(0.3) -> Linear(512, C). Used by both training loops below."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens.mean(dim=-2))


class ReferenceClassifier(nn.Module):
    """Reference compressor + head, one slide per call: returns (logits 1 x C, weighted aux loss)."""

    def __init__(self, dim: int, num_classes: int, num_slots: int = 32) -> None:
        super().__init__()
        self.compressor = ReferenceTCSSA(dim, num_slots)
        self.head = SlotClassifier(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens, aux = self.compressor(x)
        return self.head(tokens).unsqueeze(0), routing_loss.AUX_LOSS_WEIGHT * aux


class BatchedClassifier(nn.Module):
    """TC-SSA (``tcssa.TCSSA``) + the same head on padded, masked batches: (logits B x C, {losses})."""

    def __init__(self, dim: int, num_classes: int, num_slots: int = 32) -> None:
        super().__init__()
        self.compressor = TCSSA(dim, num_slots=num_slots)
        self.head = SlotClassifier(dim, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.compressor(x, mask)
        return self.head(out.tokens), {"routing": routing_loss.AUX_LOSS_WEIGHT * out.aux_loss}


class DenseSelfAttention(nn.Module):
    """One single-head self-attention layer over all N patch tokens with explicit N x N scores,
    mean-pooled: the cost of letting a transformer see the whole bag, O(N^2 D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1])).softmax(dim=-1)
        return (attention @ v).mean(dim=-2)


def train_epoch_reference(model: ReferenceClassifier, optimizer, slides, labels, order) -> None:
    """The published training loop: one slide, one backward, one optimizer step."""
    model.train()
    for i in order:
        logits, aux = model(slides[i])
        loss = F.cross_entropy(logits, labels[i : i + 1]) + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_epoch_batched(model: nn.Module, optimizer, slides, labels, sampler: LengthBucketSampler) -> None:
    """Several slides per step: bucketed by N, padded with a mask into one reused buffer; the
    model's extra losses come weighted."""
    model.train()
    longest = sorted(len(s) for s in slides)[-sampler.batch_size :]
    buffer = slides[0].new_empty(len(longest) * longest[-1] * slides[0].shape[-1])
    for batch in sampler:
        x, mask = pad_slides([slides[i] for i in batch], buffer)
        logits, losses = model(x, mask)
        loss = F.cross_entropy(logits, labels[batch]) + sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def build_classifiers(
    dim: int, num_classes: int, num_slots: int, seed: int, batch_size: int = 1, lr: float = 1e-3
):
    """(reference classifier + its AdamW, batched TC-SSA classifier + fused AdamW), same initial weights.

    The batched model is ``tcssa.mil``'s ``tcssa`` when that package is present, else the inline
    ``BatchedClassifier``; the reference starts from its weights, so that the two training loops
    differ only in how they feed the slides and step the optimizer. With ``batch_size`` slides per
    step there are that many times fewer steps per epoch; the batched optimizer's learning rate
    follows the linear scaling rule, lr * batch_size, so that an epoch moves the weights about as
    far as one of single-slide steps. Measured on the rare-lesion cohort (docs/RESULTS.md, "Speed
    and memory"): with the square-root rule, 16 slides per step reached a test AUC of 0.58-0.85
    after 10 epochs where one slide per step reached 0.90; with the linear rule, 0.97.
    """
    batched = _mil_model("tcssa", dim, num_classes, seed)
    if batched is None:
        torch.manual_seed(seed)
        batched = BatchedClassifier(dim, num_classes, num_slots)
    reference = ReferenceClassifier(dim, num_classes, num_slots)
    reference.compressor.load_state_dict(batched.compressor.reference_state_dict())
    reference.head.load_state_dict(batched.head.state_dict())
    # AdamW's default on CPU is its per-parameter loop, what the published code gets.
    batched_lr = lr * batch_size
    return (
        reference,
        torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=1e-5),
        batched,
        torch.optim.AdamW(batched.parameters(), lr=batched_lr, weight_decay=1e-5, fused=True),
    )
