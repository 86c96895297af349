"""A large pyramidal slide made of real tissue, for measuring `tcssa extract` at a realistic size.

The slides in ../shared/data/wsi are small (the CMU-1 region is 2220 x 2967 px, one level). This
script repeats a real slide's level 0, mirrored so that neighbours join without seams, into a square
of ``--size`` px and writes it as a tiled, JPEG-compressed pyramidal TIFF (levels halving until the
smallest is under 1024 px) with the source's mpp in its resolution tags. OpenSlide opens it as a
generic TIFF with a real pyramid, so the thumbnail and tissue come from a small level, as on a scan.

    python scripts/mosaic_slide.py ../shared/data/wsi/cmu-1-small-region.svs /tmp/mosaic.tif --size 12288
    python scripts/extract_throughput.py /tmp/mosaic.tif

The result is a benchmark input, not data: the tissue is the same region many times.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from tcssa.wsi.slide import open_slide


def mosaic(source: np.ndarray, size: int) -> np.ndarray:
    """``source`` (H x W x 3) tiled over a ``size`` x ``size`` square, every other copy mirrored."""
    height, width = source.shape[:2]
    row = np.concatenate([source, source[:, ::-1]], axis=1)
    block = np.concatenate([row, row[::-1]], axis=0)  # 2H x 2W, seamless when repeated
    reps = (-(-size // block.shape[0]), -(-size // block.shape[1]), 1)
    return np.ascontiguousarray(np.tile(block, reps)[:size, :size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a slide tcssa can open (its level 0 is repeated)")
    parser.add_argument("out", help="the TIFF to write")
    parser.add_argument("--size", type=int, default=12288, help="side of the square, level-0 px")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args()
    if args.size < 256:
        parser.error(f"--size must be at least 256, got {args.size}")

    import tifffile  # optional dependency (the `wsi` extra)

    with open_slide(args.source) as slide:
        info = slide.info
        source = slide.read_region((0, 0), 0, (info.width, info.height))
    level = mosaic(source, args.size)
    per_cm = 1e4 / info.mpp
    with tifffile.TiffWriter(args.out, bigtiff=True) as writer:
        scale = 1
        while True:
            writer.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": args.quality},
                subfiletype=0 if scale == 1 else 1,
                resolution=(per_cm / scale, per_cm / scale),
                resolutionunit="CENTIMETER",
            )
            if max(level.shape[:2]) < 1024:
                break
            half = (max(1, level.shape[1] // 2), max(1, level.shape[0] // 2))
            level = np.asarray(Image.fromarray(level).reduce(2).resize(half))
            scale *= 2
    print(f"{args.out}: {args.size} x {args.size} px at {info.mpp:.3f} mpp from {info.path.name}")


if __name__ == "__main__":
    main()
