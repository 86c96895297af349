"""What ``tcssa extract`` does to each slide (``ExtractConfig``): encoder, magnification, tiles, batches.

Imports neither torch nor numpy, so ``tcssa --help`` stays fast: ``tcssa.cli.flags`` makes one flag of
each field, with its help and default. The field names are the keyword arguments of
``tcssa.wsi.extract.extract_slide`` and ``extract_folder`` (``extract_folder(slides, out,
**asdict(config))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ExtractConfig:
    encoder: str = field(
        default="capricorn-densenet121",
        metadata={
            "help": "patch encoder: capricorn-densenet121, handcrafted (weak, for tests), resnet50-trunc, "
            "uni, uni2, conch, or module:callable returning a PatchEncoder"
        },
    )
    weights: str | None = field(
        default=None,
        metadata={"help": "local weight file of the encoder (uni, uni2, conch, resnet50-trunc need one)"},
    )
    mpp: float | None = field(
        default=None,
        metadata={
            "help": "microns per level-0 pixel, overriding the slide's metadata (default: the metadata; "
            "without it 0.5, i.e. 20x, with a warning)"
        },
    )
    target_magnification: int = field(
        default=20,
        metadata={"flag": "--magnification", "help": "objective magnification the tiles are taken at"},
    )
    patch_size: int = field(default=256, metadata={"help": "tile side in pixels at that magnification"})
    overlap: int = field(
        default=0, metadata={"help": "pixels (at that magnification) each tile shares with the next"}
    )
    min_tissue: float = field(
        default=0.5,
        metadata={"help": "smallest share of a tile the tissue mask must cover for it to be kept"},
    )
    mask_path: str | None = field(
        default=None,
        metadata={
            "flag": "--mask",
            "help": "tissue mask instead of detecting tissue: a GeoJSON or mask image for one slide, or a "
            "folder of SLIDE.geojson / SLIDE.png / SLIDE.tif (a slide without one has its tissue detected)",
        },
    )
    thumbnail_size: int = field(
        default=2048,
        metadata={"help": "longest side in pixels of the thumbnail tissue is detected on and drawn over"},
    )
    batch_size: int = field(default=32, metadata={"help": "tiles per encoder batch"})
    num_workers: int = field(
        default=0, metadata={"flag": "--workers", "help": "DataLoader processes reading tiles (0: this one)"}
    )
    device: str = field(
        default="auto",
        metadata={"help": "where the encoder runs: auto (CUDA when present), cpu, cuda, cuda:1, ..."},
    )
    precision: Literal["auto", "float32"] = field(
        default="auto",
        metadata={
            "help": "auto: bfloat16 (or float16) autocast on a GPU, float32 on the CPU; float32: never"
        },
    )
