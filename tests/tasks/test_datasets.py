"""Loaders: real files (when present), the paper's N-CoT format, and errors that say where."""
import json

import pytest

from formats.records import build_prompt, ncot_target
from tasks.datasets import (
    DatasetError,
    gsm8k_to_ncot,
    infer_cot_kind,
    load_dataset,
    load_gsm8k_jsonl,
    load_reft_json,
)


def test_gsm8k_answer_becomes_paper_ncot():
    cot, final = gsm8k_to_ncot("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                               "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72")
    assert final == "72"
    assert cot == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n"
                   "Therefore, the answer is: 72")


def test_gsm8k_answer_line_is_the_examples_answer():
    cot, final = gsm8k_to_ncot("She earns 1,000 x 2 = <<1000*2=2000>>2,000 dollars. \n#### 2,000 ")
    assert final == "2000" and cot == "She earns 1,000 x 2 = 2,000 dollars.\nTherefore, the answer is: 2000"
    assert cot == ncot_target("She earns 1,000 x 2 = 2,000 dollars. ", final)


def test_ncot_target_is_the_papers():
    # train_sft_model.py: answer_cot.strip() + "\nTherefore, the answer is: " + answer_value.strip()
    assert ncot_target("  So 5 + 2 = 7.\n\nTherefore, the answer is <7>.\n", " 7.0 ") == \
        "So 5 + 2 = 7.\n\nTherefore, the answer is <7>.\nTherefore, the answer is: 7.0"


# Two records of the ReFT svamp_nl.json as published: svamp_0 (abridged) and svamp_852, a GPT-3.5
# non-answer. Their targets, by hand from train_sft_model.py's tokenize_fn.
SVAMP_ROWS = [
    {"item_id": "svamp_0", "question": "initially he had 29 endangered bird species . if each species has 7 pairs "
                                       "of birds how many pairs does he have in total ?",
     "answer_cot": "29 species x 7 pairs = 203 pairs\n\nTherefore, Tyler has a total of 203 pairs of birds in the "
                   "bird sanctuary.\n\nTherefore, the answer is <203>.",
     "answer_value": "203.0"},
    {"item_id": "svamp_852", "question": "Mark sprinted 24 miles at 6 miles per hour. How long did Mark sprint?",
     "answer_cot": "This question was already answered earlier. The answer is <4>.", "answer_value": "4.0"},
]


def test_reft_json_ncot_targets_get_the_papers_answer_line(tmp_path):
    path = _write(tmp_path, "svamp_nl.json", json.dumps(SVAMP_ROWS))
    first, second = load_reft_json(path, "svamp", "ncot")
    assert first.cot == ("29 species x 7 pairs = 203 pairs\n\nTherefore, Tyler has a total of 203 pairs of birds in "
                         "the bird sanctuary.\n\nTherefore, the answer is <203>.\nTherefore, the answer is: 203.0")
    assert second.cot == ("This question was already answered earlier. The answer is <4>.\n"
                          "Therefore, the answer is: 4.0")
    assert (first.answer, second.answer) == ("203.0", "4.0")
    assert infer_cot_kind(path) == "ncot"


def test_reft_json_programs_stay_programs_and_kinds_are_checked(tmp_path):
    program = 'def solution():\n    """q"""\n    return 7'
    path = _write(tmp_path, "svamp_python_sdp.json",
                  json.dumps([{"item_id": "svamp_1", "question": "q", "answer_value": "7", "answer_cot": program}]))
    assert load_reft_json(path, "svamp", "pcot")[0].cot == program
    assert infer_cot_kind(path) == "pcot"
    with pytest.raises(DatasetError, match=r"svamp_python_sdp\.json\[record 0\]: field 'answer_cot' is a program, "
                                           r"not a ncot CoT \(the file's kind: pcot\)"):
        load_reft_json(path, "svamp", "ncot")
    texts = _write(tmp_path, "svamp_nl.json", json.dumps(SVAMP_ROWS))
    with pytest.raises(DatasetError, match=r"\[record 0\]: field 'answer_cot' is text without 'def solution\(\):'"):
        load_reft_json(texts, "svamp", "pcot")
    answers_only = _write(tmp_path, "test.json", json.dumps([{"question": "q", "answer_value": "7"}]))
    assert infer_cot_kind(answers_only) is None
    assert infer_cot_kind(tmp_path / "x.jsonl") == "ncot"


def test_gsm8k_jsonl_as_pcot_keeps_answers_only(tmp_path):
    path = _write(tmp_path, "test.jsonl", '{"question": "q", "answer": "x\\n#### 3"}\n')
    (example,) = load_gsm8k_jsonl(path, cot_kind="pcot")
    assert (example.cot_kind, example.cot, example.answer) == ("pcot", None, "3")


