"""Issue 17, item 5: the bench's single-slide, cohort, bfloat16 and streaming rows and a training step
on one device, beside the published formulation (``tcssa.bench.reference``), in a few minutes.

    python scripts/gpu_bench.py --device cuda            # benchmarks/gpu_bench.sh runs this
    python scripts/gpu_bench.py --device cpu --tiny      # the same code paths in seconds (tested)

Every time is the median of ``--repeats`` calls after one warm-up, with the device synchronised
around each call; ratios are to the reference measured in the same process. Prints the device name,
then one line per measurement; record them with the machine in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tcssa.bench.measure import quiet_bfloat16_warning
from tcssa.bench.reference import ReferenceTCSSA, build_classifiers, optimizer_step, train_epoch_reference
from tcssa.bench.workloads import synthetic_slide, write_h5_slide
from tcssa.data.batching import pad_slides
from tcssa.io.chunks import compress_h5
from tcssa.io.published import to_published
from tcssa.method.compressor import TCSSA


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _agreement(a, b) -> float:
    return float((a.topk_index.sort(-1).values == b.topk_index.sort(-1).values).all(-1).float().mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def single_slide(args, device: torch.device) -> None:
    torch.manual_seed(0)
    ours = TCSSA(args.dim).eval().to(device)
    reference = ReferenceTCSSA(args.dim).eval().to(device)
    reference.load_state_dict(to_published(ours))
    half = TCSSA(args.dim).eval().to(device)
    half.load_state_dict(ours.state_dict())
    half = half.bfloat16()
    for n in args.sizes:
        x = synthetic_slide(n, args.dim, 7).to(device)
        low = x.bfloat16()
        calls = {
            "reference": lambda x=x: reference(x),
            "tcssa": lambda x=x: ours(x),
            "tcssa-bf16": lambda low=low: half(low),
        }
        seconds = {}
        with torch.inference_mode():
            for name, call in calls.items():
                seconds[name] = timed(call, device, args.repeats)
            for mode in ("bf16-gate", "bf16-aggregate"):
                ours.set_mixed_precision(mode)
                seconds[f"tcssa-{mode}"] = timed(lambda x=x: ours(x), device, args.repeats)
                mixed = ours(x)
                ours.set_mixed_precision(None)
                full = ours(x)
                print(
                    f"agreement  N={n:>9,}  tcssa-{mode:<15} top-2 {100 * _agreement(full, mixed):.2f}%  "
                    f"tokens {_rel(mixed.tokens, full.tokens):.2e}"
                )
            full, whole_bf16 = ours(x), half(low)
            print(
                f"agreement  N={n:>9,}  tcssa-bf16      top-2 {100 * _agreement(full, whole_bf16):.2f}%  "
                f"tokens {_rel(whole_bf16.tokens, full.tokens):.2e}"
            )
        for name, s in seconds.items():
            print(
                f"single     N={n:>9,}  {name:<20} {1000 * s:9.2f} ms  "
                f"{seconds['reference'] / s:5.2f}x reference"
            )
        if args.compile:
            compiled = torch.compile(ours, dynamic=True)
            with torch.inference_mode():
                started = time.perf_counter()
                compiled(x)
                _sync(device)
                first = time.perf_counter() - started
                s = timed(lambda c=compiled, x=x: c(x), device, args.repeats)
            print(
                f"single     N={n:>9,}  tcssa-compiled       {1000 * s:9.2f} ms  "
                f"{seconds['reference'] / s:5.2f}x reference ({seconds['tcssa'] / s:.2f}x eager; "
                f"first call {first:.1f} s)"
            )


def _cohort(args, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    low, high = args.cohort_patches
    lengths = torch.randint(low, high + 1, (args.cohort_slides,), generator=gen).tolist()
    return [synthetic_slide(n, args.dim, 100 + i).to(device) for i, n in enumerate(lengths)]


def cohort(args, device: torch.device) -> None:
    torch.manual_seed(0)
    ours = TCSSA(args.dim).eval().to(device)
    reference = ReferenceTCSSA(args.dim).eval().to(device)
    reference.load_state_dict(to_published(ours))
    slides, size = _cohort(args, device), args.batch_size
    calls = {
        "reference, one by one": lambda: [reference(x)[0] for x in slides],
        "tcssa, one by one": lambda: [ours(x).tokens for x in slides],
        "compress_slides": lambda: ours.compress_slides(slides, size),
        "forward_slides": lambda: [
            ours.forward_slides(slides[i : i + size]) for i in range(0, len(slides), size)
        ],
        "padded forward": lambda: [
            ours(*pad_slides(slides[i : i + size])) for i in range(0, len(slides), size)
        ],
    }
    with torch.inference_mode():
        seconds = {name: timed(call, device, args.repeats) for name, call in calls.items()}
    ref = seconds["reference, one by one"]
    for name, s in seconds.items():
        print(
            f"cohort     {len(slides)} slides  {name:<22} {len(slides) / s:9.1f} slides/s  "
            f"{ref / s:5.2f}x reference"
        )


def streaming(args, device: torch.device) -> None:
    torch.manual_seed(0)
    model = TCSSA(args.dim).eval().to(device)
    with tempfile.TemporaryDirectory(prefix="tcssa-gpu-bench-") as tmp:
        path = write_h5_slide(Path(tmp) / "slide.h5", args.stream_patches, args.dim)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s = timed(lambda: compress_h5(model, path, chunk_size=args.chunk_size), device, 1)
        peak = torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else float("nan")
    print(
        f"streaming  N={args.stream_patches:>9,}  compress_h5 (float16 h5)  {s:7.2f} s  "
        f"{args.stream_patches / s:,.0f} patches/s  device peak {peak:.0f} MiB"
    )


def training(args, device: torch.device) -> None:
    slides = _cohort(args, device)[: args.train_slides]
    labels = (torch.arange(len(slides)) % 2).to(device)
    reference, ref_opt, packed, opt = build_classifiers(args.dim, 2, 32, 0, len(slides))
    _, _, padded, padded_opt = build_classifiers(args.dim, 2, 32, 0, len(slides))
    for model in (reference, packed, padded):
        model.to(device).train()

    def reference_steps() -> None:  # the published loop: one slide, one step
        train_epoch_reference(reference, ref_opt, slides, labels, range(len(slides)))

    def step(model, optimizer, *batch) -> None:
        optimizer_step(optimizer, model.compute_loss(labels, *batch)[1])

    calls = {
        "reference (one slide per step)": reference_steps,
        "one step, list of slides": lambda: step(packed, opt, slides),
        "one step, padded and masked": lambda: step(padded, padded_opt, *pad_slides(slides)),
    }
    seconds = {name: timed(call, device, args.repeats) for name, call in calls.items()}
    ref = seconds["reference (one slide per step)"]
    for name, s in seconds.items():
        print(
            f"training   {len(slides)} slides  {name:<31} {len(slides) / s:8.1f} slides/s  "
            f"{ref / s:5.2f}x reference"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes: the code paths in seconds")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the compressor")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = {
        "dim": 1024,
        "sizes": (1_000, 10_000, 100_000),
        "cohort_slides": 48,
        "cohort_patches": (1_000, 10_000),
    }
    sizes.update(batch_size=16, train_slides=16, stream_patches=1_000_000, chunk_size=65_536)
    if args.tiny:
        sizes = {"dim": 64, "sizes": (300,), "cohort_slides": 6, "cohort_patches": (50, 200)}
        sizes.update(batch_size=3, train_slides=4, stream_patches=2_000, chunk_size=512)
        args.repeats = 1
    for name, value in sizes.items():
        setattr(args, name, value)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device     {device} ({name}); torch {torch.__version__}")
    with warnings.catch_warnings():
        quiet_bfloat16_warning()
        for section in (single_slide, cohort, streaming, training):
            started = time.perf_counter()
            section(args, device)
            print(f"section    {section.__name__} took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
