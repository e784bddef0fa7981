"""The ReFT reward: compare a sample's final answer with the gold answer.

    reward = 1.0             the extracted answer equals the gold answer
             partial_reward  an answer was extracted but it is wrong   (paper: 0.1)
             0.0             no answer (nothing to extract, program failed or timed out)

Two rules decide what "extracted" and "equals" mean (``reward.rule``):

* ``paper``: the official code's, exactly (`rewards.paper_rule`): ``float()`` of the text after
  the last ``\\nTherefore, the answer is: ``; MathQA compares the lower-cased text with the gold
  letter and so gives every sample at least the partial reward (a failed program reads "none");
  programs run as its ``process_code`` + ``run`` do (top-level lines kept, ``math`` and
  ``sympy`` given, ``sys.exit`` turned into ``print``).
* ``lenient``: this project's tolerant reading (`rewards.extract`): ``$1,000``, ``3/4``,
  ``<203>.``, ``#### 72``, an MCQ value mapped to its option letter; a program is cut to its
  function and runs as a module of its own.

The paper applies the partial reward on numeric datasets and its code applies it to MathQA-MCQ
too; so do both rules. N-CoT scoring is a pure function (`score_ncot`); P-CoT needs a program
run, so `score_program` takes the sandbox's `ExecResult` and `Scorer` batches both kinds
through a `ProgramSandbox` pool. Every `Score` names the rule that produced it.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from formats.records import pcot_header
from rewards import paper_rule
from rewards.extract import (
    answer_text,
    numbers_equal,
    option_for_value,
    parse_mcq_letter,
    parse_number,
)
from rewards.sandbox import ExecResult, ProgramSandbox, SandboxLimits

MCQ_DATASETS = frozenset({"mathqa"})   # answers are option letters a-e
RULES = ("paper", "lenient")
ANSWER_CHARS = 256                     # what a Score keeps of a MathQA answer under the paper rule


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    correct_reward: float = 1.0
    partial_reward: float = 0.1     # paper §3: "0.1 partial reward" for a wrong but extractable answer
    program_timeout_s: float = SandboxLimits.timeout_s   # paper's code: 10 s per program
    program_memory_mb: int = SandboxLimits.memory_mb     # far above what a word problem needs; stops memory bombs
    sandbox_workers: Optional[int] = None  # None = one per CPU core
    max_actor_restarts: int = 3
    """How often Ray restarts the reward actor (``actors.reward``) after its process died (killed,
    out of memory, its node lost) in one run; the driver sends the samples whose scores were lost
    with it again. Programs cannot kill it (they run in the sandbox), so more deaths than this
    are the host's doing, repeated: the run stops, naming the actor and its node."""
    rule: str = "paper"
    """How answers are extracted and compared: "paper" (the official code's rule, exactly) or
    "lenient" (module docstring). Default "paper": it is what the paper trained and evaluated
    with, so a run's rewards and accuracies mean what the paper's do; and the embedded default's
    synthetic task writes the paper's format (CoTs ending "\\nTherefore, the answer is: X",
    programs of one function), whose gold the paper rule scores 100% (``reft audit-rewards
    --dataset synthetic``). "lenient" also reads what the paper's code misses ("$18", "3/4", an
    MCQ option's value): for completions in other formats (e.g. a model prompted, not trained)."""

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"reward.rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 <= self.partial_reward <= self.correct_reward:
            raise ValueError(f"reward.partial_reward must be in [0, correct_reward], got {self.partial_reward}")
        if self.program_timeout_s <= 0:
            raise ValueError(f"reward.program_timeout_s must be > 0, got {self.program_timeout_s}")
        if self.max_actor_restarts < 0:
            raise ValueError(f"reward.max_actor_restarts must be >= 0, got {self.max_actor_restarts}")

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
    rule: Optional[str] = None   # the rule that produced it: "paper" | "lenient"
    # MathQA under the paper rule: a program that failed keeps its status (error, timeout, ...)
    # and still has the answer "none" and the partial reward, as in the paper's code.


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
        return Score(0.0, None, failed_status, False, why, rule="lenient")
    correct = answers_match(answer, gold, dataset)
    return Score(cfg.correct_reward if correct else cfg.partial_reward, answer, "ok", correct, rule="lenient")


def _judge_paper(answer: Optional[paper_rule.Answer], gold: str, dataset: str, cfg: RewardConfig,
                 status: str = "ok", detail: str = "") -> Score:
    """The official reward placement (``train_rl_reft.py::rollout``): 1 if correct, the partial
    reward for any other extracted answer, 0 for none."""
    mcq = dataset in MCQ_DATASETS
    try:
        target = paper_rule.gold_answer(gold, mcq)
    except ValueError as e:
        raise ValueError(f"{e} (dataset {dataset!r})") from None
    if answer is None:
        return Score(0.0, None, "no_answer" if status == "ok" else status, False, detail, rule="paper")
    correct = paper_rule.is_correct(answer, target, mcq)
    text = answer[:ANSWER_CHARS] if mcq else format_number(answer)
    return Score(cfg.correct_reward if correct else cfg.partial_reward, text, status, correct,
                 "" if status == "ok" else detail, rule="paper")


