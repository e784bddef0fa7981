"""Final-answer extraction from chains of thought, and answer comparison.

Pure functions, no I/O. The rules follow the paper's code (lqtrung1998/mwp_ReFT):

* N-CoT: the answer is the text after the LAST ``Therefore, the answer is:``, parsed as a number
  (MathQA-MCQ: an option letter a-e). Two gold-data dialects are read too: GSM8K's ``#### 72``
  and the ReFT SVAMP files' ``Therefore, the answer is <203>.``.
* Numbers: ``1,234``, ``$42``, ``42%``, ``42.``, ``42.0``, ``-3``, ``.5``, ``3/4``, ``1 1/2``.
  Anything else (words, units, two numbers, an expression) is no answer, so that a model is
  never rewarded for an answer the extractor had to guess.
* Numeric answers are equal when ``|a - b| <= 1e-2`` (the paper's tolerance).

Every function here runs in linear time on any input (no regex that can backtrack on a long run
of whitespace): N-CoT answers are parsed in the reward actor's own process, with no time limit.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Mapping, Optional

TRIGGER_STEM = "Therefore, the answer is"   # followed by ":" (paper) or " <x>" (SVAMP files)
GSM8K_TRIGGER = "####"
NUMERIC_TOLERANCE = 1e-2
MCQ_LETTERS = "abcde"

# A plain decimal: optional sign, digits with optional thousands commas, optional fraction.
_DECIMAL = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"^(?P<num>{_DECIMAL})$")
_FRACTION_RE = re.compile(r"^(?P<sign>[-+]?)(?:(?P<whole>\d+)\s+)?(?P<num>\d+)\s*/\s*(?P<den>\d+)$")
_OPTION_START_RE = re.compile(r"(?:^|,)\s*([a-e])\s*\)")   # "a )" at the start or after a comma


def parse_number(text: str) -> Optional[float]:
    """Parse one number written the way math answers are written; None when it is not one.

    >>> parse_number("$1,234.50"), parse_number("42%"), parse_number("3/4"), parse_number("12 apples")
    (1234.5, 42.0, 0.75, None)
    """
    # Wrappers and decorations that never change the value: "<203>." (ReFT's SVAMP files),
    # a sentence's full stop, "$", "%".
    s = text.strip().rstrip(".").strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip().rstrip(".").strip()
    if s.startswith("$"):
        s = s[1:].strip()
    elif s.startswith("-$"):
        s = "-" + s[2:].strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if not s:
        return None
    m = _NUMBER_RE.match(s)
    if m and any(ch.isdigit() for ch in s):
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    m = _FRACTION_RE.match(s)
    if m and int(m["den"]) != 0:
        value = int(m["whole"] or 0) + int(m["num"]) / int(m["den"])
        return -value if m["sign"] == "-" else value
    return None


def answer_text(completion: str) -> Optional[str]:
    """The raw answer text of an N-CoT completion: after the last trigger, else after ``####``."""
    idx = completion.rfind(TRIGGER_STEM)
    if idx >= 0:
        rest = completion[idx + len(TRIGGER_STEM):]
        rest = rest[1:] if rest.startswith(":") else rest
    else:
        idx = completion.rfind(GSM8K_TRIGGER)
        if idx < 0:
            return None
        rest = completion[idx + len(GSM8K_TRIGGER):]
    # The answer is what follows on the same line; a model that keeps talking after it
    # (new lines) is judged on the first line only.
    return rest.strip().split("\n", 1)[0].strip()


def parse_mcq_letter(text: str) -> Optional[str]:
    """``"c"``, ``"(C)"``, ``"c )"``, ``"c) 30"`` → ``"c"``; anything else → None.

    An optional "(", the letter, then nothing or one of ``) . :`` (and anything after it)."""
    s = text.strip().rstrip(".")
    s = (s[1:] if s.startswith("(") else s).lstrip()
    if not s or s[0] not in "abcdeABCDE":
        return None
    rest = s[1:].lstrip()
    return s[0].lower() if not rest or rest[0] in ").:" else None


def parse_mcq_options(question: str) -> dict[str, str]:
    """The options a MathQA question carries on its last line, in either dialect of the data:
    ``a ) 38 , b ) 27.675 , ...`` or a list literal ``['a ) 12', 'b ) 15', ...]``."""
    last_line = question.strip().split("\n")[-1].strip()
    if last_line.startswith("["):
        try:
            items = ast.literal_eval(last_line)
        except (ValueError, SyntaxError):
            return {}
        pairs = [re.match(r"^\s*([a-e])\s*\)\s*(.*)$", str(item), re.DOTALL) for item in items]
        return {m.group(1): m.group(2).strip() for m in pairs if m}
    if not re.match(r"^a\s*\)", last_line):
        return {}
    # Each option's text runs from its "x )" to the comma before the next option's.
    starts = list(_OPTION_START_RE.finditer(last_line))
    ends = [m.start() for m in starts[1:]] + [len(last_line)]
    options = {}
    for m, end in zip(starts, ends):
        options.setdefault(m.group(1), last_line[m.end():end].strip())
    return options


def numbers_equal(a: float, b: float, tol: float = NUMERIC_TOLERANCE) -> bool:
    return abs(a - b) <= tol


def option_for_value(value: float, options: Mapping[str, str]) -> Optional[str]:
    """MathQA with a program: the option letter whose numeric value equals ``value``, if exactly one does."""
    hits = [k for k, text in options.items()
            if (v := parse_number(text)) is not None and numbers_equal(v, value)]
    return hits[0] if len(hits) == 1 else None
