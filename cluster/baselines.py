"""The paper's baselines, run by ``reft train`` from the same warm-up as ReFT and with the same
outputs (``<run_dir>/rl/metrics.jsonl`` with ``eval/test_accuracy``, ``eval/train_accuracy`` and
``rl/epoch``, plus ``rl/reward_mean`` / ``rl/train_accuracy`` where they sample; results.*,
curves.png), so that ``reft report`` compares them with ReFT. Luong et al. (ACL 2024) §4.2 and
the code's ``exps/paper_exps/{SFT,OffSL,OnSL}``:

    sft         SFT continued from the warm-up on the gold CoTs for rl.epochs epochs, a greedy
                evaluation after each; results.json also names the best one (the paper's SFT row
                is its best checkpoint).
    offline_st  the warm-up model samples rl.offline_samples CoTs of every training question; the
                correct ones, deduplicated, at most rl.offline_keep per question, join the gold
                CoTs, and SFT runs on the union for rl.epochs epochs.
    online_st   the RL loop with a supervised loss: each step samples its questions as ReFT's
                does and trains on 1/2 its correct samples + 1/2 the same questions' gold CoTs;
                the new weights go to the samplers after every step.

sft and offline_st take the RL loop's place with `cluster.sft.train_sft` (phase "rl", after a
step-0 evaluation of the warm-up, as the RL loop starts): ``run_sft_stage``. online_st is the RL
loop (`cluster.rl.RLTrainer`) with ``OnlineSTLearn`` as its update. ``cluster.recipes`` registers
all of them by name.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from actors.rollout import Sample
from cluster.config import RunConfig
from cluster.config_io import ConfigError
from cluster.evaluate import FleetEvaluator, HFEvaluator, Scored
from cluster.metrics import MetricsLogger
from cluster.sft import train_sft
from formats.records import Example, pcot_header
from learner.data import Tokenized, collate, sft_target, tokenize_sft
from learner.worker import LearnerWorker
from rewards.score import Score

logger = logging.getLogger("reft")

SELF_TRAINING_FILE = "self_training.jsonl"   # offline_st's added CoTs, in <run_dir>/rl/
# offline_st's samples per sampling call: bounds what the driver holds (samples carry token ids and
# log-probs) while giving the engines thousands of sequences to batch.
SAMPLES_PER_CALL = 8192


def learnable(sample: Sample, score: Score) -> bool:
    """A sample the self-training baselines learn from: correct, and ended by the model (EOS), not
    cut by the length cap: learning a cut CoT would teach the model to stop where the cap cut it."""
    return score.correct and sample.finish_reason == "stop"


# ------------------------------------------------------------------------------ sft, offline_st

def run_sft_stage(cfg: RunConfig, base_model: str, run_dir: Path, train: list[Example], test: list[Example],
                  resume: bool = False, self_training: bool = False) -> list[dict]:
    """The stage after the warm-up for sft and offline_st (``cfg.learner.model`` is the warm-up;
    ``base_model`` the model the warm-up started from). Returns the evaluation records, as
    `cluster.train.run_rl` does: step 0 (the warm-up), then one per epoch.

    ``--resume`` reuses the warm-up, but a stage that had started refuses: `train_sft` has no
    mid-run checkpoint to go on from, and starting over would mix two attempts in one metrics file.
    """
    stage_dir = run_dir / "rl"
    if resume and (stage_dir / "metrics.jsonl").exists():
        raise ConfigError(f"rl.algorithm = {cfg.rl.algorithm} cannot resume its stage: start a new run from the same "
                          f"warm-up with rl.warmup_checkpoint=<{run_dir}/sft/epoch-N> (or remove {stage_dir})")
    warmup = cfg.learner.model
    record = {"rl/epoch": 0.0, **evaluate_greedy(cfg, warmup, train, test)}
    data, start, fresh = train, warmup, False
    if self_training:   # offline_st: the warm-up's correct samples join the gold CoTs
        added, sampling = sample_self_training(cfg, warmup, train)
        record.update(sampling)
        stage_dir.mkdir(parents=True, exist_ok=True)
        with open(stage_dir / SELF_TRAINING_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dataclasses.asdict(e)) + "\n" for e in added)
        data = train + added   # gold first: train_sft's training-accuracy check takes the first questions
        if cfg.rl.offline_init == "base":
            start, fresh = base_model, True
    metrics = MetricsLogger(stage_dir)
    metrics.write(0, record)
    metrics.close()
    result = train_sft(stage_config(cfg, start, fresh), run_dir, data, test, phase="rl", epoch_key="rl/epoch",
                       max_seconds=cfg.rl.max_seconds, start_epoch=0 if fresh else cfg.sft.epochs)
    return [{"step": 0, **record}] + [r for r in result.history if "eval/test_accuracy" in r]


def stage_config(cfg: RunConfig, start: str, fresh: bool) -> RunConfig:
    """The SFT recipe of the stage: rl.epochs epochs from ``start``, a greedy evaluation after each
    with RL's generation budget (so the numbers compare with ReFT's). ``fresh``: from the base
    model, the warm-up's recipe with a schedule of its own over the stage's epochs (offline
    self-training: 20 epochs, linear decay, as ``OffSL/*.sh``); else the warm-up's schedule goes on
    from where the warm-up stopped (`run_sft_stage` passes ``start_epoch``): the paper's SFT
    baseline is its 40-epoch warm-up run, continued. The horizon is ``sft.schedule_epochs``, or
    warm-up + stage epochs when it is unset."""
    schedule = None if fresh else (cfg.sft.schedule_epochs or cfg.sft.epochs + cfg.rl.epochs)
    if schedule is not None and cfg.sft.epochs + cfg.rl.epochs > schedule:
        raise ConfigError(f"rl.algorithm = {cfg.rl.algorithm} continues the warm-up's {schedule}-epoch learning-rate "
                          f"schedule (sft.schedule_epochs) after its sft.epochs = {cfg.sft.epochs}: rl.epochs = "
                          f"{cfg.rl.epochs} runs past it (at most {schedule - cfg.sft.epochs})")
    sft = dataclasses.replace(cfg.sft, epochs=cfg.rl.epochs, eval_every_epochs=1, schedule_epochs=schedule,
                              eval_max_new_tokens=cfg.rl.max_new_tokens)
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, model=start), sft=sft)


def evaluate_greedy(cfg: RunConfig, checkpoint: str, train: list[Example], test: list[Example]) -> dict:
    """Greedy accuracy of an HF checkpoint with the evaluator `train_sft` uses after each epoch,
    so that a stage's curve comes from one evaluator."""
    with HFEvaluator(cfg, Path(checkpoint)) as evaluator:
        on_test = evaluator.greedy(test, cfg.rl.max_new_tokens)
        on_train = evaluator.greedy(train[:cfg.data.train_eval_size], cfg.rl.max_new_tokens)
    return {"eval/test_accuracy": on_test.accuracy, "eval/test_answered": on_test.answered,
            "eval/train_accuracy": on_train.accuracy}


def sample_self_training(cfg: RunConfig, model: str, train: list[Example]) -> tuple[list[Example], dict]:
    """Offline self-training's data: rl.offline_samples CoTs of every training question from
    ``model``, scored by the reward actor (`cluster.evaluate.FleetEvaluator`, as ``reft
    train-reranker`` samples its training data), a block of questions at a time so that the driver
    never holds all the samples (the paper's 100 of each of 7k questions). Returns the added
    examples (`self_training_examples`) and the sampling's metrics."""
    start = time.perf_counter()
    per_call = max(1, SAMPLES_PER_CALL // cfg.rl.offline_samples)
    added, totals = [], collections.Counter()
    with FleetEvaluator.start(cfg, Path(model)) as sampler:
        for first in range(0, len(train), per_call):
            questions = train[first:first + per_call]
            scored = sampler.sample(questions, cfg.rl.offline_samples, cfg.rl.temperature, cfg.rl.max_new_tokens,
                                    phase="self_training")
            scores = [s.score for row in scored for s in row]
            totals.update(samples=len(scores), reward=sum(s.reward for s in scores),
                          correct=sum(s.correct for s in scores), answered=sum(s.answer is not None for s in scores))
            added += self_training_examples(questions, scored, cfg.rl.offline_keep)
    n = totals["samples"]
    metrics = {
        "rl/reward_mean": totals["reward"] / n,
        "rl/train_accuracy": 100.0 * totals["correct"] / n,
        "rl/answered": 100.0 * totals["answered"] / n,
        "self_training/added": float(len(added)),
        "self_training/questions_covered": 100.0 * len({e.question for e in added}) / len(train),
        "timing/rollout_s": time.perf_counter() - start,
    }
    logger.info("offline_st: %d samples, %.1f%% correct, %d distinct correct CoTs added", n,
                metrics["rl/train_accuracy"], len(added))
    return added, metrics


def self_training_examples(questions: Sequence[Example], scored: Sequence[Sequence[Scored]],
                           keep: int) -> list[Example]:
    """The CoTs offline self-training adds, as the paper's ``train_sl_model.py`` selects them: for
    each question (``scored[q]``: its samples, in sample order), its correct samples, stripped,
    without duplicates, the first ``keep`` of them; a copy of the gold CoT among those is dropped
    (the gold is in the training set already). A correct sample the length cap cut is kept, as the
    paper's code keeps it (online self-training's `learnable` does not). P-CoT samples get the
    prompt's function header back, so that they are whole programs as the gold ones are."""
    added = []
    for gold, samples in zip(questions, scored, strict=True):
        header = pcot_header(gold.question) if gold.cot_kind == "pcot" else ""
        gold_target, distinct = sft_target(gold).strip(), []
        for s in samples:
            cot = (header + s.sample.completion_text).strip()   # as the paper's code strips the whole CoT
            if s.score.correct and cot not in distinct:
                distinct.append(cot)
        for cot in distinct[:keep]:
            example = dataclasses.replace(gold, id=f"{gold.id}-st{len(added)}", cot=cot)
            if sft_target(example).strip() != gold_target:
                added.append(example)
    return added


# ------------------------------------------------------------------------------ online_st

def online_st_batch(gold: Sequence[Tokenized], sampled: Sequence[Tokenized], pad_id: int,
                    world_size: int) -> dict[str, torch.Tensor]:
    """One online self-training step's batch: the gold CoTs, then the correct samples, each half
    weighing 1/2 of the loss as a token mean over its own tokens (``loss_weights``, see
    `LearnerWorker.sft_step`), as the paper's ``train_rl_sl.py`` (loss = CE(samples)/2 +
    CE(gold)/2). A step without a correct sample trains on CE(gold)/2 alone, as that code does.
    Rows are padded with copies of a gold row whose response is masked out, so that the batch
    splits into ``world_size`` equal shards."""
    items = list(gold) + list(sampled)
    padding = -len(items) % world_size
    batch = collate(items + [gold[0]] * padding, pad_id)
    mask = batch["response_mask"].float()
    weights = torch.zeros_like(mask)
    for rows in (slice(0, len(gold)), slice(len(gold), len(items))):
        tokens = mask[rows].sum()
        if tokens > 0:
            weights[rows] = 0.5 * mask[rows] / tokens
    batch["response_mask"][len(items):] = 0
    batch["loss_weights"] = weights
    return batch


class OnlineSTLearn:
    """Online self-training's update in the RL loop (`cluster.rl.RLTrainer`): ReFT's actors,
    sampling, scoring, weight sync, evaluation and checkpoints, with SFT in place of PPO. No
    reference model is loaded (the paper's train_rl_sl.py has no KL term). Steps 4-5 of a step:

        4. batch       the questions' gold CoTs + the learnable samples (`online_st_batch`)
        5. update      learner.ppo_epochs SFT steps on it (the paper's code reuses PPO's 2 passes)
    """

    with_reference = False
    with_critic = False

    def __init__(self, trainer):
        self.gold = [tokenize_sft(trainer.tokenizer, e) for e in trainer.train_set]

    def __call__(self, trainer, indices, samples, scores):
        cfg = trainer.cfg
        learned = [Tokenized(list(s.prompt_token_ids), list(s.completion_token_ids))
                   for s, sc in zip(samples, scores) if learnable(s, sc)]
        batch = online_st_batch([self.gold[i] for i in indices], learned, trainer.pad_id,                # 4
                                cfg.cluster.num_learners)
        updates = [trainer.learners.run_sharded(LearnerWorker.sft_step, batch)[0]                        # 5
                   for _ in range(cfg.learner.ppo_epochs)]
        return {
            "self_training/learned": 100.0 * len(learned) / len(scores),
            "learner/loss": updates[0]["loss"],   # at the weights that sampled the step
            "learner/loss_final_pass": updates[-1]["loss"],   # after ppo_epochs - 1 steps on this batch
            "learner/grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
            "learner/lr": updates[-1]["lr"],
        }
