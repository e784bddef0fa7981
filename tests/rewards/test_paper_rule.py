"""The paper reward rule against the official code's behaviour, one group per row of
../shared/PAPER_CODE.md that concerns rewards (N-CoT extraction, MathQA multiple choice, P-CoT
program, numeric equality, reward values), each case beside what the lenient rule does.

Expected values are worked out by hand from lqtrung1998/mwp_ReFT (train_rl_reft.py mappers,
src/python_engine.py process_code + run, src/utils.py floatify) and were checked by running
those few lines of the official logic in plain Python, outside the project.
"""
import pytest

from formats.records import build_prompt
from rewards import paper_rule
from rewards.sandbox import ExecResult
from rewards.score import RewardConfig, Scorer, prepare_program, score_ncot, score_program

PAPER, LENIENT = RewardConfig(rule="paper"), RewardConfig(rule="lenient")
LINE = "\nTherefore, the answer is: "          # the official answer_trigger
OPTIONS = {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}


# --- N-CoT extraction: float() of what follows the last "\nTherefore, the answer is: " ---------
@pytest.mark.parametrize("completion, gold, paper, lenient", [
    ("Tom has 18 apples." + LINE + "18", "18", 1.0, 1.0),
    ("x" + LINE + "18.", "18", 1.0, 1.0),            # float("18.") is 18.0
    ("x" + LINE + "  18  ", "18", 1.0, 1.0),         # stripped
    ("x" + LINE + "17", "18", 0.1, 0.1),             # extracted, wrong: partial reward
    ("x" + LINE + "$18", "18", 0.0, 1.0),            # float("$18") raises: no answer
    ("x" + LINE + "3/4", "0.75", 0.0, 1.0),
    ("x" + LINE + "1,000", "1000", 0.0, 1.0),        # no comma removal on the prediction
    ("x" + LINE + "<18>.", "18", 0.0, 1.0),
    ("x" + LINE + "18 apples", "18", 0.0, 0.0),
    ("x" + LINE + "1e3", "1000", 1.0, 0.0),          # Python's float syntax
    ("x" + LINE + "1_000", "1000", 1.0, 0.0),
    ("x" + LINE + "inf", "18", 0.1, 0.0),            # a float, just not the gold one
    ("x" + LINE + "nan", "18", 0.1, 0.0),            # |nan - 18| <= 0.01 is False
    ("x" + LINE + "18\nQuestion: next one", "18", 0.0, 1.0),   # the rest is part of the text
    ("x" + LINE + "5" + LINE + "18", "18", 1.0, 1.0),          # the last answer line
    ("Therefore, the answer is: 18", "18", 0.0, 1.0),          # no line before it: no "\n" to split on
    ("x\nTherefore, the answer is:18", "18", 0.0, 1.0),        # no space after the colon
    ("x\n#### 18", "18", 0.0, 1.0),                            # GSM8K's marker is not the paper's
    ("x\nThe answer is 18", "18", 0.0, 0.0),
    ("x" + LINE + "1000", "1,000", 1.0, 1.0),        # the gold's commas are removed
])
def test_ncot_extraction(completion, gold, paper, lenient):
    got = score_ncot(completion, gold, "gsm8k", cfg=PAPER)
    assert (got.reward, got.rule) == (paper, "paper"), got
    assert score_ncot(completion, gold, "gsm8k", cfg=LENIENT).reward == lenient


def test_ncot_reads_the_decoded_prompt_and_completion():
    # text.strip().split("\nAnswer reasoning:\n")[-1]: only what follows the LAST prompt trigger.
    q = "Tom has 5 apples and buys 13. How many?"
    assert paper_rule.reasoning_text(" 5 + 13 = 18." + LINE + "18 \n", q) == "5 + 13 = 18." + LINE + "18"
    echo = "So 18." + LINE + "18\nAnswer reasoning:\nI restart." + LINE + "7"
    assert score_ncot(echo, "18", "svamp", cfg=PAPER, question=q).reward == 0.1   # reads 7
    # Without the question the completion is what follows the prompt: the same answer.
    assert paper_rule.reasoning_text(echo) == paper_rule.reasoning_text(echo, q)
    assert build_prompt(q, "ncot").endswith(paper_rule.COT_TRIGGER)
    # An answer line straight after the prompt has no "\n" before it once stripped: no answer.
    assert score_ncot("Therefore, the answer is: 18", "18", "gsm8k", cfg=PAPER, question=q).reward == 0.0


