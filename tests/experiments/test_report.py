"""``reft report``: the paper-shaped tables and plots from small hand-made run directories."""
import json
import math

import pytest
import yaml

from experiments.cli import main
from experiments.report import read_run, table2, table4, write_report
from experiments.voting import pass_at_k_curve, rerank_curve, voting_curve


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def sft_records(test, train):
    """Per-step losses, then one record per epoch with the greedy accuracies, as cluster.sft writes."""
    out = []
    for epoch, (te, tr) in enumerate(zip(test, train), start=1):
        out += [{"step": epoch * 10 - 1, "time": epoch, "sft/loss": 1.0 / epoch}]
        out += [{"step": epoch * 10, "time": epoch + 0.5, "epoch": epoch, "sft/epoch_loss": 1.0 / epoch,
                 "eval/test_accuracy": te, "eval/train_accuracy": tr}]
    return out


def eval_json(checkpoint, answers, correct, scores, greedy):
    """An eval.json as ``reft eval`` writes it, its curves computed from hand-made samples."""
    k = len(answers[0])
    curve = {"k": list(range(1, k + 1)), "voting_accuracy": voting_curve(answers, correct),
             "pass_at_k": pass_at_k_curve(correct), "rerank_accuracy": rerank_curve(scores, correct, answers)}
    return {"checkpoint": str(checkpoint), "dataset": "gsm8k", "split": "test", "cot_kind": "pcot",
            "questions": len(answers), "samples": k, "temperature": 1.0, "greedy": {"accuracy": greedy},
            "voting": {"k": k, "accuracy": curve["voting_accuracy"][-1]},
            "pass_at_k": {"1": curve["pass_at_k"][0], str(k): curve["pass_at_k"][-1]},
            "rerank": {"reranker": "rr", "k": k, "accuracy": curve["rerank_accuracy"][-1]}, "curve": curve}


@pytest.fixture
def runs(tmp_path):
    # Run "reft-pcot": SFT warm-up (2 epochs), ReFT, results.json, an evaluated SFT checkpoint.
    a = tmp_path / "reft-pcot"
    a.mkdir()
    (a / "config.yaml").write_text(yaml.safe_dump({
        "name": "reft-pcot", "data": {"dataset": "gsm8k", "cot_kind": "pcot"},
        "learner": {"model": "/models/CodeLlama-7b-hf"}, "rl": {"algorithm": "reft"}}))
    write_jsonl(a / "sft" / "metrics.jsonl", sft_records(test=[40.0, 45.0], train=[60.0, 80.0]))
    rl = [{"step": 0, "time": 0, "eval/test_accuracy": 45.0, "eval/train_accuracy": 80.0}]
    rl += [{"step": s, "time": s, "rl/epoch": s / 4, "rl/reward_mean": 0.5 + s / 20, "rl/train_accuracy": 50 + s}
           for s in range(1, 9)]
    rl += [{"step": 8, "time": 9, "eval/test_accuracy": 50.0, "eval/train_accuracy": 85.0}]
    write_jsonl(a / "rl" / "metrics.jsonl", rl)
    (a / "results.json").write_text(json.dumps({"warmup_acc": 45.0, "reft_acc": 52.5, "wall_seconds": 3.0}))
    # 2 questions x 3 samples, gold 5: votes q0 "5" (ok), q1 "3" (wrong) -> 50; pass@3 = 100;
    # the reranker picks q0's sample 2 (ok) and q1's sample 1 (ok) -> 100.
    answers = [["5", "7", "5"], ["3", "5", "3"]]
    correct = [[x == "5" for x in row] for row in answers]
    ev = eval_json(a / "sft" / "epoch-2", answers, correct, scores=[[0.1, 0.2, 0.9], [0.0, 0.8, 0.3]], greedy=45.0)
    (a / "sft" / "epoch-2" / "eval-gsm8k").mkdir(parents=True)
    (a / "sft" / "epoch-2" / "eval-gsm8k" / "eval.json").write_text(json.dumps(ev))

    # Run "sft-ncot": the SFT warm-up alone (reft sft): no results.json, no RL.
    b = tmp_path / "sft-ncot"
    b.mkdir()
    (b / "config.yaml").write_text(yaml.safe_dump({
        "name": "sft-ncot", "data": {"dataset": "gsm8k", "cot_kind": "ncot"},
        "learner": {"model": "/models/CodeLlama-7b-hf"}}))
    write_jsonl(b / "sft" / "metrics.jsonl", sft_records(test=[30.0, 38.5, 37.0], train=[50.0, 70.0, 90.0]))
    return [a, b]


