"""`tcssa bench`: speed and memory of TC-SSA from 10^3 to 10^6 patches, side by side with the
published code's formulation, measured in one run.

The reference (``ReferenceTCSSA``, below) is written from docs/METHOD.md the way the published
code does it: batch size 1, a dense N x K top-2 mask, a dense bmm, a Python loop over the K
expert MLPs, one optimizer step per slide. Every target of the issue is a ratio to it, taken
in the same run, because the machines here are shared and noisy.

How it measures
- Time: the methods of one comparison run round-robin in one process (reference, ours,
  reference, ours, ...), and each gets the median of its repeats. Compression runs under
  ``torch.inference_mode``.
- Memory: each method runs in a child process of its own (forked from a server process that
  has only imported torch and tcssa),
  sizes in increasing order. Before each size the child resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``), after one untimed warm-up call on the first size (one-time
  library set-up is not the method's), so ``peak_rss_mib`` is that size's peak resident memory of the
  whole process (Python, torch, model, input, work): the kernel's VmHWM, the counter behind
  ``resource.getrusage``'s ru_maxrss (read from /proc because ru_maxrss also carries the
  parent's peak across fork and exec); ``work_mib`` is the peak minus the resident memory
  just before the call. The
  child asks glibc to return freed buffers to the system at once (``mallopt``, M_MMAP_THRESHOLD),
  so one size's leftovers do not hide the next one's. tracemalloc is not used: it does not
  see torch's allocations. A child may also run under an address-space cap, so that a method
  that needs too much memory (dense self-attention) fails cleanly instead of swapping.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tcssa import routing_loss
from tcssa.bucketing import LengthBucketSampler, compress_slides, pad_slides
from tcssa.compressor import TCSSA
from tcssa.streaming import iter_h5_chunks

MIB = 1 << 20


# ============================================================================ the reference
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


# ============================================================================ configuration
@dataclass(frozen=True)
class BenchConfig:
    dim: int = 1024
    num_slots: int = 32
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # single-slide comparison
    stream_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # compress_h5, for the exponent
    cohort_slides: int = 48
    cohort_patches: tuple[int, int] = (1_000, 10_000)  # N drawn uniformly in this range
    batch_size: int = 16  # cohort compression
    train_batch_size: int = 8  # cohort training, slides per optimizer step
    chunk_size: int = 16_384  # compress_h5
    repeats: int = 5
    train_repeats: int = 3
    memory_cap_gib: float = 8.0  # address space a probe may add (dense attention stops here)
    agreement_size: int = 100_000  # bfloat16 vs float32 routing agreement
    auc_slides: int = 120  # synthetic rare-lesion cohort for the AUC of the two training loops
    auc_dim: int = 512
    auc_patches: tuple[int, int] = (1_000, 10_000)
    auc_epochs: int = 10
    alternatives: tuple[str, ...] = ("abmil", "transmil", "dense-attention")  # item 7
    probe_workers: int = 1  # memory probes at once (they do not time anything)
    probe_time_budget_s: float = 300.0  # a method whose call took longer skips the larger sizes
    threads: int | None = None  # torch threads (None: torch's default)
    seed: int = 0
    quick: bool = False


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
    auc_dim=32,
    auc_patches=(200, 600),
    auc_epochs=1,
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


# ============================================================================ inputs and models
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
    import h5py

    with h5py.File(path, "w") as f:
        features = f.create_dataset("features", (num_patches, dim), dtype="float16", chunks=(1024, dim))
        for start in range(0, num_patches, chunk):
            stop = min(start + chunk, num_patches)
            features[start:stop] = synthetic_slide(stop - start, dim, seed + start).half().numpy()
    return path


def _mil_model(name: str, dim: int, num_classes: int = 2, seed: int = 0) -> nn.Module | None:
    try:
        from tcssa.mil import build_model
    except ImportError:
        return None
    return build_model(name, dim, num_classes, seed=seed)


def build_method(name: str, config: BenchConfig) -> Callable | None:
    """A callable that runs method ``name`` on one slide; None when its package is absent.

    Input: an N x D float32 tensor (methods cast what they need), or for ``tcssa-h5`` an h5 path.
    """
    dim = config.dim
    torch.manual_seed(config.seed)
    if name == "reference":
        model = ReferenceTCSSA(dim, config.num_slots).eval()
        return lambda x: model(x)
    if name in ("tcssa", "tcssa-bf16", "tcssa-h5", "expert-read", "expert-read-bf16"):
        model = TCSSA(dim, num_slots=config.num_slots).eval()
        if name.endswith("bf16"):
            model = model.bfloat16()
        if name == "tcssa-h5":
            return lambda path: model.compress_h5(path, chunk_size=config.chunk_size)
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
        model = _mil_model(name, dim)
        if model is None:
            return None
        model.eval()
        return lambda x: model(x.unsqueeze(0))
    raise ValueError(f"unknown bench method {name!r}; known: {sorted(METHODS)}")


def method_input(name: str, x: Tensor) -> Tensor:
    return x.bfloat16() if name.endswith("bf16") else x


# ============================================================================ measurement
def _seconds(fn: Callable, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int | dict[str, int], warmup: bool = True
) -> dict[str, float]:
    """Median seconds of each call over its repeats, the calls run round-robin so that a burst of
    load on the shared machine hits all of them alike; with ``warmup``, one untimed call each
    first. ``repeats`` may differ per call (a call that takes minutes gets fewer)."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(calls, repeats)
    if warmup:
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(max(counts.values(), default=0)):
        for name, call in calls.items():
            if round_ < counts[name]:
                times[name].append(_seconds(call))
    return {name: statistics.median(values) for name, values in times.items()}


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:  # not Linux: the peak so far is the best we have
        return _peak_rss_mib()


