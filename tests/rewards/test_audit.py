"""The reward audit, on the synthetic task and (when present) on the real gold data, under both
reward rules; and the `reft reward` / `reft audit-rewards` commands."""
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from experiments.cli import main
from rewards.audit import audit_examples, disagreements, perturb_ncot, perturb_program, wrong_answers
from rewards.score import RULES, RewardConfig, Scorer, prepare_program
from tasks.datasets import load_dataset
from tasks.synthetic import SyntheticConfig

# SVAMP N-CoT rows whose CoT text is defective (checked by hand, 2026-11-23): eight are GPT-3.5
# non-answers ("This question was already answered earlier. The answer is <4>."), and in three
# the CoT's own final value differs from answer_value (svamp_929: CoT 9, gold 8.93; svamp_2000:
# CoT 69.32, gold 69.4; svamp_993: CoT 3.33, gold 3.333). The paper's target appends the answer
# line with answer_value to every CoT (tasks/test_datasets.py), so all of them now score 1.
SVAMP_NCOT_DEFECTIVE_COT = {"svamp_852", "svamp_929", "svamp_993", "svamp_1085", "svamp_1650", "svamp_1753",
                            "svamp_2000", "svamp_2033", "svamp_2109", "svamp_2636", "svamp_2697"}


@pytest.fixture(scope="module")
def scorer():
    with Scorer(RewardConfig(program_timeout_s=5.0, sandbox_workers=2)) as s:
        yield s


@pytest.mark.parametrize("rule", RULES)
def test_perturbations_change_the_answer(rule):
    assert wrong_answers("72", "gsm8k") == ["73", "727", "72.05"]
    assert wrong_answers("e", "mathqa") == ["a"]
    assert perturb_ncot("x\nTherefore, the answer is: 72", "73") == "x\nTherefore, the answer is: 73"
    assert perturb_ncot("x\n#### 72", "73") == "x\nTherefore, the answer is: 73"
    # A top-level import and a line after a blank one: the gold as `rule` runs it, nested whole.
    gold = "import math\ndef solution():\n    return math.floor(72.5)\n\nprint('after the blank line')"
    program = perturb_program(gold, "73", "gsm8k", rule)
    assert "after the blank line" not in program
    assert ("    import math\n" in program) == (rule == "paper")   # lenient drops the lines before the function
    prepared = prepare_program(program, rule=rule)
    assert prepared.endswith("    _gold_solution()\n    return 73")  # survives the runner's cut
    global_vars, local_vars = {}, {}
    exec(prepared, global_vars, local_vars)                       # both namespaces, as the paper's runner
    if rule == "paper":
        assert eval("solution()", global_vars, local_vars) == 73


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", ["ncot", "pcot"])
def test_audit_synthetic(scorer, kind, rule):
    examples = load_dataset("synthetic", "train", kind, synthetic_config=SyntheticConfig(num_train=150, num_test=10))
    row = audit_examples(examples, "train", scorer, rule=rule)
    assert (row.rows, row.gold_correct, row.failures, row.rule) == (150, 150, [], rule)
    assert (row.perturbed, row.perturbed_scored_correct, row.perturbed_extracted) == (450, 0, 450)


@pytest.mark.parametrize("rule, reason", [("paper", "no answer line"), ("lenient", "no answer trigger")])
def test_audit_reports_a_bad_gold_row(scorer, rule, reason):
    examples = load_dataset("synthetic", "train", "ncot", synthetic_config=SyntheticConfig(num_train=20, num_test=5))
    broken = examples[3].__class__(**{**examples[3].__dict__, "cot": "I do not know."})
    row = audit_examples(examples[:3] + [broken], "train", scorer, rule=rule)
    assert row.gold_correct == 3 and not row.ok
    assert [f["id"] for f in row.failures] == [broken.id]
    assert reason in row.failures[0]["reason"] and "I do not know." in row.failures[0]["reason"]


def test_disagreements_list_the_rows_the_rules_score_differently(scorer):
    examples = load_dataset("synthetic", "train", "ncot", synthetic_config=SyntheticConfig(num_train=5, num_test=5))
    dollar = examples[1].__class__(**{**examples[1].__dict__, "cot": f"x\nTherefore, the answer is: ${examples[1].answer}"})
    rows = [audit_examples([examples[0], dollar], "train", scorer, rule=rule) for rule in RULES]
    assert disagreements(*rows) == [{"id": dollar.id, "gold": dollar.answer, "paper_answer": None, "paper_reward": 0.0,
                                     "lenient_answer": dollar.answer, "lenient_reward": 1.0}]
    assert rows[0].rules_disagree == rows[1].rules_disagree == 1


