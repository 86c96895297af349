"""The training engine: ``fit`` one model on one fold, ``evaluate`` it on a set of slides.

The engine knows the MIL model contract only (``tcssa.mil.base.MILModel``:
``model.compute_loss(labels, x, mask=, coords=, reduction=) -> (logits,
{"task": cross-entropy, name: already weighted extra loss})``; ``model.routing(x,
mask)`` when the model has slots) and datasets whose items are ``(bag, label)``
turned into padded, masked batches by a collate function (``tcssa.data.collate_bags``).

Reproducibility. Nothing depends on leftover random state: the slide order of
epoch e is a permutation seeded by (seed, fold, e), and the global torch RNG
is reseeded before every forward pass from (seed, fold, epoch, update, rank,
pass). A run is therefore reproducible by seed on CPU, and a run resumed from
the state saved at the end of epoch e redoes epoch e+1 exactly as an
uninterrupted run does: no RNG state needs saving.

Batches and processes. An optimizer update averages the loss over
``batch_size * grad_accum_steps`` slides, a global number. Under torchrun the
processes find each other through Accelerate (``process_state``: its
``PartialState``; collectives from ``accelerate.utils``), and the model is
wrapped in torch's DDP as Accelerate wraps it (see ``fit`` for why no
``Accelerator``). The slides of each update are dealt to the processes (slide
i of the update goes to rank i mod P) and each process runs its share in
passes of at most ``batch_size`` slides, gradients synchronised on the last
pass of the update only (DDP's ``no_sync`` before it: the number of passes
varies by update and process, which ``Accelerator.accumulate``'s fixed step
count cannot express). Each pass's
summed loss is scaled by P / (slides in the update) before backward; DDP
averages gradients over the P processes, so every update applies the gradient
of the mean loss over its slides, exactly as one process does. A process whose
share of an update is empty (the last update of an epoch, or fewer slides per
update than processes) runs a pass with weight 0 so that DDP's gradient
all-reduce still sees every process. A single process wraps nothing, and
without torchrun no process group is made either.

The model's extra losses (e.g. TC-SSA's routing loss) are means over the
slides of a pass; they are multiplied by the pass's slide count so that they
too average over the update, whatever the split into passes.

So one process with ``batch_size`` 2b and two with b apply the same updates,
equal within float tolerance for a model without training-time randomness.
Dropout masks and routing noise are drawn per pass, so with them the two runs
draw different noise: equally good, not identical.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tcssa.data import collate_bags, pooled_patches
from tcssa.io.checkpoints import load_training_state, save_model, save_training_state
from tcssa.io.runs import RESUME_STATE, SlotUse, append_metrics_log, write_metrics_log
from tcssa.mil.base import TASK_LOSS, MILModel, class_probabilities, training_objective
from tcssa.runtime import process_state
from tcssa.train.config import TrainConfig
from tcssa.train.metrics import (
    COLLAPSE_SHARE,
    MissingClassWarning,
    classification_metrics,
    slot_utilisation,
    warn_if_collapsed,
)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class SlideTooLargeError(ValueError):
    """A batch of slides did not fit in memory."""


@dataclass
class FitResult:
    best_epoch: int  # 1-based epoch whose weights the model now holds
    best_val_loss: float  # NaN without a validation set
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Predictions:
    """Per-slide outputs of ``evaluate``, in dataset order."""

    slide_ids: list[str]
    labels: np.ndarray  # N true labels
    probs: np.ndarray  # N x C class probabilities
    losses: np.ndarray  # N per-slide cross-entropy
    slot_counts: np.ndarray | None = None  # K patches assigned per slot, summed over slides
    num_patches: int = 0  # real patches over all slides

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else math.nan

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def metrics(self, class_names: Sequence[str] | None = None, where: str = "") -> dict[str, float]:
        return classification_metrics(self.labels, self.probs, class_names, where)


# -------------------------------------------------------------- processes
def process_device(requested: str = "auto") -> torch.device:
    """The device of this process: ``auto`` means CUDA when present, else CPU; under several
    processes ``cuda`` is this process's GPU (``cuda:LOCAL_RANK``)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    process = process_state(requested)
    if requested == "cuda" and process.use_distributed:
        return torch.device("cuda", process.local_process_index)
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


