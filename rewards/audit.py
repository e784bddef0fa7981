"""Reward audit: score every gold CoT of a dataset, and perturbed copies of it.

A reward that silently scores correct answers 0 (or wrong ones 1) ruins a training run without
an error, so before training on a dataset we check, for every row:

* the gold CoT scores as correct (reward 1);
* the same CoT with its final answer changed scores as wrong. Three perturbations for numeric
  answers: +1, x10+7 (catches a parser that drops digits) and +0.05 (just outside the paper's
  1e-2 tolerance, catches a tolerance that is too loose). MCQ: the next option letter.

Test sets carry no CoT; their rows are audited through the sentence the paper's N-CoT ends
with, ``Therefore, the answer is: {answer}``, which checks that every gold answer is readable.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from formats.records import ANSWER_TRIGGER, Example
from rewards.extract import TRIGGER_STEM, answer_text, parse_number
from rewards.score import MCQ_DATASETS, Scorer, format_number

_SOLUTION_DEF = re.compile(r"^def solution\(\):", re.MULTILINE)


@dataclasses.dataclass
class AuditRow:
    """One (dataset, split, kind) audited."""
    dataset: str
    split: str
    cot_kind: str
    rows: int = 0
    gold_correct: int = 0
    perturbed: int = 0
    perturbed_scored_correct: int = 0
    perturbed_extracted: int = 0   # read as an answer (partial reward): proves the check is not vacuous
    failures: list = dataclasses.field(default_factory=list)   # [{"id", "gold", "status", "answer", "reason"}]

    @property
    def gold_accuracy(self) -> float:
        return 100.0 * self.gold_correct / max(self.rows, 1)

    @property
    def perturbed_correct_rate(self) -> float:
        return 100.0 * self.perturbed_scored_correct / max(self.perturbed, 1)

    def summary(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "cot_kind": self.cot_kind, "rows": self.rows,
                "gold_correct_pct": round(self.gold_accuracy, 3),
                "gold_failures": len(self.failures), "perturbed": self.perturbed,
                "perturbed_scored_correct_pct": round(self.perturbed_correct_rate, 3),
                "perturbed_extracted_pct": round(100.0 * self.perturbed_extracted / max(self.perturbed, 1), 3)}


def wrong_answers(gold: str, dataset: str) -> list[str]:
    """Answers that must never score as correct against ``gold``."""
    if dataset in MCQ_DATASETS:
        letters = "abcde"
        return [letters[(letters.index(gold) + 1) % 5]]
    g = parse_number(gold)
    return [format_number(g + 1), format_number(g * 10 + 7), format_number(round(g + 0.05, 6))]


def perturb_ncot(cot: str, new_answer: str) -> str:
    """Replace the final answer of an N-CoT (any of the dialects `answer_text` reads)."""
    idx = cot.rfind(TRIGGER_STEM)
    head = cot[:idx] if idx >= 0 else cot[:cot.rfind("####")]
    return f"{head}{ANSWER_TRIGGER} {new_answer}"


def perturb_program(program: str, new_answer: str, dataset: str) -> str:
    """Keep the gold program (it still runs) but make ``solution()`` return ``new_answer``.

    The gold function is nested inside the new ``solution`` because the runner keeps only the
    text from ``def solution():`` to the first blank line.
    """
    renamed = _SOLUTION_DEF.sub("def _gold_solution():", program, count=1)
    nested = "\n".join("    " + line for line in renamed.split("\n"))
    value = repr(new_answer) if dataset in MCQ_DATASETS else new_answer
    return f"def solution():\n{nested}\n    _gold_solution()\n    return {value}"


def audit_examples(examples: Sequence[Example], split: str, scorer: Scorer,
                   progress: bool = False) -> AuditRow:
    if not examples:
        raise ValueError("nothing to audit: no examples")
    first = examples[0]
    row = AuditRow(first.dataset, split, first.cot_kind)
    kind = first.cot_kind if first.cot is not None else "ncot"
    golds, options = [e.answer for e in examples], [e.options for e in examples]

    texts = [e.cot if e.cot is not None else f"{ANSWER_TRIGGER} {e.answer}" for e in examples]
    scores = _score_chunks(scorer, texts, golds, kind, first.dataset, options, progress, "gold")
    row.rows = len(examples)
    for e, text, s in zip(examples, texts, scores):
        if s.correct:
            row.gold_correct += 1
        else:
            found = answer_text(text) if kind == "ncot" else s.answer
            reason = s.detail or f"extracted {found!r} != gold {e.answer!r}"
            # The end of the CoT shows a reader whether the gold annotation or the extractor is wrong.
            row.failures.append({"id": e.id, "gold": e.answer, "status": s.status, "answer": s.answer,
                                 "reason": f"{reason}; CoT ends {text[-90:]!r}"})

    bad_texts, bad_golds, bad_options = [], [], []
    for e, text in zip(examples, texts):
        for wrong in wrong_answers(e.answer, e.dataset):
            bad_texts.append(perturb_program(text, wrong, e.dataset) if kind == "pcot" else perturb_ncot(text, wrong))
            bad_golds.append(e.answer)
            bad_options.append(e.options)
    bad_scores = _score_chunks(scorer, bad_texts, bad_golds, kind, first.dataset, bad_options, progress, "perturbed")
    row.perturbed = len(bad_scores)
    row.perturbed_scored_correct = sum(s.correct for s in bad_scores)
    row.perturbed_extracted = sum(s.status == "ok" for s in bad_scores)
    return row


def _score_chunks(scorer, texts, golds, kind, dataset, options, progress, label, chunk=256):
    from tqdm import tqdm
    out = []
    with tqdm(total=len(texts), desc=f"audit {dataset}/{kind} {label}", disable=not progress, unit="row") as bar:
        for i in range(0, len(texts), chunk):
            out += scorer.score(texts[i:i + chunk], golds[i:i + chunk], kind, dataset, options[i:i + chunk])
            bar.update(len(texts[i:i + chunk]))
    return out


def format_table(rows: Iterable[AuditRow]) -> str:
    """A markdown table, one line per (dataset, split, kind)."""
    import pandas as pd
    frame = pd.DataFrame([r.summary() for r in rows])
    return frame.to_markdown(index=False)
