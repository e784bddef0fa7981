"""Sampling-based evaluation (``reft eval``), and the run-config and question loading that
``reft train-reranker`` (``experiments.reranker``) shares with it.

It samples through the RL stage's evaluator (``cluster.evaluate.FleetEvaluator``): a
``RolloutFleet`` of vLLM engines serving the checkpoint and the sandboxed reward actor, which
judges every sample exactly as the RL reward does. The driver only submits, collects and computes (``experiments.voting``).

    reft eval             greedy top-1; K samples per question at temperature T: voting accuracy
                          with the first k samples (k = 1..K), pass@k, and with --rerank the
                          accuracy of the reranker's top-rated sample among those with an answer
                          (scored on the learner group, ``cluster.reranker``)

The paper (Table 4) reports voting and reranking over 100 samples at temperature 1.0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.evaluate import FleetEvaluator, Scored
from formats.records import Example

logger = logging.getLogger("reft")

# ------------------------------------------------------------------------- config and questions


def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The run config a checkpoint was trained under: ``config.yaml`` in the checkpoint itself
    (RL checkpoints carry one), else in its parent or grandparent (``<run>/sft/epoch-N`` ->
    ``<run>/config.yaml``)."""
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    return None


def resolve_config(checkpoint: Path, dataset: Optional[str], cot_kind: Optional[str], config: Optional[Path] = None,
                   overrides: Sequence[str] = ()) -> tuple[RunConfig, str]:
    """The run config to evaluate ``checkpoint`` with, and where it came from.

    ``config`` if given, else the checkpoint's run config (``find_run_config``), else the
    defaults. The synthetic task's questions depend on its generator settings, so evaluating on
    it needs the run config that generated the training set: with neither, ConfigError.
    ``data.dataset`` / ``data.cot_kind`` are set to what is evaluated (None: the config's); a
    train/test file path of the run's own dataset is dropped when another dataset is evaluated.
    """
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: no config.json, not a Hugging Face model directory (evaluate an "
            "exported one: <run>/sft/epoch-N, or an RL step's policy <run>/checkpoints/step-N/policy)")
    source = config or find_run_config(checkpoint)
    if source is None and dataset in (None, "synthetic"):
        raise ConfigError(f"--dataset {dataset or 'synthetic (the default)'}: no config.yaml in {checkpoint} or its two parent directories, "
                          "and no --config; the synthetic questions depend on the run's data.synthetic settings")
    cfg = load_config(RunConfig, source, overrides)
    data = cfg.data
    dataset = dataset or data.dataset
    same = dataset == data.dataset
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        data, dataset=dataset, cot_kind=cot_kind or data.cot_kind,
        train_path=data.train_path if same else None, test_path=data.test_path if same else None))
    return cfg, str(source) if source else "defaults"


def load_questions(cfg: RunConfig, split: str, max_questions: Optional[int] = None) -> list[Example]:
    """The first ``max_questions`` questions of ``cfg.data``'s dataset split (all when None)."""
    from tasks.datasets import load_dataset
    d = cfg.data
    examples = load_dataset(d.dataset, split, d.cot_kind, data_dir=Path(d.data_dir) if d.data_dir else None,
                            path=d.test_path if split == "test" else d.train_path, synthetic_config=d.synthetic)
    examples = examples[:max_questions] if max_questions else examples
    if not examples:
        raise ConfigError(f"{d.dataset}/{split}: no questions to evaluate")
    return examples


# ------------------------------------------------------------------------- reft eval