# ------------------------------------------------------------------ helpers
def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def epoch_order(num_slides: int, seed: int, fold: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derived_seed(seed, fold, epoch, 0x5EED))
    return torch.randperm(num_slides, generator=generator).tolist()


def plan_epoch(
    num_slides: int, config: TrainConfig, fold: int, epoch: int, rank: int, world_size: int
) -> list[tuple[int, int, list[int], int]]:
    """This process's passes in one epoch: (update, pass, slide indices, slides in the update).

    An empty share becomes one pass over the update's first slide, marked by
    ``slides in the update = 0`` so that its loss weighs nothing.
    """
    order = epoch_order(num_slides, config.seed, fold, epoch)
    per_update = config.slides_per_update
    passes = []
    for update, start in enumerate(range(0, num_slides, per_update)):
        slides = order[start : start + per_update]
        share = slides[rank::world_size]
        if not share:
            passes.append((update, 0, [slides[0]], 0))
            continue
        for p, at in enumerate(range(0, len(share), config.batch_size)):
            passes.append((update, p, share[at : at + config.batch_size], len(slides)))
    return passes


def _is_out_of_memory(err: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t is not None)
    if isinstance(err, oom_types):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _too_large(err: BaseException, slides: str, phase: str) -> SlideTooLargeError:
    return SlideTooLargeError(
        f"out of memory during {phase} on slide(s) {slides}: {str(err).splitlines()[0][:200]}. "
        "Cap the patches per training slide with --max-patches (e.g. --max-patches 8000), "
        "lower --batch-size, or run on a device with more memory."
    )


def _batch_slides(batch: Any) -> str:
    sizes = batch.mask.sum(dim=1).tolist()
    return ", ".join(f"{sid} ({n:,} patches)" for sid, n in zip(batch.slide_ids, sizes, strict=True))


def _nonfinite_outputs(model: nn.Module, slides: Sequence[str], total: int) -> str:
    """Why outputs are NaN/Inf: the model's weights, or (naming them) the slides' features."""
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        return (
            f"the model's weights are NaN or Inf ({', '.join(broken[:3])}), so every output is: the "
            "training diverged, lower --lr"
        )
    shown = ", ".join(str(s) for s in slides[:10]) + (
        f" ... ({len(slides) - 10} more)" if len(slides) > 10 else ""
    )
    return (
        f"the model's outputs (logits) are NaN or Inf for {len(slides)} of {total} slide(s): {shown}. "
        "Their feature files hold NaN/Inf or values too large for the model (check them with "
        "`tcssa inspect FILE`)"
    )


def _load_batches(dataset: Any, batches: list[list[int]], collate: Callable, num_workers: int, phase: str):
    """Yield ``(indices, batch)``; running out of memory while reading or padding names the slides."""
    loader = iter(_loader(dataset, batches, collate, num_workers))
    for indices in batches:
        try:
            batch = next(loader)
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err):
                raise
            ids = getattr(dataset, "slide_ids", None)
            slides = ", ".join(str(ids[i]) if ids is not None else f"#{i}" for i in indices)
            raise _too_large(err, slides, f"{phase} (reading and padding the batch)") from err
        yield indices, batch


def _to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    coords = batch.coords.to(device) if getattr(batch, "coords", None) is not None else None
    return batch.features.to(device), batch.mask.to(device), coords, batch.labels.to(device)


def _loader(dataset: Any, batches: list[list[int]], collate: Callable, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)


def default_collate() -> Callable:
    return collate_bags


