"""The RL loop after the warm-up: the same questions, the policy's own samples, rewards, updates.

The driver is a single controller: it moves small things between actors (requests, samples,
scores, weight handles) and runs the batch-wide maths (advantages). One RL step:

    1. questions   next questions_per_step training questions (seeded order, data position kept)
    2. rollout     the vLLM fleet samples K CoTs per question; samples stream out as they finish
    3. reward      the reward actor scores them while the rest are still decoding
    4-6. learn     the recipe's update (``Learn``): for ReFT (``PPOLearn``) the learner scores the
                   batch (log pi_old, V, log pi_ref in one call), the driver shapes the reward
                   (score on the last token - beta * KL per token) and takes advantages (GAE, or
                   GRPO / RLOO), then PPO: ppo_epochs passes of clipped policy + alpha * clipped
                   value loss. Online self-training's update is SFT (``cluster.baselines``).
    7. sync        learner rank 0 publishes version v+1 itself; the driver hands the small handle
                   to every sampler, which loads the weights and proves it holds them
    8. evaluate    greedy accuracy on the test split every eval_every steps; checkpoint

With ``rl.max_staleness = 1`` the next batch's questions go to the samplers as soon as this
batch's samples are in: they decode on the weights of version v while the learner runs steps 4-6,
and the sync of step 7 waits for them (an actor loads new weights only when its running requests
are done), so every sample of a batch comes from one version, one behind the learner. For such a
batch PPO's "old" policy, the one in the ratio and the KL penalty, is the sampler's: its log-probs
come with the samples (equal to the learner's in fp32, docs/measurements.md); the values are the
learner's.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch

from actors.config import BROADCAST_TRANSPORTS
from actors.fleet import RolloutFleet
from actors.reward import collect_scored
from actors.reward import launch as launch_reward
from actors.rollout import Sample, SampleRequest
from actors.weight_sync import RemoteSender
from cluster.actor_group import unshard
from cluster.config import RunConfig
from cluster.config_io import dump_yaml
from cluster.evaluate import FleetEvaluator
from cluster.experience import add_advantages, samples_to_batch
from cluster.console import CONSOLE, PhaseBar
from cluster.metrics import PARTIAL, MetricsLogger, summary_line, write_atomically
from cluster.placement import place
from cluster.schedule import TrainState, next_questions, peek_questions
from cluster.sft import start_learners
from formats.hf import load_tokenizer
from formats.records import Example, prompt_token_ids
from learner.worker import PPO_KEYS, LearnerWorker

logger = logging.getLogger("reft")
SAMPLES_FILE = "samples.jsonl"   # <run_dir>/rl/: the first step's samples, then one step's per evaluation


class Learn(Protocol):
    """The algorithm's half of an RL step (4-6 in the module docstring): from the step's scored
    samples to an update of the learner; returns the step's metrics. ``with_reference`` /
    ``with_critic``: whether the learner must hold the frozen reference model / a value model."""

    with_reference: bool
    with_critic: bool

    def __call__(self, trainer: "RLTrainer", indices: Sequence[int], samples: Sequence[Sample],
                 scores: Sequence) -> dict: ...


@dataclasses.dataclass
class PPOLearn:
    """ReFT's update (and GRPO's, RLOO's: the same PPO loss with critic-free advantages).

    Only the passes the algorithm needs run: the reference's when a KL coefficient is > 0, the
    critic's when the estimator reads values, and the policy's own scoring pass only when the
    sampler's log-probs cannot stand for PPO's old policy (``recompute_old``)."""
    estimator: str                 # a registered advantage estimator (learner.algos)
    kl_coef: float                 # beta of the per-token KL penalty to the reference, in the reward (ReFT)
    kl_loss_coef: float = 0.0      # coefficient of the k3 KL loss term (GRPO / RLOO)
    with_critic: bool = True       # does the estimator read V (GAE), or not (GRPO, RLOO)?
    recompute_old: bool = True     # score an on-policy batch with the learner (else the sampler's log-probs)
    check_every: int = 0           # with the sampler's: every N steps also the learner's, for the gap metric

    @property
    def with_reference(self) -> bool:
        return self.kl_coef > 0 or self.kl_loss_coef > 0   # the reference is only needed for a KL term

    def __call__(self, trainer, indices, samples, scores):
        rl, state = trainer.cfg.rl, trainer.state
        batch = samples_to_batch(samples, trainer.pad_id)
        # A batch sampled one version ago: PPO's old policy is the sampler's (module docstring).
        stale = min(s.policy_version for s in samples) < state.version
        learner_old = self.recompute_old and not stale
        check = bool(self.check_every) and state.step % self.check_every == 0
        with_policy = learner_old or check
        scored = unshard(trainer.learners.run_sharded(LearnerWorker.score, batch, rl.temperature,
                                                      self.with_reference, with_policy))
        # The learner's where it computed them (asked for, or free with a shared value head), as
        # the paper's code; the sampler's for a stale batch or where the pass was saved.
        old = scored.logprobs if scored.logprobs is not None and not stale else batch["sampler_logprobs"]
        values = scored.values if scored.values is not None else torch.zeros_like(old)
        batch.update(scores=torch.tensor([sc.reward for sc in scores], dtype=torch.float32), old_logprobs=old,
                     values=values, ref_logprobs=scored.ref_logprobs if self.with_reference else old)
        if scored.logprobs is not None:   # asked for, or free (a shared value head's forward)
            batch["learner_logprobs"] = scored.logprobs   # the sampler/learner mismatch metric
        ppo_batch, metrics = add_advantages(batch, self.estimator, self.kl_coef, rl.advantage)
        keys = PPO_KEYS + (("ref_logprobs",) if self.kl_loss_coef else ())
        update = trainer.learners.run_sharded(LearnerWorker.ppo_update, {k: ppo_batch[k] for k in keys},
                                              rl.temperature, self.kl_loss_coef)[0]
        metrics.update({f"learner/{k}": v for k, v in update.items()})
        return metrics


def sample_requests(examples: list[Example], indices: Sequence[int], step: int, cfg: RunConfig,
                    tokenizer) -> list[SampleRequest]:
    """The step's requests: one per question, its prompt tokenised as SFT tokenises it."""
    rl = cfg.rl
    return [SampleRequest(request_id=f"s{step}-q{i}", prompt=tuple(prompt_token_ids(tokenizer, examples[i])),
                          n=rl.samples_per_question, temperature=rl.temperature, top_p=rl.top_p,
                          max_tokens=rl.max_new_tokens, seed=cfg.seed * 1_000_003 + step * 10_007 + i,
                          question_index=i)
            for i in indices]


