"""The synthetic task: deterministic, split-disjoint, in range, and every gold CoT is right."""
import dataclasses
import re

import pytest

from formats.records import ANSWER_TRIGGER, pcot_header
from rewards.extract import answer_text, parse_number
from tasks.synthetic import SyntheticConfig, generate

CFG = SyntheticConfig(num_train=200, num_test=100)
EQUATION = re.compile(r", so [A-Z][a-z]+ has (\d+) ([-+*/]) (\d+) = (\d+) [a-z]+\.$")


@pytest.fixture(scope="module")
def data():
    return {kind: generate(CFG, cot_kind=kind) for kind in ("ncot", "pcot")}


def _equations(cot: str) -> list[tuple[int, str, int, int]]:
    """(a, op, b, c) for each step line of an N-CoT."""
    steps = [EQUATION.search(line) for line in cot.split("\n")[1:-1]]
    assert all(steps), cot
    return [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in steps]


def _run(program: str) -> int:
    namespace: dict = {}
    exec(program, namespace)  # our own generated programs, not model output
    return namespace["solution"]()


def test_same_seed_same_data_and_other_seed_other_data():
    assert generate(CFG) == generate(CFG)
    other = generate(dataclasses.replace(CFG, seed=1))
    assert {e.question for e in other[0]} != {e.question for e in generate(CFG)[0]}


def test_sizes_ids_and_fields(data):
    train, test = data["ncot"]
    assert len(train) == CFG.num_train and len(test) == CFG.num_test
    assert train[7].id == "synthetic-train-000007" and test[0].id == "synthetic-test-000000"
    assert all(e.dataset == "synthetic" and e.cot_kind == "ncot" and e.cot for e in train + test)


def test_no_question_repeats_within_or_across_splits(data):
    train, test = data["ncot"]
    questions = [e.question for e in train + test]
    assert len(set(questions)) == len(questions)


def test_same_questions_and_answers_for_both_cot_kinds(data):
    for ncot, pcot in zip(data["ncot"][0] + data["ncot"][1], data["pcot"][0] + data["pcot"][1]):
        assert (ncot.id, ncot.question, ncot.answer) == (pcot.id, pcot.question, pcot.answer)
        assert (ncot.cot_kind, pcot.cot_kind) == ("ncot", "pcot")


def test_ncot_arithmetic_is_right_and_in_range(data):
    for e in data["ncot"][0] + data["ncot"][1]:
        start = int(re.search(r"starts with (\d+) ", e.cot.split("\n")[0])[1])
        value = start
        assert 2 <= start <= CFG.max_operand
        for a, op, b, c in _equations(e.cot):
            assert a == value, "each step continues from the previous result"
            assert 2 <= b <= CFG.max_operand and 2 <= c <= CFG.max_value
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0, "division is exact"
            value = c
        assert e.answer == str(value)


def test_ncot_ends_with_the_papers_trigger(data):
    for e in data["ncot"][0] + data["ncot"][1]:
        assert e.cot.endswith(f"\n{ANSWER_TRIGGER} {e.answer}")
        assert parse_number(answer_text(e.cot)) == int(e.answer), "the reward's extractor reads it"


def test_every_pcot_program_returns_the_answer(data):
    for e in data["pcot"][0] + data["pcot"][1]:
        assert e.cot.startswith(pcot_header(e.question))
        body = e.cot[len(pcot_header(e.question)):].split("\n")
        assert all(line.startswith("    ") and not line[4].isspace() for line in body), "4-space indents"
        assert body[-2:] == ["    result = " + body[-3].split()[0], "    return result"]
        assert _run(e.cot) == int(e.answer)


def test_step_counts_follow_the_config():
    cfg = SyntheticConfig(num_train=150, num_test=100, min_steps=2, max_steps=3, test_min_steps=4, test_max_steps=5)
    train, test = generate(cfg)
    train_steps = {len(_equations(e.cot)) for e in train}
    test_steps = {len(_equations(e.cot)) for e in test}
    assert train_steps == {2, 3} and test_steps == {4, 5}


def test_operations_follow_the_config():
    train, test = generate(SyntheticConfig(num_train=100, num_test=20, operations=["*", "-"]))
    ops = {op for e in train + test for _, op, _, _ in _equations(e.cot)}
    assert ops == {"*", "-"}