def _peak_rss_mib() -> float:
    # VmHWM, the kernel's peak-RSS mark of this process's memory, which clear_refs resets. It is
    # what ru_maxrss reports too, except that ru_maxrss also remembers the parent's RSS at fork
    # (Linux keeps it across exec), which would hide a small child behind a big parent.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, which ru_maxrss reports
        return True
    except OSError:
        return False


def run_probe(spec: dict) -> list[dict]:
    """Child-process side of a memory probe: run one method at each size, report peak RSS."""
    _return_freed_memory_at_once()
    if spec["config"].get("threads"):
        torch.set_num_threads(spec["config"]["threads"])
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    method, results = spec["method"], []
    if spec.get("cap_gib"):
        extra = int(spec["cap_gib"] * (1 << 30))
        with open("/proc/self/statm") as f:
            virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (virtual + extra, resource.RLIM_INFINITY))
    if method.startswith("cohort-"):
        slides = cohort_slides(config)
        run = build_cohort_method(method, config)
        inputs = [(sum(len(s) for s in slides), slides)]
    else:
        run = build_method(method, config)
        inputs = [(n, None) for n in spec["sizes"]]
    _load_shared_code(config)
    warm = True
    for size, data in inputs:
        row = {"method": method, "n": size}
        try:
            if data is None:
                data = spec["files"][str(size)] if method == "tcssa-h5" else synthetic_slide(size, config.dim)
                data = method_input(method, data) if isinstance(data, Tensor) else data
            with torch.inference_mode():
                if warm:  # one-time library set-up (thread pools, BLAS buffers) is not the method's
                    run(data)
                    warm = False
                gc.collect()
                row["rss_before_mib"] = _rss_mib()
                row["peak_reset"] = _reset_peak_rss()
                row["probe_seconds"] = _seconds(run, data)
            row["peak_rss_mib"] = _peak_rss_mib()
            row["work_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
            row["probe_s"] = row["probe_seconds"]
            row["status"] = "ok"
        except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
            row["status"] = f"out of memory (cap {spec.get('cap_gib')} GiB): {str(err).splitlines()[0][:120]}"
            results.append(row)
            break
        data = None
        results.append(row)
        if row["probe_seconds"] > config.probe_time_budget_s:  # larger sizes would take longer still
            break
    return results


def _return_freed_memory_at_once() -> None:
    # glibc keeps freed buffers below its (adaptive) mmap threshold for reuse, and RSS with them;
    # a fixed 128 KiB threshold makes every larger buffer go back to the system when freed.
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: measurements may then include some retained buffers


def _load_shared_code(config: BenchConfig) -> None:
    """Run every compression method once on a toy slide, so that each probe child starts with the
    same library code paged in: RSS counts code pages, and a method should not be charged for
    torch kernels that another method merely happened not to load first."""
    toy = replace(config, dim=32, num_slots=4)
    x = synthetic_slide(64, toy.dim)
    with torch.inference_mode():
        for name in ("reference", "tcssa", "tcssa-bf16"):
            build_method(name, toy)(method_input(name, x))
    gc.collect()


def probe_many(jobs: list[dict], workers: int) -> list[list[dict]]:
    """``probe_memory(**job)`` for each job, ``workers`` child processes at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: probe_memory(**job), jobs))


def _probe_context():
    # Children fork from a server that has imported torch and tcssa once (a fresh exec would
    # pay that import, seconds, per probe); the server runs no torch op, so forking it is safe.
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tcssa.bench"])
    return context


def probe_memory(
    method: str,
    sizes: Sequence[int],
    config: BenchConfig,
    files: dict | None = None,
    cap_gib: float | None = None,
) -> list[dict]:
    """Run ``run_probe`` in a fresh child process and return its rows."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    spec = {"method": method, "sizes": list(sizes), "config": asdict(config), "files": files or {}}
    spec["cap_gib"] = cap_gib
    try:
        with ProcessPoolExecutor(1, mp_context=_probe_context()) as child:
            return child.submit(run_probe, spec).result()
    except BrokenProcessPool:
        return [{"method": method, "n": n, "status": "child process killed (out of memory?)"} for n in sizes]


# ============================================================================ cohort methods
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
    if name == "cohort-batched":
        model = TCSSA(config.dim, num_slots=config.num_slots).eval()
        return lambda slides: compress_slides(model, slides, config.batch_size)
    raise ValueError(f"unknown cohort method {name!r}")


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


def build_classifiers(dim: int, num_classes: int, num_slots: int, seed: int):
    """(reference classifier + its AdamW, batched TC-SSA classifier + fused AdamW), same initial weights.

    The batched model is ``tcssa.mil``'s ``tcssa`` when that package is present, else the inline
    ``BatchedClassifier``; the reference starts from its weights, so that the two training loops
    differ only in how they feed the slides and step the optimizer.
    """
    batched = _mil_model("tcssa", dim, num_classes, seed)
    if batched is None:
        torch.manual_seed(seed)
        batched = BatchedClassifier(dim, num_classes, num_slots)
    reference = ReferenceClassifier(dim, num_classes, num_slots)
    reference.compressor.load_state_dict(batched.compressor.reference_state_dict())
    reference.head.load_state_dict(batched.head.state_dict())
    hyper = {"lr": 1e-4, "weight_decay": 1e-5}
    # AdamW's default on CPU is its per-parameter loop, what the published code gets.
    return (
        reference,
        torch.optim.AdamW(reference.parameters(), **hyper),
        batched,
        torch.optim.AdamW(batched.parameters(), fused=True, **hyper),
    )


# ============================================================================ the run
@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def machine_description() -> dict:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line)
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory,
        "bf16_instructions": sorted(f for f in flags if "bf16" in f or f.startswith("amx")) or "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class _Bench:
    def __init__(self, config: BenchConfig, work_dir: Path, progress: bool) -> None:
        self.config = config
        self.work_dir = work_dir
        self.progress = progress
        self.result = BenchResult()

    def log(self, message: str) -> None:
        if self.progress:
            tqdm.write(message, file=sys.stderr)

    # ------------------------------------------------------------ single slide
    def single_slide(self) -> None:
        c = self.config
        methods = ["reference", "tcssa", "tcssa-bf16", *c.alternatives]
        floors = ["gate-product", "gate-product-bf16", "expert-read", "expert-read-bf16"]
        built = {name: build_method(name, c) for name in methods + floors}
        available = [name for name in methods if built[name] is not None]
        jobs = [
            {
                "method": m,
                "sizes": c.sizes,
                "config": c,
                "cap_gib": c.memory_cap_gib if "attention" in m else None,
            }
            for m in available
        ]
        self.log(f"memory probes: {', '.join(available)} in child processes")
        memory = {
            (row["method"], row["n"]): row for rows in probe_many(jobs, c.probe_workers) for row in rows
        }
        for n in tqdm(c.sizes, desc="single slide", disable=not self.progress, leave=False):
            x = synthetic_slide(n, c.dim, c.seed)
            inputs = {name: method_input(name, x) for name in built}
            # A method whose probe failed (or stopped) at this size is not timed here either.
            runnable = floors + [m for m in available if memory.get((m, n), {}).get("status") == "ok"]
            calls = {m: (lambda m=m, inputs=inputs: built[m](inputs[m])) for m in runnable}
            # A call that took its probe more than 20 s is timed once (the probe ran it already).
            slow = {m: memory.get((m, n), {}).get("probe_seconds", 0) > 20 for m in calls}
            repeats = {m: 1 if slow[m] else c.repeats for m in calls}
            with torch.inference_mode():
                seconds = interleaved_medians(calls, repeats, warmup=n == c.sizes[0])
            for name in available + floors:
                row = {
                    "section": "single slide",
                    "method": name,
                    "n": n,
                    **_memory_fields(memory.get((name, n))),
                }
                if name in seconds:
                    row.update(_time_fields(seconds[name], n))
                elif "status" not in row:
                    row["status"] = "not run (a smaller N ran out of memory or time)"
                self.result.rows.append(row)
            x = inputs = calls = None  # free this size's slide before the next one
        self._single_slide_ratios()

    def _single_slide_ratios(self) -> None:
        rows = {(r["method"], r["n"]): r for r in self.result.rows if r["section"] == "single slide"}
        for (name, n), row in rows.items():
            ref = rows.get(("reference", n), {})
            floor_part = name.startswith(("gate-product", "expert-read"))
            if "time_ms" in row and "time_ms" in ref and not floor_part:
                row["speedup_vs_reference"] = ref["time_ms"] / row["time_ms"]
            if "peak_rss_mib" in row and "peak_rss_mib" in ref:
                row["peak_rss_vs_reference"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
            suffix = "-bf16" if name.endswith("bf16") else ""
            gate, experts = (
                rows.get((f"gate-product{suffix}", n), {}),
                rows.get((f"expert-read{suffix}", n), {}),
            )
            if name in ("reference", "tcssa", "tcssa-bf16") and "time_ms" in gate and "time_ms" in experts:
                row["floor_ms"] = gate["time_ms"] + experts["time_ms"]
                row["floor_fraction"] = row["floor_ms"] / row["time_ms"]

    # ------------------------------------------------------------ exactness and bfloat16
    def agreement(self) -> None:
        """Our tokens vs the reference's (same weights), and bfloat16 vs float32 routing."""
        c = self.config
        torch.manual_seed(c.seed)
        ours = TCSSA(c.dim, num_slots=c.num_slots).eval()
        reference = ReferenceTCSSA(c.dim, c.num_slots).eval()
        reference.load_state_dict(ours.reference_state_dict())
        half = TCSSA(c.dim, num_slots=c.num_slots).eval()
        half.load_state_dict(ours.state_dict())
        half = half.bfloat16()
        x = synthetic_slide(c.agreement_size, c.dim, c.seed + 7)
        with torch.inference_mode():
            full = ours(x)
            ref_tokens = reference(x)[0]
            low = half(x.bfloat16())
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "tcssa vs reference (float32, same weights)",
                "n": c.agreement_size,
                "token_rel_error": _token_rel_error(full.tokens[0], ref_tokens),
            }
        )
        same = (full.topk_index.sort(-1).values == low.topk_index.sort(-1).values).all(-1)
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "tcssa-bf16 vs tcssa (float32)",
                "n": c.agreement_size,
                "top2_agreement": same.float().mean().item(),
                "token_rel_error": _token_rel_error(full.tokens[0], low.tokens[0].float()),
            }
        )

    # ------------------------------------------------------------ streaming
    def streaming(self) -> None:
        c = self.config
        files = {}
        for n in tqdm(c.stream_sizes, desc="writing h5 slides", disable=not self.progress, leave=False):
            files[str(n)] = str(write_h5_slide(self.work_dir / f"slide_{n}.h5", n, c.dim, c.seed))
        probes = {row["n"]: row for row in probe_memory("tcssa-h5", c.stream_sizes, c, files=files)}
        run = build_method("tcssa-h5", c)
        for n in tqdm(c.stream_sizes, desc="streaming", disable=not self.progress, leave=False):
            repeats = c.repeats if n <= 100_000 else 2
            with torch.inference_mode():
                call = {"h5": lambda n=n: run(files[str(n)])}
                seconds = interleaved_medians(call, repeats, warmup=n == c.stream_sizes[0])["h5"]
            row = {"section": "streaming", "method": "tcssa-h5", "n": n, **_memory_fields(probes.get(n))}
            row.update(_time_fields(seconds, n))
            row["chunk_size"] = c.chunk_size
            self.result.rows.append(row)
        # The same slide the published way, whole in memory as float32: its peak, for contrast.
        largest = max(c.stream_sizes)
        in_memory = probe_memory("reference", [largest], c)[0]
        row = {"section": "streaming", "method": "reference (in memory)", "n": largest}
        row.update(_memory_fields(in_memory))
        row["note"] = "reference (in memory): the float32 slide whole in RAM; memory probe only (not timed)"
        if "probe_seconds" in in_memory:
            row["probe_s"] = in_memory["probe_seconds"]
        self.result.rows.append(row)
        smallest = min(c.stream_sizes)  # exactness against the in-memory forward
        torch.manual_seed(c.seed)
        model = TCSSA(c.dim, num_slots=c.num_slots).eval()
        with torch.inference_mode():
            streamed = model.compress_h5(files[str(smallest)], chunk_size=max(1, smallest // 7))
            whole = model(next(iter_h5_chunks(files[str(smallest)], smallest)))
        self.result.rows.append(
            {
                "section": "agreement",
                "method": "compress_h5 vs in-memory forward (float32)",
                "n": smallest,
                "token_max_abs_diff": (streamed.tokens - whole.tokens).abs().max().item(),
                "token_rel_error": _token_rel_error(whole.tokens[0], streamed.tokens[0]),
            }
        )
        for path in files.values():
            Path(path).unlink(missing_ok=True)

    # ------------------------------------------------------------ cohorts
    def cohort_compression(self) -> None:
        c = self.config
        slides = cohort_slides(c)
        total = sum(len(s) for s in slides)
        methods = ["cohort-reference", "cohort-batched"]
        runs = {m: build_cohort_method(m, c) for m in methods}
        with torch.inference_mode():
            seconds = interleaved_medians({m: (lambda m=m: runs[m](slides)) for m in methods}, c.repeats)
        slides = None  # the memory probes below build their own copy
        probes = probe_many([{"method": m, "sizes": [total], "config": c} for m in methods], c.probe_workers)
        memory = {m: rows[0] for m, rows in zip(methods, probes, strict=True)}
        for m in methods:
            row = {"section": "cohort compression", "method": m, "n": total, **_memory_fields(memory[m])}
            row.update(_time_fields(seconds[m], total))
            row["slides"] = c.cohort_slides
            row["slides_per_s"] = c.cohort_slides / seconds[m]
            row["speedup_vs_reference"] = seconds["cohort-reference"] / seconds[m]
            if m == "cohort-batched":
                row["batch_size"] = c.batch_size
            self.result.rows.append(row)

    def cohort_training(self) -> None:
        c = self.config
        slides = cohort_slides(c)
        labels = torch.arange(len(slides)) % 2
        reference, ref_opt, batched, opt = build_classifiers(c.dim, 2, c.num_slots, c.seed)
        sampler = LengthBucketSampler([len(s) for s in slides], c.train_batch_size, seed=c.seed)
        order = list(range(len(slides)))
        calls = {
            "train-reference": lambda: train_epoch_reference(reference, ref_opt, slides, labels, order),
            "train-batched": lambda: train_epoch_batched(batched, opt, slides, labels, sampler),
        }
        seconds = interleaved_medians(calls, c.train_repeats)
        for m, s in seconds.items():
            row = {"section": "cohort training", "method": m, "n": sum(len(x) for x in slides)}
            row.update(_time_fields(s, row["n"]))
            row["slides"] = len(slides)
            row["slides_per_s"] = len(slides) / s
            row["speedup_vs_reference"] = seconds["train-reference"] / s
            row["note"] = (
                "one slide per step, AdamW default (per-parameter loop)"
                if m == "train-reference"
                else f"{c.train_batch_size} slides per step (bucketed, masked), fused AdamW, "
                f"model: {type(batched).__module__}.{type(batched).__name__}"
            )
            self.result.rows.append(row)

    def cohort_auc(self) -> None:
        """Both training loops on the synthetic rare-lesion cohort (issue 4's task), same epochs and
        fold; test AUC of each, and of the batched model evaluated in bfloat16."""
        try:
            from tcssa.data import Cohort, make_kfold_splits, make_synthetic_cohort, read_bag
        except ImportError:
            self.result.rows.append(
                {"section": "auc", "method": "train-batched", "status": "skipped: tcssa.data not available"}
            )
            return
        c = self.config
        low, high = c.auc_patches
        synth = make_synthetic_cohort(
            self.work_dir / "rare", "rare", c.auc_slides, c.auc_dim, c.seed, low, high, progress=False
        )
        cohort = Cohort.from_folder(synth.features_dir, synth.labels_csv)
        split = make_kfold_splits(cohort, folds=5, seed=c.seed)[0]
        train_ids = split.train + split.val  # fixed epochs, no early stopping: val is not needed
        load = lambda ids, dtype=torch.float32: [read_bag(cohort.paths[i], dtype).features for i in ids]  # noqa: E731
        train_x, test_x = load(train_ids), load(split.test)
        train_y = torch.tensor([cohort.labels[i] for i in train_ids])
        test_y = [cohort.labels[i] for i in split.test]
        reference, ref_opt, batched, opt = build_classifiers(
            c.auc_dim, cohort.num_classes, c.num_slots, c.seed
        )
        sampler = LengthBucketSampler([len(x) for x in train_x], c.train_batch_size, seed=c.seed)
        rng = torch.Generator().manual_seed(c.seed)
        seconds = {"train-reference": 0.0, "train-batched": 0.0}
        for epoch in tqdm(range(c.auc_epochs), desc="auc training", disable=not self.progress, leave=False):
            order = torch.randperm(len(train_x), generator=rng).tolist()
            sampler.set_epoch(epoch)
            seconds["train-reference"] += _seconds(
                train_epoch_reference, reference, ref_opt, train_x, train_y, order
            )
            seconds["train-batched"] += _seconds(train_epoch_batched, batched, opt, train_x, train_y, sampler)
        test_half = load(split.test, torch.bfloat16)  # float16 on disk straight to bfloat16
        low_precision = copy.deepcopy(batched).bfloat16()
        reference.eval(), batched.eval(), low_precision.eval()
        scores = {
            "train-reference": _class1_scores(lambda x: reference(x)[0], test_x),
            "train-batched": _class1_scores(lambda x: batched(x)[0], test_x),
            "train-batched, eval in bfloat16": _class1_scores(lambda x: low_precision(x)[0], test_half),
        }
        common = {"section": "auc", "slides": len(train_ids), "n": sum(len(x) for x in train_x)}
        for method, score in scores.items():
            row = {**common, "method": method, "test_auc": _auc(test_y, score), "status": "ok"}
            trained = seconds.get(method)
            if trained:
                row.update(time_ms=1000 * trained, slides_per_s=c.auc_epochs * len(train_ids) / trained)
                row["speedup_vs_reference"] = seconds["train-reference"] / trained
            row["note"] = (
                f"synthetic 'rare' cohort: {c.auc_slides} slides, D={c.auc_dim}, N {low:,}-{high:,}; "
                f"fold 0: {len(train_ids)} train, {len(split.test)} test slides; {c.auc_epochs} epochs each"
            )
            self.result.rows.append(row)
        if hasattr(batched, "routing"):  # top-2 agreement of the trained gate, bfloat16 vs float32
            with torch.inference_mode():
                same = [
                    (
                        batched.routing(x).topk_index.sort(-1).values
                        == low_precision.routing(h).topk_index.sort(-1).values
                    )
                    .all(-1)
                    .float()
                    .mean()
                    for x, h in zip(test_x, test_half, strict=True)
                ]
            self.result.rows.append(
                {
                    "section": "agreement",
                    "method": "trained tcssa-bf16 vs float32 (rare cohort test slides)",
                    "n": sum(len(x) for x in test_x),
                    "top2_agreement": float(torch.stack(same).mean()),
                }
            )


@torch.inference_mode()
def _class1_scores(predict: Callable[[Tensor], Tensor], slides: list[Tensor]) -> list[float]:
    scores = []
    for x in slides:
        logits = predict(x)
        scores.append(float(logits.float().softmax(-1)[0, -1]))
    return scores


def _auc(labels: list[int], scores: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None


def _time_fields(seconds: float, n: int) -> dict:
    return {"time_ms": 1000 * seconds, "us_per_patch": 1e6 * seconds / n, "status": "ok"}


def _memory_fields(probe: dict | None) -> dict:
    if not probe:
        return {}
    out = {k: probe[k] for k in ("peak_rss_mib", "work_mib", "probe_s") if k in probe}
    if probe.get("status", "ok") != "ok":
        out["status"] = probe["status"]
    return out


def _token_rel_error(expected: Tensor, got: Tensor) -> float:
    """max over slots of ||y_k - y'_k|| / ||y_k|| (tokens of one slide, K x D)."""
    expected, got = expected.float(), got.float()
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)).max().item()


# ============================================================================ targets
def _fit_exponent(rows: list[dict]) -> float | None:
    points = [(r["n"], r["time_ms"]) for r in rows if "time_ms" in r]
    if len(points) < 2:
        return None
    n, t = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(n, t, 1)[0])


