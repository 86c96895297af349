"""Look inside one slide with a trained TC-SSA model: which slot does each patch go to?

This is the computing half of the report's slide-level figures (``tcssa.viz`` only draws), used by
``tcssa report`` and ``tcssa demo``. From a run directory (``tcssa.io.runs``) it picks one of a fold's
*test* slides (so the model never trained on it), loads that fold's checkpoint
(``tcssa.train.runs.load_checkpoint``), reads the slide's features (``tcssa.io.features.read_bag``), routes
its patches through the model's compressor (``tcssa.method``: top-2 slot routing), and embeds
the patch features in 2-D (scikit-learn's PCA or t-SNE). ``slide_figures`` draws the slot map and
the slot embedding with ``tcssa.viz.plots`` and packages them for ``tcssa.viz.report.build_report``,
turning anything missing (no checkpoint, features not on this machine) into a note rather than an
error. ``mean_patches`` reads the test slides' sizes from their feature file headers for the
report's compression ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from tcssa.data import resolve_feature_files
from tcssa.io.bag import Bag
from tcssa.io.features import peek_shape, read_bag
from tcssa.io.runs import CompareRun, ModelRun, fold_dir
from tcssa.method.budget import effective_slots
from tcssa.train.runs import load_checkpoint
from tcssa.viz.plots import Plot, slot_embedding, slot_map
from tcssa.viz.report import SlideFigures

PHENOTYPE = "phenotype"  # per-patch ground truth written by the synthetic cohort
EMBEDDING_METHODS = ("pca", "tsne")
# Keys under which a run's config.json may record the features folder, most specific first.
FEATURES_KEYS = ("features_dir", "features", "data.features_dir", "data.features")


def _config_value(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def features_dir_of(run: ModelRun) -> Path | None:
    """The features folder a run recorded in its config.json (None when it recorded none)."""
    for key in FEATURES_KEYS:
        value = _config_value(run.config, key)
        if isinstance(value, str) and value:
            return Path(value)
    return None


@torch.inference_mode()
def compress_slide(model, features: torch.Tensor):
    """The compressor's routing of one slide (N x D), from a model with ``.routing``."""
    if not hasattr(model, "routing"):
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} has no slot routing")
    return model.routing(features.unsqueeze(0))


def top1_slots(model, features: torch.Tensor) -> np.ndarray:
    """The slot with the highest routing probability for each patch (N), from a model with ``.routing``."""
    return compress_slide(model, features).probs[0].argmax(dim=-1).numpy()


def routing_facts(
    out, top1: np.ndarray, phenotype: np.ndarray | None = None, names: list[str] | None = None
) -> str:
    """One sentence of numbers on how this slide was routed (``out``: its ``route``; ``top1``: each
    patch's top-1 slot), in the units every figure uses.

    The largest slot's share is of the slide's patches under top-2 routing (as in the slot utilisation
    figure and the demo's token budget lines). With ground truth, it adds where the rarest phenotype
    (a lesion) went: how many slots hold its patches as their top-1, and how pure the main one is.
    """
    counts = out.slot_counts[0].double()
    num_patches = out.probs.shape[1]
    text = (
        f"Top-2 routing of this slide: {int((counts > 0).sum())} of {counts.numel()} slots used, the "
        f"largest receives {100 * float(counts.max()) / num_patches:.1f}% of its {num_patches:,} patches."
    )
    if phenotype is None or len(np.unique(phenotype)) < 2:
        return text
    present, sizes = np.unique(phenotype, return_counts=True)
    rare = int(present[np.argmin(sizes)])
    rare_name = names[rare] if names and rare < len(names) else f"phenotype {rare}"
    main, taken, purity, num_slots = dominant_slot(top1, phenotype == rare)
    return (
        f"{text} Its rarest phenotype ({rare_name}, {int(sizes.min()):,} patches) has {num_slots} "
        f"top-1 slot(s); slot {main} takes {taken:,} of them and is "
        f"{100 * purity:.0f}% {rare_name} among its top-1 patches."
    )


