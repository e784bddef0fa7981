"""Dataset loaders: GSM8K as published, the ReFT repository's json files, and the synthetic task.

Every loader returns `formats.records.Example`s. Bad input raises `DatasetError`, whose
message names the file, the line (jsonl) or record index (json) and the field.

Where the files live: ``data_dir`` argument, else ``$REFT_DATA_DIR``, else ``./data``, else
``../shared/data`` (the layout of this project's workspace). Under it:

    gsm8k/grade_school_math/data/{train,test}.jsonl    GSM8K (OpenAI's repository)
    reft/data/{svamp_nl,svamp_python_sdp,...}.json     the ReFT repository's data/
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from formats.records import COT_KINDS, Example, ncot_target
from rewards.extract import parse_mcq_options, parse_number

DATASETS = ("gsm8k", "svamp", "mathqa", "mathqa-numeric", "synthetic")
SPLITS = ("train", "test")

# (dataset, split, cot kind) -> path under the data dir. Test sets carry answers only, so one
# file serves both kinds. GSM8K N-CoT train prefers the ReFT repository's file when present
# (it is what the paper trained on) and falls back to OpenAI's jsonl converted to N-CoT.
_REFT = "reft/data"
_FILES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("gsm8k", "train", "ncot"): (f"{_REFT}/gsm8k_nl.json", "gsm8k/grade_school_math/data/train.jsonl"),
    ("gsm8k", "train", "pcot"): (f"{_REFT}/gsm8k_python_sdp.json",),
    ("gsm8k", "test", "*"): (f"{_REFT}/gsm8k_test_set.json", "gsm8k/grade_school_math/data/test.jsonl"),
    ("svamp", "train", "ncot"): (f"{_REFT}/svamp_nl.json",),
    ("svamp", "train", "pcot"): (f"{_REFT}/svamp_python_sdp.json",),
    ("svamp", "test", "*"): (f"{_REFT}/svamp_test_set.json",),
    ("mathqa", "train", "ncot"): (f"{_REFT}/mathqa_nl.json",),
    ("mathqa", "train", "pcot"): (f"{_REFT}/mathqa_python_sdp.json",),
    ("mathqa", "test", "*"): (f"{_REFT}/mathqa_test_set.json",),
    ("mathqa-numeric", "train", "ncot"): (f"{_REFT}/mathqa-numeric_nl.json",),
    ("mathqa-numeric", "train", "pcot"): (f"{_REFT}/mathqa-numeric_python_sdp.json",),
    ("mathqa-numeric", "test", "*"): (f"{_REFT}/mathqa-numeric_test_set.json",),
}


class DatasetError(ValueError):
    """A malformed dataset file: the message says where (file:line or file[record]) and which field."""


def default_data_dir() -> Path:
    for candidate in (os.environ.get("REFT_DATA_DIR"), "data", "../shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    raise FileNotFoundError(
        "no data directory: set $REFT_DATA_DIR or pass --data-dir (looked in ./data and ../shared/data)")


def dataset_path(dataset: str, split: str, cot_kind: str, data_dir: Optional[Path] = None) -> Path:
    """The file for (dataset, split, kind); FileNotFoundError lists the paths that were tried."""
    if dataset not in DATASETS or dataset == "synthetic":
        raise ValueError(f"no file for dataset {dataset!r}; file datasets are {DATASETS[:-1]}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    candidates = _FILES[(dataset, split, "*" if split == "test" else cot_kind)]
    for rel in candidates:
        if (data_dir / rel).is_file():
            return data_dir / rel
    raise FileNotFoundError(f"{dataset}/{split}/{cot_kind}: none of {[str(data_dir / c) for c in candidates]} exists")


def load_dataset(dataset: str, split: str = "train", cot_kind: str = "ncot",
                 data_dir: Optional[Path] = None, path: Optional[Path] = None,
                 synthetic_config: Any = None) -> list[Example]:
    """Load one dataset split as `Example`s. ``path`` overrides the file lookup."""
    if dataset == "synthetic":
        from tasks.synthetic import SyntheticConfig, generate
        train, test = generate(synthetic_config or SyntheticConfig(), cot_kind=cot_kind)
        return train if split == "train" else test
    path = Path(path) if path else dataset_path(dataset, split, cot_kind, data_dir)
    if path.suffix == ".jsonl":
        return load_gsm8k_jsonl(path, dataset=dataset, cot_kind=cot_kind)
    return load_reft_json(path, dataset=dataset, cot_kind=cot_kind)


# ---------------------------------------------------------------------------------------------
# GSM8K jsonl as published: {"question": ..., "answer": "...<<48/2=24>>24 ...\n#### 72"}
# ---------------------------------------------------------------------------------------------
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def gsm8k_to_ncot(answer: str) -> tuple[str, str]:
    """(N-CoT in the paper's format, final answer) from a GSM8K answer field.

    Calculator notes ``<<48/2=24>>`` are removed and ``#### 72`` becomes the answer line, built
    as for the ReFT json files (`formats.records.ncot_target`), with the same text as the
    final answer (thousands commas removed: ``#### 1,000`` -> ``1000``).
    Raises ValueError when there is no ``####`` line.
    """
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("no '####' final-answer line")
    final = final.strip().replace(",", "")
    return ncot_target(_CALCULATOR_NOTE.sub("", body), final), final


def load_gsm8k_jsonl(path: Path, dataset: str = "gsm8k", cot_kind: str = "ncot") -> list[Example]:
    """N-CoT examples with the paper's target (`gsm8k_to_ncot`). As P-CoT (a test set: P-CoT
    prompts) the rows carry their answers only: their reasoning is text, not a program."""
    if cot_kind not in COT_KINDS:
        raise ValueError(f"cot_kind must be one of {COT_KINDS}, got {cot_kind!r}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            question = _field(row, "question", where)
            try:
                cot, final = gsm8k_to_ncot(_field(row, "answer", where))
            except ValueError as e:
                raise DatasetError(f"{where}: field 'answer': {e}") from None
            _check_numeric(final, where, "answer")
            examples.append(Example(id=f"{dataset}_{path.stem}_{lineno - 1}", question=question, answer=final,
                                    dataset=dataset, cot_kind=cot_kind, cot=cot if cot_kind == "ncot" else None))
    return examples


# ---------------------------------------------------------------------------------------------
# The ReFT repository's json: a list of {item_id, question, answer_value[, answer_cot]}
# ---------------------------------------------------------------------------------------------
PROGRAM_MARK = "def solution():"   # every P-CoT annotation defines it; no N-CoT one does


def _read_reft_rows(path: Path) -> list:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def infer_cot_kind(path: Path) -> Optional[str]:
    """The CoT kind of a dataset file's gold CoTs: "pcot" when its ``answer_cot``s are programs
    (contain ``def solution():``), "ncot" when they are text (GSM8K's jsonl always), None when it
    has none (a test set). A file that mixes both raises `DatasetError` naming a record of each."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return "ncot"
    kinds: dict[str, int] = {}
    for index, row in enumerate(_read_reft_rows(path)):
        cot = row.get("answer_cot") if isinstance(row, dict) else None
        if isinstance(cot, str):
            kinds.setdefault("pcot" if PROGRAM_MARK in cot else "ncot", index)
    if len(kinds) > 1:
        raise DatasetError(f"{path}: field 'answer_cot' mixes programs ([record {kinds['pcot']}]) and "
                           f"text ([record {kinds['ncot']}])")
    return next(iter(kinds), None)


def load_reft_json(path: Path, dataset: str, cot_kind: str = "ncot") -> list[Example]:
    """N-CoT ``answer_cot``s become the paper's SFT target (`formats.records.ncot_target`: the
    answer line appended); P-CoT ones stay the program. A CoT of the other kind (a program read
    as N-CoT, text read as P-CoT) raises `DatasetError`: it would train and score as garbage."""
    if cot_kind not in COT_KINDS:
        raise ValueError(f"cot_kind must be one of {COT_KINDS}, got {cot_kind!r}")
    rows = _read_reft_rows(path)
    examples = []
    for index, row in enumerate(rows):
        where = f"{path}[record {index}]"
        question = _field(row, "question", where)
        answer = _field(row, "answer_value", where).strip()
        cot = row.get("answer_cot")
        if cot is not None and not isinstance(cot, str):
            raise DatasetError(f"{where}: field 'answer_cot' must be a string, got {type(cot).__name__}")
        if cot is not None and (PROGRAM_MARK in cot) != (cot_kind == "pcot"):
            found = "a program" if PROGRAM_MARK in cot else f"text without {PROGRAM_MARK!r}"
            raise DatasetError(f"{where}: field 'answer_cot' is {found}, not a {cot_kind} CoT "
                               f"(the file's kind: {infer_cot_kind(path)})")
        if cot is not None and cot_kind == "ncot":
            cot = ncot_target(cot, answer)        # the json's answer_value, before MCQ lower-casing
        options = None
        if dataset == "mathqa":
            if answer.lower() not in "abcde" or len(answer) != 1:
                raise DatasetError(f"{where}: field 'answer_value' must be an option letter a-e, got {answer!r}")
            answer = answer.lower()
            options = parse_mcq_options(question) or None
        else:
            _check_numeric(answer, where, "answer_value")
        item_id = str(row.get("item_id", f"{dataset}_{index}"))
        examples.append(Example(id=item_id, question=question, answer=answer, dataset=dataset,
                                cot_kind=cot_kind, cot=cot, options=options))
    return examples


def _field(row: Any, name: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    if name not in row:
        raise DatasetError(f"{where}: field {name!r} is missing")
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _check_numeric(answer: str, where: str, field: str) -> None:
    if parse_number(answer) is None:
        raise DatasetError(f"{where}: field {field!r} is not a number: {answer!r}")