class RLTrainer:
    """Owns the actors of one RL run; ``step()`` is one iteration of the module docstring, with
    the recipe's ``learn`` as steps 4-6."""

    def __init__(self, cfg: RunConfig, warmup: str, run_dir: Path, train: list[Example], test: list[Example],
                 learn: Callable[["RLTrainer"], Learn]):
        self.cfg, self.run_dir, self.train_set, self.test_set = cfg, run_dir, train, test
        self.warmup = warmup
        self.tokenizer = load_tokenizer(warmup)
        self.pad_id = self.tokenizer.pad_token_id
        self.learn = learn(self)
        learner_cfg = dataclasses.replace(cfg.learner, model=warmup, with_reference=self.learn.with_reference,
                                          value_head=cfg.learner.value_head if self.learn.with_critic else "none")
        # Where the actors go (cluster.mode); in local-gpu the engines sleep while the learner trains.
        self.placement = place(cfg)
        self.colocate = self.placement.plan.colocate
        rollout_cfg = self.placement.plan.rollout_config(dataclasses.replace(cfg.rollout, model=warmup))
        self.learners = self.fleet = self.reward = None
        self.startup_s: dict[str, float] = {}   # seconds per component (the benchmark reports them)
        start = time.perf_counter()

        def start_learner_group():                                                                 # DeepSpeed ranks
            group = start_learners(cfg, learner_cfg, self.placement)
            # Learner rank 0 publishes the weights; the fleet forwards the push transports' calls to it.
            group.run(LearnerWorker.open_weight_sync, rollout_cfg)
            self.startup_s["learner"] = time.perf_counter() - start
            return group

        # The learner ranks start while the engines do. A broadcast transport (nccl, gloo) joins each
        # engine to the learner's group as soon as the engine is up: there the learner goes first.
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="learner-start")
        learners = pool.submit(start_learner_group)
        try:
            if rollout_cfg.sync in BROADCAST_TRANSPORTS:
                self.learners = learners.result()
            sender = RemoteSender(lambda: learners.result().actors[0], rollout_cfg.sync, cfg.cluster.call_timeout_s)
            self.fleet = RolloutFleet(rollout_cfg, sync=sender,
                                      actor_options=lambda i: self.placement.options("rollout", i),
                                      place_timeout_s=cfg.cluster.placement_timeout_s)
            self.startup_s["rollout"] = time.perf_counter() - start
            self.learners = learners.result()
            t = time.perf_counter()
            self.reward = launch_reward(cfg.reward, name="reward-0",                               # sandboxed scoring
                                        num_cpus=self.placement.options("reward")["num_cpus"])
            self.startup_s["reward"] = time.perf_counter() - t
        except BaseException:
            try:
                self.learners = learners.result()   # wait for it, so that it is stopped too
            except BaseException:                   # noqa: BLE001 (ActorGroup kills its own ranks on failure)
                pass
            self._stop_actors()
            raise
        finally:
            pool.shutdown(wait=False)
        self.startup_s["total"] = time.perf_counter() - start
        logger.info("rl start-up (learner and engines concurrently): %s",
                    ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_s.items()), extra=CONSOLE)
        self.evaluator = FleetEvaluator(cfg, self.tokenizer, self.fleet, self.reward)
        self.state = TrainState()
        self.total_steps = total_steps(cfg, len(train))
        self.prefetched: Optional[list[int]] = None   # next step's questions, already sampling (max_staleness 1)
        self.reward_stats: collections.Counter = collections.Counter()   # scoring calls lost, samples re-scored
        self.metrics = MetricsLogger(run_dir / "rl", ray_keys=RAY_KEYS)

    # ---------------------------------------------------------------- one RL step
    def step(self) -> dict:
        cfg, rl, state = self.cfg, self.cfg.rl, self.state
        timing, t0 = {}, time.perf_counter()
        indices = next_questions(state, len(self.train_set), rl.questions_per_step, cfg.seed)          # 1
        if self.prefetched != indices:            # on-policy, or the first step (nothing prefetched)
            self.fleet.submit(sample_requests(self.train_set, indices, state.step, cfg, self.tokenizer))
        arrivals = []             # when each chunk of samples arrived: the last one ends the generation
        samples, scores = self.collect_and_score(len(indices) * rl.samples_per_question,               # 2, 3
                                                 on_chunk=lambda chunk: arrivals.append(time.perf_counter()))
        timing["timing/generate_s"] = arrivals[-1] - t0   # the rest of rollout_s is the scoring tail
        if state.step % rl.eval_every == 0:       # the first batch, then one per evaluation
            self.write_samples(samples, scores)
        self.prefetched = self.prefetch_next() if rl.max_staleness else None
        timing["timing/rollout_s"] = time.perf_counter() - t0
        if self.colocate:
            self.fleet.sleep()      # local-gpu: the learner gets vLLM's GPU memory for steps 4-6

        t = time.perf_counter()
        metrics = self.learn(self, indices, samples, scores)                                           # 4-6
        timing["timing/learner_s"] = time.perf_counter() - t

        timing["timing/sync_s"] = self.sync_weights()                                                  # 7
        state.step += 1
        state.trained_s += step_seconds(timing)
        metrics.update(self.sample_metrics(samples, scores, timing))
        return metrics

    def write_samples(self, samples: list[Sample], scores: list) -> None:
        """The step's samples as the learner gets them, one JSON line each, to
        ``<run_dir>/rl/samples.jsonl``: what the policy writes and how it was scored, to read
        (and the prompt token ids, to check that the samplers saw the prompts SFT trained on)."""
        with open(self.run_dir / "rl" / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for sample, score in zip(samples, scores):
                f.write(json.dumps({
                    "step": self.state.step, "question_id": self.train_set[sample.question_index].id,
                    "index": sample.index, "policy_version": sample.policy_version,
                    "prompt_token_ids": list(sample.prompt_token_ids),
                    "completion_token_ids": list(sample.completion_token_ids), "completion": sample.completion_text,
                    "finish_reason": sample.finish_reason, **dataclasses.asdict(score)}) + "\n")

    def sync_weights(self) -> float:
        """Version v+1 to every sampler: learner rank 0 publishes it (``publish_weights``), the
        driver passes the handle on; returns the seconds it took."""
        t = time.perf_counter()
        if self.colocate:
            self.fleet.wake_up()    # before the sync: a sleeping engine refuses a weight load
        self.state.version += 1
        self.fleet.push(self.learners.run(LearnerWorker.publish_weights, self.state.version)[0])
        return time.perf_counter() - t

    def sample_metrics(self, samples: list[Sample], scores: list, timing: dict) -> dict:
        """The step's sampling metrics (after the sync): rewards, accuracy, staleness, rates."""
        n, state = len(scores), self.state
        return {
            "rl/reward_mean": sum(s.reward for s in scores) / n,
            "rl/train_accuracy": 100.0 * sum(s.correct for s in scores) / n,
            "rl/answered": 100.0 * sum(s.answer is not None for s in scores) / n,
            "rl/epoch": state.epoch + state.position / len(self.train_set),
            "rl/staleness": float(state.version - 1 - min(s.policy_version for s in samples)),
            "rollout/actor_restarts": float(self.fleet.num_restarts),
            "rollout/reissued_requests": float(self.fleet.stats["reissued_requests"]),
            "reward/lost_calls": float(self.reward_stats["lost_calls"]),
            "reward/rescored_samples": float(self.reward_stats["rescored_samples"]),
            "rl/samples": float(n),
            "rollout/handle_bytes": float(self.fleet.stats["last_handle_bytes"]),
            "perf/rollout_tokens_per_s": sum(len(s.completion_token_ids) for s in samples)
                                         / max(timing["timing/rollout_s"], 1e-9),
            **timing,
        }

    def prefetch_next(self) -> Optional[list[int]]:
        """max_staleness = 1: send the next step's questions to the samplers now (weights v)."""
        if self.state.step + 1 >= self.total_steps:
            return None
        indices = peek_questions(self.state, len(self.train_set), self.cfg.rl.questions_per_step, self.cfg.seed)
        self.fleet.submit(sample_requests(self.train_set, indices, self.state.step + 1, self.cfg, self.tokenizer))
        return indices

    def collect_and_score(self, expected: int, on_chunk=None) -> tuple[list[Sample], list]:
        """The ``expected`` samples of the submitted step and their scores (scored as they
        finish, `actors.reward.collect_scored`), in a fixed order: (question, index)."""
        samples, scores = collect_scored(self.fleet, self.reward, lambda s: self.train_set[s.question_index],
                                         expected, self.cfg.rollout.call_timeout_s, self.cfg.cluster.call_timeout_s,
                                         on_chunk=on_chunk,
                                         max_resends=self.cfg.reward.max_actor_restarts, stats=self.reward_stats)
        order = sorted(range(len(samples)), key=lambda i: (samples[i].question_index, samples[i].index))
        return [samples[i] for i in order], [scores[i] for i in order]

    # ---------------------------------------------------------------- evaluation
    def evaluate_and_log(self) -> dict:
        """Greedy accuracy through the samplers (current weights) and the reward actor."""
        max_tokens = self.cfg.rl.max_new_tokens
        test = self.evaluator.greedy(self.test_set, max_tokens)
        train = self.evaluator.greedy(self.train_set[:self.cfg.data.train_eval_size], max_tokens)
        record = {"eval/test_accuracy": test.accuracy, "eval/test_answered": test.answered,
                  "eval/train_accuracy": train.accuracy}
        self.metrics.write(self.state.step, record)
        logger.info("rl (%s) eval %s", self.cfg.rl.algorithm, summary_line(self.state.step, record), extra=CONSOLE)
        return record

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Learner state (DeepSpeed, optimizer, RNG, data position) and the policy as an HF
        directory from the export the last sync made (``LearnerWorker.export_weights``).

        Atomic: written under a temporary name (``step-N.tmp-<pid>``), renamed into place when
        complete, and only then named by the ``latest`` marker, itself replaced atomically. A run
        that stops anywhere in here (its driver killed) leaves the last good checkpoint and its
        marker as they were; ``latest_checkpoint`` ignores the leftover."""
        root = self.run_dir / "checkpoints"
        path = root / f"step-{self.state.step:06d}"
        tmp = root / f"{path.name}{PARTIAL}{os.getpid()}"
        tmp.mkdir(parents=True)
        self.learners.run(LearnerWorker.save_checkpoint, str(tmp), {"train_state": self.state.to_json()})
        self.learners.run(LearnerWorker.save_policy, str(tmp / "policy"))   # what `reft eval` loads
        dump_yaml(self.cfg, tmp / "config.yaml")
        # Proof that a checkpoint reuses the sync's export: one export per published version.
        exports = self.learners.run(LearnerWorker.stats)[0]["exports"]
        self.metrics.write(self.state.step, {"learner/exports": float(exports), "learner/versions": float(self.state.version)})
        if path.exists():   # this step's checkpoint from a run that stopped before naming it latest
            shutil.rmtree(path)
        tmp.rename(path)
        write_atomically(root / LATEST, path.name)
        return path

    def load(self, path: Path) -> None:
        client = self.learners.run(LearnerWorker.load_checkpoint, str(path))[0]
        self.state = TrainState(**client["train_state"])
        self.fleet.push(self.learners.run(LearnerWorker.publish_weights, self.state.version)[0])

    def forget_after(self, step: int) -> list[dict]:
        """The run continues after ``step`` (a checkpoint's; -1 = from the start): drop what an
        earlier run recorded past it (metrics, samples), which the steps to come write again, so
        that nothing is counted twice. Returns the evaluations kept (the run's history so far)."""
        kept = self.metrics.drop_after(step)
        remove_partial_checkpoints(self.run_dir)
        samples = self.run_dir / "rl" / SAMPLES_FILE
        if samples.exists():   # its "step" is the batch's index: batch k is the one step k + 1 trains on
            lines = [line for line in samples.read_text(encoding="utf-8").splitlines(keepends=True)
                     if json.loads(line)["step"] < step]
            write_atomically(samples, "".join(lines))
        return [{k: v for k, v in r.items() if k != "time"} for r in kept if "eval/test_accuracy" in r]

    def close(self) -> None:
        self.metrics.close()
        self._stop_actors()

    def _stop_actors(self) -> None:
        """Stop every actor and free its name, each whatever became of the others: after a fault
        some are dead or stuck (a learner group missing a rank fails its last call), and one
        failure must not leave the rest holding their names for the next run (``--resume`` in the
        same Ray cluster). Each failure to stop one is logged."""
        import ray

        def stop_reward():
            try:
                ray.get(self.reward.close.remote(), timeout=30)   # stops its sandbox workers
            finally:
                ray.kill(self.reward, no_restart=True)
        stops = []
        if self.fleet is not None:
            stops.append(("rollout fleet", self.fleet.shutdown))
        if self.learners is not None:
            stops += [("weight publisher of learner rank 0",   # its /dev/shm directory; the others hold none
                       lambda: self.learners.run_rank(0, LearnerWorker.close_weight_sync)),
                      ("learner group", self.learners.kill)]
        if self.reward is not None:
            stops.append(("reward actor", stop_reward))
        stops.append(("placement group", self.placement.remove))
        for what, stop in stops:
            try:
                stop()
            except Exception as e:   # noqa: BLE001 (the next ones must still run)
                logger.warning("stopping the %s failed: %s: %s", what, type(e).__name__, (str(e).splitlines() or [""])[0])


RAY_KEYS = ("rl/reward_mean", "rl/train_accuracy", "rl/kl", "learner/entropy", "learner/clipfrac",
            "learner/vf_loss", "perf/rollout_tokens_per_s", "timing/sync_s", "rl/staleness",
            "rl/sampler_logprob_gap", "eval/test_accuracy")
SUMMARY_KEYS = ("rl/reward_mean", "rl/train_accuracy", "rl/kl", "learner/pg_loss", "learner/vf_loss",
                "learner/entropy", "timing/rollout_s", "timing/learner_s", "timing/sync_s")


STEP_TIME_KEYS = ("timing/rollout_s", "timing/learner_s", "timing/sync_s")


def step_seconds(record: dict) -> float:
    """A step's training time (rollout, learner, sync; not evaluation or checkpoints): what
    rl.max_seconds counts and the SFT-continued baseline is given."""
    return sum(record.get(key, 0.0) for key in STEP_TIME_KEYS)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """RL steps of the run: rl.epochs over the training questions, at most rl.max_steps."""
    steps = max(1, cfg.rl.epochs * n_train // cfg.rl.questions_per_step)
    return steps if cfg.rl.max_steps is None else min(steps, cfg.rl.max_steps)


def run_rl(cfg: RunConfig, warmup: str, run_dir: Path, train: list[Example], test: list[Example],
           learn: Callable[[RLTrainer], Learn], resume: Optional[Path] = None) -> list[dict]:
    """The RL loop; returns the evaluation records. Ends after rl.epochs, or after the step
    whose training time crosses rl.max_seconds. A run that fails logs where it stopped and how to
    continue it (at once, before its actors are stopped), then the error goes on up."""
    trainer = RLTrainer(cfg, warmup, run_dir, train, test, learn)
    try:
        if resume is not None:
            trainer.load(resume)
            logger.info("rl: resumed from %s (step %d)", resume, trainer.state.step, extra=CONSOLE)
        history = trainer.forget_after(trainer.state.step if resume is not None else -1)
        steps, budget = trainer.total_steps, cfg.rl.max_seconds
        if trainer.state.step == 0:
            history.append({"step": 0, **trainer.evaluate_and_log()})
        bar = PhaseBar(f"rl ({cfg.rl.algorithm})", steps, budget, initial=trainer.state.step)
        try:
            while trainer.state.step < steps:
                metrics = trainer.step()
                trainer.metrics.write(trainer.state.step, metrics)
                trained_s = trainer.state.trained_s   # kept in the checkpoint: a resumed run continues its budget
                bar.advance(trained_s, reward=f"{metrics['rl/reward_mean']:.3f}",
                            acc=f"{metrics['rl/train_accuracy']:.0f}")
                logger.info("rl %s", summary_line(trainer.state.step, metrics, SUMMARY_KEYS))
                done = trainer.state.step == steps or (budget is not None and trained_s >= budget)
                if trainer.state.step % cfg.rl.eval_every == 0 or done:
                    history.append({"step": trainer.state.step, **trainer.evaluate_and_log()})
                if trainer.state.step % cfg.rl.checkpoint_every == 0 or done:
                    trainer.save()
                if done:
                    break
        finally:
            bar.close()
    except Exception as e:
        last = latest_checkpoint(run_dir)
        logger.error("rl stopped after step %d: %s: %s | `reft train --resume %s` continues from %s",
                     trainer.state.step, type(e).__name__, e, run_dir, last.name if last else "the warm-up")
        raise
    finally:
        trainer.close()
    return history


LATEST = "latest"      # <run_dir>/checkpoints/latest: the name of the last complete checkpoint


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The last complete checkpoint (the ``latest`` marker names only complete ones), or None."""
    marker = run_dir / "checkpoints" / LATEST
    return run_dir / "checkpoints" / marker.read_text().strip() if marker.exists() else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove what a run stopped while writing a checkpoint left (``step-N.tmp-<pid>``, ``latest.tmp-<pid>``),
    saying so."""
    for leftover in sorted((run_dir / "checkpoints").glob(f"*{PARTIAL}*")):
        logger.warning("removing %s: a checkpoint a stopped run did not finish writing", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
