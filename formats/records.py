"""The one record type every dataset loader and generator produces.

A record is a math word problem with its gold final answer and, for training sets, one gold
chain of thought (CoT) in the paper's format:

* N-CoT (``cot_kind="ncot"``): natural language ending ``\\nTherefore, the answer is: {answer}``.
* P-CoT (``cot_kind="pcot"``): a Python program ``def solution():\\n    \"\"\"{question}\"\"\"\\n ...
  return result`` whose ``solution()`` returns the answer.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

COT_KINDS = ("ncot", "pcot")
ANSWER_TRIGGER = "Therefore, the answer is:"
# The separators the paper's code splits a decoded sample on (lqtrung1998/mwp_ReFT train_*.py:
# ``cot_trigger`` and ``answer_trigger``): the prompt's last line, and the N-CoT answer line.
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_LINE = f"\n{ANSWER_TRIGGER} "


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str                      # gold final answer as text: "72", "38.0", or an MCQ letter "a"
    dataset: str                     # "gsm8k" | "svamp" | "mathqa" | "mathqa-numeric" | "synthetic"
    cot_kind: str                    # "ncot" | "pcot"
    cot: Optional[str] = None        # gold CoT (None for test sets, which carry answers only)
    options: Optional[Mapping[str, str]] = None  # MCQ only: {"a": "38", "b": "27.675", ...}

    def __post_init__(self):
        if self.cot_kind not in COT_KINDS:
            raise ValueError(f"Example {self.id!r}: cot_kind must be one of {COT_KINDS}, got {self.cot_kind!r}")


def build_prompt(question: str, cot_kind: str) -> str:
    """The paper's prompt (mwp_ReFT): ``Question:\\n{q}\\nAnswer reasoning:\\n``.

    P-CoT prompts continue with the function header and the question as its docstring, so the
    model only writes the body.
    """
    prompt = f"Question:\n{question.strip()}\nAnswer reasoning:\n"   # the paper's code strips the question
    if cot_kind == "pcot":
        prompt += pcot_header(question)
    return prompt


def ncot_target(cot: str, answer: str) -> str:
    """The N-CoT training target as the paper's data preparation builds it (``train_sft_model.py``):
    the CoT stripped, then ``\\nTherefore, the answer is: {answer}`` appended, whatever the CoT
    already ends with (the ReFT SVAMP file's CoTs end "Therefore, the answer is <203>.", a few end
    with no answer at all). The one place a target's answer line is written."""
    return f"{cot.strip()}{ANSWER_LINE}{answer.strip()}"


def pcot_header(question: str) -> str:
    return f'def solution():\n    """{question.strip()}"""\n'


def prompt_token_ids(tokenizer, example: Example) -> list[int]:
    """The prompt's token ids: the one tokenisation of a prompt, for SFT (``learner.data``), the
    samplers and every evaluation, so that all of them see the same tokens. No special tokens are
    added on the way (an engine given text would add its own, e.g. a Llama BOS)."""
    return tokenizer.encode(build_prompt(example.question, example.cot_kind), add_special_tokens=False)
