import csv
import random

import pytest

from tcssa.apps.vqa_demo import BURDEN_ANSWERS, LESION_ANSWERS, TINY, questions_for_slide, run_vqa_demo
from tcssa.cli import main
from tcssa.vlm.formats import read_slidebench_vqa

TRUTH = {
    "label": "positive",
    "lesion_fraction": "0.0125",
    "share_stroma": "0.2",
    "share_tumour": "0.5",
    "share_immune": "0.1",
    "share_necrosis": "0.1",
    "share_fat": "0.05",
}


def test_demo_questions_follow_the_slide_truth():
    rng = random.Random(0)
    items = {i.narrow_category: i for i in questions_for_slide("rare_slide_0001", "rare", TRUTH, rng)}
    assert set(items) == {"Tissue composition", "Lesion detection", "Lesion burden"}
    assert items["Tissue composition"].answer_text == "tumour"
    assert items["Lesion detection"].answer_text == LESION_ANSWERS[0]
    assert items["Lesion burden"].answer_text == BURDEN_ANSWERS[2]  # 1.25% lies in "1% to 3%"
    assert {i.broad_category for i in items.values()} == {"Microscopy", "Diagnosis", "Clinical"}
    for item in items.values():
        assert len(item.options) == 4 and len({t for _, t in item.options}) == 4
    negative = {**TRUTH, "label": "negative"}
    items = {i.narrow_category: i for i in questions_for_slide("s", "rare", negative, rng)}
    assert items["Lesion detection"].answer_text == LESION_ANSWERS[1]
    assert items["Lesion burden"].answer_text == BURDEN_ANSWERS[0]
    subtype = {**TRUTH, "label": "subtype_C"}
    items = {i.narrow_category: i for i in questions_for_slide("s", "subtype", subtype, rng)}
    assert items["Tumour subtype"].answer_text == "Subtype C"
    # Shuffled answer letters: over many slides every letter is the answer sometimes.
    letters = {questions_for_slide("s", "rare", TRUTH, rng)[1].answer for _ in range(40)}
    assert letters == {"A", "B", "C", "D"}


def test_tiny_demo_end_to_end(tmp_path):
    rows = run_vqa_demo(tmp_path, size=TINY, progress=False, report=lambda *_: None)
    table = list(csv.DictReader(open(tmp_path / "vqa_results.csv")))
    assert list(table[0]) == ["variant", "category", "accuracy", "n"]
    assert {r["variant"] for r in table} == {
        "slots",
        "random-k",
        "mean",
        "majority-answer",
        "most-frequent-letter",
        "uniform-random",
    }
    for variant in ("slots", "random-k", "mean"):
        categories = {r["category"] for r in table if r["variant"] == variant}
        assert {"overall", "Microscopy", "Diagnosis", "Clinical", "Lesion detection"} <= categories
    overall = [r for r in table if r["category"] == "overall"]
    assert len({r["n"] for r in overall}) == 1  # every variant answers the same test questions
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in table)
    assert len(rows) == len(table)
    test_questions = read_slidebench_vqa(tmp_path / "questions_test.csv").items
    assert len(test_questions) == int(overall[0]["n"])
    for variant in ("slots", "random-k", "mean"):
        assert (tmp_path / "runs" / variant / "stage2" / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_quick_demo_command(tmp_path):
    assert main(["vqa", "demo", "--quick", "--out", str(tmp_path)]) == 0
    table = {
        (r["variant"], r["category"]): float(r["accuracy"])
        for r in csv.DictReader(open(tmp_path / "vqa_results.csv"))
    }
    assert table[("slots", "overall")] > table[("uniform-random", "overall")]
