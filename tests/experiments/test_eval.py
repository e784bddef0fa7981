"""``reft eval``, ``reft train-reranker`` and ``reft report`` end to end on CPU with the real
components: a tiny model warmed up by ``reft sft`` (DeepSpeed learner actor), samples from vLLM
rollout actors, verdicts from the sandboxed reward actor."""
import json

import pytest

from experiments.cli import main

SAMPLES, QUESTIONS = 6, 24


@pytest.mark.slow
def test_train_reranker_eval_and_report(tmp_path, ray_local, capsys):
    # A warm-up short enough for a test whose samples are often right: the smoke task (one
    # addition) on fewer problems. Each command below starts its own vLLM engine (30-50 s), so
    # `eval --rerank` (greedy + voting + pass@k + reranking) is the only evaluation.
    run = tmp_path / "run"
    assert main(["sft", "--config", "experiments/configs/smoke.yaml", f"out_dir={tmp_path}", "name=run",
                 "data.synthetic.num_train=256", "sft.epochs=15", "sft.eval_every_epochs=15"]) == 0
    checkpoint = run / "sft" / "epoch-15"
    sampling = ["--samples", str(SAMPLES), "--max-new-tokens", "48", "rollout.max_model_len=256"]

    # 1. the reranker: 1 epoch on the samples of a few training questions, labelled by the reward
    # actor. The checkpoint is a warm-up epoch: the samples are its own, cached under it.
    reranker = tmp_path / "reranker"
    assert main(["train-reranker", "--checkpoint", str(checkpoint), "--out", str(reranker), "--epochs", "1",
                 "--max-questions", "16", "--lr", "1e-4", "--batch-size", "8", *sampling]) == 0
    meta = json.loads((reranker / "reranker.json").read_text())
    assert meta["questions"] == 16 and len(meta["history"]) == 1 and meta["drawn"] == 16 * SAMPLES
    assert 0 < meta["positives"] < meta["distinct"] <= meta["drawn"]
    assert meta["samples_from"] == meta["source_checkpoint"] == str(checkpoint)
    assert (meta["reranker.lr"], meta["reranker.batch_size"], meta["steps"]) == (1e-4, 8, meta["distinct"] // 8)
    assert all((reranker / f).is_file() for f in ("config.json", "model.safetensors", "reranker_head.safetensors",
                                                  "tokenizer.json"))
    (cache,) = (checkpoint / "reranker-samples").iterdir()
    lines = [json.loads(line) for line in (cache / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == meta["distinct"] and sum(x["count"] for x in lines) == meta["drawn"]
    assert all(len({x["completion"] for x in lines if x["question"] == q}) == sum(x["question"] == q for x in lines)
               for q in range(16))   # de-duplicated per question
    # a second reranker from the same warm-up reuses its samples: no sampling, same data
    assert main(["train-reranker", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "again"), "--epochs", "1",
                 "--max-questions", "16", "--batch-size", "8", *sampling]) == 0
    again = json.loads((tmp_path / "again" / "reranker.json").read_text())
    assert again["samples_cache"] == meta["samples_cache"] and again["distinct"] == meta["distinct"]
    assert again["reranker.lr"] == 1e-6 and again["reranker.epochs"] == 1      # the paper's rate by default

    # 2. greedy, voting, pass@k and reranking; the synthetic task's settings come from the run's config.yaml
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--max-questions",
                 str(QUESTIONS), "--rerank", str(reranker), *sampling]) == 0
    out = checkpoint / "eval-synthetic"
    result = json.loads((out / "eval.json").read_text())
    assert result["config"] == str(run / "config.yaml") and result["questions"] == QUESTIONS
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    curve = result["curve"]
    assert len(questions) == QUESTIONS and curve["k"] == list(range(1, SAMPLES + 1))
    print({k: v for k, v in result.items() if k != "curve"})
    assert result["sampled"]["accuracy"] > 0          # the warm-up has learnt something
    # voting@1 is the first sample's accuracy; pass@1 the mean over all samples; pass@K >= voting@K
    assert curve["voting_accuracy"][0] == pytest.approx(100 * sum(q["correct"][0] for q in questions) / QUESTIONS)
    assert curve["pass_at_k"][0] == pytest.approx(result["sampled"]["accuracy"])
    assert result["pass_at_k"][str(SAMPLES)] == pytest.approx(100 * sum(any(q["correct"]) for q in questions) / QUESTIONS)
    assert 100 >= result["pass_at_k"][str(SAMPLES)] >= result["voting"]["accuracy"] >= 0
    # reranking: the correctness of the top-scored sample with an answer (none: wrong); with one
    # sample there is nothing to choose
    assert all(q["rerank_pick"] is None or q["answers"][q["rerank_pick"]] is not None for q in questions)
    picked = 100 * sum(q["rerank_pick"] is not None and q["correct"][q["rerank_pick"]] for q in questions) / QUESTIONS
    assert result["rerank"]["accuracy"] == pytest.approx(picked)
    assert result["rerank"]["initialised_from"] == str(checkpoint)
    assert curve["rerank_accuracy"][0] == curve["voting_accuracy"][0]
    assert 0 <= result["rerank"]["accuracy"] <= result["pass_at_k"][str(SAMPLES)]
    assert (out / "eval.csv").is_file() and (out / "voting.png").stat().st_size > 10_000
    assert f"reranking@{SAMPLES}" in capsys.readouterr().out

    # One evaluator, two engines: HF generate in this process (SFT's per-epoch evaluation) gives
    # the vLLM fleet's greedy completions and verdicts on the same checkpoint, token for token.
    from cluster.evaluate import HFEvaluator
    from experiments.sampled_eval import load_questions, resolve_config
    cfg, _ = resolve_config(checkpoint, "synthetic", None)
    with HFEvaluator(cfg, checkpoint) as hf:
        local = hf.greedy(load_questions(cfg, "test", QUESTIONS), 48)
    assert [s.sample.completion_text for s in local.scored] == [q["greedy"]["completion"] for q in questions]
    assert [s.score.correct for s in local.scored] == [q["greedy"]["correct"] for q in questions]
    assert local.accuracy == pytest.approx(result["greedy"]["accuracy"])

    # 3. the report over the run: Table 2 from the SFT metrics, Table 4 from the evaluation
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    table4 = (tmp_path / "report" / "table4.csv").read_text()
    assert "SFT" in table4 and (tmp_path / "report" / "epochs.png").is_file()

    # bad input: exit 2 naming the problem
    assert main(["eval", "--checkpoint", str(run), "--dataset", "synthetic"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys):
    """Checked before any actor starts."""
    from tasks.synthetic import SyntheticConfig, generate
    from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

    assert main(["eval", "--checkpoint", str(tmp_path), "--dataset", "gsm8k"]) == 2
    assert "no config.json" in capsys.readouterr().err
    # an HF model with no run config near it: the synthetic questions cannot be regenerated
    syn = SyntheticConfig(num_train=8, num_test=2)
    model = build_tiny_model(tmp_path / "m", corpus_from_examples(generate(syn)[0]),
                             TinyModelConfig(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                             intermediate_size=64), syn.max_value)
    assert main(["eval", "--checkpoint", str(model), "--dataset", "synthetic"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["train-reranker", "--checkpoint", str(model), "--out", str(tmp_path / "r"),
                 "--config", "experiments/configs/smoke.yaml", "data.nope=1"]) == 2
    assert "data.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(model), "--dataset", "synthetic", "--samples", "0"])