def test_audit_real_gsm8k_and_svamp(data_dir, scorer):
    for rule in RULES:
        gsm8k = audit_examples(load_dataset("gsm8k", "train", "ncot", data_dir=data_dir), "train", scorer, rule=rule)
        assert (gsm8k.rows, gsm8k.gold_correct, gsm8k.perturbed_scored_correct) == (7473, 7473, 0)
        assert gsm8k.perturbed_extracted == gsm8k.perturbed == 3 * 7473   # each wrong answer read, none accepted
    svamp = [audit_examples(load_dataset("svamp", "train", "ncot", data_dir=data_dir), "train", scorer, rule=rule)
             for rule in RULES]
    for row in svamp:
        assert (row.gold_correct, row.failures, row.perturbed_scored_correct) == (3076, [], 0), row.rule
    assert disagreements(*svamp) == []
    ids = {item_id for item_id, _, _ in svamp[0].gold_scores}
    assert SVAMP_NCOT_DEFECTIVE_COT <= ids


@pytest.mark.slow
def test_audit_real_svamp_programs(data_dir, scorer):
    examples = load_dataset("svamp", "train", "pcot", data_dir=data_dir)
    rows = [audit_examples(examples, "train", scorer, rule=rule) for rule in RULES]
    for row in rows:
        assert (row.rows, row.gold_correct, row.perturbed_scored_correct) == (3043, 3043, 0), row.rule
        assert row.perturbed_extracted == row.perturbed
    assert disagreements(*rows) == []


def _reft(*args, stdin="", pass_fds=()):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, pass_fds=pass_fds)


def test_cli_reward_ncot_and_pcot():
    out = _reft("reward", "--kind", "ncot", "--gold", "4", stdin="2+2=4\nTherefore, the answer is: 4\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"reward": 1.0, "answer": "4", "status": "ok", "correct": True, "detail": "",
                                      "rule": "paper"}
    out = _reft("reward", "--kind", "pcot", "--gold", "208", stdin="def solution():\n    return 344 - 137\n")
    assert json.loads(out.stdout)["reward"] == 0.1
    out = _reft("reward", "--kind", "pcot", "--gold", "208", "--timeout", "1",
                stdin="def solution():\n    while True:\n        pass\n")
    assert json.loads(out.stdout) | {"detail": ""} == {"reward": 0.0, "answer": None, "status": "timeout",
                                                        "correct": False, "detail": "", "rule": "paper"}


def _reward(monkeypatch, capsys, stdin, *args):
    """`reft reward ARGS < stdin`, in this process: (exit status, the printed JSON)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(["reward", *args])
    out = capsys.readouterr().out
    return status, json.loads(out) if status == 0 else out


MATH_PROGRAM = "import math\ndef solution():\n    return math.floor(7.5)\n"   # the example


def test_cli_reward_paper_rule_runs_programs_as_the_paper(monkeypatch, capsys):
    # printf 'import math\ndef solution():\n    return math.floor(7.5)\n' | reft reward --kind pcot --gold 7
    assert _reward(monkeypatch, capsys, MATH_PROGRAM, "--kind", "pcot", "--gold", "7") == \
        (0, {"reward": 1.0, "answer": "7", "status": "ok", "correct": True, "detail": "", "rule": "paper"})
    without_import = MATH_PROGRAM.replace("import math\n", "")
    assert _reward(monkeypatch, capsys, without_import, "--kind", "pcot", "--gold", "7")[1]["reward"] == 1.0
    # The lenient rule drops the top-level import and preloads nothing: NameError, 0.
    for program in (MATH_PROGRAM, without_import):
        status, out = _reward(monkeypatch, capsys, program, "--kind", "pcot", "--gold", "7", "--rule", "lenient")
        assert (out["reward"], out["status"], out["rule"]) == (0.0, "error", "lenient") and "NameError" in out["detail"]


def test_cli_reward_rule_for_ncot(monkeypatch, capsys):
    text = "Mia has 3 + 4 = 7 apples.\nTherefore, the answer is: $7\n"
    assert _reward(monkeypatch, capsys, text, "--kind", "ncot", "--gold", "7")[1]["reward"] == 0.0
    assert _reward(monkeypatch, capsys, text, "--kind", "ncot", "--gold", "7", "--rule", "lenient")[1]["reward"] == 1.0


# Looks for the gold answer in every process's command line (`reft reward --gold X` puts it there).
GOLD_FROM_PROC = """
def solution():
    import os
    for pid in os.listdir("/proc"):
        try:
            words = open(f"/proc/{pid}/cmdline").read().split("\\0")
        except OSError:
            continue
        if "--gold" in words:
            return words[words.index("--gold") + 1]
