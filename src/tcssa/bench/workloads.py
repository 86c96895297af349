"""Inputs (synthetic slides, h5 files, cohorts) and the methods the benchmark runs on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from tcssa.bench.config import METHODS, BenchConfig
from tcssa.bench.reference import DenseSelfAttention, ReferenceTCSSA
from tcssa.data.batching import pad_slides
from tcssa.io.chunks import compress_h5
from tcssa.io.features import write_h5_in_blocks
from tcssa.method.compressor import TCSSA
from tcssa.mil import build_model


def synthetic_slide(num_patches: int, dim: int, seed: int = 0) -> Tensor:
    """Clustered features (8 tissue-like centres plus noise) standing in for patch embeddings."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=gen) * 2.0
    phenotype = torch.randint(0, 8, (num_patches,), generator=gen)
    x = torch.randn(num_patches, dim, generator=gen)
    x += centres[phenotype]
    return x


def write_h5_slide(path: Path, num_patches: int, dim: int, seed: int = 0, chunk: int = 65_536) -> Path:
    """A float16 TRIDENT-style h5 slide of clustered features, written chunk by chunk."""
    blocks = (
        synthetic_slide(min(start + chunk, num_patches) - start, dim, seed + start).half().numpy()
        for start in range(0, num_patches, chunk)
    )
    return write_h5_in_blocks(path, num_patches, dim, blocks, dtype="float16", chunk_rows=1024)


def build_method(name: str, config: BenchConfig) -> Callable:
    """A callable that runs method ``name`` on one slide.

    Input: an N x D float32 tensor (methods cast what they need), or for ``tcssa-h5`` an h5 path.
    """
    dim = config.dim
    torch.manual_seed(config.seed)
    if name == "reference":
        model = ReferenceTCSSA(dim, config.num_slots).eval()
        return lambda x: model(x)
    if name.startswith("tcssa-bf16-") or name == "tcssa-compiled":
        model = TCSSA(dim, num_slots=config.num_slots).eval()
        if name == "tcssa-compiled":
            compiled = torch.compile(model, dynamic=True)
            return lambda x: compiled(x)
        model.set_mixed_precision(name.removeprefix("tcssa-"))
        return lambda x: model(x)
    if name in ("tcssa", "tcssa-bf16", "tcssa-h5", "expert-read", "expert-read-bf16"):
        model = TCSSA(dim, num_slots=config.num_slots).eval()
        if name.endswith("bf16"):
            model = model.bfloat16()
        if name == "tcssa-h5":
            return lambda path: compress_h5(model, path, chunk_size=config.chunk_size)
        if name.startswith("expert-read"):
            slots = torch.randn(1, config.num_slots, dim, dtype=model.gate.weight.dtype)
            return lambda x: model.experts(slots)
        return lambda x: model(x)
    if name.startswith("gate-product"):
        gate = nn.Linear(dim, config.num_slots)
        if name.endswith("bf16"):
            gate = gate.bfloat16()
        return lambda x: gate(x)
    if name == "dense-attention":
        model = DenseSelfAttention(dim).eval()
        return lambda x: model(x)
    if name in ("abmil", "transmil"):
        model = build_model(name, dim, 2).eval()
        return lambda x: model(x.unsqueeze(0))
    raise ValueError(f"unknown bench method {name!r}; known: {sorted(METHODS)}")


def method_input(name: str, x: Tensor) -> Tensor:
    return x.bfloat16() if name.endswith("bf16") else x


def cohort_lengths(config: BenchConfig) -> list[int]:
    gen = torch.Generator().manual_seed(config.seed + 1)
    low, high = config.cohort_patches
    return torch.randint(low, high + 1, (config.cohort_slides,), generator=gen).tolist()


def cohort_slides(config: BenchConfig) -> list[Tensor]:
    return [
        synthetic_slide(n, config.dim, config.seed + 100 + i) for i, n in enumerate(cohort_lengths(config))
    ]


def build_cohort_method(name: str, config: BenchConfig) -> Callable[[list[Tensor]], object]:
    torch.manual_seed(config.seed)
    if name == "cohort-reference":
        model = ReferenceTCSSA(config.dim, config.num_slots).eval()
        return lambda slides: [model(x)[0] for x in slides]
    model = TCSSA(config.dim, num_slots=config.num_slots).eval()
    size = config.batch_size
    if name == "cohort-batched":
        return lambda slides: model.compress_slides(slides, size)
    if name == "cohort-packed":  # the training-capable path, batch by batch, no padding
        return lambda slides: [
            model.forward_slides(slides[i : i + size]).tokens for i in range(0, len(slides), size)
        ]
    if name == "cohort-one-by-one":
        return lambda slides: [model(x).tokens for x in slides]
    if name == "cohort-padded":  # padded, masked batches through forward (the padding included)
        return lambda slides: [
            model(*pad_slides(slides[i : i + size])).tokens for i in range(0, len(slides), size)
        ]
    raise ValueError(f"unknown cohort method {name!r}")
