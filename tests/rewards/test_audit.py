"""The reward audit, on the synthetic task and (when present) on the real gold data."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rewards.audit import audit_examples, perturb_ncot, perturb_program, wrong_answers
from rewards.score import RewardConfig, Scorer, prepare_program
from tasks.datasets import load_dataset
from tasks.synthetic import SyntheticConfig

# SVAMP N-CoT rows whose gold annotation is defective (checked by hand, 2026-11-23): eight are
# GPT-3.5 non-answers with no trigger ("This question was already answered earlier. The answer
# is <4>."), and in three the CoT's own final value differs from answer_value (svamp_929: CoT 9,
# gold 8.93; svamp_2000: CoT 69.32, gold 69.4; svamp_993: CoT 3.33, gold 3.333, and no trigger).
SVAMP_NCOT_BAD_GOLD = {"svamp_852", "svamp_929", "svamp_993", "svamp_1085", "svamp_1650", "svamp_1753",
                       "svamp_2000", "svamp_2033", "svamp_2109", "svamp_2636", "svamp_2697"}


@pytest.fixture(scope="module")
def scorer():
    with Scorer(RewardConfig(program_timeout_s=5.0, sandbox_workers=2)) as s:
        yield s


def test_perturbations_change_the_answer():
    assert wrong_answers("72", "gsm8k") == ["73", "727", "72.05"]
    assert wrong_answers("e", "mathqa") == ["a"]
    assert perturb_ncot("x\nTherefore, the answer is: 72", "73") == "x\nTherefore, the answer is: 73"
    assert perturb_ncot("x\n#### 72", "73") == "x\nTherefore, the answer is: 73"
    program = perturb_program("def solution():\n    return 72", "73", "gsm8k")
    assert prepare_program(program) == program   # survives the runner's cut at a blank line
    namespace = {}
    exec(program, namespace)
    assert namespace["solution"]() == 73


@pytest.mark.parametrize("kind", ["ncot", "pcot"])
def test_audit_synthetic(scorer, kind):
    examples = load_dataset("synthetic", "train", kind, synthetic_config=SyntheticConfig(num_train=150, num_test=10))
    row = audit_examples(examples, "train", scorer)
    assert (row.rows, row.gold_correct, row.failures) == (150, 150, [])
    assert (row.perturbed, row.perturbed_scored_correct, row.perturbed_extracted) == (450, 0, 450)


def test_audit_reports_a_bad_gold_row(scorer):
    examples = load_dataset("synthetic", "train", "ncot", synthetic_config=SyntheticConfig(num_train=20, num_test=5))
    broken = examples[3].__class__(**{**examples[3].__dict__, "cot": "I do not know."})
    row = audit_examples(examples[:3] + [broken], "train", scorer)
    assert row.gold_correct == 3
    assert [f["id"] for f in row.failures] == [broken.id]
    assert "no answer trigger" in row.failures[0]["reason"] and "I do not know." in row.failures[0]["reason"]


def test_audit_real_gsm8k_and_svamp(data_dir, scorer):
    gsm8k = audit_examples(load_dataset("gsm8k", "train", "ncot", data_dir=data_dir), "train", scorer)
    assert (gsm8k.rows, gsm8k.gold_correct, gsm8k.perturbed_scored_correct) == (7473, 7473, 0)
    assert gsm8k.perturbed_extracted == gsm8k.perturbed == 3 * 7473   # each wrong answer read, none accepted
    svamp = audit_examples(load_dataset("svamp", "train", "ncot", data_dir=data_dir), "train", scorer)
    assert {f["id"] for f in svamp.failures} == SVAMP_NCOT_BAD_GOLD
    assert svamp.perturbed_scored_correct == 0


@pytest.mark.slow
def test_audit_real_svamp_programs(data_dir, scorer):
    row = audit_examples(load_dataset("svamp", "train", "pcot", data_dir=data_dir), "train", scorer)
    assert (row.rows, row.gold_correct, row.perturbed_scored_correct) == (3043, 3043, 0)
    assert row.perturbed_extracted == row.perturbed


def _reft(*args, stdin="", pass_fds=()):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, pass_fds=pass_fds)


def test_cli_reward_ncot_and_pcot():
    out = _reft("reward", "--kind", "ncot", "--gold", "4", stdin="2+2=4\nTherefore, the answer is: 4\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"reward": 1.0, "answer": "4", "status": "ok", "correct": True, "detail": ""}
    out = _reft("reward", "--kind", "pcot", "--gold", "208", stdin="def solution():\n    return 344 - 137\n")
    assert json.loads(out.stdout)["reward"] == 0.1
    out = _reft("reward", "--kind", "pcot", "--gold", "208", "--timeout", "1",
                stdin="def solution():\n    while True:\n        pass\n")
    assert json.loads(out.stdout) | {"detail": ""} == {"reward": 0.0, "answer": None, "status": "timeout",
                                                        "correct": False, "detail": ""}


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


@pytest.mark.slow
def test_cli_audit_synthetic_and_bad_file(tmp_path):
    out = _reft("audit-rewards", "--dataset", "synthetic", "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["split"], r["cot_kind"]) for r in summary} == {("train", "ncot"), ("train", "pcot"),
                                                              ("test", "ncot"), ("test", "pcot")}
    assert all(r["gold_correct_pct"] == 100.0 and r["perturbed_scored_correct_pct"] == 0.0 for r in summary)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "answer_value": "3", "answer_cot": "Therefore, the answer is: 3"}, {"question": "q"}]')
    out = _reft("audit-rewards", "--dataset", "svamp", "--path", str(bad))
    assert out.returncode != 0
    assert "bad.json[record 1]: field 'answer_value' is missing" in out.stderr
