"""``tcssa extract``: slide files to TRIDENT-layout feature files (tcssa.wsi.extract).

The options are ExtractConfig's fields (tcssa.cli.flags makes a flag of each). The thumbnails are
drawn here, from tcssa.viz.slides, because tcssa.wsi may not import tcssa.viz: the library takes
what draws them as its ``previews`` argument.

Handlers import the library inside the function, the one justified use of function-local imports
here: ``tcssa --help`` then loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses

from tcssa.cli.flags import add_config_flags, config_from_args
from tcssa.wsi.config import ExtractConfig


def _cmd_extract(args: argparse.Namespace) -> int:
    from tcssa.apps.slide_slots import write_slide_previews
    from tcssa.wsi.extract import extract_folder

    config = config_from_args(args, ExtractConfig())
    result = extract_folder(
        args.slides,
        args.out,
        previews=None if args.no_thumbnails else write_slide_previews,
        progress=not args.no_progress,
        **dataclasses.asdict(config),
    )
    print(result.summary())
    return 1 if result.failed else 0


def _cmd_slotmap(args: argparse.Namespace) -> int:
    from tcssa.apps.slide_slots import slot_map

    done = slot_map(
        args.slide,
        args.out,
        checkpoint=args.checkpoint,
        encoder=args.encoder,
        weights=args.weights,
        num_slots=args.num_slots,
        seed=args.seed,
        mpp=args.mpp,
        device=args.device,
    )
    print(f"{done.slide}: {done.agreement.text()}")
    print(f"compressor: {done.compressor}; picture {done.picture}; numbers {done.summary}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    extract = commands.add_parser(
        "extract",
        help="slide files (.svs .tif .ndpi ...) to patch features in TRIDENT's h5 layout, resumable",
        description="Detect tissue, tile at a magnification and encode each tile: OUT/features_ENCODER/"
        "SLIDE.h5 (features N x D, coords N x 2, TRIDENT's attributes), OUT/contours_geojson/SLIDE.geojson "
        "(the tissue, for QuPath) and OUT/thumbnails/SLIDE*.png. A slide whose feature file exists is "
        "skipped, so an interrupted run continues where it stopped; a slide that fails is reported and "
        "the run goes on (exit status 1 if any failed). Under torchrun each process takes every "
        "WORLD_SIZE-th slide.",
    )
    extract.add_argument("slides", metavar="SLIDES", help="a slide file, or a folder of them (not recursive)")
    extract.add_argument("--out", required=True, help="output folder (TRIDENT's job folder layout)")
    add_config_flags(extract, ExtractConfig)
    extract.add_argument(
        "--no-thumbnails", action="store_true", help="write no thumbnail PNGs (tissue mask, tile grid)"
    )
    extract.add_argument("--no-progress", action="store_true", help="no progress bars")
    extract.set_defaults(func=_cmd_extract)

    slotmap = commands.add_parser(
        "slotmap",
        help="one slide to a picture: extract its tiles, route them through TC-SSA, draw each tile's top-1 "
        "slot beside its tissue class, and measure how well slots follow tissue (NMI, ARI vs random routing)",
    )
    slotmap.add_argument("slide", help="a slide file (svs, tiff, ndpi, mrxs: what OpenSlide/tiffslide read)")
    slotmap.add_argument("--out", required=True, help="output folder (features, thumbnails, slotmaps/)")
    slotmap.add_argument(
        "--checkpoint",
        help="a `tcssa train` fold folder or model.safetensors of a tcssa model trained on this encoder's "
        "features (default: an untrained compressor, whose gate is a random linear map)",
    )
    slotmap.add_argument(
        "--encoder",
        default="capricorn-densenet121",
        help="patch encoder; the tissue-class map needs capricorn-densenet121's class probabilities",
    )
    slotmap.add_argument("--weights", help="local weight file of the encoder, where it needs one")
    slotmap.add_argument("--num-slots", type=int, default=32, help="K of the untrained compressor")
    slotmap.add_argument("--seed", type=int, default=0, help="seed of the untrained compressor and baseline")
    slotmap.add_argument("--mpp", type=float, help="microns per level-0 pixel, overriding the metadata")
    slotmap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    slotmap.set_defaults(func=_cmd_slotmap)
