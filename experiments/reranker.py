"""``reft train-reranker``: the paper's reward-model reranker (§4.4 / Table 4), as its code trains it
(``train_reward_model.py``, ``exps/paper_exps/Rerank/*.sh``).

    reft train-reranker --checkpoint MODEL --out DIR [--samples-from WARMUP]

1. The warm-up: the SFT checkpoint MODEL started from (``find_warmup``): MODEL itself when it is
   an SFT warm-up epoch (``<run>/sft/epoch-N``), else its run config's ``rl.warmup_checkpoint``,
   else the last epoch of its run's own warm-up (``<run>/sft/epoch-N``); ``--samples-from`` says it
   outright. The paper trains the reranker of ReFT (and of SFT) on the SFT model's samples.
2. Its samples (``warmup_samples``): ``reranker.samples`` CoTs per training question at
   ``reranker.temperature``, drawn by the vLLM fleet serving the warm-up and labelled by the reward
   actor (the RL reward's code), de-duplicated per question by completion text (``distinct``), as
   the paper's code. Drawn once per warm-up and setting and cached under
   ``<warmup>/reranker-samples/<setting>/`` (samples.jsonl, meta.json): every reranker trained from
   that warm-up (one per model reranked) reuses them.
3. The reranker (``learner.reranker``): initialised from MODEL (its transformer, a fresh two-class
   head), trained with two-class cross-entropy on the DeepSpeed learner group
   (``cluster.reranker``), ``reranker.epochs`` x batches of ``reranker.batch_size``, AdamW at
   ``reranker.lr`` with a linear warm-up and decay; written to DIR for ``reft eval --rerank``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from cluster.config import RunConfig
from cluster.config_io import ConfigError, to_dict
from formats.records import Example

logger = logging.getLogger("reft")

CACHE_DIR = "reranker-samples"
SAMPLES_FILE, CACHE_META = "samples.jsonl", "meta.json"
SAMPLES_PER_CALL = 8192   # samples per sampler call: the driver holds one block of them at a time
_EPOCH_DIR = re.compile(r"epoch-(\d+)")


# ------------------------------------------------------------------------- which warm-up


def find_warmup(checkpoint: Path, cfg: RunConfig) -> tuple[Path, str]:
    """The SFT warm-up checkpoint ``checkpoint`` started from, and how it was found (module
    docstring, step 1). ``cfg``: the checkpoint's run config. ConfigError when none can be told."""
    if checkpoint.parent.name == "sft" and _EPOCH_DIR.fullmatch(checkpoint.name):
        return checkpoint, "the checkpoint is an SFT warm-up epoch: its own samples"
    if cfg.rl.warmup_checkpoint:
        warmup = Path(cfg.rl.warmup_checkpoint)
        if not (warmup / "config.json").is_file():
            raise ConfigError(f"rl.warmup_checkpoint of {checkpoint}'s run config is {warmup}, which is not an HF model "
                              "directory from here; pass --samples-from DIR (the SFT warm-up checkpoint)")
        return warmup, "rl.warmup_checkpoint of its run config"
    for run in list(checkpoint.resolve().parents)[:3]:
        epochs = [p for p in (run / "sft").glob("epoch-*") if _EPOCH_DIR.fullmatch(p.name)]
        if epochs and (run / "config.yaml").is_file():
            return max(epochs, key=lambda p: int(p.name.split("-")[1])), f"the last epoch of its run's warm-up ({run})"
    raise ConfigError(f"--checkpoint {checkpoint}: cannot tell which SFT warm-up it started from (no rl.warmup_checkpoint "
                      "in its run config, no <run>/sft/epoch-N above it); pass --samples-from DIR, the warm-up checkpoint "
                      "whose samples the paper trains the reranker on (or the checkpoint itself for its own samples)")


# ------------------------------------------------------------------------- the warm-up's samples


def distinct(texts: Sequence[str]) -> list[tuple[int, int]]:
    """(index of the first occurrence, number of occurrences) of each distinct text, in order of
    first occurrence: the paper's per-question de-duplication of sampled completions."""
    first: dict[str, int] = {}
    counts: list[list[int]] = []
    for i, text in enumerate(texts):
        if text in first:
            counts[first[text]][1] += 1
        else:
            first[text] = len(counts)
            counts.append([i, 1])
    return [(i, n) for i, n in counts]


def sample_settings(cfg: RunConfig, questions: int, max_new_tokens: int) -> dict:
    """What the cached samples depend on (besides the warm-up): the questions, how they are sampled."""
    d, r = cfg.data, cfg.reranker
    return {"dataset": d.dataset, "cot_kind": d.cot_kind, "split": "train", "train_path": d.train_path,
            "synthetic": to_dict(d.synthetic) if d.dataset == "synthetic" else None, "questions": questions,
            "samples": r.samples, "temperature": r.temperature, "max_new_tokens": max_new_tokens, "seed": cfg.seed}


