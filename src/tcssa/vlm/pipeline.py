"""File-level entry points behind ``tcssa vqa init-lm | train | eval``: read files, call the modules, write
results, and say what was skipped."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

from tcssa.io.features import peek_shape
from tcssa.vlm.checkpoint import load_run
from tcssa.vlm.config import SlideLMTrainConfig
from tcssa.vlm.data import ConversationDataset, FolderFeatures, NoFeatures, drop_missing
from tcssa.vlm.evaluate import (
    accuracy_rows,
    evaluate_multiple_choice,
    format_accuracy_table,
    multiple_choice_only,
    prior_baseline_rows,
    write_predictions,
    write_table,
)
from tcssa.vlm.formats import Conversation, VQAItem, apply_slide_map, load_questions, read_slide_map
from tcssa.vlm.prompts import to_conversation
from tcssa.vlm.tiny_lm import TinyLMConfig, build_tiny_lm, warm_up_lm
from tcssa.vlm.train import lm_dtype, prepare_stage, train_stage

log = logging.getLogger(__name__)


def read_samples(
    paths: list[str | Path], report=print, slide_map: str | Path | None = None
) -> list[VQAItem | Conversation]:
    """Every record of every file (any supported format); skipped records are counted and reported.
    ``slide_map``: a ``key,slide_id`` CSV turning the files' slide keys into feature-file ids."""
    samples = []
    for path in paths:
        result = load_questions(path)
        report(result.summary())
        samples += result.items
    if not samples:
        raise ValueError(f"no usable records in {', '.join(map(str, paths))}")
    return apply_slide_map(samples, read_slide_map(slide_map) if slide_map else None)


def sample_text(samples) -> list[str]:
    """Plain text of the samples (prompts and replies), e.g. to train the tiny LM's tokenizer."""
    texts = []
    for sample in samples:
        for _, text in to_conversation(sample).turns:
            texts.append(text.replace("<image>", ""))
    return texts


def init_lm(
    text_files: list[str | Path],
    out_dir: str | Path,
    warm_up_steps: int = 0,
    seed: int = 0,
    report=print,
    **size,
) -> Path:
    """Build the offline default LM folder from the text of question / caption files."""
    texts = sample_text(read_samples(text_files, report))
    lm, tokenizer = build_tiny_lm(out_dir, texts, TinyLMConfig(**size), seed=seed)
    if warm_up_steps:
        losses = warm_up_lm(lm, tokenizer, texts, warm_up_steps, seed=seed)
        report(f"text warm-up: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {warm_up_steps} steps")
        lm.save_pretrained(out_dir)
    report(f"language model folder: {out_dir} ({sum(p.numel() for p in lm.parameters()):,} parameters)")
    return Path(out_dir)


def train_from_files(
    stage: int,
    data: list[str | Path],
    features_dir: str | Path,
    out_dir: str | Path,
    train_config: SlideLMTrainConfig,
    lm: str | Path | None = None,
    init: str | Path | None = None,
    mil_checkpoint: str | Path | None = None,
    slide_tokens: str = "slots",
    num_tokens: int = 32,
    projector_hidden: int = 2048,
    skip_missing: bool = False,
    slide_map: str | Path | None = None,
    report=print,
) -> dict:
    samples = read_samples(data, report, slide_map)
    features = FolderFeatures(features_dir, [s.slide_id for s in samples], skip_missing=skip_missing)
    samples, dropped = drop_missing(samples, features)
    if dropped:
        report(f"left out {len(dropped)} sample(s) whose slide has no features, e.g. {dropped[0]}")
    if not samples:
        raise ValueError(f"no training sample has features in {features_dir}")
    feature_dim = peek_shape(next(iter(features.paths.values())))[1]
    model, tokenizer, info = prepare_stage(
        stage,
        lm=lm,
        init=init,
        slide_tokens=slide_tokens,
        num_tokens=num_tokens,
        feature_dim=feature_dim,
        projector_hidden=projector_hidden,
        mil_checkpoint=mil_checkpoint,
        train_config=train_config,
    )
    if model.config.feature_dim != feature_dim:
        raise ValueError(
            f"{features_dir} holds {feature_dim}-d features but the model takes {model.config.feature_dim}-d"
        )
    train_config.extra.update(
        {"data": [str(p) for p in data], "features_dir": str(features_dir), "left_out": dropped}
    )
    dataset = ConversationDataset(
        samples, features, tokenizer, train_config.max_patches, train_config.seed, train_config.mc_reply
    )
    report(f"stage {stage}: {len(dataset)} samples, slide tokens {model.config.slide_tokens}")
    result = train_stage(model, tokenizer, dataset, train_config, out_dir, info)
    report(f"trained {result['steps']} steps in {result['seconds']:.0f} s; run folder: {out_dir}")
    return result


def _multiple_choice_items(questions, limit, slide_map, report):
    """(the file's multiple-choice items, the first ``limit`` of them; how many open questions were
    left out; the read result), reporting what was read and left out."""
    result = load_questions(questions)
    report(result.summary())
    items, num_open = multiple_choice_only(
        apply_slide_map(result.items, read_slide_map(slide_map) if slide_map else None)
    )
    if num_open:
        report(f"left out {num_open} open question(s): multiple-choice evaluation only")
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError(f"{questions}: no multiple-choice question to evaluate")
    return items, num_open, result