def dominant_slot(top1: np.ndarray, members: np.ndarray) -> tuple[int, int, float, int]:
    """Where a group of patches (``members``, a boolean mask over ``top1``'s patches) went: the slot
    taking most of them as top-1, how many it takes, its purity (the share of that slot's patches
    in the group) and the number of slots the group is spread over."""
    slots, counts = np.unique(top1[members], return_counts=True)
    main = int(slots[np.argmax(counts)])
    return main, int(counts.max()), float(np.mean(members[top1 == main])), len(slots)


@dataclass
class Embedding:
    points: np.ndarray  # M x 2
    index: np.ndarray  # M patch indices into the slide
    method: str  # "PCA" or "t-SNE"
    axis_notes: tuple[str, str]


def rare_patches(groups: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of every patch of the groups (e.g. phenotypes) too rare to show up in a random sample.

    A group is rare when it holds fewer than ``max_points // 10`` patches; at most ``max_points // 4``
    patches are kept this way, rarest groups first.
    """
    values, counts = np.unique(groups, return_counts=True)
    keep: list[np.ndarray] = []
    room = max_points // 4
    for value in values[np.argsort(counts, kind="stable")]:
        members = np.flatnonzero(groups == value)
        if len(members) >= max_points // 10 or len(members) > room:
            break
        keep.append(members)
        room -= len(members)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def embed_patches(
    features: np.ndarray,
    method: str = "pca",
    max_points: int = 3000,
    seed: int = 0,
    keep: np.ndarray | None = None,
) -> Embedding:
    """A 2-D embedding of a slide's patch features: all of them, or ``max_points`` of them.

    A sample holds the patches in ``keep`` (e.g. ``rare_patches``) and a seeded random draw of the rest.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"unknown embedding {method!r}; choose one of: {', '.join(EMBEDDING_METHODS)}")
    rng = np.random.default_rng(seed)
    index = np.arange(len(features))
    if len(index) > max_points:
        kept = np.unique(keep if keep is not None else np.zeros(0, dtype=np.int64))[:max_points]
        others = np.setdiff1d(index, kept)
        drawn = rng.choice(others, max_points - len(kept), replace=False)
        index = np.sort(np.concatenate([kept, drawn]))
    sample = np.asarray(features[index], dtype=np.float32)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed)
        points = pca.fit_transform(sample)
        explained = pca.explained_variance_ratio_
        notes = tuple(f", {100 * v:.0f}% of variance" for v in explained)
        return Embedding(points, index, "PCA", notes)
    perplexity = float(min(30.0, max(5.0, (len(sample) - 1) / 3)))
    points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(sample)
    return Embedding(points, index, "t-SNE", ("", ""))


def choose_slide(run: ModelRun) -> tuple[int, str]:
    """A test slide to show: in the first fold, the positive-class slide the model is surest about.

    With binary labels that is the slide most clearly showing the evidence the model learned (for the
    synthetic ``rare`` task, a lesion); the fold's checkpoint never saw it in training.
    """
    if not run.predictions:
        raise ValueError(f"{run.name}: no fold predictions to pick a test slide from")
    fold = min(run.predictions, key=lambda p: p.fold)
    slide_ids = run.prediction_slide_ids[fold.fold]
    positive = fold.probs.shape[1] - 1
    candidates = np.flatnonzero(fold.labels == positive)
    if len(candidates) == 0:
        candidates = np.arange(len(slide_ids))
    best = candidates[np.argmax(fold.probs[candidates, positive])]
    return fold.fold, slide_ids[best]


def mean_patches(compare: CompareRun, features_dir: str | Path | None = None) -> float | None:
    """Mean patches per slide over the run's test slides, read from the feature file headers.

    None when the features are not on this machine (the report then shows no compression ratio).
    """
    run = next((r for r in compare.models.values() if r.prediction_slide_ids), None)
    if run is None:
        return None
    features_dir = Path(features_dir) if features_dir is not None else features_dir_of(run)
    if features_dir is None or not features_dir.is_dir():
        return None
    slide_ids = sorted({s for ids in run.prediction_slide_ids.values() for s in ids})
    found, _ = resolve_feature_files(features_dir, slide_ids, skip_missing=True)
    if not found:
        return None
    return float(np.mean([peek_shape(path)[0] for path in found.values()]))


