"""``SlideLMTrainConfig``: the hyperparameters of one SlideLM training stage (``tcssa vqa train``).

Each field's ``metadata["help"]`` is its ``tcssa vqa train`` flag's help (tcssa.cli.flags builds the
flags from the fields). This module imports no torch, so the command line can read it for ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

STAGE_LEARNING_RATES = {1: 1e-3, 2: 2e-4}


#: How a slide enters the LM: K slot tokens, K randomly sampled patches, one mean token, or not at all
#: ("blind": the same prompt with an empty slide span, the baseline that tells what the LM answers from
#: the question text alone).
SLIDE_TOKEN_VARIANTS = ("slots", "random-k", "mean", "blind")


@dataclass
class SlideLMTrainConfig:
    """Hyperparameters of one stage; saved to RUN/train_config.json."""

    stage: Literal[1, 2] = field(metadata={"help": "training stage"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data"})
    batch_size: int = field(default=4, metadata={"help": "samples per step and process"})
    grad_accum: int = field(
        default=1,
        metadata={
            "flag": "--grad-accum-steps",
            "help": "forward passes per optimizer update, as in `tcssa train`",
        },
    )
    lr: float | None = field(
        default=None, metadata={"help": "learning rate (default 1e-3 stage 1, 2e-4 stage 2)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "share of the optimizer steps with a linear lr warm-up"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradient norm to this, 0 for no clipping"}
    )
    max_length: int | None = field(default=2048, metadata={"help": "token limit per sample"})
    max_patches: int | None = field(
        default=None, metadata={"help": "random subset of at most this many patches per slide"}
    )
    mc_reply: Literal["letter", "text"] = field(
        default="letter",
        metadata={"help": "multiple-choice training replies: the letter or the correct option's text"},
    )
    train_compressor: bool | None = field(
        default=None,
        metadata={
            "off_flag": "--freeze-compressor",
            "help": "train the compressor with its routing loss, or keep it fixed (--freeze-compressor); "
            "unset: stage 1 trains it unless it comes from a MIL checkpoint, stage 2 keeps it fixed",
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for LM memory"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] | str = field(
        default="all-linear",
        metadata={
            "help": "modules LoRA adapts: all-linear (every attention and MLP projection, not the LM "
            "head) or module names"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"}
    )
    log_every: int = field(default=10, metadata={"help": "log the loss every this many optimizer steps"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    extra: dict = field(
        default_factory=dict,
        metadata={
            "cli": False,
            "help": "provenance (data files, features folder, ...), filled in by the run",
        },
    )

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs must be > 0, batch_size and grad_accum >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else STAGE_LEARNING_RATES[self.stage]