def run_eval(cfg: RunConfig, checkpoint: Path, split: str, samples: int, temperature: float, out: Path,
             max_new_tokens: Optional[int] = None, max_questions: Optional[int] = None,
             reranker: Optional[Path] = None, config_source: str = "") -> dict:
    """Greedy, voting, pass@k and (with ``reranker``) reranking accuracy of ``checkpoint`` on the
    dataset of ``cfg.data``; writes eval.json, eval.csv, questions.jsonl and voting.png into
    ``out`` and returns eval.json's content."""
    from experiments import voting

    start = time.perf_counter()
    max_tokens = max_new_tokens or cfg.rl.max_new_tokens
    examples = load_questions(cfg, split, max_questions)
    rerank_meta = _check_reranker(reranker, checkpoint) if reranker is not None else {}   # before the sampling
    with FleetEvaluator.start(cfg, checkpoint) as sampler:
        greedy = sampler.greedy(examples, max_tokens).scored
        sampled = sampler.sample(examples, samples, temperature, max_tokens, "eval")

    answers = [[s.score.answer for s in row] for row in sampled]
    correct = [[s.score.correct for s in row] for row in sampled]
    curve = {"k": list(range(1, samples + 1)),
             "voting_accuracy": voting.voting_curve(answers, correct),
             "pass_at_k": voting.pass_at_k_curve(correct)}
    rerank_scores = None
    if reranker is not None:
        rerank_scores = score_with_reranker(cfg, reranker, examples, sampled)
        curve["rerank_accuracy"] = voting.rerank_curve(rerank_scores, correct, answers)

    n = len(examples)
    result = {
        "checkpoint": str(checkpoint), "dataset": cfg.data.dataset, "split": split, "cot_kind": cfg.data.cot_kind,
        "config": config_source, "questions": n, "samples": samples, "temperature": temperature,
        "max_new_tokens": max_tokens,
        "greedy": {"accuracy": 100.0 * sum(s.score.correct for s in greedy) / n,
                   "answered": 100.0 * sum(s.score.answer is not None for s in greedy) / n},
        "sampled": {"accuracy": 100.0 * sum(map(sum, correct)) / (n * samples),
                    "answered": 100.0 * sum(a is not None for row in answers for a in row) / (n * samples)},
        "voting": {"k": samples, "accuracy": curve["voting_accuracy"][-1]},
        "pass_at_k": {"1": curve["pass_at_k"][0], str(samples): curve["pass_at_k"][-1]},
        "rerank": None if reranker is None else {
            "reranker": str(reranker), "k": samples, "accuracy": curve["rerank_accuracy"][-1],
            "initialised_from": rerank_meta.get("source_checkpoint"), "samples_from": rerank_meta.get("samples_from")},
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_eval(out, result, examples, greedy, sampled, rerank_scores)
    return result


def score_with_reranker(cfg: RunConfig, reranker: Path, examples: Sequence[Example],
                        sampled: list[list[Scored]]) -> list[list[float]]:
    """The reranker's P(correct) of every sample, read as it was trained to read them
    (``learner.reranker.tokenize_reranker``: prompt + completion text, its max_length), on the
    learner group."""
    from cluster.reranker import score_reranker
    from formats.hf import load_tokenizer
    from learner.reranker import META_FILE, RerankerInputs

    tokenizer = load_tokenizer(reranker)
    max_length = json.loads((Path(reranker) / META_FILE).read_text()).get("reranker.max_length",
                                                                          cfg.reranker.max_length)
    inputs = RerankerInputs(tokenizer, examples, [(q, s.sample.completion_text) for q, row in enumerate(sampled)
                                                  for s in row], max_length)
    scores = score_reranker(cfg, reranker, inputs, tokenizer.pad_token_id)
    width = len(sampled[0])
    return [scores[q * width:(q + 1) * width] for q in range(len(sampled))]


def write_eval(out: Path, result: dict, examples: Sequence[Example], greedy: Sequence[Scored],
               sampled: Sequence[Sequence[Scored]], rerank_scores: Optional[list[list[float]]]) -> None:
    """eval.json (the summary), eval.csv (the curves against k), questions.jsonl (per question:
    every sample's answer and verdict, the vote, the reranker's scores), voting.png."""
    import pandas as pd

    from experiments.report import plot_voting
    from experiments.voting import majority_vote, rerank_pick

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    pd.DataFrame(result["curve"]).to_csv(out / "eval.csv", index=False)
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for q, (example, first, row) in enumerate(zip(examples, greedy, sampled)):
            answers = [s.score.answer for s in row]
            record = {"id": example.id, "gold": example.answer,
                      "greedy": {"answer": first.score.answer, "correct": first.score.correct,
                                 "completion": first.sample.completion_text},
                      "answers": answers, "correct": [s.score.correct for s in row], "vote": majority_vote(answers)}
            if rerank_scores is not None:
                record.update(rerank_scores=rerank_scores[q], rerank_pick=rerank_pick(rerank_scores[q], answers))
            f.write(json.dumps(record) + "\n")
    label = f"{Path(result['checkpoint']).name} ({result['dataset']} {result['cot_kind']})"
    plot_voting(out / "voting.png", {label: result})


def format_eval(result: dict) -> str:
    """The summary as a small markdown table (percent)."""
    import pandas as pd
    k = result["samples"]
    rows = [("greedy top-1", result["greedy"]["accuracy"]),
            ("voting@1 (first sample)", result["curve"]["voting_accuracy"][0]),
            (f"voting@{k}", result["voting"]["accuracy"]),
            ("pass@1 (mean over samples)", result["pass_at_k"]["1"]),
            (f"pass@{k}", result["pass_at_k"][str(k)])]
    if result["rerank"] is not None:
        rows.append((f"reranking@{k}", result["rerank"]["accuracy"]))
    frame = pd.DataFrame(rows, columns=["metric", "accuracy (%)"])
    title = f"{result['checkpoint']} on {result['dataset']}/{result['split']} {result['cot_kind']}, " \
            f"{result['questions']} questions, T={result['temperature']:g}"
    return title + "\n" + frame.to_markdown(index=False, floatfmt=".1f")


# ------------------------------------------------------------------------- helpers


def _check_reranker(reranker: Path, checkpoint: Path) -> dict:
    """A reranker of this version (two classes), before minutes of sampling; a warning when it
    was not initialised from the model it reranks (the paper's reranker is). Returns its
    reranker.json."""
    from learner.reranker import check_reranker_dir
    try:
        meta = check_reranker_dir(reranker)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--rerank {e}") from None
    source = meta.get("source_checkpoint")
    if source is None or Path(source).resolve() != checkpoint.resolve():
        logger.warning("--rerank %s was initialised from %s, not from %s, the model it reranks here (the paper "
                       "initialises a reranker from the model it reranks)", reranker, source, checkpoint)
    return meta