def _prior_answers(prior_from) -> list[str] | None:
    """The answer letters of a training question file, for the most-frequent-letter baseline."""
    if not prior_from:
        return None
    prior_items = [i for i in load_questions(prior_from).items if isinstance(i, VQAItem)]
    prior = [i.answer for i in multiple_choice_only(prior_items)[0]]
    if not prior:
        raise ValueError(f"{prior_from}: no multiple-choice question to take answer priors from")
    return prior


def _eval_device(device: str | None) -> tuple[torch.device, torch.dtype]:
    """The evaluation device (CUDA when there is one) and the LM's dtype on it (bf16 on GPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, lm_dtype("auto") if device.type == "cuda" else torch.float32


def blind_eval_from_files(
    questions: str | Path,
    out_dir: str | Path,
    lm: str | Path | None = None,
    scores: tuple[str, ...] = ("letter",),
    batch_size: int = 8,
    prior_from: str | Path | None = None,
    limit: int | None = None,
    device: str | None = None,
    sample: int | None = None,
    seed: int = 0,
    report=print,
) -> list[dict]:
    """The language model alone, untrained for the task and shown no slide, on a question file: how
    much of a benchmark an LM answers from the question text (the floor every slide-token method must
    clear), beside the answer-prior baselines; writes accuracy.csv and predictions_blind_{score}.csv."""
    from tcssa.vlm.checkpoint import load_base_lm
    from tcssa.vlm.language_models import DEFAULT_LM, resolve_lm
    from tcssa.vlm.model import SlideLM, SlideLMConfig

    items, num_open, result = _multiple_choice_items(questions, limit, None, report)
    if sample and sample < len(items):
        # A random subset, in file order: the files are sorted by organ, so a prefix would not do.
        keep = sorted(random.Random(seed).sample(range(len(items)), sample))
        items = [items[i] for i in keep]
        report(f"a random {sample} of the questions (seed {seed})")
    folder = resolve_lm(lm, report)
    name = Path(str(lm)).name if lm is not None else DEFAULT_LM
    device, dtype = _eval_device(device)
    base, tokenizer = load_base_lm(folder, dtype)
    config = SlideLMConfig(feature_dim=1, lm_hidden=base.config.hidden_size, slide_tokens="blind")
    model = SlideLM(base, config).to(device).eval()
    rows = prior_baseline_rows(items, _prior_answers(prior_from))
    out_dir = Path(out_dir)
    for score in scores:
        results = evaluate_multiple_choice(
            model, tokenizer, items, NoFeatures(), "loglik", score, batch_size, device=device
        )
        rows += accuracy_rows(results, f"{name} slide-blind ({score} log-likelihood)")
        write_predictions(results, out_dir / f"predictions_blind_{score}.csv")
    write_table(rows, out_dir / "accuracy.csv")
    summary = {
        "lm": str(folder),
        "questions": str(questions),
        "n_questions": len(items),
        "sample_seed": seed if sample else None,
        "n_open_left_out": num_open,
        "n_skipped_records": len(result.skipped),
    }
    (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    report(format_accuracy_table(rows))
    return rows


def eval_from_files(
    run_dir: str | Path,
    questions: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    modes: tuple[str, ...] = ("loglik",),
    score: str = "letter",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prior_from: str | Path | None = None,
    limit: int | None = None,
    device: str | None = None,
    slide_map: str | Path | None = None,
    report=print,
) -> list[dict]:
    """Evaluate a run folder on a question file; writes accuracy.csv, predictions_{mode}.csv, missing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "tcssa vqa eval runs as one process (every process would score every question and write the "
            "same files); launch it without torchrun / accelerate launch, and pick a GPU with --device"
        )

    items, num_open, result = _multiple_choice_items(questions, limit, slide_map, report)
    features = FolderFeatures(features_dir, [i.slide_id for i in items], skip_missing=True)
    device, dtype = _eval_device(device)
    model, tokenizer, info = load_run(run_dir, dtype)
    model.to(device)
    rows = prior_baseline_rows(items, _prior_answers(prior_from))
    out_dir = Path(out_dir)
    for mode in modes:
        results = evaluate_multiple_choice(
            model, tokenizer, items, features, mode, score, batch_size, max_new_tokens, device
        )
        method = f"{Path(run_dir).name} {mode}" + (f" ({score})" if mode == "loglik" else "")
        rows += accuracy_rows(results, method)
        write_predictions(results, out_dir / f"predictions_{mode}.csv")
    write_table(rows, out_dir / "accuracy.csv")
    missing = sorted({i.slide_id for i in items if i.slide_id not in features})
    n_missing_q = sum(i.slide_id not in features for i in items)
    (out_dir / "missing_slides.txt").write_text("".join(f"{s}\n" for s in missing))
    summary = {
        "run": str(run_dir),
        "questions": str(questions),
        "n_questions": len(items),
        "n_open_left_out": num_open,
        "n_skipped_records": len(result.skipped),
        "n_missing_slides": len(missing),
        "n_questions_missing_features": n_missing_q,
    }
    (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    if missing:
        report(
            f"{len(missing)} slide(s) have no features: their {n_missing_q} question(s) count as wrong "
            f"(listed in {out_dir / 'missing_slides.txt'})"
        )
    report(format_accuracy_table(rows))
    return rows
