"""Answer extraction and comparison: tables of cases, incl. the traps that ruin peer runs."""
import time

import pytest

from rewards.extract import (
    answer_text,
    numbers_equal,
    option_for_value,
    parse_mcq_letter,
    parse_mcq_options,
    parse_number,
)


@pytest.mark.parametrize("text, expected", [
    ("72", 72.0),
    ("42.0", 42.0),
    ("1,234", 1234.0),
    ("1,234,567.5", 1234567.5),
    ("$42", 42.0),
    ("$ 1,000", 1000.0),
    ("-$5", -5.0),
    ("42%", 42.0),
    ("42.", 42.0),            # a sentence's full stop
    ("<203>.", 203.0),        # ReFT's SVAMP files
    ("<3.33>", 3.33),
    ("-3", -3.0),
    ("+7", 7.0),
    (".5", 0.5),
    ("3/4", 0.75),
    ("-3/4", -0.75),
    ("1 1/2", 1.5),
    ("  18  ", 18.0),
])
def test_parse_number_accepts(text, expected):
    assert parse_number(text) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("text", [
    "", "abc", "12 apples", "18 dollars per day", "3 + 4", "1,23", "12,3456", "1/0", "inf", "nan",
    "1e400", "4 5", "--4", "$", ".", "%",
])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("completion, raw", [
    ("So 2+2=4.\nTherefore, the answer is: 4", "4"),
    ("Therefore, the answer is: 3\nwait\nTherefore, the answer is: 5", "5"),      # the LAST trigger
    ("Natalia sold 72 clips.\n#### 72", "72"),                                     # GSM8K dialect
    ("blah\n\nTherefore, the answer is <203>.", "<203>."),                         # SVAMP dialect
    ("Therefore, the answer is: 12\nQuestion:\nanother one", "12"),               # model keeps going
    ("x" * 5000 + "\nTherefore, the answer is: 9", "9"),                          # no length window
    ("no trigger at all 42", None),
])
def test_answer_text(completion, raw):
    assert answer_text(completion) == raw


def test_trigger_beats_gsm8k_marker_and_long_text():
    # The answer is found however far it is from the end (peers cut to the last 300 chars).
    text = "#### 1\n" + "step\n" * 2000 + "Therefore, the answer is: 2"
    assert parse_number(answer_text(text)) == 2.0


def test_numbers_equal_tolerance_is_the_papers():
    assert numbers_equal(72.0, 72.009)
    assert numbers_equal(3.33, 3.333)
    assert not numbers_equal(72.0, 72.02)
    assert not numbers_equal(0.036, 0.05)


@pytest.mark.parametrize("text, letter", [
    ("c", "c"), ("C", "c"), ("(c)", "c"), ("c )", "c"), ("c ) 30", "c"), ("e.", "e"), ("f", None), ("30", None),
    ("cat", None), ("( c )", "c"), ("c : 30", "c"), ("c x", None), ("(", None), ("", None),
])
def test_mcq_letter(text, letter):
    assert parse_mcq_letter(text) == letter


def test_mcq_options_from_real_mathqa_question():
    q = ("a shopkeeper sold an article offering a discount of 5 % and earned a profit of 31.1 % . what would have "
         "been the percentage of profit earned if no discount had been offered ?\n"
         "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these")
    options = parse_mcq_options(q)
    assert options == {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}
    assert option_for_value(38.0, options) == "a"
    assert option_for_value(27.675, options) == "b"
    assert option_for_value(31.0, options) is None
    assert parse_mcq_options("no options here") == {}


def test_mcq_options_list_dialect():
    q = "what is the value ?\n['a ) 15 ohms', 'b ) 15 / 8 ohms', 'c ) 1 / 8 ohms', 'd ) 8 / 15 ohms', 'e ) 8 ohms']"
    assert parse_mcq_options(q) == {"a": "15 ohms", "b": "15 / 8 ohms", "c": "1 / 8 ohms", "d": "8 / 15 ohms",
                                    "e": "8 ohms"}


def test_mcq_options_with_commas_inside_an_option():
    assert parse_mcq_options("q ?\na ) 5 , 6 , b ) 7 , c ) , d ) x c ) y , e ) 9") == {
        "a": "5 , 6", "b": "7", "c": "", "d": "x c ) y", "e": "9"}


# Long runs of whitespace, digits or separators: what a model can write after the answer trigger.
# The MathQA letter regex these replace took 5 s on the first one.
HOSTILE_ANSWERS = [
    "a" + " " * 16000 + "x",
    "(" + " " * 16000 + "a" + " " * 16000 + "x",
    "1" + " " * 16000 + "1" + " " * 16000 + "x",
    "1," * 16000 + "x",
    "1" * 16000 + "x",
    "a ) " + " " * 16000 + "x",
    "a )" + ", " * 8000 + "x",
]


@pytest.mark.parametrize("text", HOSTILE_ANSWERS, ids=range(len(HOSTILE_ANSWERS)))
def test_answer_parsing_is_linear_on_hostile_text(text):
    from rewards.score import RewardConfig, score_ncot
    lenient, paper = RewardConfig(rule="lenient"), RewardConfig(rule="paper")
    start = time.perf_counter()
    letter = "a" if text.startswith("a )") else None       # "a ) <anything>" is option a
    assert parse_mcq_letter(text) == letter and parse_number(text) is None
    parse_mcq_options(text)
    assert score_ncot("Therefore, the answer is: " + text, "a", "mathqa", cfg=lenient).correct == (letter == "a")
    assert score_ncot("Therefore, the answer is: " + text, "1", "gsm8k", cfg=lenient).reward == 0.0
    # The paper rule: float() of the text, or the whole text for MathQA (never the letter alone).
    assert score_ncot("x\nTherefore, the answer is: " + text, "a", "mathqa", cfg=paper).reward == 0.1
    assert score_ncot("x\nTherefore, the answer is: " + text, "1", "gsm8k", cfg=paper).reward == 0.0
    assert time.perf_counter() - start < 0.25     # linear: ~1 ms; the old regex: seconds
