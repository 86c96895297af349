import json
from collections import Counter

import pytest

from tcssa.vlm.formats import (
    Conversation,
    detect_format,
    load_questions,
    read_slidebench_captions,
    read_slidebench_vqa,
    read_slideinstruct,
    read_wsi_vqa,
    slide_id_from_reference,
)
from tcssa.vlm.prompts import (
    PLAIN_CHAT_TEMPLATE,
    assemble,
    format_question,
    parse_letter,
    render_pieces,
    reply_ids,
    tokenize_conversation,
)
from vlm_helpers import mc_item, tiny_tokenizer


def test_slidebench_vqa_real_file(shared_data):
    result = read_slidebench_vqa(shared_data / "vqa" / "SlideBench-VQA-TCGA.csv")
    items = result.items
    assert len(items) == 1489 and not result.skipped
    assert Counter(i.broad_category for i in items) == {"Diagnosis": 999, "Microscopy": 389, "Clinical": 101}
    assert len({i.narrow_category for i in items}) == 13
    assert Counter(i.answer for i in items) == {"B": 616, "C": 537, "A": 224, "D": 112}
    assert len({i.slide_id for i in items}) == 589
    first = items[0]
    # BOM stripped from the first column name; the slide path became its stem, UUID part kept.
    assert first.question_id == "1"
    assert first.slide_id == "TCGA-05-4244-01Z-00-DX1.d4ff32cd-38cf-40ea-8213-45c2b100ac01"
    assert first.options[2] == ("C", "Papillary adenocarcinoma") and first.answer == "C"
    assert first.answer_text == "Papillary adenocarcinoma"
    assert load_questions(shared_data / "vqa" / "SlideBench-VQA-TCGA.csv").items == items


def test_slidebench_vqa_empty_options_and_bad_answers(tmp_path):
    path = tmp_path / "vqa.csv"
    path.write_text(
        "\ufeffID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
        "1,a/b/TCGA-X.h5,LUAD,Diagnosis,Grading,Grade?,G1,G2,,,B\n"
        "2,TCGA-Y,LUAD,Clinical,Risk,Risk?,low,high,,,D\n",
        encoding="utf-8",
    )
    result = read_slidebench_vqa(path)
    assert [i.letters for i in result.items] == [("A", "B")]
    assert result.items[0].slide_id == "TCGA-X"
    assert len(result.skipped) == 1 and "ID 2" in result.skipped[0] and "'D'" in result.skipped[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Slide,Question\n1,x,q\n")
    with pytest.raises(ValueError, match="missing column"):
        read_slidebench_vqa(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_slidebench_vqa(tmp_path / "nope.csv")


def test_slide_ids_keep_dots_that_are_not_file_suffixes():
    assert slide_id_from_reference("TCGA-05-4244-01Z-00-DX1.d4ff32cd") == "TCGA-05-4244-01Z-00-DX1.d4ff32cd"
    assert slide_id_from_reference("x/y/slide.1.h5") == "slide.1"
    assert slide_id_from_reference("C:\\data\\s01.svs") == "s01"
    assert slide_id_from_reference("007") == "007"


def test_wsi_vqa_real_files(shared_data):
    for split, total, closed, skipped in [
        ("train", 7139, 3724, 21),
        ("val", 798, 421, 0),
        ("test", 735, 390, 0),
    ]:
        result = read_wsi_vqa(shared_data / "vqa" / f"WsiVQA_{split}.json")
        assert len(result.items) + len(result.skipped) == total
        # 29 train answers are not verbatim choices; 8 match once a final full stop is dropped, and
        # the other 21 match no choice at all: reported, not guessed.
        assert len(result.skipped) == skipped
        items = result.items
        assert sum(i.is_multiple_choice for i in items) == closed - skipped
        assert all(i.answer in i.letters for i in items if i.is_multiple_choice)
        assert all(not i.letters and i.answer for i in items if not i.is_multiple_choice)
    test = read_wsi_vqa(shared_data / "vqa" / "WsiVQA_test.json").items
    assert Counter(len(i.options) for i in test) == {4: 388, 0: 345, 2: 2}
    train = read_wsi_vqa(shared_data / "vqa" / "WsiVQA_train.json")
    # "grade 3." matches the choice "grade 3" once the final full stop is dropped
    graded = [i for i in train.items if i.slide_id == "TCGA-A1-A0SP" and "grade of invasive" in i.question]
    assert graded and graded[0].answer_text == "grade 3"
    assert detect_format(shared_data / "vqa" / "WsiVQA_val.json") == "wsi-vqa"


def test_slidebench_captions_real_file(shared_data):
    result = read_slidebench_captions(shared_data / "vqa" / "SlideBench-Caption-TCGA.csv")
    assert len(result.items) + len(result.skipped) == 732
    conv = result.items[0]
    assert isinstance(conv, Conversation) and conv.turns[0][1].startswith("<image>\n")
    assert conv.turns[1][1].startswith("The essential pathological findings")
    assert detect_format(shared_data / "vqa" / "SlideBench-Caption-TCGA.csv") == "slidebench-caption"


def test_slideinstruct(tmp_path):
    records = [
        {
            "id": "c1",
            "image": ["feats/TCGA-AA.csv"],
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "Tumour."},
                {"from": "human", "value": "Grade?"},
                {"from": "gpt", "value": "G2."},
            ],
        }
    ]
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    assert detect_format(path) == "slideinstruct"
    conv = read_slideinstruct(path).items[0]
    assert conv.slide_id == "TCGA-AA" and len(conv.turns) == 4
    for change, message in [
        ({"image": ["a", "b"]}, "exactly one slide"),
        (
            {"conversations": [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}]},
            "placeholder",
        ),
        ({"conversations": [{"from": "robot", "value": "<image>"}]}, "unknown speaker"),
    ]:
        path.write_text(json.dumps([{**records[0], **change}]))
        with pytest.raises(ValueError, match=message):
            read_slideinstruct(path)
    # a repeated sample id is reported with the file and the id, and the samples are kept
    path.write_text(json.dumps([records[0], records[0], {**records[0], "id": "c2"}]))
    with pytest.warns(UserWarning, match=r"instruct\.json: 1 sample id\(s\) occur more than once: c1"):
        assert len(read_slideinstruct(path).items) == 3


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("B", "B"),
        (" B\n", "B"),
        ("(C)", "C"),
        ("(C) fat", "C"),
        ("D.", "D"),
        ("A. tumour", "A"),
        ("B)", "B"),
        ("Answer: C", "C"),
        ("answer:(A)", "A"),
        ("Based on the slide, B", None),  # a capital B at the start of a word is not an answer
        ("A lesion is present", None),
        ("The answer is B", None),
        ("E", None),  # not an option of this question
        ("b", None),
        ("", None),
        ("AB", None),
    ],
)
def test_strict_letter_parsing(reply, expected):
    assert parse_letter(reply, ("A", "B", "C", "D")) == expected


