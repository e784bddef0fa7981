"""The ``paper`` reward rule: the official code's extraction and judging, reproduced exactly.

Source: lqtrung1998/mwp_ReFT, ``train_rl_reft.py`` (``rollout`` and the three ``*_fn_mapper``
tables), ``src/python_engine.py`` (``process_code``, ``run``) and ``src/utils.py`` (``floatify``).
Pure functions; the program run itself is the sandbox's (``namespace="paper"``, see
``rewards/_sandbox_worker.py``), and ``rewards.score`` turns what these return into a `Score`.

What the official code does with a decoded sample (prompt + completion, special tokens skipped):

1. ``text.strip().split("\\nAnswer reasoning:\\n")[-1].strip()``: the reasoning (`reasoning_text`).
   For P-CoT the prompt ends with the ``def solution():`` header, so the reasoning is the
   whole program, header included.
2. N-CoT: the text after the last ``"\\nTherefore, the answer is: "`` (newline and space
   included; without one, the whole reasoning). Numeric datasets: ``float()`` of it, stripped,
   else no answer: Python's own float syntax, so "18.", "1e3", "1_000", "inf" and "nan" are read
   and "$18", "3/4", "1,000", "18 apples" are not. MathQA: lower-cased, quotes removed, stripped;
   always an answer, whatever the text.
3. P-CoT: `paper_program` (``process_code``), run as ``run`` does; the value ``solution()``
   returns through ``floatify`` (numeric) or ``str(value)`` normalised as in 2 (MathQA, where a
   program that fails or times out reads "none").
4. Numeric: correct when ``|answer - gold| <= 1e-2``, gold being ``float(gold without commas)``;
   MathQA: string equality with the normalised gold letter. Correct 1, any other extracted answer
   the partial reward (0.1), no answer 0: so every MathQA sample gets at least 0.1.
"""
from __future__ import annotations

from typing import Optional, Union

from formats.records import ANSWER_LINE, COT_TRIGGER, build_prompt

PROGRAM_PREAMBLE = ("import math", "import sympy")   # process_code's first lines
NUMERIC_TOLERANCE = 1e-2

Answer = Union[float, str]   # numeric datasets: a float; MathQA: the normalised text


def reasoning_text(completion: str, question: Optional[str] = None, cot_kind: str = "ncot") -> str:
    """``text.strip().split(COT_TRIGGER)[-1].strip()`` of the decoded sample.

    With ``question`` the text is this project's prompt (`formats.records.build_prompt`) followed
    by the completion, exactly what the model was given and wrote. Without it the completion is
    taken as everything after the prompt's ``Answer reasoning:`` line (for P-CoT: a whole program,
    header included); only a ``COT_TRIGGER`` inside it then changes what is read, and an empty
    completion reads "" (after a real prompt the official code would read the stripped prompt:
    no number, and for MathQA a wrong text either way).
    """
    if question is None and not completion.strip():
        return ""
    prompt = build_prompt(question, cot_kind) if question is not None else build_prompt("", "ncot")
    return (prompt + completion).strip().split(COT_TRIGGER)[-1].strip()


def floatify(text) -> Optional[float]:
    """``src/utils.py::floatify``: ``float(x)``, or None when that raises."""
    try:
        return float(text)
    except Exception:
        return None


def mcq_text(text: str) -> str:
    """How the official code normalises a MathQA answer (and the gold letter) before comparing."""
    return text.lower().replace('"', "").replace("'", "").strip()


def gold_answer(gold: str, mcq: bool) -> Answer:
    """The gold answer as the official code compares it (``post_process_final_answer_fn_mapper``,
    after ``collate_fn`` removed the commas). Raises ValueError for a non-numeric numeric gold."""
    if mcq:
        return mcq_text(gold)
    value = floatify(gold.replace(",", "").strip())
    if value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    return value


def ncot_answer(reasoning: str, mcq: bool) -> Optional[Answer]:
    """The official N-CoT extraction (``post_process_answer_cot_fn_mapper[('nl', ...)]``)."""
    tail = reasoning.split(ANSWER_LINE)[-1]
    return mcq_text(tail) if mcq else floatify(tail.strip())


def paper_program(reasoning: str) -> str:
    """``src/python_engine.py::process_code``: the program the official code runs.

    ``sys.exit`` becomes ``print`` anywhere in the text; after ``import math`` and ``import
    sympy`` come the text's lines up to (not including) the first whitespace-only one, except
    that a line starting ``def solution`` is always kept. Top-level lines before the function are
    kept (and run, in the locals namespace: see the worker's ``execute``).
    """
    if "sys.exit" in reasoning:
        reasoning = reasoning.replace("sys.exit", "print")
    kept = list(PROGRAM_PREAMBLE)
    for line in reasoning.split("\n"):
        if line.startswith("def solution"):
            kept.append(line)
            continue
        if line.strip() == "":
            break
        kept.append(line)
    return "\n".join(kept)


def is_correct(answer: Answer, gold: Answer, mcq: bool) -> bool:
    """``compare_answer_fn_mapper``: string equality for MathQA, ``|a - b| <= 1e-2`` otherwise
    (False for nan, as the official comparison)."""
    return answer == gold if mcq else abs(answer - gold) <= NUMERIC_TOLERANCE
