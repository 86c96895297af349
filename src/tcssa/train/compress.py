"""``tcssa compress``: each slide's K slot tokens from a trained TC-SSA checkpoint, for any downstream model.

One h5 per slide in the output folder, named like the feature file
(``tcssa.io.features.write_slot_tokens``):

- ``tokens``       K x D float32  the slot tokens y_k (what the classifier head and the VLM projector see)
- ``topk_index``   N x 2 int64    the two slots each patch is routed to
- ``topk_weight``  N x 2 float32  their truncated routing weights P~ (not renormalised)
- ``slot_counts``  K int64        patches assigned to each slot
- ``slot_mass``    K float32      each slot's routing mass sum_j P~_jk
- ``token_mask``   K bool         the tokens to use: all True, unless a token budget (``token_budget``:
                                  the checkpoint's, or ``--token-budget``) kept only the fewest slots
                                  covering a share of the routing mass (issue 15)

with attributes naming the source file, the checkpoint, K, the coverage asked for (``coverage``,
"all" without a budget) and ``effective_slots`` (the True entries of ``token_mask``). Eval mode: the
output is deterministic. A ``spatial`` model reads the patch coordinates of each feature file.

Under torchrun (issue 17) each process takes its share of the slides (``shard``: rank r of W takes
every W-th file of the sorted list from the r-th), so that the processes together write each
output once. A rerun resumes: an output that is complete and from the same checkpoint and coverage
(``tcssa.io.features.slot_tokens_complete``) is kept; an incomplete or stale one is written again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from tcssa.io.features import FEATURE_EXTENSIONS, read_bag, slot_tokens_complete, write_slot_tokens
from tcssa.method.budget import slot_mass
from tcssa.mil.tcssa_mil import budget_coverage
from tcssa.runtime import process_state
from tcssa.train.engine import process_device
from tcssa.train.runs import load_checkpoint

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` among ``world_size`` processes: every ``world_size``-th from
    the ``rank``-th. The shares of ranks 0..W-1 are disjoint and together hold every item once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    return list(items[rank::world_size])


def compress_folder(
    checkpoint: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    token_budget: float | str | None = "checkpoint",
    rank: int | None = None,
    world_size: int | None = None,
) -> list[Path]:
    """Compress every feature file of ``features_dir`` (this process's ``shard`` of them: ``rank`` of
    ``world_size``, torchrun's RANK and WORLD_SIZE when not given); returns the h5 paths it wrote.

    ``token_budget``: "checkpoint" (the model's own option), None or "all" (every token), "auto" or
    a routing coverage in (0, 1] (``tcssa.mil.tcssa_mil.budget_coverage``)."""
    model, model_config = load_checkpoint(checkpoint)
    if not hasattr(model, "routing"):
        raise ValueError(
            f"{checkpoint}: a {model_config['model'].get('name')!r} model has no slots to compress into; "
            "use a tcssa checkpoint"
        )
    if token_budget != "checkpoint":
        model.coverage = budget_coverage(token_budget)
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"features folder not found: {features_dir}")
    files = sorted(
        p for p in features_dir.iterdir() if p.is_file() and p.suffix.lower() in FEATURE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"{features_dir}: no feature files ({', '.join(FEATURE_EXTENSIONS)})")
    torch_device = process_device(device)
    model.to(torch_device)
    # Under torchrun each process compresses its share of the slides (one output file per slide);
    # one process compresses them all.
    if rank is None or world_size is None:
        process = process_state(device)
        rank, world_size = process.process_index, process.num_processes
    mine = shard(files, rank, world_size)
    written, skipped, redone, patches = [], 0, 0, 0
    started = time.perf_counter()
    bar_off = None if rank == 0 else True
    num_slots = model.compressor.num_slots
    coverage = getattr(model, "coverage", None)
    coverage_attr = "all" if coverage is None else float(coverage)
    for path in tqdm(mine, desc="compressing", unit="slide", disable=bar_off):
        target = out_dir / f"{path.stem}.h5"
        if target.exists() and not overwrite:
            if slot_tokens_complete(target, num_slots, model.in_dim, checkpoint, {"coverage": coverage_attr}):
                skipped += 1
                continue
            redone += 1
        bag = read_bag(path)
        if bag.dim != model.in_dim:
            raise ValueError(
                f"{path}: features have D={bag.dim}, but the checkpoint expects D={model.in_dim}"
            )
        coords = None
        if getattr(model, "requires_coords", False):
            if bag.coords is None:
                raise ValueError(f"{path}: a spatial model needs patch coordinates, and this file has none")
            coords = bag.coords.unsqueeze(0).to(torch_device)
        with torch.no_grad():
            out = model.routing(bag.features.unsqueeze(0).to(torch_device), None, coords)
            keep = model.token_mask(out) if hasattr(model, "token_mask") else None
            if keep is None:
                keep = torch.ones_like(out.slot_counts, dtype=torch.bool)
        arrays = {
            "tokens": out.tokens[0].float().cpu().numpy(),
            "topk_index": out.topk_index[0].cpu().numpy(),
            "topk_weight": out.topk_weight[0].float().cpu().numpy(),
            "slot_counts": out.slot_counts[0].cpu().numpy(),
            "slot_mass": slot_mass(out.topk_weight, out.topk_index, out.slot_counts.shape[1])[0]
            .float()
            .cpu()
            .numpy(),
            "token_mask": keep[0].cpu().numpy(),
        }
        attrs = {
            "slide_id": bag.slide_id,
            "source": str(path.resolve()),
            "checkpoint": str(Path(checkpoint).resolve()),
            "num_slots": int(arrays["tokens"].shape[0]),
            "num_patches": bag.num_patches,
            "coverage": coverage_attr,
            "effective_slots": int(arrays["token_mask"].sum()),
        }
        write_slot_tokens(target, arrays, attrs)
        written.append(target)
        patches += bag.num_patches
    if written:
        seconds = time.perf_counter() - started
        print(
            f"process {rank} of {world_size}: {len(written)} slide(s), {patches:,} patches "
            f"in {seconds:.1f} s "
            f"({len(written) / seconds:.2f} slides/s)"
        )
    if skipped:
        print(f"note: {skipped} slide(s) already compressed in {out_dir} were left as they are (--overwrite)")
    if redone:
        print(
            f"note: {redone} incomplete or stale output(s) in {out_dir} (another checkpoint?) "
            "were written again"
        )
    return written
