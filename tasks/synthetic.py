"""A seeded generator of GSM8K-style arithmetic word problems: the embedded default task.

A problem is a short story about one count of items that changes step by step:

    Mia has 12 apples. She buys 7 more apples. Then Tom has 3 times as many apples as Mia.
    He sells 4 of his apples. How many apples does Tom have now?

Each step is ONE arithmetic operation (+, -, *, exact /) on the running count, so "k steps" means
k equations in the gold chain of thought. Both gold CoT kinds are written from the same sampled
story, and no randomness is spent on writing them, so one seed gives the same questions for N-CoT
and P-CoT runs:

* N-CoT: one line per step, ``..., so Tom has 19 * 3 = 57 apples.``, ending
  ``\\nTherefore, the answer is: {answer}`` (the paper's format).
* P-CoT: a program in the style of the ReFT repository's SVAMP ``python_sdp`` files, one
  assignment per given number and one per step, ``//`` for division so the result stays an int.

Every count and operand is an integer in [2, max_value]: the word-level tokenizer
(`tasks.tiny_model`) holds each integer in [0, max_value] as one token, so any arithmetic
result the model writes is a single token. 0 and 1 never occur, so every count reads as a plural.

The vocabulary is kept to a few hundred words (names, items, a dozen verbs) because the tokenizer
is word-level and every distinct word costs an embedding row.
"""
from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple, Optional

from formats.records import ANSWER_TRIGGER, COT_KINDS, Example, pcot_header

OPERATIONS = ("+", "-", "*", "/")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    """Seeds the one random stream that draws every problem: same seed, same data."""
    num_train: int = 1000
    """A FIXED training set that the tiny model can memorise. docs/measurements.md §2: 5,000 easy problems let SFT
    alone saturate test accuracy, so there is nothing left for RL; ReFT's gain lives where SFT overfits
    a small set with one gold CoT per question and RL keeps learning from its own samples."""
    num_test: int = 500
    """Enough for a ±2-point accuracy estimate, small enough for a greedy evaluation in seconds on CPU."""
    min_steps: int = 1
    """Fewest operations per training problem; 1 gives the model easy problems to get its first rewards on."""
    max_steps: int = 3
    """Most operations per training problem. Each step multiplies the ways to go wrong, so 3 keeps
    greedy accuracy after SFT well below 100% without making rewards too rare for RL."""
    test_min_steps: Optional[int] = None
    """Fewest operations per test problem; None = min_steps (kept None, not filled in, so that a config
    that overrides min_steps moves the test problems with it)."""
    test_max_steps: Optional[int] = None
    """Most operations per test problem; None = max_steps. Set it above max_steps to test generalisation
    to longer problems than any seen in training."""
    max_operand: int = 20
    """Largest number a sentence introduces (start count, operand). 20 is the calibrated setting of
    docs/measurements.md §2; operands are drawn from [2, max_operand]."""
    max_value: int = 200
    """Largest count any step may produce. The tokenizer holds every integer up to it as one token,
    twice (with and without a leading space), so the vocabulary grows by 2 per unit: 200 keeps it
    under a thousand tokens while 3 steps of products still have room."""
    operations: tuple[str, ...] = OPERATIONS
    """Which operations steps may use, from ("+", "-", "*", "/"); "/" only ever divides exactly."""
    restate_steps: bool = True
    """N-CoT step lines restate the question's sentence before their equation (``He buys 7 more
    apples, so Tom has 12 + 7 = 19 apples.``), as GSM8K's CoTs do. False writes the equation
    alone (``Tom has 12 + 7 = 19 apples.``): half the tokens, and no long copying, which is most
    of what a tiny model trained from scratch gets wrong in the restated form."""
    terse_fraction: float = 0.0
    """Fraction of TRAINING gold CoTs that skip their working, as human and LLM annotations
    sometimes do: an N-CoT then states the final count without an equation (``So Tom has 15
    apples.``), a P-CoT returns it as a literal (``result = 15``), both computed "in the head".
    Which questions get a terse CoT is random, so a question's wording does not tell. A terse CoT
    can be memorised for a training question but not carried over to a new one (the tiny model
    cannot do several operations in one token), while step-by-step working generalises: SFT
    imitates both, RL sampling both on the training questions can learn which one earns the
    reward (the paper's "learning from multiple CoTs"). 0 = every CoT works step by step. Test
    CoTs are always step by step."""

    def __post_init__(self):
        # Configs arrive from YAML too: accept a list and store a tuple, so the config stays hashable.
        object.__setattr__(self, "operations", tuple(self.operations))

        def check(ok: bool, field: str, why: str):
            if not ok:
                raise ValueError(f"SyntheticConfig.{field} = {getattr(self, field)!r}: {why}")

        check(self.num_train >= 1, "num_train", "must be >= 1")
        check(self.num_test >= 1, "num_test", "must be >= 1")
        check(self.min_steps >= 1, "min_steps", "must be >= 1")
        check(self.max_steps >= self.min_steps, "max_steps", f"must be >= min_steps ({self.min_steps})")
        test_min, test_max = self.test_steps
        check(test_min >= 1, "test_min_steps", "must be >= 1")
        check(test_max >= test_min, "test_max_steps", f"must be >= the test problems' fewest steps ({test_min})")
        check(self.max_operand >= 2, "max_operand", "must be >= 2 (operands are drawn from [2, max_operand])")
        check(self.max_value >= 2 * self.max_operand, "max_value",
              f"must be >= 2 * max_operand ({2 * self.max_operand}) so that every step has room")
        check(0.0 <= self.terse_fraction <= 1.0, "terse_fraction", "must be in [0, 1]")
        check(len(self.operations) > 0, "operations", "must name at least one operation")
        check(set(self.operations) <= set(OPERATIONS) and len(set(self.operations)) == len(self.operations),
              "operations", f"must be distinct members of {OPERATIONS}")

    @property
    def test_steps(self) -> tuple[int, int]:
        """(fewest, most) operations per test problem, the train range where not set."""
        return (self.min_steps if self.test_min_steps is None else self.test_min_steps,
                self.max_steps if self.test_max_steps is None else self.test_max_steps)