def _find_feature_file(features_dir: Path, slide_id: str) -> Path:
    found, _ = resolve_feature_files(features_dir, [slide_id])
    return found[slide_id]


def slide_figures(
    compare: CompareRun,
    *,
    model_name: str = "tcssa",
    features_dir: str | Path | None = None,
    slide_id: str | None = None,
    embedding: str = "pca",
    max_points: int = 3000,
    seed: int = 0,
) -> SlideFigures:
    """The slot map and slot embedding of one test slide, or notes saying why they are missing."""
    run = compare.models.get(model_name)
    if run is None:
        return SlideFigures(notes=[f"No {model_name} run in {compare.path}, so no slot map or embedding."])
    fold, slide_id = _test_fold_and_slide(run, slide_id)
    checkpoint = fold_dir(run.path, fold)
    if run.fold_checkpoint(fold) is None:
        return SlideFigures(
            notes=[f"No checkpoint {checkpoint}/model.safetensors, so no slot map or embedding."]
        )
    features_dir = Path(features_dir) if features_dir is not None else features_dir_of(run)
    if features_dir is None or not features_dir.is_dir():
        where = (
            "not recorded in the run's config.json" if features_dir is None else f"{features_dir} not found"
        )
        return SlideFigures(
            notes=[
                f"Slide features are needed for the slot map and embedding ({where}); "
                "pass them with `tcssa report RUN_DIR --features DIR`."
            ]
        )
    path = _find_feature_file(features_dir, slide_id)
    bag = _read_with_phenotype(path)
    model, _ = load_checkpoint(checkpoint)
    label = f"{slide_id}, a fold {fold} test slide"
    return _slot_figures(model, bag, path, label, embedding, max_points, seed)


def _test_fold_and_slide(run: ModelRun, slide_id: str | None) -> tuple[int, str]:
    """The fold whose test set holds ``slide_id``, or ``choose_slide``'s pick when it is None."""
    if slide_id is None:
        return choose_slide(run)
    folds = [f for f, ids in run.prediction_slide_ids.items() if slide_id in ids]
    if not folds:
        raise ValueError(f"slide {slide_id!r} is in no test fold of {run.path}")
    return folds[0], slide_id


def _slot_figures(
    model, bag: Bag, path: Path, label: str, embedding: str, max_points: int, seed: int
) -> SlideFigures:
    """The slot map (when the bag has patch coordinates) and slot embedding of the slide in ``path``."""
    routed = compress_slide(model, bag.features)  # once: the slot map, the embedding and the caption's facts
    slots = routed.probs[0].argmax(dim=-1).numpy()
    num_slots = model.num_tokens
    phenotype = bag.extras.get(PHENOTYPE)
    names = bag.attrs.get("phenotype_names")
    names = [str(n) for n in names] if isinstance(names, list) else None
    figures, notes = [], []
    facts = routing_facts(routed, slots, phenotype, names)
    if bag.coords is not None:
        figures.append(slot_map(bag.coords.numpy(), slots, num_slots, phenotype, names, label, facts=facts))
    else:
        notes.append(f"{path} has no patch coordinates, so no slot map.")
    figures.append(_embedding_plot(bag, slots, num_slots, phenotype, names, embedding, max_points, seed))
    return SlideFigures(plots=figures, notes=notes)


def _read_with_phenotype(path: Path) -> Bag:
    """The slide's bag, with its per-patch phenotypes (ground truth) when the file has them."""
    try:
        return read_bag(path, extras=(PHENOTYPE,))
    except ValueError as err:
        if f"no '{PHENOTYPE}' dataset" not in str(err):
            raise
        return read_bag(path)