"""


def test_cli_reward_gold_from_a_private_descriptor():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"208\n")
    os.close(write_fd)
    try:
        out = _reft("reward", "--kind", "pcot", "--gold-fd", str(read_fd), pass_fds=(read_fd,),
                    stdin="def solution():\n    return 344 - 136\n")
    finally:
        os.close(read_fd)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reward"] == 1.0
    # --gold stays public to the machine, but not to the sandboxed program.
    out = _reft("reward", "--kind", "pcot", "--gold", "208", stdin=GOLD_FROM_PROC)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["reward"] < 1.0, out.stdout
    # Bad input: a clear error, no traceback.
    for args in (["--gold-fd", "97"], ["--gold", "seven"]):
        out = _reft("reward", "--kind", "ncot", *args, stdin="Therefore, the answer is: 7\n")
        assert out.returncode == 2 and "reft reward: error:" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cli_reward_answers_json_after_a_deep_directory_chain():
    """A program that leaves a ~1,100-deep chain of directories and files: the cleanup neither
    raises nor leaves anything, and the command still prints its JSON."""
    before = set(Path(tempfile.gettempdir()).glob("reft-sandbox-*"))
    program = ("def solution():\n    import os\n    path = 'd'\n    for i in range(1100):\n"
               "        os.mkdir(path)\n        open(path + '/f', 'w').write('x')\n        path += '/d'\n"
               "    return 208\n")
    out = _reft("reward", "--kind", "pcot", "--gold", "208", stdin=program)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] in ("ok", "error")    # error: its tmpfs ran out of inodes
    assert set(Path(tempfile.gettempdir()).glob("reft-sandbox-*")) == before


def _write_rows(path, rows):
    path.write_text(json.dumps(rows))
    return path


PROGRAM_ROW = {"item_id": "svamp_1", "question": "Mia has 3 apples and buys 4.", "answer_value": "7.0",
               "answer_cot": "def solution():\n    return math.floor(7.5)"}
TEXT_ROW = {"item_id": "svamp_2", "question": "Tom has 2 apples and buys 5.", "answer_value": "7.0",
            "answer_cot": "Tom has 2 + 5 = 7 apples. Therefore, the answer is <7>."}


def test_cli_audit_infers_the_kind_and_fails_on_a_bad_gold_row(tmp_path, capsys):
    programs = _write_rows(tmp_path / "programs.json", [PROGRAM_ROW])
    # No --kind: a file of programs is P-CoT. math without an import: right under paper only.
    status = main(["audit-rewards", "--dataset", "svamp", "--path", str(programs), "--quiet"])
    out = capsys.readouterr()
    summary = {r["rule"]: r for r in json.loads(out.out.strip().splitlines()[-1])}
    assert {r["cot_kind"] for r in summary.values()} == {"pcot"}
    assert (summary["paper"]["gold_correct_pct"], summary["lenient"]["gold_correct_pct"]) == (100.0, 0.0)
    assert summary["paper"]["rules_disagree"] == 1 and "svamp_1" in out.out
    assert status == 1 and "rule=lenient svamp_1" in out.out and "reward audit failed" in out.err
    assert main(["audit-rewards", "--dataset", "svamp", "--path", str(programs), "--rule", "paper", "--quiet"]) == 0
    capsys.readouterr()
    # A text file is N-CoT: its target gets the paper's answer line, so both rules score it.
    texts = _write_rows(tmp_path / "texts.json", [TEXT_ROW])
    assert main(["audit-rewards", "--dataset", "svamp", "--path", str(texts), "--quiet"]) == 0
    capsys.readouterr()


def test_cli_audit_wrong_kind_is_an_error_not_a_report(tmp_path, capsys):
    texts = _write_rows(tmp_path / "texts.json", [TEXT_ROW])
    assert main(["audit-rewards", "--dataset", "svamp", "--path", str(texts), "--kind", "pcot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "texts.json[record 0]: field 'answer_cot' is text without 'def solution():', not a pcot CoT" in err
    mixed = _write_rows(tmp_path / "mixed.json", [TEXT_ROW, PROGRAM_ROW])
    assert main(["audit-rewards", "--dataset", "svamp", "--path", str(mixed), "--quiet"]) == 2
    assert "mixed.json: field 'answer_cot' mixes programs ([record 1]) and text ([record 0])" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_audit_synthetic_and_bad_file(tmp_path):
    out = _reft("audit-rewards", "--dataset", "synthetic", "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["split"], r["cot_kind"], r["rule"]) for r in summary} == {
        (split, kind, rule) for split in ("train", "test") for kind in ("ncot", "pcot") for rule in RULES}
    assert all(r["gold_correct_pct"] == 100.0 and r["perturbed_scored_correct_pct"] == 0.0
               and r["rules_disagree"] == 0 for r in summary)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "answer_value": "3", "answer_cot": "Therefore, the answer is: 3"}, {"question": "q"}]')
    out = _reft("audit-rewards", "--dataset", "svamp", "--path", str(bad))
    assert out.returncode != 0
    assert "bad.json[record 1]: field 'answer_value' is missing" in out.stderr