def test_prompt_pieces_plain_and_chat_template():
    tokenizer = tiny_tokenizer()
    item = mc_item("q", "s", "C")
    text = format_question(item)
    assert text.startswith("<image>\n") and "C. fat" in text and text.endswith("directly.")
    turns = [("human", text), ("gpt", "C")]
    pieces = render_pieces(tokenizer, turns)
    assert pieces[-1] == (" C<|endoftext|>\n", True)
    assert pieces[0][0].startswith("USER: <image>") and pieces[0][0].endswith("ASSISTANT:")
    # The prompt an evaluation sees is exactly the prompt training saw.
    assert render_pieces(tokenizer, turns[:1], add_generation_prompt=True) == pieces[:1]
    tokenized = tokenize_conversation(tokenizer, turns)
    sample = assemble(tokenized, 5, tokenizer.pad_token_id)
    assert sum(sample.image_mask) == 5
    supervised = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != -100]
    assert tuple(supervised) == reply_ids(tokenizer, turns[:1], "C")
    # A tokenizer with a chat template of its own (ChatML-like) is rendered with it.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pieces = render_pieces(tokenizer, turns)
    assert pieces[0][0].endswith("<|im_start|>assistant\n") and pieces[1] == ("C<|im_end|>\n", True)
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def test_placeholder_count_and_length_errors():
    tokenizer = tiny_tokenizer()
    for turns in (
        [("human", "no slide here"), ("gpt", "A")],
        [("human", "<image> and <image>"), ("gpt", "A")],
        [("human", "<image>"), ("gpt", "<image>")],
    ):
        with pytest.raises(ValueError, match="exactly one <image>"):
            tokenize_conversation(tokenizer, turns)
    tokenized = tokenize_conversation(
        tokenizer, [("human", "<image>\nWhich tissue?"), ("gpt", "stroma " * 20)]
    )
    long = assemble(tokenized, 4, 0)
    cut = assemble(tokenized, 4, 0, max_length=len(long.input_ids) - 5)
    assert cut.input_ids == long.input_ids[:-5] and sum(cut.image_mask) == 4
    with pytest.raises(ValueError, match="max_length 3 is too short"):
        assemble(tokenized, 4, 0, max_length=3)


SLIDEBENCH_HEADER = "ID,Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"


