"""What a benchmark run measures: sizes, cohorts, repeats (``BenchConfig``; ``QUICK`` for CI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    dim: int = 1024
    num_slots: int = 32
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # single-slide comparison
    stream_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # compress_h5, for the exponent
    cohort_slides: int = 48
    cohort_patches: tuple[int, int] = (1_000, 10_000)  # N drawn uniformly in this range
    batch_size: int = 16  # cohort compression
    # Cohort training, slides per optimizer step. 8, not 16: as fast per slide on this CPU with one
    # thread (2.55x vs 2.56x the reference), twice the updates per epoch (docs/RESULTS.md).
    train_batch_size: int = 8
    chunk_size: int = 16_384  # compress_h5
    repeats: int = 5
    train_repeats: int = 3
    memory_cap_gib: float = 8.0  # address space a probe may add (dense attention stops here)
    agreement_size: int = 100_000  # bfloat16 vs float32 routing agreement
    auc_slides: int = 120  # synthetic rare-lesion slides the two training loops learn from (about)
    auc_test_slides: int = 120  # and held out to measure their AUC on (same cohort, split by case)
    auc_dim: int = 512
    auc_patches: tuple[int, int] = (1_000, 10_000)
    auc_epochs: int = 10
    auc_seeds: int = 3  # cohorts (seed, seed+1, ...) the AUC comparison is repeated on; their mean is judged
    train_warmup_epochs: float = 1.0  # batched loop: lr warm-up (tcssa.bench.reference.batched_warmup)
    auc_equal_time: bool = True  # also train the batched loop on to the reference's training time
    # One slide per step (batched: x B). Not METHOD.md's 1e-4: with it neither loop learns the rare
    # lesion from 120 slides in 10 epochs (test AUC 0.57 and 0.53, docs/RESULTS.md), so a comparison
    # at 1e-4 would compare two models at chance.
    learning_rate: float = 1e-3
    alternatives: tuple[str, ...] = ("abmil", "transmil", "dense-attention")  # item 7
    probe_workers: int = 1  # memory probes at once (they do not time anything)
    probe_time_budget_s: float = 300.0  # a method whose call took longer skips the larger sizes
    threads: int | None = None  # torch threads (None: torch's default)
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.train_batch_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got train_batch_size (--train-batch-size) "
                f"{self.train_batch_size}, batch_size {self.batch_size}"
            )
        if self.auc_seeds < 1:
            raise ValueError(f"auc_seeds (--auc-seeds) must be >= 1, got {self.auc_seeds}")
        if self.train_warmup_epochs < 0:
            raise ValueError(f"train_warmup_epochs must be >= 0, got {self.train_warmup_epochs}")


QUICK = BenchConfig(
    dim=128,
    sizes=(1_000, 4_000),
    stream_sizes=(2_000, 20_000),
    cohort_slides=6,
    cohort_patches=(300, 1_500),
    batch_size=6,
    train_batch_size=3,
    chunk_size=4_096,
    repeats=2,
    train_repeats=1,
    memory_cap_gib=2.0,
    agreement_size=4_000,
    auc_slides=16,
    auc_test_slides=16,
    auc_dim=32,
    auc_patches=(200, 600),
    auc_epochs=1,
    auc_seeds=2,
    train_warmup_epochs=0.5,
    alternatives=("abmil", "dense-attention"),  # TransMIL alone would take most of the minute
    probe_workers=4,
    threads=1,
    quick=True,
)

#: Single-slide methods: name -> what it is (also the legend of the plots).
METHODS = {
    "reference": "published-code formulation, float32 (batch 1, dense N x K mask, bmm, expert loop)",
    "tcssa": "tcssa.TCSSA forward, float32",
    "tcssa-bf16": "tcssa.TCSSA forward, features and model in bfloat16",
    "tcssa-h5": "TCSSA.compress_h5: float16 h5 file streamed in chunks, float32 model",
    "abmil": "ABMIL (tcssa.mil), float32, all N patches",
    "transmil": "TransMIL (tcssa.mil), float32, all N patches",
    "dense-attention": "one dense self-attention layer over all N patches (explicit N x N scores)",
    "gate-product": "floor: the gate product X W_g^T + b alone, float32",
    "gate-product-bf16": "floor: the gate product alone, bfloat16",
    "expert-read": "floor: the 32 experts on one slide (one read of their weights), float32",
    "expert-read-bf16": "floor: the 32 experts on one slide, bfloat16",
}


SECTIONS = ("single", "agreement", "streaming", "cohort", "training", "auc")