# ----------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(
    model: MILModel,
    dataset: Any,
    *,
    collate: Callable | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    with_routing: bool = False,
    num_workers: int = 0,
    desc: str | None = None,
) -> Predictions:
    """Class probabilities and losses for every slide of ``dataset`` (eval mode: deterministic).

    Under several processes each evaluates its share and all receive the
    gathered result. ``with_routing`` also sums the slot assignments of models
    that have ``routing`` (tcssa), for the collapse report.
    """
    collate = collate or default_collate()
    device = torch.device(device)
    process = process_state(device.type)
    model.eval()
    mine = list(range(len(dataset)))[process.process_index :: process.num_processes]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    records: list[tuple[int, str, int, list[float], float, bool]] = []
    slot_counts = None
    num_patches = 0
    route = with_routing and hasattr(model, "routing")
    bar = tqdm(total=len(batches), desc=desc, leave=False, disable=None if process.is_main_process else True)
    for indices, batch in _load_batches(dataset, batches, collate, num_workers, "evaluation"):
        x, mask, coords, labels = _to_device(batch, device)
        num_patches += int(mask.sum())
        try:
            logits, losses = model.compute_loss(labels, x, mask=mask, coords=coords, reduction="none")
            if route:
                counter = getattr(model, "slot_counts", None)  # routing only, when the model has it
                # coords only to a model that routes with them (tcssa with spatial=True)
                where = (coords,) if getattr(model, "requires_coords", False) else ()
                if counter is not None:
                    per_slide = counter(x, mask, *where)
                else:
                    per_slide = model.routing(x, mask, *where).slot_counts
                counts = per_slide.sum(dim=0).cpu()
                slot_counts = counts if slot_counts is None else slot_counts + counts
        except (RuntimeError, MemoryError) as err:
            if _is_out_of_memory(err):
                raise _too_large(err, _batch_slides(batch), "evaluation") from err
            raise
        slide_losses = losses[TASK_LOSS].cpu().tolist()
        probs = class_probabilities(logits).cpu().tolist()
        finite = torch.isfinite(logits).all(dim=1).cpu().tolist()
        for j, index in enumerate(indices):
            records.append((index, batch.slide_ids[j], int(labels[j]), probs[j], slide_losses[j], finite[j]))
        bar.update(1)
    bar.close()

    gathered = gather_object(records)  # every process's records, in rank order
    gathered.sort(key=lambda r: r[0])
    bad = [r[1] for r in gathered if not r[5]]
    if bad:  # every process holds the gathered records, so all raise alike
        raise NonFiniteLossError(
            f"{desc + ': ' if desc else ''}{_nonfinite_outputs(model, bad, len(gathered))}"
        )
    if route:
        counts = (
            slot_counts if slot_counts is not None else torch.zeros(model_num_slots(model), dtype=torch.long)
        )
        slot_counts = reduce(counts.to(device), reduction="sum").cpu()
    num_classes = len(gathered[0][3]) if gathered else 0
    return Predictions(
        slide_ids=[r[1] for r in gathered],
        labels=np.array([r[2] for r in gathered], dtype=np.int64),
        probs=np.array([r[3] for r in gathered], dtype=np.float64).reshape(len(gathered), num_classes),
        losses=np.array([r[4] for r in gathered], dtype=np.float64),
        slot_counts=slot_counts.numpy() if route else None,
        num_patches=sum(gather_object([num_patches])),
    )


def model_num_slots(model: nn.Module) -> int:
    tokens = getattr(model, "num_tokens", None)
    if tokens is None:
        raise ValueError("model has routing but no num_tokens")
    return int(tokens)


