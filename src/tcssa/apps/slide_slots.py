"""Where did the slots go on a real slide? Slot tokens drawn on the tissue, beside the tissue classes.

``tcssa slotmap SLIDE`` extracts the slide's tiles and features (``tcssa.wsi.extract``, the default
encoder is the capricorn DenseNet121, whose 9 PathMNIST tissue-class probabilities are stored with
the features), routes every tile through a TC-SSA compressor (a trained ``tcssa train`` checkpoint,
or, without one, a freshly initialised compressor: its gate is a random linear map, so the picture
then shows the routing's geometry, not a learned model), and draws each tile's top-1 slot on the
slide thumbnail beside each tile's most likely tissue class.

How well the slots follow the tissue classes is measured by the normalised mutual information and
the adjusted Rand index between top-1 slot and tissue class, against random routing: the same slot
sizes dealt to the tiles at random (a permutation of the slot labels), repeated, so the baseline has
a mean and a spread. A score is worth reading only as far above that baseline as the spread allows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from tcssa.io.features import read_bag
from tcssa.io.files import atomic_output, write_json
from tcssa.io.slidelm import load_compressor
from tcssa.method.compressor import TCSSA
from tcssa.viz import slides as figures
from tcssa.viz.report import SlideFigures
from tcssa.wsi.encoders.capricorn import PATHMNIST_CLASSES
from tcssa.wsi.extract import SlidePreview, extract_slide, features_dir
from tcssa.wsi.slide import open_slide

#: The per-tile tissue classes the default encoder stores beside its features.
TISSUE_CLASSES_EXTRA = "pathmnist_probs"


@dataclass(frozen=True)
class Agreement:
    """Top-1 slot against tissue class over a slide's tiles, and the same under random routing."""

    nmi: float
    ari: float
    random_nmi_mean: float
    random_nmi_std: float
    random_ari_mean: float
    random_ari_std: float
    num_tiles: int
    slots_used: int
    classes_present: int
    permutations: int

    def text(self) -> str:
        return (
            f"NMI {self.nmi:.3f} (random routing {self.random_nmi_mean:.3f} ± {self.random_nmi_std:.3f}), "
            f"ARI {self.ari:.3f} (random {self.random_ari_mean:.3f} ± {self.random_ari_std:.3f}) over "
            f"{self.num_tiles:,} tiles, {self.slots_used} slots used, {self.classes_present} tissue classes "
            f"present; random routing: the same slot sizes dealt at random, {self.permutations} times"
        )


def top1_slots(model: TCSSA, features: torch.Tensor) -> np.ndarray:
    """Each tile's most probable slot (eval mode: no noise), N int64."""
    model.eval()
    with torch.inference_mode():
        out = model(features.to(model.gate.weight.dtype).unsqueeze(0))
    return out.topk_index[0, :, 0].cpu().numpy().astype(np.int64)


def slot_class_agreement(
    slots: np.ndarray, classes: np.ndarray, *, permutations: int = 200, seed: int = 0
) -> Agreement:
    """NMI and ARI of ``slots`` against ``classes`` (both N ints), and their random-routing baseline."""
    slots, classes = np.asarray(slots), np.asarray(classes)
    if slots.shape != classes.shape or slots.ndim != 1:
        raise ValueError(
            f"slots and classes must be two 1-D arrays of one length, got {slots.shape}, {classes.shape}"
        )
    if len(slots) < 2:
        raise ValueError(f"slot-class agreement needs at least 2 tiles, got {len(slots)}")
    if permutations < 2:
        raise ValueError(f"permutations must be >= 2 (the baseline reports a spread), got {permutations}")
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(slots) for _ in range(permutations)]
    random_nmi = np.array([normalized_mutual_info_score(classes, s) for s in shuffled])
    random_ari = np.array([adjusted_rand_score(classes, s) for s in shuffled])
    return Agreement(
        nmi=float(normalized_mutual_info_score(classes, slots)),
        ari=float(adjusted_rand_score(classes, slots)),
        random_nmi_mean=float(random_nmi.mean()),
        random_nmi_std=float(random_nmi.std(ddof=1)),
        random_ari_mean=float(random_ari.mean()),
        random_ari_std=float(random_ari.std(ddof=1)),
        num_tiles=len(slots),
        slots_used=int(len(np.unique(slots))),
        classes_present=int(len(np.unique(classes))),
        permutations=permutations,
    )