def test_read_run(runs):
    a = read_run(runs[0])
    assert (a.model, a.dataset, a.cot_kind, a.algorithm) == ("CodeLlama-7b-hf", "gsm8k", "pcot", "reft")
    # results.json's headline overrides the metrics' last test accuracy (ReFT: 50.0 -> 52.5)
    assert a.top1 == {"SFT": 45.0, "ReFT": 52.5}
    assert [e["label"] for e in a.evals] == ["SFT"]
    assert read_run(runs[1]).top1 == {"SFT": 37.0}           # the last epoch's, from the metrics
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        read_run(runs[0] / "sft")


def test_table2_is_model_algorithm_by_dataset_and_cot(runs):
    frame = table2([read_run(r) for r in runs]).set_index(["model", "algorithm"])
    assert list(frame.columns) == ["gsm8k P-CoT", "gsm8k N-CoT"]
    assert frame.loc[("CodeLlama-7b-hf", "SFT")].tolist() == [45.0, 37.0]
    assert frame.loc[("CodeLlama-7b-hf", "ReFT"), "gsm8k P-CoT"] == 52.5
    assert math.isnan(frame.loc[("CodeLlama-7b-hf", "ReFT"), "gsm8k N-CoT"])


def test_table4_top1_voting_reranking(runs):
    frame = table4([read_run(r) for r in runs])
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row["algorithm"], row["checkpoint"], row["CoT"], row["K"]) == ("SFT", "epoch-2", "P-CoT", 3)
    assert (row["top-1"], row["voting@K"], row["pass@K"], row["reranking@K"]) == (45.0, 50.0, 100.0, 100.0)


def test_write_report_files(runs, tmp_path):
    out = tmp_path / "report"
    written = write_report(runs, out)
    for name in ("table2.md", "table2.csv", "table4.md", "table4.csv", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "epochs.png").stat().st_size > 20_000 and (out / "voting.png").stat().st_size > 10_000
    assert written["report"] == out / "report.md"
    assert "52.5" in (out / "table2.md").read_text() and "ReFT" in (out / "report.md").read_text()


def test_report_command(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    assert "gsm8k P-CoT" in capsys.readouterr().out
    assert (tmp_path / "r" / "table4.csv").is_file()
    # a directory that is not a run: exit 2, the message names it
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_result_row_takes_the_last_and_the_best_evaluation():
    from cluster.train import result_row
    history = [{"step": 0, "eval/test_accuracy": 50.0, "eval/train_accuracy": 55.0},
               {"step": 8, "rl/reward_mean": 0.5},                                   # a step without evaluation
               {"step": 16, "eval/test_accuracy": 85.5, "eval/train_accuracy": 88.0},
               {"step": 32, "eval/test_accuracy": 82.5, "eval/train_accuracy": 85.0},
               {"step": 33, "rl/reward_mean": 0.7}]
    assert result_row("reft", history) == {"model": "reft", "test_accuracy": 82.5, "best_test_accuracy": 85.5,
                                           "train_accuracy": 85.0}
    assert result_row("none", [])["test_accuracy"] is None


def test_trained_units_counts_the_recipes_steps_or_epochs():
    from cluster.train import trained_units
    rl = [{"step": 0, "eval/test_accuracy": 50.0},                                 # evaluations count for nothing
          {"step": 1, "timing/rollout_s": 0.2, "timing/learner_s": 0.5, "timing/sync_s": 0.02},
          {"step": 2, "timing/rollout_s": 0.2, "timing/learner_s": 0.5}, {"step": 2, "eval/test_accuracy": 60.0}]
    assert trained_units(rl) == "2 steps"
    assert trained_units(rl[:2]) == "1 step"
    assert trained_units([{"step": 0}, {"rl/epoch": 1, "sft/epoch_seconds": 3.0}]) == "1 epoch"
