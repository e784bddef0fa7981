"""The SFT warm-up recipe: supervised fine-tuning on the gold CoTs, run on the DeepSpeed learner
group, with a Hugging Face checkpoint and a greedy evaluation after every epoch.

    for epoch in 1..E:
        for each batch of gold (question, CoT) pairs, in a seeded shuffled order:
            learner.sft_step(batch)              # cross-entropy on the CoT tokens only
        export weights → runs/<name>/sft/epoch-<e>/     (HF format: the RL stage starts from one)
        greedy accuracy on held-out and on training problems

Users run it once (``reft sft``) and start several RL runs from its checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Optional

from cluster.actor_group import ActorGroup
from cluster.config import RunConfig
from cluster.evaluate import HFEvaluator
from cluster.console import CONSOLE, PhaseBar
from cluster.metrics import MetricsLogger, summary_line
from cluster.placement import Placement, place
from cluster.runtime import init_ray, join_cluster, load_splits, make_run_dir, prepare_model
from formats.hf import load_tokenizer
from formats.records import Example
from learner.config import LearnerConfig
from learner.data import collate, tokenize_sft
from learner.worker import LearnerWorker

logger = logging.getLogger("reft")


@dataclasses.dataclass
class SFTResult:
    checkpoints: list        # HF checkpoint dirs, one per epoch
    history: list            # per-epoch dicts: epoch, loss, accuracies, seconds


def start_learners(cfg: RunConfig, learner_cfg, placement: Placement, worker: type = LearnerWorker) -> ActorGroup:
    """The DeepSpeed ranks, each with the resources and bundle ``placement`` gives it; ``worker``:
    their class (the policy's ``LearnerWorker``, or the reranker's ``RerankerWorker``)."""
    return ActorGroup(worker, cfg.cluster.num_learners, learner_cfg,
                      options=lambda rank: placement.options("learner", rank), name_prefix="learner",
                      timeout_s=cfg.cluster.call_timeout_s)


def sft_learner_config(cfg: RunConfig, total_steps: int, schedule_offset: int = 0) -> LearnerConfig:
    """The learner of an SFT stage: the run's, with the SFT optimiser settings, no reference and
    no value model (nothing reads a value: a separate critic would double every forward).
    ``total_steps`` is the schedule's length, ``schedule_offset`` where in it the stage starts."""
    return dataclasses.replace(cfg.learner, with_reference=False, value_head="none", lr=cfg.sft.lr,
                               lr_schedule=cfg.sft.lr_schedule, warmup_ratio=cfg.sft.warmup_ratio,
                               total_steps=total_steps, schedule_offset=schedule_offset)


def run_sft(cfg: RunConfig) -> SFTResult:
    """``reft sft``: set up the run (directory, resolved config, model, data), then `train_sft`."""
    cfg.validate()
    run_dir = make_run_dir(cfg)
    cfg = join_cluster(cfg)
    cfg = prepare_model(cfg, run_dir)
    train, test = load_splits(cfg)
    return train_sft(cfg, run_dir, train, test, max_seconds=cfg.sft.max_seconds)