def test_questions_are_varied_stories(data):
    train = data["ncot"][0]
    assert len({e.question.split()[0] for e in train}) > 15, "many names"
    assert len({e.question.split(".")[0].split()[-1] for e in train}) > 10, "many items"
    handed_over = [e for e in train if "times as many" in e.question and " as before" not in e.question]
    assert handed_over, "some stories hand the count to another person"


@pytest.mark.parametrize("field, value", [
    ("num_train", 0), ("num_test", 0), ("min_steps", 0), ("max_steps", 0), ("test_min_steps", 0),
    ("test_max_steps", 0), ("max_operand", 1), ("max_value", 10), ("operations", ()), ("operations", ("%",)),
    ("operations", ("+", "+")), ("terse_fraction", -0.1), ("terse_fraction", 1.5),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field} ="):
        SyntheticConfig(**{field: value})


def test_test_steps_default_to_the_train_steps():
    cfg = SyntheticConfig(min_steps=2, max_steps=4)
    assert cfg.test_steps == (2, 4)


def test_config_file_that_sets_train_steps_moves_the_test_steps(tmp_path):
    # A YAML section given in part is merged into the default section; the default must not carry
    # test steps resolved from the default train steps (1-3), or a 2-step task is tested on 1-3 steps.
    from cluster.config import RunConfig
    from cluster.config_io import load_config
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  synthetic:\n    num_train: 50\n    num_test: 30\n    min_steps: 2\n    max_steps: 2\n")
    cfg = load_config(RunConfig, path).data.synthetic
    assert cfg.test_steps == (2, 2)
    _, test = generate(cfg)
    assert {len(_equations(e.cot)) for e in test} == {2}


def test_impossible_config_says_so():
    with pytest.raises(ValueError, match="could only generate"):
        generate(SyntheticConfig(num_train=50, num_test=5, min_steps=3, max_steps=3, max_operand=3, max_value=6,
                                 operations=("/",)))


def test_terse_cots_skip_the_working_and_change_nothing_else():
    plain = generate(CFG, "ncot")
    terse_cfg = dataclasses.replace(CFG, terse_fraction=0.5)
    mixed = generate(terse_cfg, "ncot")
    assert [(e.question, e.answer) for e in plain[0] + plain[1]] == [(e.question, e.answer) for e in mixed[0] + mixed[1]]
    assert [e.cot for e in mixed[1]] == [e.cot for e in plain[1]]       # test CoTs stay step by step
    terse = [e for e in mixed[0] if e.cot.split("\n")[1].startswith("So ")]
    assert 0.4 < len(terse) / len(mixed[0]) < 0.6
    for e in terse:
        first, statement, trigger = e.cot.split("\n")
        assert re.fullmatch(r"[A-Z][a-z]+ starts with \d+ [a-z]+\.", first)
        assert re.fullmatch(rf"So [A-Z][a-z]+ has {e.answer} [a-z]+\.", statement)
        assert trigger == f"{ANSWER_TRIGGER} {e.answer}"
    programs = generate(terse_cfg, "pcot")
    literal = [e for e in programs[0] if "    result = " + e.answer + "\n" in e.cot]
    assert [e.id for e in literal] == [e.id for e in terse]              # the same questions are terse
    assert all(_run(e.cot) == int(e.answer) for e in programs[0] + programs[1])
    assert programs[1] == generate(CFG, "pcot")[1]


def test_equation_only_steps_keep_the_arithmetic_and_drop_the_restated_sentence():
    restated = generate(CFG, "ncot")[0]
    short = generate(dataclasses.replace(CFG, restate_steps=False), "ncot")[0]
    for a, b in zip(restated, short):
        assert (a.question, a.answer) == (b.question, b.answer)
        long_lines, short_lines = a.cot.split("\n"), b.cot.split("\n")
        assert len(long_lines) == len(short_lines) and long_lines[0] == short_lines[0]
        for long_line, short_line in zip(long_lines[1:-1], short_lines[1:-1]):
            assert re.fullmatch(r"[A-Z][a-z]+ has \d+ [-+*/] \d+ = \d+ [a-z]+\.", short_line)
            assert long_line.endswith(", so " + short_line)
    assert sum(len(e.cot) for e in short) < 0.7 * sum(len(e.cot) for e in restated)
