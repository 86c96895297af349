"""Stand-ins for the parts tcssa.wsi.extract is built from, behaving as the issue 14 interface says.

``tcssa.wsi.extract`` reads slides (``tcssa.wsi.slide``), detects tissue (``tcssa.wsi.tissue``),
tiles (``tcssa.wsi.tiling``), encodes (``tcssa.wsi.encoders``) and reads/writes tissue masks
(``tcssa.io.geojson``). The tests of its own logic (resume, failures, sharding, output layout, the
empty slide, attributes) swap these for the small fakes here, so they run fast and test extract
alone. A fake slide is a PNG image (any extension), read whole by PIL, at 0.5 um/px (20x) unless an
mpp is given; its tiles are cut from the array.

Until the parts are merged in, ``install_missing_parts`` registers the fakes under the real module
names that are missing, so that ``tcssa.wsi.extract`` can be imported at all; with the real parts
present it does nothing (``REAL_PARTS`` says which case this is).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PART_MODULES = (
    "tcssa.wsi.slide",
    "tcssa.wsi.tiling",
    "tcssa.wsi.tissue",
    "tcssa.wsi.encoders",
    "tcssa.io.geojson",
)


def _present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # ValueError: a stand-in registered here (no __spec__)
        return False


#: Whether the real slide reader, tiling, tissue detection, encoders and geojson are importable.
REAL_PARTS = all(_present(name) for name in PART_MODULES)


class SlideReadError(ValueError):
    pass


@dataclass(frozen=True)
class SlideInfo:
    path: Path
    name: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str
    magnification: int
    backend: str


def magnification_from_mpp(mpp: float) -> int:
    for bound, power in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < bound:
            return power
    raise ValueError(f"mpp {mpp} is beyond 5x")


class Slide:
    def __init__(self, info: SlideInfo, pixels: np.ndarray) -> None:
        self.info, self.pixels = info, pixels

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pixels = None

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        step = max(1, math.ceil(max(self.info.width, self.info.height) / max_size))
        return np.ascontiguousarray(self.pixels[::step, ::step]), float(step)


def open_slide(path, mpp: float | None = None, *, default_mpp: float = 0.5) -> Slide:
    path = Path(path)
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise SlideReadError(f"{path}: not a slide this reader opens ({err})") from err
    height, width = pixels.shape[:2]
    used = mpp if mpp is not None else default_mpp
    info = SlideInfo(
        path, path.stem, width, height, ((width, height),), (1.0,), used,
        "user" if mpp is not None else "metadata", magnification_from_mpp(used), "fake",
    )  # fmt: skip
    return Slide(info, pixels)


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray
    downsample: float


def detect_tissue(thumbnail: np.ndarray, downsample: float, **_) -> TissueMask:
    """Tissue is whatever is darker than near-white."""
    return TissueMask(thumbnail.mean(axis=-1) < 220, float(downsample))


def detection_image(thumbnail: np.ndarray, downsample: float, mpp: float) -> tuple[np.ndarray, float]:
    """Tissue is found on the thumbnail as it is."""
    return thumbnail, float(downsample)


@dataclass(frozen=True)
class TileGrid:
    coords: np.ndarray
    tissue_fraction: np.ndarray
    patch_size: int
    patch_size_level0: int
    target_magnification: int
    level0_magnification: int
    overlap: int
    read_level: int
    read_size: int

    def __len__(self) -> int:
        return len(self.coords)


def tile_slide(
    info: SlideInfo,
    mask: np.ndarray | None = None,
    mask_downsample: float = 1.0,
    *,
    target_magnification: int = 20,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    read_level: int | None = None,
) -> TileGrid:
    if target_magnification > info.magnification:
        raise ValueError(f"{info.path}: {target_magnification}x asked of a {info.magnification}x slide")
    side = round(patch_size * info.magnification / target_magnification)
    step = side - round(overlap * info.magnification / target_magnification)
    coords, fractions = [], []
    for y in range(0, info.height - side + 1, step):  # row-major: rows of x within y
        for x in range(0, info.width - side + 1, step):
            if mask is None:
                share = 1.0
            else:
                window = mask[int(y / mask_downsample) : math.ceil((y + side) / mask_downsample),
                              int(x / mask_downsample) : math.ceil((x + side) / mask_downsample)]  # fmt: skip
                share = float(window.mean()) if window.size else 0.0
            if share >= min_tissue:
                coords.append((x, y))
                fractions.append(share)
    return TileGrid(
        np.asarray(coords, dtype=np.int64).reshape(-1, 2), np.asarray(fractions, dtype=np.float32),
        patch_size, side, target_magnification, info.magnification, overlap, 0, side,
    )  # fmt: skip


class TileDataset(torch.utils.data.Dataset):
    def __init__(self, slide_path, grid: TileGrid, mpp: float | None = None) -> None:
        self.slide_path, self.grid, self.mpp = Path(slide_path), grid, mpp
        self._pixels = None

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = open_slide(self.slide_path, self.mpp).pixels
        x, y = (int(v) for v in self.grid.coords[index])
        side, size = self.grid.patch_size_level0, self.grid.patch_size
        tile = Image.fromarray(np.ascontiguousarray(self._pixels[y : y + side, x : x + side]))
        return np.array(tile.resize((size, size), Image.BILINEAR))


class MeanColourEncoder(torch.nn.Module):
    """Features: a tile's mean red, green, blue and 1; extra "tone": its share dark and light."""

    name = "fake-mean"
    dim = 4
    input_size = 16
    extra_names = {"tone": ("dark", "light")}

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # so .to(device) has something to move
        self.batches_seen = 0
        self.fail_on_batch: int | None = None

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        images = tiles.permute(0, 3, 1, 2).float()
        return torch.nn.functional.interpolate(images, size=self.input_size, mode="area")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches_seen += 1
        if self.batches_seen == self.fail_on_batch:
            raise RuntimeError("the fake encoder failed on purpose")
        means = images.mean(dim=(2, 3)) * self.scale
        return torch.cat([means, torch.ones(len(images), 1)], dim=1)

    def extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        dark = (images.mean(dim=(1, 2, 3)) / 255.0).unsqueeze(1)
        return {"tone": torch.cat([1 - dark, dark], dim=1)}


