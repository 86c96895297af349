"""Where the time of `tcssa extract` goes on one slide: reading, tissue, tiling against the encoder.

Runs each stage of the pipeline on its own, on the same tiles, and prints seconds per stage, tiles per
second and the share of the encoder's own time that everything before it costs (issue 14's target:
under 15%). Then times the whole `extract_slide` for comparison, and the peak resident memory.

    python scripts/extract_throughput.py ../shared/data/wsi/cmu-1-small-region.svs \
        --encoders capricorn-densenet121 handcrafted --batch-size 32

Record the CPU (`lscpu`) beside the numbers: they are this machine's, not a property of tcssa.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from tcssa.io.geojson import save_tissue_geojson
from tcssa.wsi.encoders import build_encoder
from tcssa.wsi.extract import extract_slide
from tcssa.wsi.slide import open_slide
from tcssa.wsi.tiling import read_tile, tile_slide
from tcssa.wsi.tissue import detect_tissue, detection_image


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide")
    parser.add_argument("--encoders", nargs="+", default=["capricorn-densenet121", "handcrafted"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--magnification", type=int, default=20)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with open_slide(args.slide) as slide:
        (thumbnail, downsample), t_thumb = _timed(slide.thumbnail, 2048)
        mask, t_tissue = _timed(
            lambda: detect_tissue(*detection_image(thumbnail, downsample, slide.info.mpp))
        )
        with tempfile.TemporaryDirectory() as tmp:
            _, t_geojson = _timed(save_tissue_geojson, mask, f"{tmp}/tissue.geojson")
        grid, t_grid = _timed(
            tile_slide,
            slide.info,
            mask.mask,
            mask.downsample,
            target_magnification=args.magnification,
            patch_size=args.patch_size,
            min_tissue=args.min_tissue,
        )
        tiles, t_read = _timed(lambda: np.stack([read_tile(slide, grid, i) for i in range(len(grid))]))
    before = t_thumb + t_tissue + t_geojson + t_grid + t_read
    print(
        f"{args.slide}: {len(grid)} tiles at {args.magnification}x/{args.patch_size}, "
        f"tissue {mask.mask.mean():.3f} of the thumbnail, {torch.get_num_threads()} torch thread(s)"
    )
    print(
        f"  thumbnail {t_thumb:.2f} s, tissue {t_tissue:.2f} s, geojson {t_geojson:.2f} s, "
        f"grid {t_grid:.3f} s, reading the tiles {t_read:.2f} s ({len(grid) / t_read:.0f} tiles/s)"
    )
    for name in args.encoders:
        encoder = build_encoder(name).place("cpu")
        encoder.encode(torch.as_tensor(tiles[:2]))  # warm-up: first-call allocations, not the steady rate
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(tiles), args.batch_size):
                encoder.encode(torch.as_tensor(tiles[start : start + args.batch_size]))
        t_encode = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            _, t_whole = _timed(
                extract_slide,
                args.slide,
                tmp,
                encoder,
                target_magnification=args.magnification,
                patch_size=args.patch_size,
                min_tissue=args.min_tissue,
                batch_size=args.batch_size,
                device="cpu",
                progress=False,
            )
        print(
            f"  {name}: encoder {t_encode:.2f} s ({len(tiles) / t_encode:.1f} tiles/s); everything before "
            f"it {before:.2f} s = {100 * before / t_encode:.0f}% of the encoder's time; whole "
            f"extract_slide {t_whole:.2f} s ({len(tiles) / t_whole:.1f} tiles/s)"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak resident memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