# ---------------------------------------------------------------------- fit
def fit(
    model: MILModel,
    train_set: Any,
    val_set: Any,
    config: TrainConfig,
    *,
    collate: Callable | None = None,
    fold: int = 0,
    out_dir: str | Path | None = None,
    model_config: dict[str, Any] | None = None,
    resume: bool = False,
    class_names: Sequence[str] | None = None,
    verbose: bool = True,
    resumable: bool = True,
) -> FitResult:
    """Train ``model`` on ``train_set``, early-stopping on ``val_set``'s loss; leaves the best weights in it.

    With ``out_dir`` (written by rank 0 only): ``metrics.jsonl`` (one line per
    epoch), the best weights as ``model.safetensors`` + ``model_config.json``
    whenever the validation loss improves, and ``resume.safetensors`` at every
    epoch end. ``resume=True`` continues from that state when it exists.
    ``resumable=False`` writes neither the resume state nor the improving
    checkpoints along the way, only the final best weights: for many short
    runs (``tcssa demo``), where writing the optimizer state every epoch
    costs a third of the time.
    Without a validation set the scheduler and early stopping are off and the
    last epoch's weights are kept. ``verbose=False`` shows no progress.
    """
    collate = collate or default_collate()
    process = process_state(config.device)
    device = process_device(config.device)
    out_dir = Path(out_dir) if out_dir is not None else None
    write = out_dir is not None and process.is_main_process
    model.to(device)
    optimizer = _adamw(model, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience
    )
    has_val = val_set is not None and len(val_set) > 0
    state: dict[str, Any] = {
        "epoch": 0,
        "best_epoch": 0,
        "best_val_loss": math.inf,
        "bad_epochs": 0,
        "train_seconds": 0.0,
        "history": [],
    }
    best_weights: dict[str, torch.Tensor] | None = None

    state_path = out_dir / RESUME_STATE if out_dir is not None else None
    if resume and state_path is not None and state_path.is_file():
        saved = load_training_state(state_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["progress"]
        best_weights = saved.get("best_model")
        if best_weights is None and state["best_epoch"] == state["epoch"]:
            best_weights = copy.deepcopy(model.state_dict())
    elif model.init_patches > 0:
        # Data-dependent initialisation (k-means gate init) on a fresh start only: a resumed run has
        # its weights already. Every process draws the same sample, so the models agree.
        init_seed = derived_seed(config.seed, fold, 7)
        show = verbose and process.is_main_process
        transform = getattr(model, "patch_transform", None)
        sample = pooled_patches(train_set, model.init_patches, init_seed, progress=show, transform=transform)
        model.initialise_from_patches(sample.to(device), init_seed)
    if write:
        # The log lists exactly the epochs the state covers: lines from an epoch cut short go.
        write_metrics_log(out_dir, state["history"])

    train_loss: nn.Module = _PassLoss(model)
    if process.use_distributed:
        # Gradients are all-reduced by torch's DistributedDataParallel, built as Accelerate's
        # prepare_model builds it. No Accelerator here: an Accelerator fixes process-wide settings
        # (mixed precision) once per process, and `tcssa vqa demo` runs the VLM trainer (bfloat16 on
        # a GPU) after a MIL fit in the same process. The engine's arithmetic is its own anyway
        # (float32 logits for the loss), whatever ACCELERATE_* variables say.
        device_ids = [device.index] if device.type == "cuda" else None
        train_loss = DistributedDataParallel(train_loss, device_ids=device_ids)

    stopped_early = state["bad_epochs"] >= config.early_stopping_patience
    # A resumed fit that already warned (an earlier epoch of its log crossed the line) stays quiet.
    collapse_warned = any(r.get("top_slot_share", 0.0) > COLLAPSE_SHARE for r in state["history"])
    while state["epoch"] < config.epochs and not stopped_early:
        epoch = state["epoch"] + 1
        started = time.perf_counter()
        desc = f"fold {fold} epoch {epoch}/{config.epochs}"
        bar = tqdm(desc=desc, disable=None if process.is_main_process and verbose else True)
        train_log = _train_epoch(train_loss, model, optimizer, train_set, config, collate, fold, epoch, bar)
        record: dict[str, Any] = {"epoch": epoch, **train_log, "lr": optimizer.param_groups[0]["lr"]}

        if has_val:
            try:
                val = evaluate(
                    model,
                    val_set,
                    collate=collate,
                    batch_size=config.eval_batch_size,
                    device=device,
                    num_workers=config.num_workers,
                    with_routing=True,
                )
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"fold {fold}, epoch {epoch}, validation set: {err}; stopping. The checkpoint of "
                    "the last complete epoch is kept (resume state and best model)."
                ) from err
            record["val_loss"] = val.loss
            if val.slot_counts is not None:
                # Collapse control (issue 15): how evenly the validation patches use the slots, each
                # epoch, and one warning per fit when a slot takes over (not every epoch after).
                use = SlotUse(val.slot_counts.tolist(), val.num_patches)
                record.update(slot_utilisation(use))
                if not collapse_warned and process.is_main_process:
                    where = f"fold {fold} validation set, epoch {epoch}"
                    collapse_warned = warn_if_collapsed(use, where, getattr(model, "aux_weight", None))
            with _quiet_metric_warnings():
                record.update({f"val_{k}": v for k, v in val.metrics(class_names).items()})
            scheduler.step(val.loss)
            improved = val.loss < state["best_val_loss"]
        else:
            improved = True
        record["seconds"] = seconds = time.perf_counter() - started  # training and validation
        state["train_seconds"] += seconds
        state["epoch"] = epoch
        state["history"].append(record)
        if improved:
            state["best_epoch"], state["bad_epochs"] = epoch, 0
            state["best_val_loss"] = record.get("val_loss", math.nan)
            best_weights = copy.deepcopy(model.state_dict())
            if write and resumable:
                save_model(out_dir, model, model_config or {})
        else:
            state["bad_epochs"] += 1
        stopped_early = state["bad_epochs"] >= config.early_stopping_patience
        if write and resumable:
            saved = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": state,
            }
            if state["best_epoch"] != epoch:
                saved["best_model"] = best_weights
            save_training_state(state_path, saved)
        if write:
            append_metrics_log(out_dir, record)
        _finish_epoch_bar(bar, desc, record, show=verbose and process.is_main_process)

    if best_weights is not None:
        model.load_state_dict(best_weights)
    if write:
        save_model(out_dir, model, model_config or {})
    process.wait_for_everyone()
    return FitResult(
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val_loss"] if has_val else math.nan,
        epochs_run=state["epoch"],
        stopped_early=stopped_early and state["epoch"] < config.epochs,
        train_seconds=state["train_seconds"],
        history=state["history"],
    )