def generate(cfg: SyntheticConfig, cot_kind: str = "ncot") -> tuple[list[Example], list[Example]]:
    """(train, test) Examples with ``cot_kind`` gold CoTs (test too: the synthetic task has them).

    Deterministic given ``cfg``; the questions do not depend on ``cot_kind``. No question text
    appears twice, within or across the splits.
    """
    if cot_kind not in COT_KINDS:
        raise ValueError(f"cot_kind must be one of {COT_KINDS}, got {cot_kind!r}")
    rng = random.Random(cfg.seed)
    style_rng = random.Random(cfg.seed + 1)   # a stream of its own: the questions do not depend on it
    seen: set[str] = set()
    splits = {}
    for split, size, min_steps, max_steps in (("train", cfg.num_train, cfg.min_steps, cfg.max_steps),
                                              ("test", cfg.num_test, *cfg.test_steps)):
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < size:
            # Generous bound: with the default pools a duplicate is rare, but a tiny config (one
            # operation, small numbers) can run out of distinct questions or of feasible steps.
            attempts += 1
            if attempts > 100 * size:
                raise ValueError(f"{cfg}: could only generate {len(problems)} of {size} distinct {split} "
                                 "problems; allow more operations, steps or larger numbers")
            problem = _sample_problem(rng, cfg, rng.randint(min_steps, max_steps))
            if problem is not None and problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        terse = [split == "train" and style_rng.random() < cfg.terse_fraction for _ in problems]
        splits[split] = [
            Example(id=f"synthetic-{split}-{i:06d}", question=p.question, answer=str(p.answer),
                    dataset="synthetic", cot_kind=cot_kind,
                    cot=(p.terse_pcot if is_terse else p.pcot) if cot_kind == "pcot" else
                        (p.terse_ncot if is_terse else p.ncot))
            for i, (p, is_terse) in enumerate(zip(problems, terse))]
    train_questions = {e.question for e in splits["train"]}
    assert not any(e.question in train_questions for e in splits["test"]), "train/test share a question"
    return splits["train"], splits["test"]


# ---------------------------------------------------------------------------------------------
# The story pieces. Sentence bodies are formatted with:
#   {S}      the holder as subject: a pronoun, or the name when a pronoun could be ambiguous
#   {name}   the holder's name        {other}  another person's name
#   {him}    the holder's object pronoun ("her"/"him")   {his}  possessive ("her"/"his")
#   {n}      the step's operand       {items}  the plural item word
# ---------------------------------------------------------------------------------------------

class Person(NamedTuple):
    name: str
    subject: str      # she / he
    object: str       # her / him
    possessive: str   # her / his


PEOPLE = tuple(Person(n, "she", "her", "her") for n in (
    "Mia", "Emma", "Olivia", "Ava", "Sophia", "Lily", "Grace", "Chloe", "Zoe", "Nora", "Ella", "Ruby", "Sara")) + \
    tuple(Person(n, "he", "him", "his") for n in (
        "Tom", "Jack", "Liam", "Noah", "Ben", "Sam", "Leo", "Max", "Owen", "Eli", "Luke", "Ryan", "Omar"))

ITEMS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "coins", "shells",
         "balloons", "candies", "stamps", "beads", "crayons", "oranges", "toys", "ribbons", "buttons")


class StepTemplate(NamedTuple):
    body: str           # the sentence without its full stop and connector
    operand_var: str    # the P-CoT variable that holds the operand
    hands_over: bool = False  # the count now belongs to {other} (the story follows them from here)


