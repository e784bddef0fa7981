"""Loaders: real files (when present), the paper's N-CoT format, and errors that say where."""
import json

import pytest

from formats.records import build_prompt
from tasks.datasets import (
    DatasetError,
    gsm8k_to_ncot,
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
    assert "<<" not in first.cot and first.cot.endswith("Therefore, the answer is: 72")
