"""The lenient reward rule (1 / partial / 0) for N-CoT and P-CoT, and program preparation; the
paper rule's cases are in test_paper_rule.py."""
import pytest

from rewards.sandbox import ExecResult
from rewards.score import (
    RewardConfig,
    format_number,
    prepare_program,
    score_ncot,
    score_program,
)

MCQ_OPTIONS = {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}
LENIENT = RewardConfig(rule="lenient")


@pytest.mark.parametrize("completion, gold, dataset, reward, status, answer", [
    ("2+2=4\nTherefore, the answer is: 4", "4", "gsm8k", 1.0, "ok", "4"),
    ("Therefore, the answer is: 4.0", "4", "gsm8k", 1.0, "ok", "4"),
    ("Therefore, the answer is: $1,000", "1000", "gsm8k", 1.0, "ok", "1000"),
    ("Therefore, the answer is: 5", "4", "gsm8k", 0.1, "ok", "5"),                 # partial reward
    ("Therefore, the answer is: four", "4", "gsm8k", 0.0, "no_answer", None),
    ("I think it is 4", "4", "gsm8k", 0.0, "no_answer", None),
    ("Therefore, the answer is <203>.", "203.0", "svamp", 1.0, "ok", "203"),
    ("Therefore, the answer is: 0.04", "0.036", "mathqa-numeric", 1.0, "ok", "0.04"),  # |diff| <= 1e-2
    ("Therefore, the answer is: a", "a", "mathqa", 1.0, "ok", "a"),
    ("Therefore, the answer is: (B)", "a", "mathqa", 0.1, "ok", "b"),
    ("Therefore, the answer is: 38", "a", "mathqa", 0.0, "no_answer", None),       # no options given
])
def test_score_ncot(completion, gold, dataset, reward, status, answer):
    s = score_ncot(completion, gold, dataset, cfg=LENIENT)
    assert (s.reward, s.status, s.answer, s.correct, s.rule) == (reward, status, answer, reward == 1.0, "lenient")


def test_mcq_value_maps_to_option_letter():
    s = score_ncot("Therefore, the answer is: 38", "a", "mathqa", options=MCQ_OPTIONS, cfg=LENIENT)
    assert (s.reward, s.answer) == (1.0, "a")


def test_format_number_keeps_every_digit():
    # 10 significant digits once turned 109200000.05 into the gold 109200000 (GSM8K train row 644).
    assert format_number(109200000.05) == "109200000.05"
    assert format_number(72.0) == "72" and format_number(-0.5) == "-0.5"


def test_partial_reward_is_configurable():
    assert score_ncot("Therefore, the answer is: 5", "4", cfg=RewardConfig(partial_reward=0.0, rule="lenient")).reward == 0.0
    with pytest.raises(ValueError, match="partial_reward"):
        RewardConfig(partial_reward=2.0)


def test_gold_must_be_numeric():
    with pytest.raises(ValueError, match="not a number"):
        score_ncot("Therefore, the answer is: 4", "four", "gsm8k", cfg=LENIENT)


@pytest.mark.parametrize("result, gold, reward, status", [
    (ExecResult("ok", "208"), "208.0", 1.0, "ok"),
    (ExecResult("ok", "207"), "208.0", 0.1, "ok"),
    (ExecResult("ok", "hello"), "208.0", 0.0, "no_answer"),
    (ExecResult("no_answer", None), "208.0", 0.0, "no_answer"),
    (ExecResult("timeout", None, "wall time limit"), "208.0", 0.0, "timeout"),
    (ExecResult("error", None, "ZeroDivisionError"), "208.0", 0.0, "error"),
    (ExecResult("killed", None, "SIGSEGV"), "208.0", 0.0, "killed"),
])
def test_score_program(result, gold, reward, status):
    s = score_program(result, gold, "svamp", cfg=LENIENT)
    assert (s.reward, s.status) == (reward, status)


def test_score_program_mcq_value_or_letter():
    assert score_program(ExecResult("ok", "27.675"), "b", "mathqa", MCQ_OPTIONS, LENIENT).reward == 1.0
    assert score_program(ExecResult("ok", "b"), "b", "mathqa", MCQ_OPTIONS, LENIENT).reward == 1.0
    assert score_program(ExecResult("ok", "30"), "b", "mathqa", MCQ_OPTIONS, LENIENT).reward == 0.1


def test_prepare_program_cuts_after_function():
    question = "Iesha has 344 books."
    continuation = ("    result = 344 - 136\n    return result\n\n"
                    "print(open('/etc/passwd').read())\ndef solution():\n    return 0\n")
    program = prepare_program(continuation, question=question, rule="lenient")
    assert program == 'def solution():\n    """Iesha has 344 books."""\n    result = 344 - 136\n    return result'
    # A whole program is taken from its `def solution():` line.
    assert prepare_program("junk\ndef solution():\n    return 1\n\nx=1", rule="lenient") == "def solution():\n    return 1"


def test_rule_is_checked_and_named():
    assert RewardConfig().rule == "paper"            # the default: the paper's rule
    with pytest.raises(ValueError, match=r"reward\.rule must be one of \('paper', 'lenient'\), got 'exact'"):
        RewardConfig(rule="exact")
    with pytest.raises(ValueError, match="rule must be one of"):
        prepare_program("def solution():\n    return 1", rule="exact")
