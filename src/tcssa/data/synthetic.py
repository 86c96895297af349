"""A synthetic gigapixel cohort: slides with known tissue phenotypes, for tests and stress tests.

Each slide is a patch grid (coords in level-0 pixels, 256 px patches) holding an irregular piece
of tissue. Smooth random fields cut the tissue into spatially coherent regions of phenotypes
(stroma, tumour, immune, necrosis, fat, with background-like patches at the tissue edge). Each
phenotype is a cluster in feature space:

    x_j = noise_std * eps_j + mu[p_j] + A[p_j] z_j + shift_slide

eps_j ~ N(0, I_D) patch noise; mu[p] the phenotype centres (orthonormal directions scaled so that
two centres lie ``phenotype_separation`` apart); A[p] z_j within-phenotype variation on
``within_rank`` directions; shift_slide the nuisance shared by all patches of a slide: a stain
shift on a few fixed "stain" directions, an isotropic batch jitter, and a patient effect shared
by the slides of one case. The per-patch phenotype is stored in each h5 (``phenotype``).

The defaults give foundation-model-like geometry: most variance lies in a few tissue directions,
so phenotypes are distinct clusters (k-means on one slide recovers them), while the isotropic
noise is small per dimension (0.15; a norm of 3.4 at D = 512). With noise_std = 1 the isotropic
noise (norm 22.6 at D = 512) swamps the tissue structure and a learned router starts blind.

Tasks (slide label):

- ``rare``: positive slides hold a ``lesion`` phenotype in a small fraction of their patches
  (``lesion_fraction``, drawn per slide, log-uniform, from a range or fixed), in one to a few
  compact foci inside tumour. The lesion lies ``lesion_offset`` from tumour along its own
  direction, so a patch-level linear probe separates it and k-means puts it in a cluster of its
  own, but at 1% of a slide it moves the slide mean by ~0.01 * lesion_offset, less than the
  per-slide nuisance along that direction: mean pooling dilutes it, and 32 random patches miss it
  with probability 0.99^32 = 72%.
- ``subtype``: two or three classes whose tumour centre moves by ``subtype_shift`` along a class
  direction (about one noise std per patch: subtle patch by patch, clear over hundreds of tumour
  patches, blurred by the slide nuisance in a slide mean).
- ``composition``: ``hot`` when immune patches outnumber tumour patches by the ratio
  immune / (immune + tumour) > ``composition_threshold``, else ``cold``.
- ``margin`` (issue 15, spatial cues): EVERY slide holds one compact lesion focus of the same
  features and the same share distribution (``lesion_fraction``); ``margin`` slides have it on the
  tissue's edge (its seed patch in the outermost ring of tissue), ``interior`` slides deep inside
  (its seed at least its own radius plus ``margin_depth`` patches from the edge). Only where the
  lesion lies tells the classes apart: a model that forgets positions is at chance.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from tcssa.io.features import write_h5
from tcssa.io.files import atomic_output, write_text

TASKS = ("rare", "subtype", "composition", "margin")
TISSUE_PHENOTYPES = ("stroma", "tumour", "immune", "necrosis", "fat")
BACKGROUND = "background"
LESION = "lesion"
SUBTYPE_NAMES = ("subtype_A", "subtype_B", "subtype_C")
# Mean tissue composition (stroma, tumour, immune, necrosis, fat) around which slides vary.
BASE_COMPOSITION = (0.35, 0.25, 0.15, 0.10, 0.15)


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic cohort (distances and stds in feature units)."""

    task: str = "rare"
    num_slides: int = 200
    dim: int = 512
    seed: int = 0
    # slide size: patches per slide, log-uniform between the two
    min_patches: int = 1000
    max_patches: int = 50000
    patch_size: int = 256
    magnification: int = 20
    tissue_fill: float = 0.5  # share of the slide's patch grid covered by tissue
    region_scale: float = 6.0  # smoothness of tissue regions, in patches
    background_fraction: tuple[float, float] = (0.02, 0.08)  # background-like edge patches per slide
    composition_concentration: float = 8.0  # Dirichlet concentration of per-slide composition
    # feature geometry
    noise_std: float = 0.15
    phenotype_separation: float = 4.0
    within_rank: int = 8
    within_std: float = 1.0
    # nuisance shared by all patches of a slide
    stain_directions: int = 3
    stain_std: float = 1.5
    slide_jitter_std: float = 0.1
    case_std: float = 0.1
    # task: rare
    positive_fraction: float = 0.5
    lesion_fraction: tuple[float, float] = (0.002, 0.05)
    lesion_offset: float = 6.0
    max_lesion_foci: int = 3
    # task: margin (the lesion's share and offset are the rare task's)
    margin_depth: float = 3.0  # an interior lesion's seed: >= its radius + this many patches deep
    # task: subtype
    num_subtypes: int = 2
    subtype_shift: float = 0.2
    # task: composition
    composition_threshold: float = 0.5
    composition_margin: float = 0.05
    # cohort structure and output
    two_slide_case_fraction: float = 0.2  # share of cases with two slides (grouping matters)
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        lesion = self.lesion_fraction
        if isinstance(lesion, int | float):
            object.__setattr__(self, "lesion_fraction", (float(lesion), float(lesion)))
        object.__setattr__(self, "lesion_fraction", tuple(float(v) for v in self.lesion_fraction))
        object.__setattr__(self, "background_fraction", tuple(float(v) for v in self.background_fraction))
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.num_slides < 4:
            problems.append(f"num_slides must be >= 4, got {self.num_slides}")
        if self.dim < 2:
            problems.append(f"dim must be >= 2, got {self.dim}")
        if not 1 <= self.min_patches <= self.max_patches:
            problems.append(
                f"need 1 <= min_patches <= max_patches, got {self.min_patches}, {self.max_patches}"
            )
        low, high = self.lesion_fraction
        if len(self.lesion_fraction) != 2 or not 0 < low <= high <= 0.5:
            problems.append(f"lesion_fraction must be a value or (low, high) in (0, 0.5], got {lesion}")
        bg_low, bg_high = self.background_fraction
        if not 0 <= bg_low <= bg_high < 0.5:
            problems.append(
                f"background_fraction must be (low, high) in [0, 0.5), got {self.background_fraction}"
            )
        if not 0 < self.positive_fraction < 1:
            problems.append(f"positive_fraction must be in (0, 1), got {self.positive_fraction}")
        if self.num_subtypes not in (2, 3):
            problems.append(f"num_subtypes must be 2 or 3, got {self.num_subtypes}")
        margin, threshold = self.composition_margin, self.composition_threshold
        if not 0.1 + margin < threshold < 0.9 - margin:
            problems.append("composition_threshold +- composition_margin must lie inside (0.1, 0.9)")
        if not 0 < self.tissue_fill <= 1:
            problems.append(f"tissue_fill must be in (0, 1], got {self.tissue_fill}")
        if not 0 <= self.two_slide_case_fraction <= 1:
            problems.append(f"two_slide_case_fraction must be in [0, 1], got {self.two_slide_case_fraction}")
        if self.feature_dtype not in ("float16", "float32"):
            problems.append(f"feature_dtype must be float16 or float32, got {self.feature_dtype!r}")
        for name in ("noise_std", "within_std", "stain_std", "slide_jitter_std", "case_std", "region_scale"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.margin_depth < 0:
            problems.append(f"margin_depth must be >= 0, got {self.margin_depth}")
        if self.within_rank < 0 or self.stain_directions < 0 or self.max_lesion_foci < 1:
            problems.append("within_rank and stain_directions must be >= 0, max_lesion_foci >= 1")
        if problems:
            raise ValueError("synthetic cohort: " + "; ".join(problems))

    @property
    def phenotype_names(self) -> list[str]:
        return [BACKGROUND, *TISSUE_PHENOTYPES] + ([LESION] if self.task in ("rare", "margin") else [])

    @property
    def class_names(self) -> list[str]:
        if self.task == "rare":
            return ["negative", "positive"]
        if self.task == "composition":
            return ["cold", "hot"]
        if self.task == "margin":
            return ["interior", "margin"]
        return list(SUBTYPE_NAMES[: self.num_subtypes])


@dataclass
class SyntheticCohort:
    """Where a synthetic cohort was written, with its per-slide ground truth."""

    root: Path
    features_dir: Path
    labels_csv: Path
    truth_csv: Path
    config: SyntheticConfig
    slide_ids: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    num_patches: int = 0
    seconds: float = 0.0


@dataclass
class _Geometry:
    """Directions in feature space shared by every slide of a cohort."""

    centers: torch.Tensor  # P x D
    within: torch.Tensor  # P x r x D
    stain: torch.Tensor  # s x D
    subtype: torch.Tensor  # C x D


def _unit_directions(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors, orthonormal when the dimension allows it."""
    if count == 0:
        return np.zeros((0, dim))
    raw = rng.standard_normal((dim, count))
    if count <= dim:
        q, _ = np.linalg.qr(raw)
        return q.T
    return (raw / np.linalg.norm(raw, axis=0)).T


def _geometry(config: SyntheticConfig, rng: np.random.Generator) -> _Geometry:
    names = config.phenotype_names
    tissue = [n for n in names if n != LESION]
    extra = config.num_subtypes if config.task == "subtype" else 0
    directions = _unit_directions(len(names) + extra, config.dim, rng)
    # orthonormal centres at distance `separation` from each other: scale by separation / sqrt(2)
    centers = directions[: len(tissue)] * config.phenotype_separation / math.sqrt(2)
    if config.task in ("rare", "margin"):
        lesion = centers[tissue.index("tumour")] + config.lesion_offset * directions[len(tissue)]
        centers = np.vstack([centers, lesion])
    subtype = directions[len(names) : len(names) + extra] * config.subtype_shift
    within = np.stack([_unit_directions(config.within_rank, config.dim, rng) for _ in names])
    stain = _unit_directions(config.stain_directions, config.dim, rng)
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return _Geometry(as_tensor(centers), as_tensor(within), as_tensor(stain), as_tensor(subtype))


@dataclass
class _SlidePlan:
    slide_id: str
    case_id: str
    label: int
    num_patches: int
    lesion_fraction: float = 0.0
    immune_ratio: float = 0.0
    lesion_depth: float = 0.0  # margin task: the lesion seed's distance from the tissue edge, in patches


def _plan_cohort(config: SyntheticConfig, rng: np.random.Generator) -> list[_SlidePlan]:
    """Cases (some with two slides), balanced labels per case, and each slide's size and targets."""
    case_sizes = []
    while sum(case_sizes) < config.num_slides:
        room = config.num_slides - sum(case_sizes)
        case_sizes.append(2 if room >= 2 and rng.random() < config.two_slide_case_fraction else 1)
    num_classes = len(config.class_names)
    if num_classes == 2:
        positives = int(round(config.positive_fraction * len(case_sizes)))
        positives = min(max(positives, 1), len(case_sizes) - 1)
        case_labels = np.array([1] * positives + [0] * (len(case_sizes) - positives))
    else:
        case_labels = np.arange(len(case_sizes)) % num_classes
    rng.shuffle(case_labels)
    low, high = math.log(config.min_patches), math.log(config.max_patches)
    plans, slide_index = [], 0
    for case_index, size in enumerate(case_sizes):
        for _ in range(size):
            plan = _SlidePlan(
                slide_id=f"slide_{slide_index:04d}",
                case_id=f"case_{case_index:04d}",
                label=int(case_labels[case_index]),
                num_patches=int(round(math.exp(rng.uniform(low, high)))),
            )
            if (config.task == "rare" and plan.label == 1) or config.task == "margin":
                lo, hi = config.lesion_fraction
                plan.lesion_fraction = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            if config.task == "composition":
                t, m = config.composition_threshold, config.composition_margin
                plan.immune_ratio = float(rng.uniform(t + m, 0.9) if plan.label else rng.uniform(0.1, t - m))
            plans.append(plan)
            slide_index += 1
    return plans


def _smooth_field(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), scale, mode="reflect")
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


def _composition(config: SyntheticConfig, plan: _SlidePlan, rng: np.random.Generator) -> np.ndarray:
    """Shares of (stroma, tumour, immune, necrosis, fat) among the non-background patches."""
    shares = rng.dirichlet(np.array(BASE_COMPOSITION) * config.composition_concentration)
    tumour, immune = TISSUE_PHENOTYPES.index("tumour"), TISSUE_PHENOTYPES.index("immune")
    if config.task in ("subtype", "rare"):
        # every slide of these tasks has some tumour (the subtype signal, the lesion's home)
        shares[tumour] = max(shares[tumour], 0.1)
    if config.task == "composition":
        both = rng.uniform(0.25, 0.6)
        others = [i for i in range(len(shares)) if i not in (tumour, immune)]
        shares[others] *= (1 - both) / shares[others].sum()
        shares[immune], shares[tumour] = both * plan.immune_ratio, both * (1 - plan.immune_ratio)
    return shares / shares.sum()


def _layout(config: SyntheticConfig, plan: _SlidePlan, rng: np.random.Generator):
    """Patch grid positions (N x 2, grid units) and phenotype index per patch for one slide."""
    names = config.phenotype_names
    n = plan.num_patches
    aspect = rng.uniform(0.7, 1.4)
    cells = n / config.tissue_fill
    width = max(int(math.ceil(math.sqrt(cells * aspect))), 1)
    height = max(int(math.ceil(cells / width)), 1)
    while width * height < n:
        height += 1
    rows, cols = np.mgrid[0:height, 0:width]
    # tissue: the n highest cells of a smooth field that falls off from the slide centre (a blob)
    radial = ((rows - height / 2) / (height / 2)) ** 2 + ((cols - width / 2) / (width / 2)) ** 2
    tissue_field = _smooth_field((height, width), max(min(height, width) / 8, 1.0), rng) - 2.5 * radial
    flat_field = tissue_field.ravel()
    tissue = np.sort(np.argpartition(-flat_field, n - 1)[:n]) if n < flat_field.size else np.arange(n)
    phenotype = np.full(n, names.index("stroma"), dtype=np.int64)
    # background-like patches at the tissue edge (lowest tissue field)
    bg_share = rng.uniform(*config.background_fraction)
    num_bg = int(round(bg_share * n)) if n > 10 else 0
    free = np.ones(n, dtype=bool)
    if num_bg:
        edge = np.argpartition(flat_field[tissue], num_bg - 1)[:num_bg]
        phenotype[edge] = names.index(BACKGROUND)
        free[edge] = False
    # tissue regions: each phenotype takes the unassigned cells where its smooth field is highest;
    # stroma fills whatever is left, as it does around everything else in a real section
    shares = _composition(config, plan, rng)
    num_free = int(free.sum())
    counts = np.floor(shares * num_free).astype(int)
    order = [TISSUE_PHENOTYPES.index(p) for p in TISSUE_PHENOTYPES if p != "stroma"]
    rng.shuffle(order)
    for index in order:
        count = min(counts[index], int(free.sum()))
        if count <= 0:
            continue
        score = _smooth_field((height, width), config.region_scale, rng).ravel()[tissue]
        score[~free] = -np.inf
        chosen = np.argpartition(-score, count - 1)[:count]
        phenotype[chosen] = names.index(TISSUE_PHENOTYPES[index])
        free[chosen] = False
    grid = np.stack([tissue % width, tissue // width], axis=1)  # (x, y) in patches
    if plan.lesion_fraction > 0 and config.task == "margin":
        _place_margin_lesion(config, plan, grid, phenotype, (width, height), rng)
    elif plan.lesion_fraction > 0:
        _place_lesion(config, plan, grid, phenotype, rng)
    return grid, phenotype, (width, height)


def _place_lesion(config, plan, grid, phenotype, rng) -> None:
    """Compact lesion foci seeded in tumour: the patches nearest the foci become ``lesion``."""
    names = config.phenotype_names
    n = len(phenotype)
    count = max(1, int(round(plan.lesion_fraction * n)))
    plan.lesion_fraction = count / n  # the realised share, recorded as ground truth
    candidates = np.flatnonzero(phenotype == names.index("tumour"))
    if len(candidates) == 0:
        candidates = np.flatnonzero(phenotype != names.index(BACKGROUND))
    foci = grid[rng.choice(candidates, size=rng.integers(1, config.max_lesion_foci + 1))]
    distance = np.min(np.linalg.norm(grid[:, None, :] - foci[None, :, :], axis=2), axis=1)
    distance = distance + rng.uniform(0, 1.5, size=n)  # ragged, not circular, borders
    distance[phenotype == names.index(BACKGROUND)] = np.inf
    phenotype[np.argpartition(distance, count - 1)[:count]] = names.index(LESION)


def tissue_depth(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Each tissue patch's distance (in patches) from the nearest grid cell without tissue: 1 for the
    outermost ring of tissue. ``grid`` is N x 2 (x, y) in patches, ``size`` the (width, height)."""
    width, height = size
    tissue = np.zeros((height + 2, width + 2), dtype=bool)  # a border of no tissue around the grid
    tissue[grid[:, 1] + 1, grid[:, 0] + 1] = True
    return ndimage.distance_transform_edt(tissue)[grid[:, 1] + 1, grid[:, 0] + 1]


def _place_margin_lesion(config, plan, grid, phenotype, size, rng) -> None:
    """The margin task's one compact lesion: seeded on the tissue edge for a ``margin`` slide (label 1),
    at least its radius + ``margin_depth`` patches deep for an ``interior`` one (label 0); the
    patches nearest the seed become ``lesion``."""
    names = config.phenotype_names
    n = len(phenotype)
    count = max(1, int(round(plan.lesion_fraction * n)))
    plan.lesion_fraction = count / n
    depth = tissue_depth(grid, size)
    allowed = phenotype != names.index(BACKGROUND)
    if not allowed.any():
        allowed[:] = True
    radius = math.sqrt(count / math.pi)
    if plan.label == 1:
        wanted = allowed & (depth <= 1.5)
        fallback = np.flatnonzero(allowed)[np.argmin(depth[allowed])]
    else:
        wanted = allowed & (depth >= radius + config.margin_depth)
        fallback = np.flatnonzero(allowed)[np.argmax(depth[allowed])]
    candidates = np.flatnonzero(wanted) if wanted.any() else np.array([fallback])
    seed = candidates[rng.integers(len(candidates))]
    plan.lesion_depth = float(depth[seed])
    distance = np.linalg.norm(grid - grid[seed], axis=1) + rng.uniform(0, 1.0, size=n)
    distance[~allowed] = np.inf
    phenotype[np.argpartition(distance, count - 1)[:count]] = names.index(LESION)


def _slide_features(
    config: SyntheticConfig,
    geometry: _Geometry,
    phenotype: np.ndarray,
    shift: torch.Tensor,
    label: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """All N x D features of one slide with one random draw and one fused matmul-add."""
    n, num_types, rank = len(phenotype), len(config.phenotype_names), config.within_rank
    centers = geometry.centers.clone()
    if config.task == "subtype":
        centers[config.phenotype_names.index("tumour")] += geometry.subtype[label]
    # design matrix H (N x q) and basis B (q x D): one-hot phenotype -> centre, per-phenotype
    # latent factors -> within-phenotype directions, a column of ones -> the slide's shift
    types = torch.from_numpy(phenotype)
    design = torch.zeros(n, num_types * (1 + rank) + 1)
    design[torch.arange(n), types] = 1.0
    if rank:
        latent = torch.randn(n, rank, generator=generator) * config.within_std
        blocks = design[:, num_types : num_types * (1 + rank)].view(n, num_types, rank)
        blocks[torch.arange(n), types] = latent
    design[:, -1] = 1.0
    basis = torch.cat([centers, geometry.within.reshape(-1, config.dim), shift[None]])
    features = torch.randn(n, config.dim, generator=generator)
    return features.addmm_(design, basis, beta=config.noise_std)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    # through a temporary file: a full disk leaves no truncated labels.csv that looks complete
    with atomic_output(path) as partial, open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def parse_overrides(pairs: list[str], reserved: tuple[str, ...] = ()) -> dict:
    """``["stain_std=2", "background_fraction=0.01,0.05"]`` -> typed SyntheticConfig options.

    ``reserved`` names knobs that have their own command-line option and may not be set twice.
    """
    defaults = {f.name: f.default for f in fields(SyntheticConfig)}
    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if name in reserved:
            raise ValueError(f"--set {name}: use --{name.replace('_', '-')} instead")
        if not sep or name not in defaults:
            raise ValueError(
                f"--set expects KEY=VALUE with KEY one of {', '.join(sorted(defaults))}; got {pair!r}"
            )
        default = defaults[name]
        try:
            if isinstance(default, tuple):
                options[name] = tuple(float(v) for v in text.split(","))
            elif isinstance(default, bool):
                options[name] = text.strip().lower() in ("1", "true", "yes")
            else:
                options[name] = type(default)(text.strip())
        except ValueError as err:
            raise ValueError(f"--set {name}: cannot read {text!r} as {type(default).__name__}") from err
    return options


def make_synthetic_cohort(
    out_dir: str | Path,
    task: str = "rare",
    num_slides: int = 200,
    dim: int = 512,
    seed: int = 0,
    min_patches: int = 1000,
    max_patches: int = 50000,
    lesion_fraction: float | tuple[float, float] = (0.002, 0.05),
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    **options,
) -> SyntheticCohort:
    """Write a synthetic cohort to ``out_dir``: ``features/{slide_id}.h5``, ``labels.csv``
    (slide_id,label,case_id), ``truth.csv`` (per-slide ground truth) and ``synthetic_config.json``.

    ``options`` are further ``SyntheticConfig`` fields (e.g. ``num_subtypes=3``,
    ``feature_dtype="float32"``). The same arguments always give the same files.
    """
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"synthetic cohort: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    config = SyntheticConfig(
        task=task,
        num_slides=num_slides,
        dim=dim,
        seed=seed,
        min_patches=min_patches,
        max_patches=max_patches,
        lesion_fraction=lesion_fraction,
        **options,
    )
    return write_synthetic_cohort(out_dir, config, overwrite=overwrite, progress=progress, workers=workers)


def write_synthetic_cohort(
    out_dir: str | Path,
    config: SyntheticConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> SyntheticCohort:
    """Write the cohort ``config`` describes; ``workers`` threads (default: up to 4, one per CPU)
    generate slides side by side. Each slide has its own seed, so the files do not depend on it."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    started = time.perf_counter()
    root = Path(out_dir)
    features_dir = root / "features"
    if features_dir.exists() and any(features_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{features_dir} is not empty (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)

    geometry_seed, plan_seed, slide_seed, case_seed = np.random.SeedSequence(config.seed).spawn(4)
    geometry = _geometry(config, np.random.default_rng(geometry_seed))
    plans = _plan_cohort(config, np.random.default_rng(plan_seed))
    case_ids = sorted({plan.case_id for plan in plans})
    case_seeds = dict(zip(case_ids, case_seed.spawn(len(case_ids)), strict=True))
    jobs = [
        (config, geometry, plan, seed, case_seeds[plan.case_id], features_dir)
        for plan, seed in zip(plans, slide_seed.spawn(len(plans)), strict=True)
    ]
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        rows = list(
            tqdm(
                pool.map(_write_slide, jobs),
                total=len(jobs),
                desc="synthetic slides",
                unit="slide",
                disable=not progress,
            )
        )
    except BaseException:
        # a failed slide (a full disk, say) stops the slides not yet started instead of letting
        # each of them fail in turn; every file already written is complete (write_h5 renames)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    labels_csv, truth_csv = root / "labels.csv", root / "truth.csv"
    _write_csv(labels_csv, ["slide_id", "label", "case_id"], [[r[0], r[2], r[1]] for r in rows])
    truth_header = ["slide_id", "case_id", "label", "num_patches", "lesion_fraction", "immune_ratio"]
    _write_csv(truth_csv, truth_header + [f"share_{n}" for n in config.phenotype_names], rows)
    write_text(root / "synthetic_config.json", json.dumps(asdict(config), indent=2) + "\n")
    return SyntheticCohort(
        root=root,
        features_dir=features_dir,
        labels_csv=labels_csv,
        truth_csv=truth_csv,
        config=config,
        slide_ids=[r[0] for r in rows],
        labels={r[0]: r[2] for r in rows},
        num_patches=sum(r[3] for r in rows),
        seconds=time.perf_counter() - started,
    )


def _write_slide(job) -> list:
    """Generate and write one slide; return its row of ``truth.csv``."""
    config, geometry, plan, slide_seed, case_seed, features_dir = job
    names, classes = config.phenotype_names, config.class_names
    rng = np.random.default_rng(slide_seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    grid, phenotype, (width, height) = _layout(config, plan, rng)
    case_effect = np.random.default_rng(case_seed).standard_normal(config.dim) * config.case_std
    stain = torch.randn(config.stain_directions, generator=generator) * config.stain_std
    shift = (
        stain @ geometry.stain
        + torch.randn(config.dim, generator=generator) * config.slide_jitter_std
        + torch.from_numpy(case_effect).float()
    )
    features = _slide_features(config, geometry, phenotype, shift, plan.label, generator)
    if config.feature_dtype == "float16":
        features = features.half()
    offset = rng.integers(0, 50, size=2)
    coords = (grid + offset) * config.patch_size
    shares = np.bincount(phenotype, minlength=len(names)) / len(phenotype)
    tumour, immune = shares[names.index("tumour")], shares[names.index("immune")]
    immune_ratio = float(immune / (immune + tumour)) if immune + tumour > 0 else 0.0
    write_h5(
        features_dir / f"{plan.slide_id}.h5",
        features.numpy(),
        coords,
        attrs={
            "patch_size": config.patch_size,
            "patch_size_level0": config.patch_size,
            "level0_magnification": config.magnification,
            "target_magnification": config.magnification,
            "overlap": 0,
            "level0_width": int((width + offset[0]) * config.patch_size),
            "level0_height": int((height + offset[1]) * config.patch_size),
            "name": plan.slide_id,
        },
        extra={"phenotype": phenotype},
        file_attrs={
            "synthetic": True,
            "task": config.task,
            "label": classes[plan.label],
            "case_id": plan.case_id,
            "phenotype_names": names,
            "lesion_fraction": plan.lesion_fraction,
            "immune_ratio": immune_ratio,
            **({"lesion_depth": plan.lesion_depth} if config.task == "margin" else {}),
        },
    )
    return [
        plan.slide_id,
        plan.case_id,
        classes[plan.label],
        len(phenotype),
        f"{plan.lesion_fraction:.6f}",
        f"{immune_ratio:.6f}",
    ] + [f"{share:.6f}" for share in shares]