def test_prompts_are_the_papers():
    assert build_prompt("Q?", "ncot") == "Question:\nQ?\nAnswer reasoning:\n"
    assert build_prompt("Q?", "pcot") == 'Question:\nQ?\nAnswer reasoning:\ndef solution():\n    """Q?"""\n'


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "x\\n#### 3"}', '{"question": "q2"}'], r"bad\.jsonl:2: field 'answer' is missing"),
    (['{"question": "q", "answer": "x\\n#### 3"}', '{"question": "q2", '], r"bad\.jsonl:2: bad JSON"),
    (['{"question": "q", "answer": "no marker"}'], r"bad\.jsonl:1: field 'answer': no '####'"),
    (['{"question": "q", "answer": "x\\n#### seven"}'], r"bad\.jsonl:1: field 'answer' is not a number: 'seven'"),
    (['{"question": "", "answer": "x\\n#### 3"}'], r"bad\.jsonl:1: field 'question' must be a non-empty string"),
    (['[1, 2]'], r"bad\.jsonl:1: expected an object"),
])
def test_gsm8k_jsonl_errors_name_file_line_field(tmp_path, lines, message):
    path = _write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_gsm8k_jsonl(path)


@pytest.mark.parametrize("rows, dataset, message", [
    ([{"item_id": "a", "question": "q", "answer_value": "3"}, {"item_id": "b", "question": "q"}], "svamp",
     r"\[record 1\]: field 'answer_value' is missing"),
    ([{"question": "q", "answer_value": "three"}], "svamp", r"\[record 0\]: field 'answer_value' is not a number"),
    ([{"question": "q\na ) 1 , b ) 2", "answer_value": "z"}], "mathqa", r"\[record 0\]: field 'answer_value' must be an option letter"),
    ([{"question": "q", "answer_value": "3", "answer_cot": 5}], "svamp", r"\[record 0\]: field 'answer_cot' must be a string"),
])
def test_reft_json_errors_name_file_record_field(tmp_path, rows, dataset, message):
    path = _write(tmp_path, "bad.json", json.dumps(rows))
    with pytest.raises(DatasetError, match=message):
        load_reft_json(path, dataset)


def test_reft_json_bad_json_names_line(tmp_path):
    path = _write(tmp_path, "bad.json", '[\n{"question": "q",\n "answer_value": }\n]')
    with pytest.raises(DatasetError, match=r"bad\.json:3: bad JSON"):
        load_reft_json(path, "svamp")


def test_numeric_answers_may_be_json_numbers(tmp_path):
    path = _write(tmp_path, "ok.json", json.dumps([{"question": "q", "answer_value": 3.5}]))
    assert load_reft_json(path, "svamp")[0].answer == "3.5"


# --- real files -------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, split, kind, rows", [
    ("gsm8k", "train", "ncot", 7473),
    ("gsm8k", "test", "ncot", 1319),
    ("svamp", "train", "ncot", 3076),
    ("svamp", "train", "pcot", 3043),
    ("svamp", "test", "ncot", 1000),
    ("mathqa", "test", "ncot", 1605),
    ("mathqa-numeric", "test", "ncot", 1605),
])
def test_real_datasets_load(data_dir, dataset, split, kind, rows):
    examples = load_dataset(dataset, split, kind, data_dir=data_dir)
    assert len(examples) == rows
    assert len({e.id for e in examples}) == rows
    if split == "train":
        assert all(e.cot for e in examples)
    if dataset == "mathqa":
        assert all(e.answer in "abcde" for e in examples)
        assert sum(bool(e.options) for e in examples) == rows


def test_real_gsm8k_first_row(data_dir):
    first = load_dataset("gsm8k", "train", "ncot", data_dir=data_dir)[0]
    assert first.answer == "72"
    assert "<<" not in first.cot and first.cot.endswith("clips altogether in April and May.\nTherefore, the answer is: 72")


def test_real_ncot_targets_end_with_the_answer_line(data_dir):
    for dataset in ("gsm8k", "svamp"):
        for e in load_dataset(dataset, "train", "ncot", data_dir=data_dir):
            assert e.cot.endswith(f"\nTherefore, the answer is: {e.answer}"), e.id
    svamp = {e.id: e for e in load_dataset("svamp", "train", "ncot", data_dir=data_dir)}
    assert svamp["svamp_852"].cot == ("This question was already answered earlier. The answer is <4>.\n"
                                      "Therefore, the answer is: 4.0")


def test_every_real_pcot_target_is_a_body_after_the_prompts_header(data_dir):
    """The P-CoT prompt ends with the function header, so no target may repeat it, including the
    programs whose docstring quotes the question with other punctuation (svamp: 37 of them)."""
    from learner.data import sft_target
    examples = load_dataset("svamp", "train", "pcot", data_dir=data_dir)
    targets = [sft_target(e) for e in examples]
    assert not [e.id for e, t in zip(examples, targets) if "def solution" in t]
    assert all(t.startswith("    ") for t in targets)