def test_gold_parsing():
    assert paper_rule.gold_answer(" 1,000 ", mcq=False) == 1000.0
    assert paper_rule.gold_answer("'C' ", mcq=True) == "c"
    with pytest.raises(ValueError, match="not a number"):
        score_ncot("x" + LINE + "4", "four", "gsm8k", cfg=PAPER)


# --- MathQA multiple choice: lower-cased, quotes removed, string equality; any text is 0.1 ----
@pytest.mark.parametrize("completion, paper, lenient, paper_answer", [
    ("x" + LINE + "c", 1.0, 1.0, "c"),
    ("x" + LINE + "C", 1.0, 1.0, "c"),
    ("x" + LINE + "'c'", 1.0, 0.0, "c"),            # quotes removed; the lenient letter parser reads none
    ('x' + LINE + '"c"', 1.0, 0.0, "c"),
    ("x" + LINE + "(c)", 0.1, 1.0, "(c)"),
    ("x" + LINE + "c )", 0.1, 1.0, "c )"),
    ("x" + LINE + "30", 0.1, 1.0, "30"),            # the option's value: lenient maps it to c
    ("x" + LINE + "b", 0.1, 0.1, "b"),
    ("I do not know.", 0.1, 0.0, "i do not know."),  # no answer line: the whole text, still 0.1
    ("", 0.1, 0.0, ""),
])
def test_mathqa_mcq(completion, paper, lenient, paper_answer):
    got = score_ncot(completion, "c", "mathqa", OPTIONS, cfg=PAPER)
    assert (got.reward, got.answer) == (paper, paper_answer), got
    assert score_ncot(completion, "c", "mathqa", OPTIONS, cfg=LENIENT).reward == lenient


def test_mathqa_program_results():
    # str(res).lower() with quotes removed; a failed program's res is None -> "none" -> 0.1.
    ok = ExecResult("ok", "b", number=None)         # the sandbox's "paper" answer: normalised str(value)
    assert score_program(ok, "b", "mathqa", cfg=PAPER).reward == 1.0
    assert score_program(ExecResult("ok", "27.675", number=27.675), "b", "mathqa", OPTIONS, PAPER).reward == 0.1
    for failed in (ExecResult("error", None, "NameError: x"), ExecResult("timeout", None, "over 10 s")):
        s = score_program(failed, "b", "mathqa", cfg=PAPER)
        assert (s.reward, s.answer, s.status, s.correct) == (0.1, "none", failed.status, False), s
    assert score_program(ExecResult("error", None, "x"), "b", "mathqa", cfg=LENIENT).reward == 0.0


# --- P-CoT program: process_code --------------------------------------------------------------
def test_process_code():
    program = ("import numpy as np\nx = 2\ndef solution():\n    import sys\n    sys.exit(3)\n"
               "    return x\n  \ndef solution():\n    return 0\n")
    assert paper_rule.paper_program(program) == (
        "import math\nimport sympy\nimport numpy as np\nx = 2\ndef solution():\n    import sys\n"
        "    print(3)\n    return x")       # top-level lines kept; cut at the whitespace-only line
    # sys.exit becomes print anywhere, strings included.
    assert paper_rule.paper_program("def solution():\n    return 'sys.exit'") == \
        "import math\nimport sympy\ndef solution():\n    return 'print'"
    # A tab-only or \r-only line is whitespace too; an empty text is the preamble alone.
    assert paper_rule.paper_program("def solution():\n\t\n    return 1").endswith("def solution():")
    assert paper_rule.paper_program("") == "import math\nimport sympy"
    # With the question, the prompt's header comes first (the official text after the cot trigger).
    q = "Mia has 3 apples."
    assert prepare_program("    return 3\n", question=q, rule="paper") == \
        'import math\nimport sympy\ndef solution():\n    """Mia has 3 apples."""\n    return 3'


@pytest.fixture(scope="module")
def scorer():
    with Scorer(RewardConfig(program_timeout_s=5.0, sandbox_workers=2)) as s:
        yield s


def fn(*lines):
    return "def solution():\n" + "".join(f"    {line}\n" if line else "\n" for line in lines)