class _PassLoss(nn.Module):
    """``model.compute_loss`` summed over the slides of a pass, as the forward of a module: DDP
    synchronises the gradients of what runs through the forward of the module it wraps only."""

    def __init__(self, model: MILModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels, x, mask, coords) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.compute_loss(labels, x, mask=mask, coords=coords, reduction="sum")


def _seed_generators(seed: int, device: torch.device) -> None:
    # torch.manual_seed would also (lazily) seed every CUDA/XPU/MTIA device, at about 4 ms a call:
    # more than a whole training step on a small bag. Only the CPU generator and that of the
    # training device draw the dropout masks and routing noise.
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: on CPU about 8x faster than the default
    # per-parameter loop for TC-SSA's 17M parameters (the step is memory-bound). Older torch builds
    # or unusual devices without it fall back to the default implementation.
    try:
        return torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _train_epoch(
    train_loss: nn.Module,
    model: MILModel,
    optimizer: torch.optim.Optimizer,
    train_set: Any,
    config: TrainConfig,
    collate: Callable,
    fold: int,
    epoch: int,
    bar: tqdm,
) -> dict[str, float]:
    process = PartialState()  # set up by fit
    rank, world_size = process.process_index, process.num_processes
    device = next(model.parameters()).device
    model.train()
    if hasattr(train_set, "set_epoch"):  # BagDataset draws its --max-patches subsets per (seed, epoch)
        train_set.set_epoch(epoch)
    passes = plan_epoch(len(train_set), config, fold, epoch, rank, world_size)
    batches = [indices for _, _, indices, _ in passes]
    loader = _load_batches(train_set, batches, collate, config.num_workers, "training")
    num_updates = passes[-1][0] + 1 if passes else 0
    bar.reset(total=num_updates)
    # Running sums over this process's slides: task loss, then each named extra loss.
    zero = lambda: torch.zeros((), dtype=torch.float64, device=device)
    sums: dict[str, torch.Tensor] = {TASK_LOSS: zero()}
    count = 0
    i = 0
    for update in range(num_updates):
        optimizer.zero_grad(set_to_none=True)
        update_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite_logits = torch.zeros((), dtype=torch.float64, device=device)
        seen: list[tuple[list[str], torch.Tensor]] = []  # this update's slides, logits finite per slide
        group = []
        while i < len(passes) and passes[i][0] == update:
            group.append(passes[i])
            i += 1
        for position, (_, pass_index, _, update_size) in enumerate(group):
            _, batch = next(loader)
            _seed_generators(derived_seed(config.seed, fold, epoch, update, rank, pass_index), device)
            last = position == len(group) - 1
            # gradients are synchronised on the update's last pass only
            no_sync = isinstance(train_loss, DistributedDataParallel) and not last
            sync = train_loss.no_sync() if no_sync else contextlib.nullcontext()
            x, mask, coords, labels = _to_device(batch, device)
            n = labels.shape[0]
            try:
                with sync:
                    logits, losses = train_loss(labels, x, mask, coords)
                    total = training_objective(losses, extra_weight=n)
                    weight = world_size / update_size if update_size else 0.0
                    (total * weight).backward()
            except (RuntimeError, MemoryError) as err:
                if _is_out_of_memory(err):
                    raise _too_large(err, _batch_slides(batch), "training") from err
                raise
            for name in losses:  # every process must all-reduce the same names, even after weight-0 passes
                sums.setdefault(name, zero())
            if update_size:  # a weight-0 pass only keeps DDP in step
                finite = torch.isfinite(logits.detach()).all(dim=1)
                seen.append((list(batch.slide_ids), finite))
                nonfinite_logits += (~finite).sum().double()
                update_sum += total.detach().double()
                for name, value in losses.items():
                    slides = 1 if name == TASK_LOSS else n  # the task loss is a sum, the others are means
                    sums[name] += slides * value.detach().double()
                count += n
        # Every process checks the same all-reduced numbers, so all stop together.
        checked = reduce(torch.stack([update_sum, nonfinite_logits]), reduction="sum")
        update_total, nonfinite = checked.tolist()
        if not math.isfinite(update_total) or nonfinite > 0:
            raise NonFiniteLossError(
                f"fold {fold}, epoch {epoch}, update {update + 1}: the training loss is {update_total}"
                f"{_nonfinite_slides(model, seen)}; stopping. The checkpoint of the last "
                "complete epoch is kept (resume state and best model)."
            )
        with _warmed_up(optimizer, warmup_factor(config.warmup_epochs, epoch, update, num_updates)):
            optimizer.step()
        bar.set_postfix(loss=f"{update_total / group[0][3] if group[0][3] else 0.0:.4f}", refresh=False)
        bar.update(1)

    names = sorted(sums)
    totals = reduce(
        torch.stack([sums[k] for k in names] + [torch.tensor(float(count), device=device)]), reduction="sum"
    )
    slides = max(1.0, float(totals[-1]))
    log = {f"train_{k}_loss": float(totals[j]) / slides for j, k in enumerate(names)}
    log["train_loss"] = sum(float(totals[j]) for j in range(len(names))) / slides
    return log


