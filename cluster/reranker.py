"""The reranker on the DeepSpeed learner group (``learner.reranker_worker.RerankerWorker`` ranks,
placed by the run mode's plan exactly as the SFT warm-up's learners): training and scoring.

    train_reranker   epochs x shuffled batches of ``reranker.batch_size`` (sequence, correct?)
                     pairs -> RerankerWorker.train_step; then rank 0 writes the directory
    score_reranker   P(correct) of every sequence, in order, from a reranker directory

The driver tokenises batches (``learner.reranker.RerankerInputs`` tokenises on demand) and passes
them and paths; the model never loads in this process.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch

from cluster.actor_group import unshard
from cluster.config import RunConfig
from cluster.config_io import ConfigError
from cluster.console import PhaseBar
from cluster.placement import place
from cluster.runtime import init_ray
from cluster.sft import start_learners
from learner.config import LearnerConfig
from learner.data import Tokenized, collate
from learner.reranker_worker import RerankerWorker

logger = logging.getLogger("reft")

SCORE_ROWS_PER_RANK = 64   # sequences per rank and scoring call (micro-batched on the rank)


def reranker_learner_config(cfg: RunConfig, model: str, total_steps: int) -> LearnerConfig:
    """The run's learner (ZeRO stage, dtype, backend, micro-batch, threads, seed) with the
    reranker's optimiser (``cfg.reranker``): no reference, no value head, weight decay 0 and
    gradient clipping 1.0 as the paper's script, the schedule over ``total_steps``."""
    r = cfg.reranker
    return dataclasses.replace(cfg.learner, model=model, with_reference=False, value_head="none", lr=r.lr,
                               lr_schedule=r.lr_schedule, warmup_ratio=r.warmup_ratio, total_steps=total_steps,
                               schedule_offset=0, weight_decay=0.0, grad_clip=1.0)


@contextmanager
def reranker_group(cfg: RunConfig, learner_cfg: LearnerConfig):
    """The RerankerWorker ranks for the duration of the block, then killed and unplaced."""
    init_ray(cfg)
    placement = place(cfg)
    try:
        group = start_learners(cfg, learner_cfg, placement, worker=RerankerWorker)
    except BaseException:
        placement.remove()
        raise
    try:
        yield group
    finally:
        group.kill()
        placement.remove()


def train_reranker(cfg: RunConfig, model: str, sequences: Sequence[Tokenized], labels: Sequence[bool], out: Path,
                   meta: dict, pad_id: int, metrics=None) -> list[dict]:
    """Train a reranker initialised from ``model`` (its transformer and a fresh two-class head) on
    (``sequences[i]``, ``labels[i]``) for ``cfg.reranker.epochs``, shuffled each epoch with
    ``cfg.seed``, and save it in ``out`` with ``meta`` and the history. Each step takes
    ``reranker.batch_size`` samples; the samples left over after the last full batch of an epoch
    wait for another epoch's shuffle (as the SFT warm-up). Returns one record per epoch: mean loss,
    the running accuracy of the argmax class (each batch before its update) and the share of
    correct samples (always guessing "wrong" scores 100 minus it). ``metrics`` (a
    ``cluster.metrics.MetricsLogger``) also gets every step's loss, grad norm and lr."""
    r, world = cfg.reranker, cfg.cluster.num_learners
    if len(sequences) != len(labels):
        raise ValueError(f"need one label per sequence, got {len(sequences)} sequences and {len(labels)} labels")
    if r.batch_size % world:
        raise ConfigError(f"reranker.batch_size={r.batch_size} must be divisible by cluster.num_learners={world}")
    steps_per_epoch = len(sequences) // r.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"reranker.batch_size={r.batch_size} is larger than the {len(sequences)} distinct samples")
    target = torch.tensor([int(bool(y)) for y in labels], dtype=torch.long)
    positive_rate = 100.0 * float(target.float().mean())
    learner_cfg = reranker_learner_config(cfg, model, steps_per_epoch * r.epochs)
    rng = random.Random(cfg.seed)
    history, step, start = [], 0, time.perf_counter()
    bar = PhaseBar("reranker", steps_per_epoch * r.epochs, None)
    try:
        with reranker_group(cfg, learner_cfg) as group:
            for epoch in range(1, r.epochs + 1):
                order = list(range(len(sequences)))
                rng.shuffle(order)
                losses, accuracies = [], []
                for i in range(steps_per_epoch):
                    rows = order[i * r.batch_size:(i + 1) * r.batch_size]
                    batch = collate([sequences[j] for j in rows], pad_id)
                    del batch["response_mask"]
                    batch["labels"] = target[rows]
                    out_step = group.run_sharded(RerankerWorker.train_step, batch)[0]
                    step += 1
                    losses.append(out_step["loss"])
                    accuracies.append(out_step["accuracy"])
                    bar.advance(None, epoch=epoch, loss=f"{out_step['loss']:.3f}")
                    if metrics is not None:
                        metrics.write(step, {"reranker/loss": out_step["loss"], "reranker/grad_norm": out_step["grad_norm"],
                                             "reranker/lr": out_step["lr"]})
                record = {"epoch": epoch, "step": step, "reranker/epoch_loss": sum(losses) / len(losses),
                          "reranker/train_accuracy": sum(accuracies) / len(accuracies),
                          "reranker/positive_rate": positive_rate}
                history.append(record)
                if metrics is not None:
                    metrics.write(step, record)
                logger.info("reranker epoch %d: loss %.4f, train accuracy %.1f%% (%.1f%% of the samples are correct)",
                            epoch, record["reranker/epoch_loss"], record["reranker/train_accuracy"], positive_rate)
            meta = {**meta, "steps": step, "history": history, "train_seconds": round(time.perf_counter() - start, 1)}
            group.run(RerankerWorker.save, str(out), meta)
    finally:
        bar.close()
    return history


def score_reranker(cfg: RunConfig, reranker: Path, sequences: Sequence[Tokenized], pad_id: int,
                   progress: Optional[str] = "rerank") -> list[float]:
    """P(correct) of every sequence under the reranker directory ``reranker``, in order, on the
    learner group (the run's ZeRO stage and dtype). Sequences go in batches of similar length (less
    padding), each padded with copies of its first row to split evenly over the ranks."""
    world = cfg.cluster.num_learners
    learner_cfg = dataclasses.replace(cfg.learner, model=str(reranker), with_reference=False, value_head="none",
                                      lr_schedule="constant", total_steps=0, schedule_offset=0)
    # Lengths only: lazy inputs are tokenised again per batch rather than all held here.
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in (sequences[i] for i in range(len(sequences)))]
    order = sorted(range(len(sequences)), key=lengths.__getitem__)
    per_call = SCORE_ROWS_PER_RANK * world
    out = [0.0] * len(sequences)
    bar = PhaseBar(progress, -(-len(order) // per_call), None) if progress else None
    try:
        with reranker_group(cfg, learner_cfg) as group:
            for start in range(0, len(order), per_call):
                rows = order[start:start + per_call]
                padded = rows + rows[:1] * (-len(rows) % world)
                batch = collate([sequences[i] for i in padded], pad_id)
                shards = group.run_sharded(RerankerWorker.score, {k: batch[k] for k in ("input_ids", "attention_mask")})
                for i, p in zip(rows, unshard(shards).tolist()):
                    out[i] = p
                if bar is not None:
                    bar.advance(None)
    finally:
        if bar is not None:
            bar.close()
    return out