# (program, gold, paper reward, lenient reward): run through the sandbox under both rules.
PROGRAMS = [
    pytest.param("import math\n" + fn("return math.floor(7.5)"), "7", 1.0, 0.0, id="top-level-import-math"),
    pytest.param(fn("return math.floor(7.5)"), "7", 1.0, 0.0, id="math-without-import"),
    pytest.param(fn("return sympy.Rational(14, 2)"), "7", 1.0, 0.0, id="sympy-without-import"),
    pytest.param(fn("import sys", "sys.exit(3)", "return 7"), "7", 1.0, 0.0, id="sys-exit-prints"),
    pytest.param(fn("return 7 > 3"), "1", 1.0, 0.0, id="bool-is-1.0"),
    pytest.param(fn("return '7'"), "7", 1.0, 1.0, id="str-number"),
    pytest.param(fn("return 'seven'"), "7", 0.0, 0.0, id="str-word"),
    pytest.param(fn("return None"), "7", 0.0, 0.0, id="none"),
    pytest.param(fn("return 1j"), "7", 0.0, 0.0, id="complex"),
    pytest.param(fn("return 6.995"), "7", 1.0, 1.0, id="within-1e-2"),
    pytest.param(fn("return 8"), "7", 0.1, 0.1, id="wrong"),
    pytest.param(fn("a = 7", "", "return a"), "7", 0.0, 0.0, id="blank-line-cuts"),
    pytest.param(fn("a = 7", "    ", "return a"), "7", 0.0, 1.0, id="whitespace-line-cuts-paper-only"),
    pytest.param("X = 7\n" + fn("return X"), "7", 0.0, 0.0, id="top-level-name-not-in-globals"),
    pytest.param("def helper():\n    return 7\n" + fn("return helper()"), "7", 0.0, 0.0, id="top-level-helper"),
    pytest.param(fn("def f(n):", "    return 1 if n < 2 else n * f(n - 1)", "return f(4)"), "24", 1.0, 1.0,
                 id="nested-recursive-helper"),
    pytest.param(fn("return __name__"), "7", 0.0, 0.0, id="no-__name__-global"),
    pytest.param(fn("return 7") + "print(solution())\n", "7", 1.0, 1.0, id="top-level-call-after"),
    pytest.param(fn("while True:", "    pass"), "7", 0.0, 0.0, id="timeout"),
]


@pytest.mark.parametrize("program, gold, paper, lenient", PROGRAMS)
def test_programs_under_both_rules(scorer, program, gold, paper, lenient):
    got = scorer.score([program], [gold], "pcot", "gsm8k", rule="paper")[0]
    assert (got.reward, got.rule) == (paper, "paper"), (program, got)
    assert scorer.score([program], [gold], "pcot", "gsm8k", rule="lenient")[0].reward == lenient


def test_program_continuation_with_the_question(scorer):
    # What the reward actor gets: the model's text after the P-CoT prompt's header.
    got = scorer.score(["    return math.sqrt(49)\n\nprint('junk')\n"], ["7"], "pcot", "svamp",
                       questions=["What is the square root of 49?"])[0]
    assert (got.reward, got.answer, got.rule) == (1.0, "7", "paper")


def test_mathqa_program_end_to_end(scorer):
    got = scorer.score([fn("return 'C'"), fn("return 1 / 0"), fn("return 30")], ["c"] * 3, "pcot", "mathqa",
                       [OPTIONS] * 3, rule="paper")
    assert [(s.reward, s.answer) for s in got] == [(1.0, "c"), (0.1, "none"), (0.1, "30")]


# --- numeric equality and reward values ---------------------------------------------------------
def test_numeric_equality_is_abs_within_1e_2():
    assert paper_rule.is_correct(0.04, 0.036, mcq=False)
    assert paper_rule.is_correct(72.005, 72.0, mcq=False)
    assert not paper_rule.is_correct(72.02, 72.0, mcq=False)
    assert not paper_rule.is_correct(72.01, 72.0, mcq=False)   # 0.010000000000005116 > 1e-2 in floats


def test_reward_values_are_configurable_and_named():
    custom = RewardConfig(correct_reward=2.0, partial_reward=0.5, rule="paper")
    assert [score_ncot("x" + LINE + a, "7", cfg=custom).reward for a in ("7", "8", "eight")] == [2.0, 0.5, 0.0]
    default = [score_ncot("x" + LINE + a, "7") for a in ("7", "8", "eight")]   # RewardConfig(): paper
    assert [(s.reward, s.rule) for s in default] == [(1.0, "paper"), (0.1, "paper"), (0.0, "paper")]