def _nonfinite_slides(model: nn.Module, seen: list[tuple[list[str], torch.Tensor]]) -> str:
    """What made an update's loss non-finite, naming its slides (gathered from every process)."""
    local_bad = [sid for ids, finite in seen for sid, ok in zip(ids, finite.tolist(), strict=True) if not ok]
    local_all = [sid for ids, _ in seen for sid in ids]
    bad, every = gather_object(local_bad), gather_object(local_all)
    if bad or any(not torch.isfinite(p).all() for p in model.parameters()):
        return f" ({_nonfinite_outputs(model, bad, len(every))})"
    shown = ", ".join(every[:10]) + (" ..." if len(every) > 10 else "")
    return (
        f" with finite logits on every slide of the update ({shown}), so a term of the model's own "
        "loss (e.g. the routing loss) is not: check these slides' features for extreme values, or "
        "lower --lr"
    )


def warmup_factor(warmup_epochs: float, epoch: int, update: int, num_updates: int) -> float:
    """Share of the learning rate that update ``update`` (0-based) of ``epoch`` (1-based, of
    ``num_updates`` updates) gets under a linear warm-up over ``warmup_epochs`` epochs: the epochs
    done counting this update, over ``warmup_epochs``, capped at 1. Computed from the position
    alone, so a resumed run warms up exactly as an uninterrupted one."""
    if warmup_epochs <= 0 or num_updates < 1:
        return 1.0
    return min(1.0, (epoch - 1 + (update + 1) / num_updates) / warmup_epochs)


@contextlib.contextmanager
def _warmed_up(optimizer: torch.optim.Optimizer, factor: float):
    # The warm-up scales the rate for this step only: ReduceLROnPlateau keeps owning the rate
    # stored in the optimizer (and in the resume state), so the two never fight.
    if factor >= 1.0:
        yield
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate * factor
    try:
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate


@contextlib.contextmanager
def _quiet_metric_warnings():
    # A validation set of a few slides often lacks a class; the test-set metrics warn about it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingClassWarning)
        yield


def _finish_epoch_bar(bar: tqdm, desc: str, record: dict[str, Any], show: bool) -> None:
    """Leave one line per epoch with the training loss and validation AUC (printed when no terminal)."""
    shown = {"loss": f"{record['train_loss']:.4f}"}
    if "val_loss" in record:
        shown.update(val_loss=f"{record['val_loss']:.4f}", val_auc=f"{record['val_auc']:.4f}")
    if bar.disable:
        if show:
            print(f"{desc}: " + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
    else:
        bar.set_postfix(shown)
    bar.close()
