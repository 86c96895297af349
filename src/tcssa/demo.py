"""The main job: show what TC-SSA does to one slide's token budget.

For now this compresses one synthetic slide (clustered random features standing
in for patch embeddings) and reports N patches -> K tokens, the ratio and the
time. The full comparison demo builds on this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tcssa.compressor import TCSSA


@dataclass
class BudgetReport:
    num_patches: int
    dim: int
    num_slots: int
    seconds: float
    slots_used: int
    largest_slot_share: float

    @property
    def ratio(self) -> float:
        return self.num_patches / self.num_slots

    def lines(self) -> list[str]:
        return [
            f"slide: {self.num_patches:,} patches x {self.dim}-d features",
            f"TC-SSA: {self.num_patches:,} patches -> {self.num_slots} slot tokens "
            f"({self.ratio:,.0f}x fewer tokens, "
            f"{100 * self.num_slots / self.num_patches:.3f}% of the sequence)",
            f"every patch feeds its top-2 slots; {self.slots_used}/{self.num_slots} slots used, "
            f"largest slot holds {100 * self.largest_slot_share:.1f}% of assignments",
            f"compression time (CPU, eval, float32): {1000 * self.seconds:.1f} ms",
        ]


def token_budget_demo(
    num_patches: int = 20_000, dim: int = 512, num_slots: int = 32, seed: int = 0
) -> BudgetReport:
    """Compress one synthetic slide with an untrained TC-SSA and report the token budget."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=gen) * 2.0
    phenotype = torch.randint(0, 8, (num_patches,), generator=gen)
    features = centres[phenotype] + torch.randn(num_patches, dim, generator=gen)
    torch.manual_seed(seed)
    model = TCSSA(dim, num_slots=num_slots).eval()
    with torch.inference_mode():
        model(features[:100])  # warm-up so the timing is of the compression itself
        start = time.perf_counter()
        out = model(features)
        seconds = time.perf_counter() - start
    counts = out.slot_counts[0]
    return BudgetReport(
        num_patches=num_patches,
        dim=dim,
        num_slots=num_slots,
        seconds=seconds,
        slots_used=int((counts > 0).sum()),
        largest_slot_share=float(counts.max() / counts.sum()),
    )
