"""From slide files to TRIDENT-layout feature files: ``extract_slide`` (one slide), ``extract_folder``.

One slide: open it (``tcssa.wsi.slide``), take a thumbnail, find the tissue on it
(``tcssa.wsi.tissue.detect_tissue``, or a mask given as a GeoJSON or an image through
``tcssa.io.geojson.load_tissue_mask``), save the tissue as GeoJSON, tile it
(``tcssa.wsi.tiling.tile_slide``), read the tiles through a DataLoader (``TileDataset``, one slide
handle per worker) and encode them (``tcssa.wsi.encoders``: inference mode, channels-last on a GPU,
bfloat16 or float16 autocast on a GPU only), streaming each batch into
``tcssa.io.features.FeatureFileWriter``. The output folder has TRIDENT's job layout:

    OUT/features_{encoder}/{slide}.h5      features, coords, extras, TRIDENT's attributes
    OUT/contours_geojson/{slide}.geojson   the tissue, level-0 polygons QuPath opens
    OUT/thumbnails/{slide}*.png            drawn by the ``previews`` callable when one is given

The thumbnails are figures, and figures are ``tcssa.viz``'s, which ``tcssa.wsi`` may not import: the
caller passes what draws them (``tcssa extract`` passes tcssa.viz.slides' drawings). A slide file
is named by its stem (``a.svs`` -> ``a``), as TRIDENT names it.

A folder run (``extract_folder``) resumes: a slide is done when its final feature file exists (it
is renamed into place only when complete, so a file there is whole; ``*.partial`` files left by a
killed run are ignored). A slide that fails (not a slide, a truncated file, an unreadable region, a
magnification the slide does not have) is reported with the reason and the run goes on; the
failures are listed in the result. Under ``torchrun`` each process takes ``slides[rank::world]``;
the processes find each other through Accelerate's ``PartialState`` (gloo on the CPU), as
tcssa.runtime.process_state does. Progress bars (slides, and the tiles of each slide) show on
the main process only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import tcssa
from tcssa.io import geojson
from tcssa.io.features import FeatureFileWriter
from tcssa.runtime import process_state
from tcssa.wsi import encoders, tiling, tissue
from tcssa.wsi import slide as slide_reader

if TYPE_CHECKING:
    from tcssa.io.geojson import TissueMask
    from tcssa.wsi.encoders import PatchEncoder
    from tcssa.wsi.slide import SlideInfo
    from tcssa.wsi.tiling import TileGrid

#: Files a folder run treats as slides (the formats OpenSlide and tiffslide read), by extension.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
    ".dcm",
)
#: A tissue mask found for a slide in a mask folder: ``{slide}{extension}``, the first that exists.
MASK_EXTENSIONS = (".geojson", ".json", ".png", ".tif", ".tiff")
CONTOURS_DIR = "contours_geojson"
THUMBNAILS_DIR = "thumbnails"


def features_dir(out_dir: str | Path, encoder_name: str) -> Path:
    """``OUT/features_{encoder}``: TRIDENT's folder of one encoder's feature files."""
    return Path(out_dir) / f"features_{encoder_name}"


@dataclass(frozen=True)
class SlidePreview:
    """What a slide's thumbnails are drawn from: the thumbnail (downsample = level-0 px per
    thumbnail px), the tissue mask and the tile grid (level-0 coords)."""

    info: SlideInfo
    thumbnail: np.ndarray
    downsample: float
    tissue: TissueMask
    grid: TileGrid


#: Draws a slide's thumbnails into the folder it is given (``OUT/thumbnails``).
PreviewWriter = Callable[[SlidePreview, Path], object]


@dataclass(frozen=True)
class SlideDone:
    slide: Path
    features: Path
    tiles: int
    seconds: float


@dataclass(frozen=True)
class SlideFailure:
    slide: Path
    reason: str


@dataclass
class ExtractResult:
    """What one process of a folder run did: slides written, skipped (already done), failed."""

    features_dir: Path
    done: list[SlideDone] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # the feature files that were there already
    failed: list[SlideFailure] = field(default_factory=list)
    rank: int = 0
    world: int = 1

    @property
    def tiles(self) -> int:
        return sum(d.tiles for d in self.done)

    def summary(self) -> str:
        """A few lines for the terminal: counts, tiles per second, then each failure and its reason."""
        seconds = sum(d.seconds for d in self.done)
        rate = (
            f", {self.tiles / seconds:.1f} tiles/s with tissue detection"
            if seconds > 0 and self.tiles
            else ""
        )
        empty = sum(1 for d in self.done if d.tiles == 0)
        where = f"process {self.rank} of {self.world}: " if self.world > 1 else ""
        lines = [
            f"{where}{len(self.done)} slides extracted ({self.tiles:,} tiles{rate}"
            + (f"; {empty} without tissue tiles, written empty" if empty else "")
            + f"), {len(self.skipped)} skipped (already done), {len(self.failed)} failed",
            f"features: {self.features_dir}",
        ]
        if self.failed:
            lines.append("failed:")
            lines.extend(f"  {f.slide}: {f.reason}" for f in self.failed)
        return "\n".join(lines)


def list_slides(slides: str | Path) -> list[Path]:
    """A slide file as given, or the slide files of a folder (by ``SLIDE_EXTENSIONS``, not recursive,
    sorted). Two slides of one stem would write one feature file: a ValueError naming both."""
    slides = Path(slides)
    if slides.is_file():
        return [slides]
    if not slides.is_dir():
        raise FileNotFoundError(f"no such slide file or folder: {slides}")
    found = sorted(
        p
        for p in slides.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_EXTENSIONS
    )
    by_stem: dict[str, Path] = {}
    for path in found:
        if path.stem in by_stem:
            raise ValueError(f"{by_stem[path.stem]} and {path} would both write {path.stem}.h5: rename one")
        by_stem[path.stem] = path
    return found


def process_share(device: str = "auto") -> tuple[int, int, bool, int]:
    """(rank, world size, is main process, local rank) of this process.

    Launched by ``torchrun`` with several processes, the first call joins their process group
    (``tcssa.runtime.process_state``); a process started without torchrun joins none.
    """
    state = process_state(device)
    return state.process_index, state.num_processes, state.is_main_process, state.local_process_index


def resolve_device(requested: str = "auto", *, local_rank: int = 0, several: bool = False) -> torch.device:
    """``auto``: CUDA when present, else the CPU; under several processes ``cuda`` is this process's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and several:
        return torch.device("cuda", local_rank)
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ValueError(f"unknown device {requested!r} (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


def _check_options(
    *,
    target_magnification,
    patch_size,
    overlap,
    min_tissue,
    batch_size,
    num_workers,
    thumbnail_size,
    precision,
) -> None:
    problems = []
    if target_magnification <= 0:
        problems.append(f"magnification must be positive, got {target_magnification}")
    if patch_size < 1:
        problems.append(f"patch size must be at least 1 pixel, got {patch_size}")
    if not 0 <= overlap < patch_size:
        problems.append(f"overlap must be at least 0 and below the patch size {patch_size}, got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        problems.append(f"min tissue is a share of the tile, from 0 to 1, got {min_tissue}")
    if batch_size < 1:
        problems.append(f"batch size must be at least 1, got {batch_size}")
    if num_workers < 0:
        problems.append(f"workers must be 0 or more, got {num_workers}")
    if thumbnail_size < 64:
        problems.append(f"thumbnail size must be at least 64 pixels, got {thumbnail_size}")
    if precision not in ("auto", "float32"):
        problems.append(f"precision must be auto or float32, got {precision!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _prepare_encoder(encoder: PatchEncoder | str, weights, device: torch.device) -> PatchEncoder:
    if isinstance(encoder, str):
        encoder = encoders.build_encoder(encoder, weights)
    encoder = encoder.to(device).eval()
    if device.type == "cuda":  # channels-last convolutions are faster on a GPU
        encoder = encoder.to(memory_format=torch.channels_last)
    return encoder


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if device.type != "cuda" or precision == "float32":
        return None  # the CPU stays float32: bfloat16 is emulated, slowly, on most CPUs
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def _encode(
    encoder: PatchEncoder, tiles: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = encoder.preprocess(tiles.to(device, non_blocking=True))
    if device.type == "cuda" and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        both = getattr(encoder, "features_and_extras", None)  # one pass for both, where an encoder has it
        if both is not None:
            features, extras = both(images)
        else:
            features = encoder(images)
            extras = encoder.extras(images) if encoder.extra_names else {}
    return features.float().cpu(), {name: values.float().cpu() for name, values in extras.items()}


def failure_reason(err: Exception) -> str:
    """One line for a failed slide: tcssa's errors (ValueError, OSError) name the file already; others
    get their type. An error raised in a DataLoader worker arrives with the worker's traceback in its
    message: its last line is the original error."""
    text = str(err)
    if "Original Traceback" in text:
        return [line for line in text.splitlines() if line.strip()][-1].strip()
    return text if isinstance(err, ValueError | OSError) else f"{type(err).__name__}: {text}"


def mask_file_for(slide_path: Path, mask_path: str | Path | None) -> Path | None:
    """The tissue mask of a slide: ``mask_path`` itself when it is a file, ``{stem}{ext}`` in it when
    it is a folder (None when the folder has none: the tissue is then detected)."""
    if mask_path is None:
        return None
    mask_path = Path(mask_path)
    if mask_path.is_file():
        return mask_path
    if not mask_path.is_dir():
        raise FileNotFoundError(f"no such tissue mask file or folder: {mask_path}")
    return next(
        (c for ext in MASK_EXTENSIONS if (c := mask_path / f"{slide_path.stem}{ext}").is_file()), None
    )


def _extract_one(
    slide_path: Path,
    out_dir: Path,
    encoder: PatchEncoder,
    device: torch.device,
    *,
    mpp: float | None,
    target_magnification: int,
    patch_size: int,
    overlap: int,
    min_tissue: float,
    mask_path: str | Path | None,
    thumbnail_size: int,
    batch_size: int,
    num_workers: int,
    precision: str,
    previews: PreviewWriter | None,
    progress: bool,
) -> SlideDone:
    started = time.perf_counter()
    mask_file = mask_file_for(slide_path, mask_path)
    with slide_reader.open_slide(slide_path, mpp=mpp) as slide:
        info = slide.info
        thumbnail, downsample = slide.thumbnail(thumbnail_size)
    if mask_file is not None:
        mask = geojson.load_tissue_mask(mask_file, info.width, info.height, downsample)
    else:
        mask = tissue.detect_tissue(*tissue.detection_image(thumbnail, downsample, info.mpp))
    grid = tiling.tile_slide(
        info,
        mask.mask,
        mask.downsample,
        target_magnification=target_magnification,
        patch_size=patch_size,
        overlap=overlap,
        min_tissue=min_tissue,
    )
    geojson.save_tissue_geojson(mask, out_dir / CONTOURS_DIR / f"{info.name}.geojson")
    if previews is not None:
        previews(SlidePreview(info, thumbnail, downsample, mask, grid), out_dir / THUMBNAILS_DIR)

    folder = features_dir(out_dir, encoder.name)
    path = folder / f"{info.name}.h5"
    coords = np.asarray(grid.coords, dtype=np.int64)
    coords_attrs = {
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "level0_magnification": int(grid.level0_magnification),
        "target_magnification": int(grid.target_magnification),
        "overlap": int(grid.overlap),
        "name": info.name,
        "savetodir": str(out_dir),
        "level0_width": int(info.width),
        "level0_height": int(info.height),
    }
    features_attrs = {"name": info.name, "savetodir": str(folder), "encoder": encoder.name}
    file_attrs = {
        "tcssa_version": tcssa.__version__,
        "slide_file": str(slide_path),
        "slide_backend": info.backend,
        "mpp": float(info.mpp),
        "mpp_source": info.mpp_source,
        "read_level": int(grid.read_level),
        "read_size": int(grid.read_size),
        "min_tissue": float(min_tissue),
        "tissue": str(mask_file) if mask_file is not None else "detected",
    }
    with FeatureFileWriter(
        path,
        encoder.dim,
        coords_attrs=coords_attrs,
        features_attrs=features_attrs,
        extras=dict(encoder.extra_names),
        file_attrs=file_attrs,
    ) as writer:
        if len(coords):
            dataset = tiling.TileDataset(slide_path, grid, info.mpp)
            loader = DataLoader(
                dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
            )
            dtype = _autocast_dtype(device, precision)
            bar = tqdm(total=len(coords), desc=info.name, unit="tile", leave=False, disable=not progress)
            try:
                with bar:
                    for tiles in loader:
                        start = writer.num_rows
                        features, extras = _encode(encoder, torch.as_tensor(tiles), device, dtype)
                        writer.append(features, coords[start : start + len(features)], extras)
                        bar.update(len(features))
            finally:
                close = getattr(dataset, "close", None)  # this process's slide handle, not left to the GC
                if close is not None:
                    close()
            if writer.num_rows != len(coords):  # inside the block: a short file is never renamed into place
                raise RuntimeError(f"{slide_path}: {writer.num_rows} tiles encoded of {len(coords)}")
    return SlideDone(slide_path, path, len(coords), time.perf_counter() - started)


def extract_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    encoder: PatchEncoder | str = "capricorn-densenet121",
    *,
    weights: str | Path | None = None,
    mpp: float | None = None,
    target_magnification: int = 20,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mask_path: str | Path | None = None,
    thumbnail_size: int = 2048,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    previews: PreviewWriter | None = None,
    progress: bool = True,
) -> Path:
    """Extract one slide into ``out_dir`` (the layout of the module docstring); returns the feature
    file. Always writes (no resume check: that is ``extract_folder``'s). ``encoder``: a
    PatchEncoder or a name for ``build_encoder`` (with ``weights``). Errors name the slide."""
    options = dict(
        target_magnification=target_magnification,
        patch_size=patch_size,
        overlap=overlap,
        min_tissue=min_tissue,
        batch_size=batch_size,
        num_workers=num_workers,
        thumbnail_size=thumbnail_size,
        precision=precision,
    )
    _check_options(**options)
    slide_path = Path(slide_path)
    if not slide_path.is_file():
        raise FileNotFoundError(f"no such slide file: {slide_path}")
    torch_device = resolve_device(device)
    prepared = _prepare_encoder(encoder, weights, torch_device)
    done = _extract_one(
        slide_path,
        Path(out_dir),
        prepared,
        torch_device,
        mpp=mpp,
        mask_path=mask_path,
        previews=previews,
        progress=progress,
        **options,
    )
    return done.features


def extract_folder(
    slides: str | Path,
    out_dir: str | Path,
    encoder: PatchEncoder | str = "capricorn-densenet121",
    *,
    weights: str | Path | None = None,
    mpp: float | None = None,
    target_magnification: int = 20,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mask_path: str | Path | None = None,
    thumbnail_size: int = 2048,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    previews: PreviewWriter | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Extract every slide of ``slides`` (a folder, or one slide file) into ``out_dir``.

    Resumable: a slide whose feature file exists is skipped. A failing slide is recorded with its
    reason and the run goes on (``ExtractResult.failed``). Files in ``out_dir`` that are not this
    run's outputs are left alone. Under torchrun this process takes ``slides[rank::world]``. Options
    as ``extract_slide``; bad options, a missing folder, two slides of one name, a mask file given
    for several slides and an encoder that cannot be built raise before any slide is touched.
    """
    options = dict(
        target_magnification=target_magnification,
        patch_size=patch_size,
        overlap=overlap,
        min_tissue=min_tissue,
        batch_size=batch_size,
        num_workers=num_workers,
        thumbnail_size=thumbnail_size,
        precision=precision,
    )
    _check_options(**options)
    paths = list_slides(slides)
    if mask_path is not None:
        if not Path(mask_path).exists():
            raise FileNotFoundError(f"no such tissue mask file or folder: {mask_path}")
        if Path(mask_path).is_file() and len(paths) > 1:
            raise ValueError(
                f"one mask file ({mask_path}) for {len(paths)} slides: give a folder of SLIDE.geojson masks"
            )
    out_dir = Path(out_dir)
    rank, world, is_main, local_rank = process_share(device)
    torch_device = resolve_device(device, local_rank=local_rank, several=world > 1)
    prepared = _prepare_encoder(encoder, weights, torch_device)
    result = ExtractResult(features_dir(out_dir, prepared.name), rank=rank, world=world)
    mine: Sequence[Path] = paths[rank::world]
    show = progress and is_main
    bar = tqdm(mine, desc="slides", unit="slide", disable=not show)
    for slide_path in bar:
        target = result.features_dir / f"{slide_path.stem}.h5"
        if target.is_file():
            result.skipped.append(target)
            continue
        try:
            done = _extract_one(
                slide_path,
                out_dir,
                prepared,
                torch_device,
                mpp=mpp,
                mask_path=mask_path,
                previews=previews,
                progress=show,
                **options,
            )
        except Exception as err:  # one bad slide must not stop a night's run: record it, go on
            reason = failure_reason(err)
            result.failed.append(SlideFailure(slide_path, reason))
            if progress:
                tqdm.write(f"failed: {slide_path}: {reason}", file=sys.stderr)
            continue
        result.done.append(done)
    return result
