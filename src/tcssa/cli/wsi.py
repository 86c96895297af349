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
from pathlib import Path

from tcssa.cli.flags import add_config_flags, config_from_args
from tcssa.wsi.config import ExtractConfig


def write_slide_previews(preview, folder: Path) -> list[Path]:
    """``{slide}.png`` (the thumbnail), ``{slide}_mask.png`` (the tissue) and ``{slide}_grid.png`` (the
    tiles) in ``folder``, from a tcssa.wsi.extract.SlidePreview."""
    from PIL import Image  # Pillow comes with matplotlib, which tcssa.viz needs

    from tcssa.io.files import atomic_output
    from tcssa.viz import slides as figures

    name, grid = preview.info.name, preview.grid
    thumbnail = folder / f"{name}.png"
    with atomic_output(thumbnail) as partial:
        Image.fromarray(preview.thumbnail).save(partial, format="PNG")
    mask = figures.mask_overlay(preview.thumbnail, preview.tissue.mask, title=f"{name}: tissue")
    tiles = figures.tile_grid_overlay(
        preview.thumbnail,
        preview.downsample,
        grid.coords,
        grid.patch_size_level0,
        title=f"{name}: {len(grid.coords)} tiles at {grid.target_magnification}x",
    )
    return [
        thumbnail,
        figures.save_png(mask, folder / f"{name}_mask.png"),
        figures.save_png(tiles, folder / f"{name}_grid.png"),
    ]


def _cmd_extract(args: argparse.Namespace) -> int:
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
