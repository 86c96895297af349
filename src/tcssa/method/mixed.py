"""Mixed bfloat16 / float32 compression (issue 17): the two large products in bfloat16, the rest
as the float32 model computes it.

A float32 TCSSA spends its time on two N x D products: the gate logits (N x D times D x K) and
the aggregation of step 5 (K x N times N x D). Running the whole model in bfloat16 moves the top-2
choice of about 1% of the patches (docs/RESULTS.md), because the gate logits are rounded to 8
significant bits and a patch whose second and third slots are that close changes slots.

Two ways to keep the choice (``TCSSA.mixed_precision``):

- ``"bf16-gate"``: the gate product in bfloat16; each patch whose gap between its second and
  third largest logits is below ``tie_margin`` (the patches whose top-2 set the rounding could
  change) gets its logits again in float32, and everything from there on is float32 except the
  aggregation product, which runs in bfloat16 with float32 sums.
- ``"bf16-aggregate"``: the gate in float32 (the top-2 choice is exactly float32's), only the
  aggregation product in bfloat16.

The experts (one read of their weights per batch) and all sums stay float32. Neither pays on a CPU
without bfloat16 instructions, where torch emulates bfloat16 products: the compressor still warns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIXED_PRECISIONS = ("bf16-gate", "bf16-aggregate")
#: Logit gap (second minus third largest) below which "bf16-gate" decides in float32. bfloat16
#: logits of the bench's D = 1024 slides differed from float32 by at most 0.022 (99.9% of them by
#: under 0.012); at 0.02 about 6% of the patches were refined and the top-2 choice of all 100,000
#: agreed with float32 (docs/RESULTS.md, "Speed, round 2").
DEFAULT_TIE_MARGIN = 0.02


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be None or one of {MIXED_PRECISIONS}, got {mode!r}")


def gate_logits(gate: nn.Linear, x: Tensor, x_low: Tensor, tie_margin: float) -> Tensor:
    """B x N x K float32 gate logits from the bfloat16 product, near-ties of the top-2 set redone in
    float32 from ``x`` (``x_low`` is ``x`` in bfloat16)."""
    logits = F.linear(x_low, gate.weight.to(x_low.dtype), gate.bias.to(x_low.dtype)).to(x.dtype)
    if logits.shape[-1] <= 2:  # every slot is chosen: no tie can change the top-2 set
        return logits
    top3 = logits.topk(3, dim=-1).values
    close = (top3[..., 1] - top3[..., 2]) < tie_margin
    if bool(close.any()):
        rows = close.nonzero(as_tuple=True)
        logits = logits.index_put(rows, gate(x[rows]))
    return logits


def refined_share(gate: nn.Linear, x: Tensor, tie_margin: float) -> float:
    """The share of patches of ``x`` (N x D) that ``"bf16-gate"`` decides again in float32."""
    with torch.no_grad():
        low = x.bfloat16()
        logits = F.linear(low, gate.weight.bfloat16(), gate.bias.bfloat16()).float()
        top3 = logits.topk(min(3, logits.shape[-1]), dim=-1).values
        if top3.shape[-1] < 3:
            return 0.0
        return float(((top3[..., 1] - top3[..., 2]) < tie_margin).float().mean())
