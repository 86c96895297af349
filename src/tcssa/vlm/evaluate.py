"""Multiple-choice evaluation (``tcssa vqa eval``), SlideBench style.

Two ways to read the model's answer, both deterministic:

- ``loglik``: every option is scored by the model's log-likelihood after the prompt, with the reply
  tokenized exactly as training supervises one. ``score="letter"``: the tokens of the option's letter
  (the reply's end-of-turn tokens, the same for every option, are left out, so a model trained to
  answer "B" and one trained to answer "B. text" are read alike); ``score="text"``: the whole reply
  made of the option's text, end-of-turn included (so a prefix of a longer option is not favoured).
  The most likely option wins; ties go to the first.
- ``generate``: greedy generation, read with ``prompts.parse_letter`` (the reply must BE a valid
  letter, optionally "(B)", "B.", "Answer: B"); anything else counts as wrong and is listed as unparsed.

Accuracy is reported overall and per broad and narrow category. A question whose slide has no
features counts as wrong, stays in the denominator, and is listed. Answer-prior baselines (most
frequent answer letter; uniform random = 1/options) go in the same table.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tcssa.vlm.formats import VQAItem
from tcssa.vlm.model import SlideLM, collate
from tcssa.vlm.prompts import (
    IGNORE_INDEX,
    EncodedSample,
    assemble,
    format_question,
    parse_letter,
    reply_ids,
    tokenize_conversation,
)

EVAL_MODES = ("loglik", "generate")
SCORE_TARGETS = ("letter", "text")
TABLE_COLUMNS = ("method", "level", "category", "accuracy", "n", "n_missing", "n_unparsed")


@dataclass
class QuestionResult:
    question_id: str
    slide_id: str
    broad_category: str
    narrow_category: str
    answer: str
    num_options: int
    prediction: str  # a letter, or "" when there is none
    correct: bool
    status: str  # ok | missing_features | unparsed
    reply: str = ""  # the generated text (generate mode)


def multiple_choice_only(items: list[VQAItem]) -> tuple[list[VQAItem], int]:
    """The multiple-choice items and how many open questions were left out (report it)."""
    closed = [item for item in items if item.is_multiple_choice]
    return closed, len(items) - len(closed)


@torch.no_grad()
def evaluate_multiple_choice(
    model: SlideLM,
    tokenizer,
    items: list[VQAItem],
    features,
    mode: str = "loglik",
    score: str = "letter",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[QuestionResult]:
    """One QuestionResult per item, in order. ``features``: a FolderFeatures / MemoryFeatures."""
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    if score not in SCORE_TARGETS:
        raise ValueError(f"score must be one of {SCORE_TARGETS}, got {score!r}")
    open_items = [item.question_id for item in items if not item.is_multiple_choice]
    if open_items:
        raise ValueError(
            f"{len(open_items)} open question(s) cannot be scored as multiple choice: {open_items[:5]}"
        )
    model.eval()
    device = device or next(model.projector.parameters()).device
    results: list[QuestionResult | None] = [None] * len(items)
    present = []
    for index, item in enumerate(items):
        if item.slide_id in features:
            present.append(index)
        else:
            results[index] = _result(item, "", "missing_features")
    chunks = [present[i : i + batch_size] for i in range(0, len(present), batch_size)]
    for chunk in tqdm(chunks, desc=f"eval ({mode})", disable=not progress):
        chunk_items = [items[i] for i in chunk]
        slides = [features.load(item.slide_id) for item in chunk_items]
        if mode == "loglik":
            predictions = _predict_by_likelihood(model, tokenizer, chunk_items, slides, score, device)
            for index, item, letter in zip(chunk, chunk_items, predictions, strict=True):
                results[index] = _result(item, letter, "ok")
        else:
            replies = _generate_replies(model, tokenizer, chunk_items, slides, max_new_tokens, device)
            for index, item, reply in zip(chunk, chunk_items, replies, strict=True):
                letter = parse_letter(reply, item.letters) or ""
                results[index] = _result(item, letter, "ok" if letter else "unparsed", reply)
    return results


def _result(item: VQAItem, prediction: str, status: str, reply: str = "") -> QuestionResult:
    return QuestionResult(
        question_id=item.question_id,
        slide_id=item.slide_id,
        broad_category=item.broad_category,
        narrow_category=item.narrow_category,
        answer=item.answer,
        num_options=len(item.options),
        prediction=prediction,
        correct=bool(prediction) and prediction == item.answer,
        status=status,
        reply=reply,
    )


def _prompt_turns(item: VQAItem):
    return [("human", format_question(item))]


def _option_replies(tokenizer, turns, item: VQAItem, score: str) -> list[tuple[int, ...]]:
    replies = [
        reply_ids(tokenizer, turns, letter if score == "letter" else text) for letter, text in item.options
    ]
    if score == "letter" and len(replies) > 1:
        shared = 0  # end-of-turn tokens every option's reply ends with
        while shared < min(map(len, replies)) - 1 and len({r[len(r) - 1 - shared] for r in replies}) == 1:
            shared += 1
        replies = [r[: len(r) - shared] for r in replies]
    return replies


def _predict_by_likelihood(model, tokenizer, items, slides, score, device) -> list[str]:
    replies = [_option_replies(tokenizer, _prompt_turns(item), item, score) for item in items]
    if all(len(reply) == 1 for per_item in replies for reply in per_item):
        return _predict_by_next_token(model, tokenizer, items, slides, replies, device)
    return _predict_by_option_sequences(model, tokenizer, items, slides, replies, device)


def _predict_by_option_sequences(model, tokenizer, items, slides, replies, device) -> list[str]:
    """One sequence per option (prompt + that option's reply), scored by the reply's log-likelihood."""
    samples, rows, lengths, owners = [], [], [], []
    for slide_index, (item, slide) in enumerate(zip(items, slides, strict=True)):
        prompt = _encoded_prompt(model, tokenizer, item, slide)
        for (letter, _), reply in zip(item.options, replies[slide_index], strict=True):
            samples.append(
                EncodedSample(
                    prompt.input_ids + list(reply),
                    [IGNORE_INDEX] * (len(prompt.input_ids) + len(reply)),
                    prompt.image_mask + [False] * len(reply),
                )
            )
            rows.append(slide_index)
            lengths.append(len(reply))
            owners.append((slide_index, letter))
    batch = collate(
        samples, slides, [i.slide_id for i in items], tokenizer.pad_token_id, "left", slide_rows=rows
    ).to(device)
    logprobs = model.continuation_logprobs(batch, lengths).cpu()
    best: dict[int, tuple[float, str]] = {}
    for (slide_index, letter), value in zip(owners, logprobs.tolist(), strict=True):
        if slide_index not in best or value > best[slide_index][0]:  # ties: the first option wins
            best[slide_index] = (value, letter)
    return [best[i][1] for i in range(len(items))]


def _predict_by_next_token(model, tokenizer, items, slides, replies, device) -> list[str]:
    """``_predict_by_likelihood`` when every option's reply is one token (a letter, for most
    tokenizers): one pass over the prompt alone, reading each option token's log-probability at its
    end, instead of one pass per option. The same numbers, a quarter of the work for four options."""
    batch = _prompt_batch(model, tokenizer, items, slides, device)
    logits = model(**batch.model_inputs(), logits_to_keep=1).logits[:, -1].float()
    logprobs = logits.log_softmax(-1).cpu()
    predictions = []
    for row, (item, per_option) in enumerate(zip(items, replies, strict=True)):
        values = [float(logprobs[row, reply[0]]) for reply in per_option]
        predictions.append(item.options[values.index(max(values))][0])  # ties: the first option wins
    return predictions


def _encoded_prompt(model, tokenizer, item: VQAItem, slide) -> EncodedSample:
    """An item's prompt up to the reply, with its slide's span of slide-token positions."""
    return assemble(
        tokenize_conversation(tokenizer, _prompt_turns(item), add_generation_prompt=True),
        model.config.num_slide_tokens(slide.shape[0]),
        tokenizer.pad_token_id,
    )


def _prompt_batch(model, tokenizer, items, slides, device):
    """The items' prompts, left-padded so that every prompt ends in the last column."""
    samples = [
        _encoded_prompt(model, tokenizer, item, slide) for item, slide in zip(items, slides, strict=True)
    ]
    return collate(samples, slides, [i.slide_id for i in items], tokenizer.pad_token_id, "left").to(device)