def train_sft(cfg: RunConfig, run_dir: Path, train: list[Example], test: list[Example], phase: str = "sft",
              max_seconds: Optional[float] = None, epoch_key: str = "epoch", start_epoch: int = 0) -> SFTResult:
    """SFT from ``cfg.learner.model`` on ``train``. Checkpoints and metrics go to
    ``<run_dir>/<phase>/``. ``max_seconds`` stops training after that much training time (checked
    after each step; the epoch in progress is checkpointed and evaluated): the "SFT continued for
    the same wall time as RL" baseline. ``epoch_key`` names the epoch in the per-epoch records
    ("rl/epoch" when a baseline trains in the RL stage's place, so that runs compare by epoch).
    ``start_epoch``: epochs of the learning-rate schedule already run (by the warm-up this stage
    continues); the schedule spans ``sft.schedule_epochs`` (or start_epoch + sft.epochs) epochs.
    Writes no run config: the caller owns the run directory."""
    tokenizer = load_tokenizer(cfg.learner.model)

    # 1. tokenize the gold CoTs; drop (and count) the ones longer than max_length
    items = [tokenize_sft(tokenizer, e) for e in train]
    kept = [i for i, t in enumerate(items) if len(t.prompt_ids) + len(t.response_ids) <= cfg.sft.max_length]
    if len(kept) < len(items):
        logger.warning("sft: dropped %d of %d training examples longer than sft.max_length=%d",
                       len(items) - len(kept), len(items), cfg.sft.max_length)
    steps_per_epoch = len(kept) // cfg.sft.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"sft.batch_size={cfg.sft.batch_size} is larger than the {len(kept)} training examples")
    total_steps = steps_per_epoch * cfg.sft.epochs
    schedule_epochs = cfg.sft.schedule_epochs or start_epoch + cfg.sft.epochs
    if start_epoch + cfg.sft.epochs > schedule_epochs:
        logger.warning("%s: epochs %d-%d run past the %d-epoch learning-rate schedule (sft.schedule_epochs): "
                       "the learning rate is 0 after it", phase, start_epoch + 1, start_epoch + cfg.sft.epochs,
                       schedule_epochs)
    learner_cfg = sft_learner_config(cfg, steps_per_epoch * schedule_epochs, steps_per_epoch * start_epoch)

    # 2. the learner group (DeepSpeed ranks as Ray actors), placed by the run mode's plan
    init_ray(cfg)
    placement = place(cfg)
    try:
        group = start_learners(cfg, learner_cfg, placement)
    except BaseException:
        placement.remove()
        raise
    metrics = MetricsLogger(run_dir / phase, ray_keys=("sft/loss", "eval/test_accuracy"))
    evaluator = None   # HF generate in this process: no engine starts for the warm-up's evaluations
    result = SFTResult([], [])
    rng = random.Random(cfg.seed)
    step, trained_s, out_of_time = 0, 0.0, False
    bar = PhaseBar(phase, total_steps, max_seconds)
    try:
        for epoch in range(1, cfg.sft.epochs + 1):
            # 3. one epoch over the shuffled training set
            order = kept[:]
            rng.shuffle(order)
            start, losses, tokens = time.perf_counter(), [], 0
            for i in range(steps_per_epoch):
                rows = order[i * cfg.sft.batch_size:(i + 1) * cfg.sft.batch_size]
                batch = collate([items[r] for r in rows], tokenizer.pad_token_id, cfg.sft.max_length)
                out = group.run_sharded(LearnerWorker.sft_step, batch)[0]
                step += 1
                losses.append(out["loss"])
                tokens += int(batch["attention_mask"].sum())
                elapsed = trained_s + time.perf_counter() - start   # this phase's training time so far
                bar.advance(elapsed, epoch=epoch, loss=f"{out['loss']:.3f}")
                metrics.write(step, {"sft/loss": out["loss"], "sft/grad_norm": out["grad_norm"], "sft/lr": out["lr"]})
                if max_seconds is not None and elapsed >= max_seconds:
                    out_of_time = True
                    break
            seconds = time.perf_counter() - start
            trained_s += seconds

            # 4. checkpoint (HF format) and greedy evaluation
            ckpt = Path(group.run(LearnerWorker.save_policy, str(run_dir / phase / f"epoch-{epoch}"))[0])
            result.checkpoints.append(ckpt)
            record = {epoch_key: epoch, "step": step, "sft/epoch_loss": sum(losses) / len(losses),
                      "sft/epoch_seconds": seconds, "sft/train_seconds": trained_s, "perf/sft_tokens_per_s": tokens / seconds}
            last = epoch == cfg.sft.epochs or out_of_time
            if cfg.sft.eval_every_epochs and (epoch % cfg.sft.eval_every_epochs == 0 or last):
                evaluator = evaluator.load(ckpt) if evaluator else HFEvaluator(cfg, ckpt)
                test_eval = evaluator.greedy(test, cfg.sft.eval_max_new_tokens)
                train_eval = evaluator.greedy(train[:cfg.data.train_eval_size], cfg.sft.eval_max_new_tokens)
                record.update({"eval/test_accuracy": test_eval.accuracy, "eval/train_accuracy": train_eval.accuracy,
                               "eval/test_answered": test_eval.answered})
            metrics.write(step, record)
            result.history.append(record)
            logger.info("%s %s", phase, summary_line(step, record))
            if "eval/test_accuracy" in record:   # the console's line: the evaluation, not the perf counters
                logger.info("%s eval %s", phase, summary_line(step, record, (
                    epoch_key, "sft/epoch_loss", "eval/test_accuracy", "eval/train_accuracy", "sft/train_seconds")),
                    extra=CONSOLE)
            if out_of_time:
                break
    finally:
        bar.close()
        metrics.close()
        if evaluator is not None:
            evaluator.close()
        group.kill()
        placement.remove()
    return result
