"""What a benchmark run measures: sizes, cohorts, repeats (``BenchConfig``; ``QUICK`` for CI)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BenchConfig:
    # Each field's metadata["help"] is its `tcssa bench` flag's help (tcssa.cli.flags builds the flags
    # from the fields, with the default and the --quick value appended).
    dim: int = field(default=1024, metadata={"help": "feature dimension D"})
    num_slots: int = field(default=32, metadata={"help": "slot tokens K of the compressors measured"})
    sizes: tuple[int, ...] = field(
        default=(1_000, 10_000, 100_000), metadata={"help": "patch counts N of the single-slide comparison"}
    )
    stream_sizes: tuple[int, ...] = field(
        default=(10_000, 100_000, 1_000_000),
        metadata={"help": "patch counts N streamed from h5 files by compress_h5, for the scaling exponent"},
    )
    cohort_slides: int = field(
        default=48, metadata={"help": "slides of the cohort compressed and trained on"}
    )
    cohort_patches: tuple[int, int] = field(
        default=(1_000, 10_000),
        metadata={"help": "fewest and most patches of a cohort slide, N drawn uniformly in between"},
    )
    batch_size: int = field(default=16, metadata={"help": "slides per batch of the cohort compression"})
    # Cohort training, slides per optimizer step. 8, not 16: as fast per slide on this CPU with one
    # thread (2.55x vs 2.56x the reference), twice the updates per epoch (docs/RESULTS.md).
    train_batch_size: int = field(
        default=8, metadata={"help": "slides per optimizer step of the batched training loop"}
    )
    chunk_size: int = field(default=16_384, metadata={"help": "patches per chunk compress_h5 reads"})
    repeats: int = field(default=5, metadata={"help": "timed repeats per measurement"})
    train_repeats: int = field(default=3, metadata={"help": "timed repeats of the cohort training epoch"})
    memory_cap_gib: float = field(
        default=8.0,
        metadata={"help": "address space (GiB) a memory probe may add; dense attention stops here"},
    )
    agreement_size: int = field(
        default=100_000, metadata={"help": "patches of the bfloat16 vs float32 routing agreement"}
    )
    auc_slides: int = field(
        default=120,
        metadata={"help": "about this many synthetic rare-lesion slides the two training loops learn from"},
    )
    auc_test_slides: int = field(
        default=120,
        metadata={"help": "slides held out to measure their AUC on, of the same cohort, split by case"},
    )
    auc_dim: int = field(default=512, metadata={"help": "feature dimension of the AUC comparison's slides"})
    auc_patches: tuple[int, int] = field(
        default=(1_000, 10_000), metadata={"help": "fewest and most patches of an AUC comparison slide"}
    )
    auc_epochs: int = field(default=10, metadata={"help": "training epochs of the AUC comparison"})
    auc_seeds: int = field(
        default=3,
        metadata={
            "help": "cohorts (seeds seed, seed+1, ...) the AUC comparison is repeated on, their mean judged"
        },
    )
    train_warmup_epochs: float = field(
        default=1.0,
        metadata={"help": "lr warm-up epochs of the batched loop, see tcssa.bench.reference.batched_warmup"},
    )
    auc_equal_time: bool = field(
        default=True, metadata={"help": "also train the batched loop on to the reference's training time"}
    )
    # One slide per step (batched: x B). Not METHOD.md's 1e-4: with it neither loop learns the rare
    # lesion from 120 slides in 10 epochs (test AUC 0.57 and 0.53, docs/RESULTS.md), so a comparison
    # at 1e-4 would compare two models at chance.
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "flag": "--lr",
            "help": "learning rate of the AUC comparison, one slide per step (batched: x B)",
        },
    )
    alternatives: tuple[str, ...] = field(
        default=("abmil", "transmil", "dense-attention"),
        metadata={"help": "other methods of the single-slide comparison, from tcssa.bench.METHODS"},
    )
    probe_workers: int = field(default=1, metadata={"help": "memory probes run at once; they time nothing"})
    probe_time_budget_s: float = field(
        default=300.0, metadata={"help": "seconds: a method whose call took longer skips the larger sizes"}
    )
    mixed_precision: tuple[str, ...] = field(
        default=("bf16-gate", "bf16-aggregate"),
        metadata={"help": "mixed bfloat16 modes of the compressor measured beside float32 (issue 17)"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "also time the compressor under torch.compile (compiling takes a minute or more)"},
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads, torch's default when unset"})
    seed: int = field(default=0, metadata={"help": "seed for the synthetic slides and the models"})
    quick: bool = field(
        default=False, metadata={"cli": False, "help": "marks the QUICK preset, which --quick selects"}
    )

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
    "tcssa-h5": "tcssa.io.chunks.compress_h5: float16 h5 file streamed in chunks, float32 model",
    "tcssa-bf16-gate": "tcssa.TCSSA, float32 model, gate and aggregation products in bfloat16, "
    "near-ties of the top-2 redone in float32 (set_mixed_precision('bf16-gate'))",
    "tcssa-bf16-aggregate": "tcssa.TCSSA, float32 model and gate, aggregation product in bfloat16 "
    "(set_mixed_precision('bf16-aggregate'))",
    "tcssa-compiled": "tcssa.TCSSA forward under torch.compile (dynamic shapes), float32",
    "abmil": "ABMIL (tcssa.mil), float32, all N patches",
    "transmil": "TransMIL (tcssa.mil), float32, all N patches",
    "dense-attention": "one dense self-attention layer over all N patches (explicit N x N scores)",
    "gate-product": "floor: the gate product X W_g^T + b alone, float32",
    "gate-product-bf16": "floor: the gate product alone, bfloat16",
    "expert-read": "floor: the 32 experts on one slide (one read of their weights), float32",
    "expert-read-bf16": "floor: the 32 experts on one slide, bfloat16",
}


SECTIONS = ("single", "agreement", "streaming", "cohort", "training", "auc")