def _generate_replies(model, tokenizer, items, slides, max_new_tokens, device) -> list[str]:
    batch = _prompt_batch(model, tokenizer, items, slides, device)
    new_tokens = model.generate(
        batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


# ----------------------------------------------------------------------------- tables
def _groups(results_or_items, key_broad: str, key_narrow: str):
    groups = defaultdict(list)
    for entry in results_or_items:
        groups[("overall", "overall")].append(entry)
        broad = getattr(entry, key_broad)
        if broad:
            groups[("broad", broad)].append(entry)
        narrow = getattr(entry, key_narrow)
        if narrow:
            groups[("narrow", f"{broad} / {narrow}" if broad else narrow)].append(entry)
    return groups


def accuracy_rows(results: list[QuestionResult], method: str) -> list[dict]:
    rows = []
    for (level, category), group in _groups(results, "broad_category", "narrow_category").items():
        rows.append(
            {
                "method": method,
                "level": level,
                "category": category,
                "accuracy": sum(r.correct for r in group) / len(group),
                "n": len(group),
                "n_missing": sum(r.status == "missing_features" for r in group),
                "n_unparsed": sum(r.status == "unparsed" for r in group),
            }
        )
    return _sorted(rows)


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` (scipy's binomtest)."""
    from scipy.stats import binomtest  # scipy comes with scikit-learn

    if n == 0:
        return (0.0, 1.0)
    interval = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def paired_differences(
    results: list[QuestionResult],
    others: list[QuestionResult],
    name: str,
    other_name: str,
    resamples: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """Accuracy of ``results`` minus ``others`` on the same questions, overall and per category, with a
    paired bootstrap 95% interval. Slides are resampled, not questions: the questions about one slide
    hinge on the same evidence (a lesion seen or missed answers several of them), so they are not
    independent draws; both answers of every question of a drawn slide are kept together."""
    if [r.question_id for r in results] != [r.question_id for r in others]:
        raise ValueError(f"{name} and {other_name} answered different questions; no paired comparison")
    first = _groups(results, "broad_category", "narrow_category")
    second = _groups(others, "broad_category", "narrow_category")
    rng = np.random.default_rng(seed)
    rows = []
    for (level, category), group in first.items():
        a = np.array([r.correct for r in group], dtype=float)
        b = np.array([r.correct for r in second[(level, category)]], dtype=float)
        slides = sorted({r.slide_id for r in group})
        index = {slide: i for i, slide in enumerate(slides)}
        owner = np.array([index[r.slide_id] for r in group])
        a_sum = np.bincount(owner, weights=a, minlength=len(slides))
        b_sum = np.bincount(owner, weights=b, minlength=len(slides))
        count = np.bincount(owner, minlength=len(slides)).astype(float)
        draws = rng.integers(0, len(slides), size=(resamples, len(slides)))
        boot = (a_sum[draws].sum(1) - b_sum[draws].sum(1)) / count[draws].sum(1)
        rows.append(
            {
                "variant": name,
                "against": other_name,
                "category": category,
                "difference": float(a.mean() - b.mean()),
                "ci95_low": float(np.quantile(boot, 0.025)),
                "ci95_high": float(np.quantile(boot, 0.975)),
                "n": len(a),
                "n_slides": len(slides),
            }
        )
    return rows


def prior_baseline_rows(items: list[VQAItem], prior_answers: list[str] | None = None) -> list[dict]:
    """Answer-prior baselines: always the most frequent letter, and uniform random (1 / options).

    ``prior_answers`` (e.g. the training set's answer letters) give the most frequent letter; without
    them it is taken from the evaluated items themselves, which flatters the baseline, and the method
    name says so.
    """
    source = prior_answers if prior_answers else [item.answer for item in items]
    counts = Counter(source)
    letter = max(sorted(counts), key=lambda k: counts[k])  # ties: alphabetical first
    where = "train" if prior_answers else "eval set"
    rows = []
    for (level, category), group in _groups(items, "broad_category", "narrow_category").items():
        common = {"level": level, "category": category, "n": len(group), "n_missing": 0, "n_unparsed": 0}
        rows.append(
            {
                "method": f"prior: always {letter} (most frequent in {where})",
                "accuracy": sum(item.answer == letter for item in group) / len(group),
                **common,
            }
        )
        rows.append(
            {
                "method": "prior: uniform random",
                "accuracy": sum(1 / len(item.options) for item in group) / len(group),
                **common,
            }
        )
    return _sorted(rows)


def _sorted(rows: list[dict]) -> list[dict]:
    order = {"overall": 0, "broad": 1, "narrow": 2}
    return sorted(rows, key=lambda r: (r["method"], order[r["level"]], r["category"]))


def write_table(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.4f}" if k == "accuracy" else row[k]) for k in TABLE_COLUMNS})
    return path


def write_predictions(results: list[QuestionResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])) if results else ["question_id"])
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))
    return path


def format_accuracy_table(rows: list[dict], levels=("overall", "broad")) -> str:
    """A small markdown table of the chosen levels, for the terminal and for docs."""
    lines = [
        "| method | level | category | accuracy | n | missing | unparsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["level"] in levels:
            lines.append(
                f"| {r['method']} | {r['level']} | {r['category']} | {100 * r['accuracy']:.2f}% | {r['n']} "
                f"| {r['n_missing']} | {r['n_unparsed']} |"
            )
    return "\n".join(lines)
