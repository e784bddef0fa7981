"""The ReFT reward rule: compare a sample's final answer with the gold answer.

    reward = 1.0             the extracted answer equals the gold answer
             partial_reward  an answer was extracted but it is wrong   (paper: 0.1)
             0.0             no answer (nothing to extract, program failed or timed out)

The paper applies the partial reward on numeric datasets and its code applies it to MathQA-MCQ
too; so do we. N-CoT scoring is a pure function (`score_ncot`); P-CoT needs a program run, so
`score_program` takes the sandbox's `ExecResult` and `Scorer` batches both kinds through a
`ProgramSandbox` pool.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from formats.records import pcot_header
from rewards.extract import (
    answer_text,
    numbers_equal,
    option_for_value,
    parse_mcq_letter,
    parse_number,
)
from rewards.sandbox import ExecResult, ProgramSandbox, SandboxLimits

MCQ_DATASETS = frozenset({"mathqa"})   # answers are option letters a-e


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    correct_reward: float = 1.0
    partial_reward: float = 0.1     # paper §3: "0.1 partial reward" for a wrong but extractable answer
    program_timeout_s: float = SandboxLimits.timeout_s   # paper's code: 10 s per program
    program_memory_mb: int = SandboxLimits.memory_mb     # far above what a word problem needs; stops memory bombs
    sandbox_workers: Optional[int] = None  # None = one per CPU core

    def __post_init__(self):
        if not 0.0 <= self.partial_reward <= self.correct_reward:
            raise ValueError(f"reward.partial_reward must be in [0, correct_reward], got {self.partial_reward}")
        if self.program_timeout_s <= 0:
            raise ValueError(f"reward.program_timeout_s must be > 0, got {self.program_timeout_s}")

    @property
    def sandbox_limits(self) -> SandboxLimits:
        """The sandbox's limits from this config (the sandbox's own defaults are these fields')."""
        return SandboxLimits(timeout_s=self.program_timeout_s, memory_mb=self.program_memory_mb)


@dataclasses.dataclass(frozen=True)
class Score:
    reward: float
    answer: Optional[str]   # the extracted answer, normalised ("72", "0.5", "c"); None if none
    status: str             # ok | no_answer | timeout | error | killed
    correct: bool
    detail: str = ""        # why there is no answer (exception, signal, unparseable text)


def format_number(value: float) -> str:
    """Canonical text of a number: integers without ".0", others as the shortest exact repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def normalise_answer(raw: str, dataset: str, options: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Turn raw answer text into the canonical form compared with gold, or None if unreadable.

    MCQ: a letter, or (for programs that return the value) the option whose value matches.
    """
    if dataset in MCQ_DATASETS:
        letter = parse_mcq_letter(raw)
        if letter is None and options:
            value = parse_number(raw)
            letter = option_for_value(value, options) if value is not None else None
        return letter
    value = parse_number(raw)
    return None if value is None else format_number(value)


def answers_match(answer: str, gold: str, dataset: str) -> bool:
    if dataset in MCQ_DATASETS:
        return answer == gold.strip().lower()
    gold_value = parse_number(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} of dataset {dataset!r} is not a number")
    return numbers_equal(float(answer), gold_value)


def _judge(raw: Optional[str], gold: str, dataset: str, options, cfg: RewardConfig,
           failed_status: str = "no_answer", detail: str = "") -> Score:
    answer = normalise_answer(raw, dataset, options) if raw is not None else None
    if answer is None:
        why = detail or ("no answer trigger" if raw is None else f"unreadable answer {raw[:60]!r}")
        return Score(0.0, None, failed_status, False, why)
    correct = answers_match(answer, gold, dataset)
    return Score(cfg.correct_reward if correct else cfg.partial_reward, answer, "ok", correct)


def score_ncot(completion: str, gold: str, dataset: str = "gsm8k",
               options: Optional[Mapping[str, str]] = None, cfg: RewardConfig = RewardConfig()) -> Score:
    """Score a natural-language CoT: the answer after the last trigger."""
    return _judge(answer_text(completion), gold, dataset, options, cfg)


def prepare_program(text: str, question: Optional[str] = None) -> str:
    """The program to run for a P-CoT sample, following the paper's code.

    ``text`` is either a whole program or (with ``question``) the model's continuation of the
    P-CoT prompt, whose header ``def solution():\\n    \"\"\"{question}\"\"\"\\n`` is prepended.
    The program is cut at the first blank line after ``def solution():`` so that whatever the
    model writes after the function (more questions, stray calls) is never executed.
    """
    if question is not None:
        text = pcot_header(question) + text
    start = text.find("def solution():")
    if start < 0:
        return text
    body = text[start:]
    end = body.find("\n\n")
    return body if end < 0 else body[:end]


def score_program(result: ExecResult, gold: str, dataset: str = "gsm8k",
                  options: Optional[Mapping[str, str]] = None, cfg: RewardConfig = RewardConfig()) -> Score:
    """Score the sandbox's result of running a P-CoT program."""
    if result.status != "ok":
        return Score(0.0, None, result.status, False, result.detail)
    return _judge(result.answer, gold, dataset, options, cfg, detail=result.detail)


class Scorer:
    """Scores batches of samples of either CoT kind; owns a pool of sandbox workers."""

    def __init__(self, cfg: RewardConfig = RewardConfig()):
        self.cfg = cfg
        self.sandbox = ProgramSandbox(
            num_workers=cfg.sandbox_workers,
            limits=cfg.sandbox_limits)

    def score(self, completions: Sequence[str], golds: Sequence[str], cot_kind: str, dataset: str,
              options: Optional[Sequence[Optional[Mapping[str, str]]]] = None,
              questions: Optional[Sequence[Optional[str]]] = None) -> list[Score]:
        """One score per completion. For P-CoT a completion is a whole program, or with its
        ``questions[i]`` the continuation of the P-CoT prompt (see `prepare_program`, run once)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        options = options or [None] * len(completions)
        if cot_kind == "ncot":
            return [score_ncot(c, g, dataset, o, self.cfg) for c, g, o in zip(completions, golds, options)]
        if cot_kind == "pcot":
            questions = questions or [None] * len(completions)
            results = self.sandbox.run_many([prepare_program(c, question=q) for c, q in zip(completions, questions)])
            return [score_program(r, g, dataset, o, self.cfg) for r, g, o in zip(results, golds, options)]
        raise ValueError(f"cot_kind must be 'ncot' or 'pcot', got {cot_kind!r}")

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
