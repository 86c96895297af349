"""The published code's formulation of TC-SSA, kept as the benchmark's reference, and the two
training loops compared (one slide per optimizer step, as published, against bucketed batches).

``ReferenceTCSSA`` is written from docs/METHOD.md the way the published code does it: one slide
(N x D) at a time, a dense N x K top-2 mask, a dense bmm and a Python loop over the K experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tcssa.data.batching import LengthBucketSampler, pad_slides
from tcssa.io.published import to_published
from tcssa.method import routing_loss
from tcssa.mil import build_model
from tcssa.mil.base import ClassifierHead, MILModel, training_objective


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
    so ``load_state_dict(tcssa.io.published.to_published(model))`` gives it our weights."""

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


class SlotClassifier(ClassifierHead):
    """The MIL head of docs/METHOD.md (``tcssa.mil.base.ClassifierHead``) on the mean of the slot
    tokens, for the reference loop; same parameter names, so it loads the batched model's head."""

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens.mean(dim=-2))


class ReferenceClassifier(MILModel):
    """Reference compressor + head, one slide (N x D) per call: (logits 1 x C, {"routing": weighted
    aux loss}). A ``MILModel`` for its loss and probabilities; like the published code it skips
    ``check_input`` (no value checks in the timed loop) and takes neither padding masks nor coords."""

    name = "reference"

    def __init__(self, dim: int, num_classes: int, num_slots: int = 32) -> None:
        super().__init__(dim, num_classes)
        self.compressor = ReferenceTCSSA(dim, num_slots)
        self.head = SlotClassifier(dim, num_classes)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if x.dim() != 2 or mask is not None or coords is not None:
            raise ValueError("the reference classifier takes one slide (N x D) a call, no mask or coords")
        tokens, aux = self.compressor(x)
        return self.head(tokens).unsqueeze(0), {"routing": routing_loss.AUX_LOSS_WEIGHT * aux}


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


def optimizer_step(optimizer, losses: dict, scheduler=None) -> None:
    """One update from a model's named losses (weighted by ``training_objective``); ``scheduler``
    (if any) steps after it."""
    loss = training_objective(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def train_epoch_reference(model: ReferenceClassifier, optimizer, slides, labels, order) -> None:
    """The published training loop: one slide, one backward, one optimizer step."""
    model.train()
    for i in order:
        _, losses = model.compute_loss(labels[i : i + 1], slides[i])
        optimizer_step(optimizer, losses)


def train_epoch_batched(
    model: MILModel, optimizer, slides, labels, sampler: LengthBucketSampler, scheduler=None
) -> None:
    """Several slides per step: bucketed by N, padded with a mask into one reused buffer; the
    model's extra losses come weighted. ``scheduler`` (if any) steps after every optimizer step."""
    model.train()
    longest = sorted(len(s) for s in slides)[-sampler.batch_size :]
    buffer = slides[0].new_empty(len(longest) * longest[-1] * slides[0].shape[-1])
    for batch in sampler:
        x, mask = pad_slides([slides[i] for i in batch], buffer)
        _, losses = model.compute_loss(labels[batch], x, mask)
        optimizer_step(optimizer, losses, scheduler)


def train_epoch_packed(
    model: MILModel, optimizer, slides, labels, sampler: LengthBucketSampler, scheduler=None
) -> None:
    """``train_epoch_batched``'s batches handed to the model as lists of slides: no padding, no
    mask (``TCSSA.forward_slides``); the same steps otherwise."""
    model.train()
    for batch in sampler:
        _, losses = model.compute_loss(labels[batch], [slides[i] for i in batch])
        optimizer_step(optimizer, losses, scheduler)


def batched_warmup(optimizer, steps: int):
    """Linear warm-up of the batched optimizer's learning rate over its first ``steps`` steps
    (from 1/(steps+1) of it up to all of it), constant after: the large-batch recipe of Goyal
    et al. 2017 that goes with the linear scaling rule. On five seeded rare-lesion cohorts
    (scripts/auc_recipes.py) 16 slides per step at lr x 16 reached a mean 10-epoch test AUC
    of 0.750 without it and 0.839 with two warm-up epochs (one slide per step: 0.951)."""
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / (steps + 1), end_factor=1.0, total_iters=max(steps, 1)
    )


def build_classifiers(
    dim: int, num_classes: int, num_slots: int, seed: int, batch_size: int = 1, lr: float = 1e-3
):
    """(reference classifier + its AdamW, batched TC-SSA classifier + fused AdamW), same initial weights.

    The batched model is ``tcssa.mil``'s ``tcssa``; the reference starts from its weights, so that
    the two training loops differ only in how they feed the slides and step the optimizer. With
    ``batch_size`` slides per step there are that many times fewer steps per epoch; the batched
    optimizer's learning rate follows the linear scaling rule, lr * batch_size (warm it up with
    ``batched_warmup``), so that an epoch moves the weights about as far as an epoch of
    single-slide steps. The square-root rule (lr * sqrt(batch_size)) left 16 slides per step at a
    test AUC of 0.58 after 10 epochs against 0.90 for one slide per step; the linear rule with
    warm-up narrows that gap but does not close it at equal epochs (docs/RESULTS.md, "Speed and
    memory", target 3).
    """
    batched = build_model("tcssa", dim, num_classes, num_slots=num_slots, seed=seed)
    reference = ReferenceClassifier(dim, num_classes, num_slots)
    reference.compressor.load_state_dict(to_published(batched.compressor))
    reference.head.load_state_dict(batched.head.state_dict())
    # AdamW's default on CPU is its per-parameter loop, what the published code gets.
    batched_lr = lr * batch_size
    return (
        reference,
        torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=1e-5),
        batched,
        torch.optim.AdamW(batched.parameters(), lr=batched_lr, weight_decay=1e-5, fused=True),
    )