ENCODER_NAMES = ("fake-mean",)


def build_encoder(name: str, weights=None) -> MeanColourEncoder:
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r} (known: {', '.join(ENCODER_NAMES)})")
    return MeanColourEncoder()


def save_tissue_geojson(mask: TissueMask, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    area = float(mask.mask.sum()) * mask.downsample**2
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [], "tissue_area_level0": area}))
    return path


def load_tissue_mask(path, width: int, height: int, downsample: float) -> TissueMask:
    with Image.open(path) as image:
        shape = (math.ceil(width / downsample), math.ceil(height / downsample))
        resized = np.asarray(image.convert("L").resize(shape, Image.NEAREST))
    return TissueMask(resized > 0, float(downsample))


def fake_modules() -> dict[str, types.SimpleNamespace]:
    """The attribute of tcssa.wsi.extract -> its fake: what the tests monkeypatch."""
    this = sys.modules[__name__]
    names = {
        "slide_reader": ("open_slide", "SlideReadError", "SlideInfo", "Slide", "magnification_from_mpp"),
        "tiling": ("tile_slide", "TileGrid", "TileDataset"),
        "tissue": ("detect_tissue", "detection_image", "TissueMask"),
        "encoders": ("build_encoder", "ENCODER_NAMES"),
        "geojson": ("save_tissue_geojson", "load_tissue_mask", "TissueMask"),
    }
    return {attr: types.SimpleNamespace(**{n: getattr(this, n) for n in ns}) for attr, ns in names.items()}


def swap_in(monkeypatch):
    """tcssa.wsi.extract with every part replaced by its stand-in, as one process; returns the module."""
    from tcssa.wsi import extract

    for attr, fake in fake_modules().items():
        monkeypatch.setattr(extract, attr, fake)
    monkeypatch.setattr(extract, "process_share", lambda device="auto": (0, 1, True, 0))
    return extract


def install_missing_parts() -> None:
    """Register the fakes under the real names of the parts not merged in yet (see the docstring)."""
    if REAL_PARTS:
        return
    by_module = dict(
        zip(PART_MODULES, ("slide_reader", "tiling", "tissue", "encoders", "geojson"), strict=True)
    )
    fakes = fake_modules()
    for module_name, attr in by_module.items():
        if module_name in sys.modules or _present(module_name):
            continue
        module = types.ModuleType(module_name, "issue 14 stand-in until the real part is merged")
        module.__dict__.update(vars(fakes[attr]))
        sys.modules[module_name] = module


def write_slide(path: Path, width: int = 1024, height: int = 768, tissue_columns: int = 3) -> Path:
    """A fake slide: white, with tissue in the first ``tissue_columns`` 256-px columns, each 256-px
    square one flat colour that says where it is (red 20 + 25 x column, green 20 + 25 x row)."""
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for row in range(height // 256):
        for column in range(min(tissue_columns, width // 256)):
            pixels[row * 256 : (row + 1) * 256, column * 256 : (column + 1) * 256] = (
                20 + 25 * column, 20 + 25 * row, 100,
            )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # PNG content whatever the extension
        Image.fromarray(pixels).save(handle, format="PNG")
    return path