def warmup_samples(cfg: RunConfig, warmup: Path, examples: Sequence[Example], max_new_tokens: int) -> Path:
    """The cache directory of ``warmup``'s de-duplicated, labelled samples of ``examples`` (module
    docstring, step 2), sampled now unless a finished one with the same settings exists. It is
    written under a temporary name and renamed when complete: an interrupted run leaves no cache."""
    settings = sample_settings(cfg, len(examples), max_new_tokens)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{settings['dataset']}-{settings['cot_kind']}-q{len(examples)}-k{settings['samples']}-" \
           f"t{settings['temperature']:g}-{digest}"
    cache = warmup / CACHE_DIR / name
    if (cache / CACHE_META).is_file():
        logger.info("reranker: the warm-up's samples from %s", cache)
        return cache
    from cluster.evaluate import FleetEvaluator

    start = time.perf_counter()
    tmp = cache.with_name(f"{name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    k = settings["samples"]
    per_call = max(1, SAMPLES_PER_CALL // k)
    drawn = kept = correct_drawn = answered_drawn = 0
    logger.info("reranker: sampling %d x %d CoTs from the warm-up %s", len(examples), k, warmup)
    try:
        with FleetEvaluator.start(cfg, warmup) as sampler, open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for first in range(0, len(examples), per_call):
                block = examples[first:first + per_call]
                scored = sampler.sample(block, k, settings["temperature"], max_new_tokens, "reranker")
                for q, (example, row) in enumerate(zip(block, scored, strict=True), start=first):
                    drawn += len(row)
                    correct_drawn += sum(s.score.correct for s in row)
                    answered_drawn += sum(s.score.answer is not None for s in row)
                    for i, count in distinct([s.sample.completion_text for s in row]):
                        s = row[i]
                        f.write(json.dumps({"question": q, "id": example.id, "completion": s.sample.completion_text,
                                            "correct": bool(s.score.correct), "answer": s.score.answer,
                                            "count": count}) + "\n")
                        kept += 1
        meta = {"warmup": str(warmup), "settings": settings, "drawn": drawn, "distinct": kept,
                "drawn_correct": correct_drawn, "drawn_answered": answered_drawn,
                "seconds": round(time.perf_counter() - start, 1)}
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
        if (cache / CACHE_META).is_file():   # another process finished the same setting meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("reranker: %d samples, %d distinct, %.1f%% correct -> %s", drawn, kept,
                100.0 * correct_drawn / max(1, drawn), cache)
    return cache


def read_samples(cache: Path) -> tuple[list[dict], dict]:
    """The cached samples (one dict per distinct sample) and the cache's meta.json."""
    meta = json.loads((cache / CACHE_META).read_text())
    with open(cache / SAMPLES_FILE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    if len(records) != meta["distinct"]:
        raise ValueError(f"{cache}: {len(records)} samples in {SAMPLES_FILE}, meta.json says {meta['distinct']}; "
                         "delete the directory to sample again")
    return records, meta


# ------------------------------------------------------------------------- reft train-reranker


def run_train_reranker(cfg: RunConfig, checkpoint: Path, out: Path, samples_from: Optional[Path] = None,
                       max_new_tokens: Optional[int] = None, max_questions: Optional[int] = None,
                       config_source: str = "") -> dict:
    """Train a reranker initialised from ``checkpoint`` on its warm-up's samples (module
    docstring) and save it in ``out``. Returns the metadata written to ``out/reranker.json``."""
    from cluster.metrics import MetricsLogger
    from cluster.reranker import train_reranker
    from experiments.sampled_eval import load_questions
    from formats.hf import load_tokenizer
    from learner.reranker import RerankerInputs

    start = time.perf_counter()
    if samples_from is not None:
        if not (samples_from / "config.json").is_file():
            raise FileNotFoundError(f"--samples-from {samples_from}: no config.json, not a Hugging Face model directory")
        warmup, why = samples_from, "--samples-from"
    else:
        warmup, why = find_warmup(checkpoint, cfg)
    logger.info("reranker: initialised from %s, trained on the samples of %s (%s)", checkpoint, warmup, why)
    max_tokens = max_new_tokens or cfg.rl.max_new_tokens
    examples = load_questions(cfg, "train", max_questions)
    cache = warmup_samples(cfg, warmup, examples, max_tokens)
    records, drawn = read_samples(cache)
    if any(examples[x["question"]].id != x["id"] for x in records):
        raise ValueError(f"{cache}: its question ids differ from the dataset's now; delete the directory to sample again")

    r = cfg.reranker
    tokenizer = load_tokenizer(checkpoint)
    sequences = RerankerInputs(tokenizer, examples, [(x["question"], x["completion"]) for x in records], r.max_length)
    labels = [x["correct"] for x in records]
    meta = {"samples_from": str(warmup), "samples_from_why": why, "samples_cache": str(cache),
            "dataset": cfg.data.dataset, "cot_kind": cfg.data.cot_kind, "config": config_source,
            "questions": len(examples), "drawn": drawn["drawn"], "distinct": len(records),
            "positives": int(sum(labels)), **{f"reranker.{k}": v for k, v in dataclasses.asdict(r).items()},
            "max_new_tokens": max_tokens, "num_learners": cfg.cluster.num_learners}
    metrics = MetricsLogger(out / "metrics", tensorboard=False)
    try:
        history = train_reranker(cfg, str(checkpoint), sequences, labels, out, meta, tokenizer.pad_token_id, metrics)
    finally:
        metrics.close()
    return {**meta, "history": history, "seconds": round(time.perf_counter() - start, 1)}