def write_slide_previews(preview: SlidePreview, folder: Path) -> list[Path]:
    """``{slide}.png`` (the thumbnail), ``{slide}_mask.png`` (the tissue) and ``{slide}_grid.png`` (the
    tiles) in ``folder``: what ``tcssa extract`` draws for every slide."""
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


@dataclass(frozen=True)
class SlideSlots:
    """What ``slot_map`` made of one slide."""

    slide: str
    features: Path
    picture: Path
    summary: Path
    agreement: Agreement
    compressor: str  # where the compressor came from
    plot: figures.Plot  # the slot map beside the class map


def slot_map(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    encoder: str = "capricorn-densenet121",
    weights: str | Path | None = None,
    num_slots: int = 32,
    seed: int = 0,
    mpp: float | None = None,
    target_magnification: int = 20,
    patch_size: int = 256,
    min_tissue: float = 0.5,
    device: str = "auto",
    progress: bool = True,
) -> SlideSlots:
    """Extract ``slide_path`` into ``out_dir`` (reusing its feature file when present), route its tiles,
    draw slots beside tissue classes (``OUT/slotmaps/{slide}.png``) and write the agreement
    (``OUT/slotmaps/{slide}.json``)."""
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    kept: list[SlidePreview] = []

    def keep_and_write(preview: SlidePreview, folder: Path) -> list[Path]:
        kept.append(preview)  # the thumbnail extraction made: drawn on below instead of read again
        return write_slide_previews(preview, folder)

    features = features_dir(out_dir, encoder) / f"{slide_path.stem}.h5"
    if not features.is_file():
        features = extract_slide(
            slide_path,
            out_dir,
            encoder,
            weights=weights,
            mpp=mpp,
            target_magnification=target_magnification,
            patch_size=patch_size,
            min_tissue=min_tissue,
            device=device,
            progress=progress,
            previews=keep_and_write,
        )
    bag = read_bag(features, extras=(TISSUE_CLASSES_EXTRA,))
    probs = bag.extras.get(TISSUE_CLASSES_EXTRA)
    if probs is None:
        raise ValueError(
            f"{features}: no {TISSUE_CLASSES_EXTRA!r} dataset; the tissue-class map needs the "
            "capricorn-densenet121 encoder's tissue-class probabilities"
        )
    class_names = PATHMNIST_CLASSES
    if checkpoint is not None:
        model, source = load_compressor(checkpoint), f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(seed)  # an untrained compressor: its gate is a random linear map
        model = TCSSA(bag.dim, num_slots=num_slots)
        source = f"untrained (random gate, seed {seed})"
    slots = top1_slots(model, bag.features)
    classes = np.asarray(probs).argmax(axis=1)
    agreement = slot_class_agreement(slots, classes, seed=seed)
    if kept:
        thumbnail, downsample = kept[0].thumbnail, kept[0].downsample
    else:  # features from an earlier run
        with open_slide(slide_path, mpp=mpp) as slide:
            thumbnail, downsample = slide.thumbnail(2048)
    size0 = int(bag.attrs.get("patch_size_level0", patch_size))
    picture = figures.slot_and_class_maps(
        thumbnail,
        downsample,
        bag.coords.numpy(),
        size0,
        slots,
        model.num_slots,
        classes,
        class_names,
        title=f"{slide_path.stem}: top-1 slot beside tissue class",
    )
    folder = out_dir / "slotmaps"
    png = figures.save_png(picture, folder / f"{slide_path.stem}.png")
    summary = folder / f"{slide_path.stem}.json"
    write_json(
        summary,
        {
            "slide": str(slide_path),
            "features": str(features),
            "compressor": source,
            "caption": picture.caption,
            **asdict(agreement),
        },
    )
    return SlideSlots(slide_path.stem, features, png, summary, agreement, source, picture)


def real_slide_figures(slide_path: str | Path, out_dir: str | Path, *, device: str = "cpu") -> SlideFigures:
    """The demo report's "A real slide" section: ``slot_map`` with an untrained compressor (the demo's
    trained one works on the synthetic cohort's features, not this encoder's), and what it measured."""
    done = slot_map(slide_path, out_dir, device=device, progress=False)
    return SlideFigures(
        plots=[done.plot],
        notes=[
            f"{done.slide}: {done.agreement.text()}.",
            f"Compressor: {done.compressor}; tiles encoded by capricorn-densenet121, whose 9 tissue classes "
            "are PathMNIST's (colorectal) classes. An untrained gate is a random linear map, so this shows "
            "where tiles go before any training, not what a trained TC-SSA learns.",
        ],
    )