def _embedding_plot(
    bag: Bag,
    slots: np.ndarray,
    num_slots: int,
    phenotype: np.ndarray | None,
    names: list[str] | None,
    method: str,
    max_points: int,
    seed: int,
) -> Plot:
    """The slide's patches in 2-D coloured by top-1 slot: a sample keeping every rare-phenotype patch."""
    keep = rare_patches(phenotype, max_points) if phenotype is not None else None
    embedded = embed_patches(bag.features.numpy(), method, max_points, seed, keep)
    sample_note = ""
    if len(embedded.index) < bag.num_patches:
        sample_note = f"A random sample of the slide's {bag.num_patches:,} patches"
        if keep is not None and len(keep):
            sample_note += ", with every patch of its rarest phenotypes"
        sample_note += "."
    return slot_embedding(
        embedded.points,
        slots[embedded.index],
        num_slots,
        embedded.method,
        None if phenotype is None else phenotype[embedded.index],
        names,
        embedded.axis_notes,
        sample_note=sample_note,
    )


def phenotype_agreement(
    run: ModelRun, features_dir: str | Path | None = None, lesion: str = "lesion"
) -> dict[str, float]:
    """How well a trained model's top-1 slots follow the ground-truth phenotype of the test patches.

    Per fold, over the fold's test slides only (its checkpoint never saw them): the NMI and ARI
    (scikit-learn) between each patch's top-1 slot and its phenotype, and the same with the top-1
    slots shuffled among the patches (``*_shuffled``: chance at the same slot sizes). For the
    ``lesion`` phenotype, the slot that takes most lesion patches: ``lesion_purity`` (the share of
    that slot's patches that are lesion) and ``lesion_recall`` (the share of lesion patches it takes);
    ``effective_k``, the mean over slides of the slots with a non-negligible share of the slide's
    routing mass (``tcssa.method.budget.effective_slots``).
    Returns the means over the folds. Needs feature files with a ``phenotype`` dataset (``tcssa synth``).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    features_dir = Path(features_dir) if features_dir is not None else features_dir_of(run)
    if features_dir is None or not features_dir.is_dir():
        raise FileNotFoundError(f"{run.name}: the features folder is not known or not found ({features_dir})")
    per_fold: list[dict[str, float]] = []
    for fold, slide_ids in sorted(run.prediction_slide_ids.items()):
        checkpoint = run.fold_checkpoint(fold)
        if checkpoint is None:
            raise FileNotFoundError(f"{run.name}: fold {fold} has no checkpoint in {run.path}")
        model, _ = load_checkpoint(checkpoint)
        found, _ = resolve_feature_files(features_dir, list(slide_ids))
        slots, phenotypes, names, used = [], [], None, []
        for slide_id in slide_ids:
            bag = read_bag(found[slide_id], extras=(PHENOTYPE,))
            with torch.no_grad():
                routed = compress_slide(model, bag.features)
            slots.append(routed.probs[0].argmax(dim=-1).numpy())
            used.append(int(effective_slots(routed.topk_weight, routed.topk_index, model.num_tokens)[0]))
            phenotypes.append(np.asarray(bag.extras[PHENOTYPE]))
            names = names or [str(n) for n in bag.attrs.get("phenotype_names", [])]
        top1, truth = np.concatenate(slots), np.concatenate(phenotypes)
        shuffled = np.random.default_rng(fold).permutation(top1)
        row = {
            "nmi": normalized_mutual_info_score(truth, top1),
            "ari": adjusted_rand_score(truth, top1),
            "nmi_shuffled": normalized_mutual_info_score(truth, shuffled),
            "ari_shuffled": adjusted_rand_score(truth, shuffled),
            "effective_k": float(np.mean(used)),
        }
        if names and lesion in names and np.any(truth == names.index(lesion)):
            is_lesion = truth == names.index(lesion)
            _, taken, purity, _ = dominant_slot(top1, is_lesion)
            row["lesion_purity"] = purity
            row["lesion_recall"] = taken / float(is_lesion.sum())
        per_fold.append(row)
    if not per_fold:
        raise ValueError(f"{run.name}: no fold predictions in {run.path}")
    keys = sorted({k for row in per_fold for k in row})
    return {k: float(np.mean([row[k] for row in per_fold if k in row])) for k in keys}