def score_ncot(completion: str, gold: str, dataset: str = "gsm8k",
               options: Optional[Mapping[str, str]] = None, cfg: RewardConfig = RewardConfig(),
               question: Optional[str] = None) -> Score:
    """Score a natural-language CoT by ``cfg.rule``: the answer after the last trigger.

    Paper rule: with ``question`` the prompt + completion is read as the official code reads a
    decoded sample (`paper_rule.reasoning_text`); without it, the completion is what follows the
    prompt. MCQ ``options`` serve the lenient rule only."""
    if cfg.rule == "lenient":
        return _judge(answer_text(completion), gold, dataset, options, cfg)
    reasoning = paper_rule.reasoning_text(completion, question, "ncot")
    answer = paper_rule.ncot_answer(reasoning, dataset in MCQ_DATASETS)
    if answer is not None:
        return _judge_paper(answer, gold, dataset, cfg)
    if paper_rule.ANSWER_LINE in reasoning:
        why = f"unreadable answer {reasoning.split(paper_rule.ANSWER_LINE)[-1].strip()[:60]!r}"
    else:
        why = "no answer line (a line starting 'Therefore, the answer is: ' after the reasoning)"
    return _judge_paper(None, gold, dataset, cfg, detail=why)


def prepare_program(text: str, question: Optional[str] = None, *, rule: str) -> str:
    """The program to run for a P-CoT sample under ``rule``.

    ``text`` is either a whole program or (with ``question``) the model's continuation of the
    P-CoT prompt, whose header ``def solution():\\n    \"\"\"{question}\"\"\"\\n`` comes first.

    paper: `paper_rule.paper_program` of `paper_rule.reasoning_text`, to run in the sandbox's
    "paper" namespace. lenient: from ``def solution():`` (lines before it dropped) to the first
    blank line, so that whatever the model writes after the function (more questions, stray
    calls) is never executed.
    """
    if rule == "paper":
        return paper_rule.paper_program(paper_rule.reasoning_text(text, question, "pcot"))
    if rule != "lenient":
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
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
    """Score the sandbox's result of running a P-CoT program, by ``cfg.rule``. Under the paper
    rule the program ran in the sandbox's "paper" namespace: ``result.number`` is floatify(value)
    (numeric datasets), ``result.answer`` the normalised str(value) (MathQA)."""
    if cfg.rule == "lenient":
        if result.status != "ok":
            return Score(0.0, None, result.status, False, result.detail, rule="lenient")
        return _judge(result.answer, gold, dataset, options, cfg, detail=result.detail)
    if dataset in MCQ_DATASETS:     # str(None) when the program failed: "none", a wrong answer
        answer = result.answer if result.status == "ok" else "none"
        return _judge_paper(answer, gold, dataset, cfg, result.status, result.detail)
    why = f"solution() returned {result.answer!r}: not a number" if result.status == "ok" else result.detail
    return _judge_paper(result.number, gold, dataset, cfg, result.status, why)


class Scorer:
    """Scores batches of samples of either CoT kind; owns a pool of sandbox workers."""

    def __init__(self, cfg: RewardConfig = RewardConfig()):
        self.cfg = cfg
        self.sandbox = ProgramSandbox(
            num_workers=cfg.sandbox_workers,
            limits=cfg.sandbox_limits)

    def score(self, completions: Sequence[str], golds: Sequence[str], cot_kind: str, dataset: str,
              options: Optional[Sequence[Optional[Mapping[str, str]]]] = None,
              questions: Optional[Sequence[Optional[str]]] = None, rule: Optional[str] = None) -> list[Score]:
        """One score per completion, by ``rule`` (default ``cfg.rule``; the reward audit scores
        both). For P-CoT a completion is a whole program, or with its ``questions[i]`` the
        continuation of the P-CoT prompt (see `prepare_program`, run once); for N-CoT the
        question lets the paper rule read prompt + completion as its code does."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        cfg = self.cfg if rule is None else dataclasses.replace(self.cfg, rule=rule)
        options = options or [None] * len(completions)
        questions = questions or [None] * len(completions)
        if cot_kind == "ncot":
            return [score_ncot(c, g, dataset, o, cfg, question=q)
                    for c, g, o, q in zip(completions, golds, options, questions)]
        if cot_kind == "pcot":
            programs = [prepare_program(c, question=q, rule=cfg.rule) for c, q in zip(completions, questions)]
            results = self.sandbox.run_many(programs, namespace="paper" if cfg.rule == "paper" else "plain")
            return [score_program(r, g, dataset, o, cfg) for r, g, o in zip(results, golds, options)]
        raise ValueError(f"cot_kind must be 'ncot' or 'pcot', got {cot_kind!r}")

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
