"""Reward audit: score every gold CoT of a dataset, and perturbed copies of it, under each rule.

A reward that silently scores correct answers 0 (or wrong ones 1) ruins a training run without
an error, so before training on a dataset we check, for every row and reward rule:

* the gold CoT scores as correct (reward 1);
* the same CoT with its final answer changed scores as wrong. Three perturbations for numeric
  answers: +1, x10+7 (catches a parser that drops digits) and +0.05 (just outside the paper's
  1e-2 tolerance, catches a tolerance that is too loose). MCQ: the next option letter.

and, between the two rules, which gold rows they score differently (`disagreements`).

Test sets carry no CoT; their rows are audited through a one-line reasoning followed by the
paper's answer line (`formats.records.ncot_target`), which checks that every gold answer is
readable. (The paper rule reads an answer line only after some reasoning: a completion that is
nothing but "Therefore, the answer is: 18" has no answer under it.)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence

from formats.records import ANSWER_TRIGGER, Example, ncot_target
from rewards.extract import TRIGGER_STEM, parse_number
from rewards.score import MCQ_DATASETS, Score, Scorer, format_number, prepare_program

_SOLUTION_DEF = re.compile(r"^def solution\(\):", re.MULTILINE)
ANSWER_ONLY_REASONING = "The gold answer of this row."   # what stands before a test row's answer line


@dataclasses.dataclass
class AuditRow:
    """One (dataset, split, kind, rule) audited."""
    dataset: str
    split: str
    cot_kind: str
    rule: str = ""
    rows: int = 0
    gold_correct: int = 0
    perturbed: int = 0
    perturbed_scored_correct: int = 0
    perturbed_extracted: int = 0   # read as an answer (partial reward): proves the check is not vacuous
    rules_disagree: Optional[int] = None   # gold rows the other rule scores differently (`disagreements`)
    failures: list = dataclasses.field(default_factory=list)   # [{"id", "gold", "status", "answer", "reason"}]
    gold_scores: list = dataclasses.field(default_factory=list, repr=False)   # [(id, gold, Score)], row order

    @property
    def gold_accuracy(self) -> float:
        return 100.0 * self.gold_correct / max(self.rows, 1)

    @property
    def perturbed_correct_rate(self) -> float:
        return 100.0 * self.perturbed_scored_correct / max(self.perturbed, 1)

    @property
    def ok(self) -> bool:
        """Every gold row right, no perturbed one."""
        return self.gold_correct == self.rows and self.perturbed_scored_correct == 0

    def summary(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "cot_kind": self.cot_kind, "rule": self.rule,
                "rows": self.rows, "gold_correct_pct": round(self.gold_accuracy, 3),
                "gold_failures": len(self.failures), "perturbed": self.perturbed,
                "perturbed_scored_correct_pct": round(self.perturbed_correct_rate, 3),
                "perturbed_extracted_pct": round(100.0 * self.perturbed_extracted / max(self.perturbed, 1), 3),
                "rules_disagree": self.rules_disagree}


def wrong_answers(gold: str, dataset: str) -> list[str]:
    """Answers that must never score as correct against ``gold``."""
    if dataset in MCQ_DATASETS:
        letters = "abcde"
        return [letters[(letters.index(gold) + 1) % 5]]
    g = parse_number(gold)
    return [format_number(g + 1), format_number(g * 10 + 7), format_number(round(g + 0.05, 6))]


def perturb_ncot(cot: str, new_answer: str) -> str:
    """Replace the final answer of an N-CoT (any of the dialects the lenient rule reads)."""
    idx = cot.rfind(TRIGGER_STEM)
    head = cot[:idx] if idx >= 0 else cot[:cot.rfind("####")]
    return f"{head}{ANSWER_TRIGGER} {new_answer}"


def perturb_program(program: str, new_answer: str, dataset: str, rule: str) -> str:
    """The gold program, as ``rule`` would run it, inside a ``solution()`` that calls the gold
    function (so the gold still runs) and returns ``new_answer``.

    The program ``rule`` prepares (`rewards.score.prepare_program`: lenient keeps only the
    function, paper its preamble and top-level lines too, both up to the first blank line) is
    nested whole, with no blank line, so that both runners keep all of it.
    """
    prepared = prepare_program(program, rule=rule)
    renamed = _SOLUTION_DEF.sub("def _gold_solution():", prepared, count=1)
    nested = "\n".join("    " + line for line in renamed.split("\n"))
    value = repr(new_answer) if dataset in MCQ_DATASETS else new_answer
    return f"def solution():\n{nested}\n    _gold_solution()\n    return {value}"


def gold_text(example: Example) -> str:
    """What is scored as the gold completion: the gold CoT, or for a test row its answer line."""
    return example.cot if example.cot is not None else ncot_target(ANSWER_ONLY_REASONING, example.answer)


def audit_examples(examples: Sequence[Example], split: str, scorer: Scorer, rule: Optional[str] = None,
                   progress: bool = False) -> AuditRow:
    """Audit ``examples`` (one dataset and CoT kind) under ``rule`` (default: the scorer's)."""
    if not examples:
        raise ValueError("nothing to audit: no examples")
    first = examples[0]
    rule = rule or scorer.cfg.rule
    kind = first.cot_kind if first.cot is not None else "ncot"
    row = AuditRow(first.dataset, split, kind, rule)
    golds, options = [e.answer for e in examples], [e.options for e in examples]

    texts = [gold_text(e) for e in examples]
    scores = _score_chunks(scorer, texts, golds, kind, first.dataset, options, rule, progress, "gold")
    row.rows = len(examples)
    for e, text, s in zip(examples, texts, scores):
        row.gold_scores.append((e.id, e.answer, s))
        if s.correct:
            row.gold_correct += 1
        else:
            reason = s.detail or f"extracted {s.answer!r} != gold {e.answer!r}"
            # The end of the CoT shows a reader whether the gold annotation or the extractor is wrong.
            row.failures.append({"id": e.id, "gold": e.answer, "status": s.status, "answer": s.answer,
                                 "reason": f"{reason}; CoT ends {text[-90:]!r}"})

    bad_texts, bad_golds, bad_options = [], [], []
    for e, text in zip(examples, texts):
        for wrong in wrong_answers(e.answer, e.dataset):
            bad_texts.append(perturb_program(text, wrong, e.dataset, rule) if kind == "pcot"
                             else perturb_ncot(text, wrong))
            bad_golds.append(e.answer)
            bad_options.append(e.options)
    bad_scores = _score_chunks(scorer, bad_texts, bad_golds, kind, first.dataset, bad_options, rule, progress,
                               "perturbed")
    row.perturbed = len(bad_scores)
    row.perturbed_scored_correct = sum(s.correct for s in bad_scores)
    row.perturbed_extracted = sum(s.answer is not None for s in bad_scores)
    return row


def disagreements(a: AuditRow, b: AuditRow) -> list[dict]:
    """The gold rows that two audits of the same examples (two rules) score differently: id,
    gold, and each rule's answer and reward. Sets ``rules_disagree`` on both."""
    if [i for i, _, _ in a.gold_scores] != [i for i, _, _ in b.gold_scores]:
        raise ValueError(f"{a.dataset}/{a.split}: the two audits did not score the same rows")
    rows = []
    for (item_id, gold, sa), (_, _, sb) in zip(a.gold_scores, b.gold_scores):
        if sa.reward != sb.reward:
            rows.append({"id": item_id, "gold": gold,
                         f"{a.rule}_answer": sa.answer, f"{a.rule}_reward": sa.reward,
                         f"{b.rule}_answer": sb.answer, f"{b.rule}_reward": sb.reward})
    a.rules_disagree = b.rules_disagree = len(rows)
    return rows


def _score_chunks(scorer, texts, golds, kind, dataset, options, rule, progress, label, chunk=256) -> list[Score]:
    from tqdm import tqdm
    out = []
    with tqdm(total=len(texts), desc=f"audit {dataset}/{kind}/{rule} {label}", disable=not progress,
              unit="row") as bar:
        for i in range(0, len(texts), chunk):
            out += scorer.score(texts[i:i + chunk], golds[i:i + chunk], kind, dataset, options[i:i + chunk],
                                rule=rule)
            bar.update(len(texts[i:i + chunk]))
    return out


def format_table(rows: Iterable[AuditRow]) -> str:
    """A markdown table, one line per (dataset, split, kind, rule)."""
    import pandas as pd
    frame = pd.DataFrame([r.summary() for r in rows])
    return frame.to_markdown(index=False)