STEP_TEMPLATES: dict[str, tuple[StepTemplate, ...]] = {
    "+": (StepTemplate("{S} buys {n} more {items}", "{items}_bought"),
          StepTemplate("{other} gives {him} {n} {items}", "{items}_received"),
          StepTemplate("{S} finds {n} more {items}", "{items}_found"),
          StepTemplate("{S} wins {n} {items} in a game", "{items}_won")),
    "-": (StepTemplate("{S} gives {n} {items} to {other}", "{items}_given"),
          StepTemplate("{S} sells {n} of {his} {items}", "{items}_sold"),
          StepTemplate("{S} loses {n} {items}", "{items}_lost"),
          StepTemplate("{S} uses {n} of {his} {items}", "{items}_used")),
    "*": (StepTemplate("{other} has {n} times as many {items} as {name}", "times_as_many", hands_over=True),
          StepTemplate("{S} trades each of {his} {items} for {n} new ones", "new_per_old"),
          StepTemplate("{S} ends up with {n} times as many {items} as before", "times_as_many")),
    "/": (StepTemplate("{name} has {n} times as many {items} as {other}", "times_as_many", hands_over=True),
          StepTemplate("{S} puts {his} {items} into {n} equal piles and keeps one pile", "num_piles"),
          StepTemplate("{S} splits {his} {items} equally into {n} bags and gives away all but one bag",
                       "num_bags")),
}
START_TEMPLATES = ("{name} has {n} {items}.", "{name} owns {n} {items}.", "{name} starts the day with {n} {items}.")
CONNECTORS = ("", "Then ", "After that, ", "Later, ")
QUESTION_TEMPLATES = ("How many {items} does {name} have now?", "How many {items} does {name} have in the end?",
                      "How many {items} does {name} end up with?")
PYTHON_OPS = {"+": "+", "-": "-", "*": "*", "/": "//"}


class Problem(NamedTuple):
    question: str
    answer: int
    ncot: str
    pcot: str
    terse_ncot: str   # SyntheticConfig.terse_fraction: the final count without its working
    terse_pcot: str   # ... and a program that returns the answer as a literal


def _operands(op: str, value: int, cfg: SyntheticConfig) -> list[int]:
    """Operands in [2, max_operand] that keep the count in [2, max_value] (and "/" exact)."""
    candidates = range(2, cfg.max_operand + 1)
    if op == "+":
        return [n for n in candidates if value + n <= cfg.max_value]
    if op == "-":
        return [n for n in candidates if value - n >= 2]
    if op == "*":
        return [n for n in candidates if value * n <= cfg.max_value]
    return [n for n in candidates if value % n == 0 and value // n >= 2]


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _sample_problem(rng: random.Random, cfg: SyntheticConfig, num_steps: int) -> Optional[Problem]:
    """One story of ``num_steps`` steps, or None when a step has no operation that stays in range."""
    holder, items = rng.choice(PEOPLE), rng.choice(ITEMS)
    value = rng.randint(2, cfg.max_operand)
    var = f"{holder.name.lower()}_{items}"
    sentences = [rng.choice(START_TEMPLATES).format(name=holder.name, n=value, items=items)]
    ncot = [f"{holder.name} starts with {value} {items}."]
    code = [f"{var} = {value}"]
    pronoun_is_clear = True   # the previous sentence named nobody but the holder
    for step in range(num_steps):
        choices = {op: _operands(op, value, cfg) for op in cfg.operations}
        feasible = [op for op in cfg.operations if choices[op]]
        if not feasible:
            return None
        op = rng.choice(feasible)
        n = rng.choice(choices[op])
        template = rng.choice(STEP_TEMPLATES[op])
        names_other = "{other}" in template.body
        other = rng.choice([p for p in PEOPLE if p != holder]) if names_other else None
        body = template.body.format(
            S=holder.subject if pronoun_is_clear else holder.name, name=holder.name,
            other=other.name if other else "", him=holder.object, his=holder.possessive, n=n, items=items)
        connector = rng.choice(CONNECTORS) if step > 0 else ""
        sentences.append(_capitalize(connector + body) + ".")

        new_value = _apply(op, value, n)
        new_holder = other if template.hands_over else holder
        new_var = f"{new_holder.name.lower()}_{items}"
        operand_var = template.operand_var.format(items=items)
        equation = f"{new_holder.name} has {value} {op} {n} = {new_value} {items}."
        ncot.append(f"{_capitalize(body)}, so {equation}" if cfg.restate_steps else equation)
        code += [f"{operand_var} = {n}", f"{new_var} = {var} {PYTHON_OPS[op]} {operand_var}"]
        holder, var, value = new_holder, new_var, new_value
        pronoun_is_clear = not names_other

    sentences.append(rng.choice(QUESTION_TEMPLATES).format(items=items, name=holder.name))
    question = " ".join(sentences)
    ncot.append(f"{ANSWER_TRIGGER} {value}")
    terse = [ncot[0], f"So {holder.name} has {value} {items}.", ncot[-1]]
    code += [f"result = {var}", "return result"]
    pcot = pcot_header(question) + "\n".join("    " + line for line in code)
    terse_pcot = pcot_header(question) + f"    result = {value}\n    return result"
    return Problem(question, value, "\n".join(ncot), pcot, "\n".join(terse), terse_pcot)


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]