def test_wsi_vqa_string_choice_is_refused_naming_file_and_id(tmp_path):
    path = tmp_path / "wsi_strings.json"
    good = {"Id": "TCGA-AA-0001", "Question": "grade?", "Choice": ["G1", "G2"], "Answer": "G2"}
    for choice in ("ABCD", '["G1", "G2", "G3"]', "['G1', 'G2']"):
        bad = {"Id": "TCGA-BB-0002", "Question": "grade?", "Choice": choice, "Answer": "G2"}
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(
            ValueError, match=r"wsi_strings\.json item 1 \(Id 'TCGA-BB-0002'\).*Choice is a string"
        ):
            read_wsi_vqa(path)
    for choice in ({"a": "G1"}, 3, [["G1"], "G2"], [None, "G2"]):
        bad = {"Id": "TCGA-BB-0002", "Question": "grade?", "Choice": choice, "Answer": "G2"}
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(
            ValueError, match=r"wsi_strings\.json item 1 \(Id 'TCGA-BB-0002'\).*list of choice"
        ):
            read_wsi_vqa(path)
    # open questions: no Choice, null, [] or an empty string
    opens = [{"Id": f"TCGA-C{i}", "Question": "vital status?", "Answer": "alive"} for i in range(4)]
    for record, choice in zip(opens[1:], (None, [], " "), strict=True):
        record["Choice"] = choice
    path.write_text(json.dumps([good, *opens]))
    items = read_wsi_vqa(path).items
    assert [i.is_multiple_choice for i in items] == [True, False, False, False, False]
    assert items[0].letters == ("A", "B") and items[0].answer == "B"
    path.write_text(json.dumps([good, "not a record"]))
    with pytest.raises(ValueError, match=r"item 1 \(Id None\): expected keys"):
        read_wsi_vqa(path)


@pytest.mark.parametrize("reader", [read_slidebench_vqa, read_slidebench_captions])
def test_slidebench_duplicate_ids_are_refused_naming_file_and_ids(tmp_path, reader):
    path = tmp_path / "dups.csv"
    if reader is read_slidebench_vqa:
        row = "{},TCGA-X,LUAD,Diagnosis,Grading,Grade?,G1,G2,,,B\n"
        path.write_text(SLIDEBENCH_HEADER + "".join(row.format(i) for i in ("1", "2", "3", "2 ", "7", "1")))
    else:
        row = "{},TCGA-X,LUAD,Describe.,A caption.\n"
        path.write_text(
            "ID,Slide,Tumor,Question,Caption\n"
            + "".join(row.format(i) for i in ("1", "2", "3", "2 ", "7", "1"))
        )
    with pytest.raises(
        ValueError, match=r"dups\.csv: 2 duplicated ID\(s\): '1' on lines 2, 7; '2' on lines 3, 5"
    ):
        reader(path)
    with pytest.raises(ValueError, match="duplicated ID"):
        load_questions(path)


def test_wsi_vqa_questions_about_one_case_share_its_id_but_not_a_question_id(tmp_path):
    """WSI-VQA's Id is the case: several questions (even one question twice, as in the release) per Id."""
    path = tmp_path / "wsi.json"
    record = {"Id": "TCGA-AA-0001", "Question": "grade?", "Choice": ["G1", "G2"], "Answer": "G2"}
    path.write_text(json.dumps([record, record, {**record, "Question": "stage?"}]))
    items = read_wsi_vqa(path).items
    assert len(items) == 3 and {i.slide_id for i in items} == {"TCGA-AA-0001"}
    assert len({i.question_id for i in items}) == 3


def test_real_question_files_have_unique_question_ids(shared_data):
    for name in ("SlideBench-VQA-TCGA.csv", "WsiVQA_train.json", "WsiVQA_val.json", "WsiVQA_test.json"):
        result = load_questions(shared_data / "vqa" / name)
        ids = [i.question_id for i in result.items]
        assert len(ids) == len(set(ids)), name


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        text = SLIDEBENCH_HEADER + "1,TCGA-X,LUAD,Diagnosis,Grading,Grade?,G1,G2,,,B\n"
        text += "2,TCGA-Y,LUAD,Diagnosis,Grading,Gr\u00e4de?,G1,G2,,,A\n"
        bad_line, readers = 3, (read_slidebench_vqa, load_questions, detect_format)
    else:
        records = [
            '{"Id": "TCGA-X", "Question": "q?", "Answer": "a"}',
            '{"Id": "TCGA-Y", "Question": "\u00e9?", "Answer": "a"}',
        ]
        text = "[\n" + ",\n".join(records) + "\n]\n"
        bad_line, readers = 3, (read_wsi_vqa, load_questions, detect_format)
    path.write_bytes(text.encode("latin-1"))
    for read in readers:
        with pytest.raises(
            ValueError,
            match=rf"latin1\{suffix}: .*line {bad_line} \(byte \d+ of the line\) has bytes b'\\x(e4|e9)' "
            "that are not UTF-8",
        ):
            read(path)
    path.write_bytes(text.encode("utf-8-sig"))  # the same text as UTF-8 (with a BOM) reads
    assert len(load_questions(path).items) == 2


def test_a_slide_map_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path):
    from tcssa.vlm.formats import read_slide_map

    path = tmp_path / "map.csv"
    path.write_bytes("key,slide_id\nTCGA-A,s1\nTCGA-\u00df,s2\n".encode("cp1252"))
    not_utf8 = r"map\.csv: line 3 \(byte 6 of the line\) has bytes b'\\xdf' that are not UTF-8"
    with pytest.raises(ValueError, match=not_utf8):
        read_slide_map(path)