def evaluate_targets(result: BenchResult, config: BenchConfig) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (None: not measured)."""
    rows = result.rows
    find = lambda section, method: [r for r in rows if r["section"] == section and r["method"] == method]  # noqa: E731
    targets = []

    def add(item: str, target: str, measured: str, met: bool | None) -> None:
        targets.append({"item": item, "target": target, "measured": measured, "met": met})

    ours = {r["n"]: r for r in find("single slide", "tcssa") if "speedup_vs_reference" in r}
    if ours:
        speed = ", ".join(f"N={n:,}: {r['speedup_vs_reference']:.2f}x" for n, r in ours.items())
        mem = ", ".join(f"{r.get('peak_rss_vs_reference', float('nan')):.3f}" for r in ours.values())
        met = all(
            r["speedup_vs_reference"] >= 1 and r.get("peak_rss_vs_reference", 9) <= 1 for r in ours.values()
        )
        add(
            "1",
            "one slide, float32: never slower, never more peak memory",
            f"{speed}; peak RSS ratio {mem}",
            met,
        )
    batched = find("cohort compression", "cohort-batched")
    if batched:
        r = batched[0]
        add(
            "2",
            f"cohort compression ({r['slides']} slides): >= 1.5x slides/s",
            f"{r['speedup_vs_reference']:.2f}x ({r['slides_per_s']:.1f} vs "
            f"{find('cohort compression', 'cohort-reference')[0]['slides_per_s']:.1f} slides/s)",
            r["speedup_vs_reference"] >= 1.5,
        )
    trained = find("cohort training", "train-batched")
    if trained:
        r = trained[0]
        auc = {x["method"]: x for x in rows if x["section"] == "auc"}
        auc_text, auc_ok = "AUC not measured", None
        if "train-batched" in auc and "train-reference" in auc:
            a, b = auc["train-batched"]["test_auc"], auc["train-reference"]["test_auc"]
            auc_text, auc_ok = f"test AUC {a:.3f} (batched) vs {b:.3f} (reference)", a >= b
        add(
            "3",
            "cohort training: >= 3x slides/s, rare-lesion AUC not lower",
            f"{r['speedup_vs_reference']:.2f}x; {auc_text}",
            (r["speedup_vs_reference"] >= 3) and (auc_ok if auc_ok is not None else True),
        )
    bf16 = {r["n"]: r for r in find("single slide", "tcssa-bf16") if "speedup_vs_reference" in r}
    agree = [r for r in rows if r["method"] == "tcssa-bf16 vs tcssa (float32)"]
    if bf16 and agree:
        n = max(bf16)
        a = agree[0]
        add(
            "4",
            "bfloat16 at the largest N: >= 3x the float32 reference; top-2 agreement >= 99%; "
            "tokens within 1e-2",
            f"N={n:,}: {bf16[n]['speedup_vs_reference']:.2f}x; agreement {100 * a['top2_agreement']:.2f}% "
            f"(N={a['n']:,}); token rel. error {a['token_rel_error']:.2e}",
            bf16[n]["speedup_vs_reference"] >= 3
            and a["top2_agreement"] >= 0.99
            and a["token_rel_error"] <= 1e-2,
        )
    stream = find("streaming", "tcssa-h5")
    if stream:
        largest = max(stream, key=lambda r: r["n"])
        exponent = _fit_exponent(stream)
        exact = [r for r in rows if r["method"].startswith("compress_h5 vs")]
        peak = largest.get("peak_rss_mib")
        add(
            "5",
            f"compress_h5 at N={largest['n']:,} (D={config.dim}, float16 file): peak RSS < 1 GiB, "
            "time ~ N^1, exact",
            f"peak RSS {peak:.0f} MiB; time exponent {exponent:.3f} over N={min(r['n'] for r in stream):,}.."
            f"{largest['n']:,}; max |token diff| {exact[0]['token_max_abs_diff']:.1e}"
            if peak is not None and exponent is not None and exact
            else "incomplete",
            None
            if peak is None or not exact
            else peak < 1024 and exact[0]["token_max_abs_diff"] <= 1e-4 and largest["n"] >= 1_000_000,
        )
    floors = [
        r for r in find("single slide", "tcssa") + find("single slide", "reference") if "floor_fraction" in r
    ]
    if floors:
        text = "; ".join(f"{r['method']} N={r['n']:,}: {r['floor_fraction']:.2f}" for r in floors)
        add(
            "6",
            "time per patch against the floor (gate product + one read of the expert weights)",
            text,
            None,
        )
    alternatives = []
    for m in ("abmil", "transmil", "dense-attention"):
        ran = [r["n"] for r in find("single slide", m) if "time_ms" in r]
        failed = [r["n"] for r in find("single slide", m) if r.get("status", "ok") != "ok"]
        if ran or failed:
            alternatives.append(
                f"{m}: ran to N={max(ran):,}" + (f", stopped at N={min(failed):,}" if failed else "")
                if ran
                else f"{m}: stopped at N={min(failed):,}"
            )
    if alternatives:
        add("7", "alternatives in the same table: where O(N^2) stops", "; ".join(alternatives), None)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    add(
        "8",
        "the same table on a GPU",
        f"not run (GPU present: {gpu})" if gpu else "no GPU on this machine",
        None,
    )
    return targets


# ============================================================================ output
COLUMNS = [
    "section",
    "method",
    "n",
    "time_ms",
    "us_per_patch",
    "speedup_vs_reference",
    "peak_rss_mib",
    "work_mib",
    "peak_rss_vs_reference",
    "floor_ms",
    "floor_fraction",
    "slides",
    "slides_per_s",
    "probe_s",
    "batch_size",
    "chunk_size",
    "top2_agreement",
    "token_rel_error",
    "token_max_abs_diff",
    "test_auc",
    "status",
    "note",
]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return f"{value:.1e}"
    return str(value)


def format_table(result: BenchResult) -> str:
    """The rows as plain-text tables, one per section, with only the columns that section fills."""
    lines = []
    for section in dict.fromkeys(r["section"] for r in result.rows):
        rows = [r for r in result.rows if r["section"] == section]
        columns = [c for c in COLUMNS[1:] if any(c in r for r in rows) and c != "note"]
        cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines += ["", f"## {section}", "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        notes = sorted({r["note"] for r in rows if r.get("note")})
        lines += [f"  note: {note}" for note in notes]
    if result.targets:
        lines += ["", "## targets"]
        for t in result.targets:
            met = {True: "MET", False: "NOT MET", None: "report"}[t["met"]]
            lines.append(f"{t['item']}. [{met}] {t['target']}: {t['measured']}")
    return "\n".join(lines).lstrip("\n")


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "bench.json",
        "csv": out_dir / "bench.csv",
        "plot": out_dir / "bench_scaling.png",
    }
    payload = {"meta": result.meta, "targets": result.targets, "rows": result.rows}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    plot_scaling(result, paths["plot"])
    return paths


def plot_scaling(result: BenchResult, path: Path) -> None:
    """Time and peak memory against N, log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("time_ms", "time per slide (ms)"), ("peak_rss_mib", "peak RSS of the process (MiB)"))
    methods = dict.fromkeys(r["method"] for r in result.rows if r["section"] in ("single slide", "streaming"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in methods:
            points = sorted(
                (r["n"], r[key])
                for r in result.rows
                if r["method"] == m and key in r and r["section"] in ("single slide", "streaming")
            )
            if points:
                style = "--" if m.startswith(("gate-product", "expert-read")) else "-"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patches per slide N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    machine = result.meta.get("machine", {})
    fig.suptitle(
        f"TC-SSA speed and memory, D={result.meta.get('config', {}).get('dim')} ({machine.get('cpu')})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("single", "agreement", "streaming", "cohort", "training", "auc")


def run_bench(
    config: BenchConfig, out_dir: str | Path, sections: Sequence[str] = SECTIONS, progress: bool = True
) -> tuple[BenchResult, dict[str, Path]]:
    """Run the benchmark sections, write bench.json, bench.csv and bench_scaling.png into ``out_dir``."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    start = time.perf_counter()
    load = os.getloadavg if hasattr(os, "getloadavg") else lambda: None
    machine = {**machine_description(), "load_average_start": load()}
    default_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    machine["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tcssa-bench-") as work:
        bench = _Bench(config, Path(work), progress)
        steps = {
            "single": bench.single_slide,
            "agreement": bench.agreement,
            "streaming": bench.streaming,
            "cohort": bench.cohort_compression,
            "training": bench.cohort_training,
            "auc": bench.cohort_auc,
        }
        section_seconds = {}
        for name in tqdm([s for s in SECTIONS if s in sections], desc="bench", disable=not progress):
            began = time.perf_counter()
            steps[name]()
            section_seconds[name] = round(time.perf_counter() - began, 1)
    machine["load_average_end"] = load()
    torch.set_num_threads(default_threads)
    result = bench.result
    result.meta = {
        "command": "tcssa bench" + (" --quick" if config.quick else ""),
        "config": asdict(config),
        "machine": machine,
        "seconds": time.perf_counter() - start,
        "section_seconds": section_seconds,
        "methods": METHODS,
        "how": __doc__.split("How it measures", 1)[1].strip(),
    }
    result.targets = evaluate_targets(result, config)
    return result, write_outputs(result, Path(out_dir))


def measure_h5_streaming(
    work_dir: str | Path, num_patches: int, dim: int = 1024, chunk_size: int = 16_384
) -> dict:
    """Write a float16 slide of ``num_patches`` x ``dim`` and compress it with compress_h5 in a child
    process; returns that child's peak RSS and time (the bounded-memory check of the slow test)."""
    config = replace(BenchConfig(), dim=dim, chunk_size=chunk_size)
    path = write_h5_slide(Path(work_dir) / f"slide_{num_patches}.h5", num_patches, dim)
    return probe_memory("tcssa-h5", [num_patches], config, files={str(num_patches): str(path)})[0]
