"""The ReFT recipe: SFT warm-up, then reinforcement learning on the same questions.

The driver is a single controller: it only moves data between actors and runs the batch-wide
maths (advantages). One RL step:

    1. questions   next questions_per_step training questions (seeded order, data position kept)
    2. rollout     the vLLM fleet samples K CoTs per question; samples stream out as they finish
    3. reward      the reward actor scores them while the rest are still decoding
    4. score       the learner recomputes log pi_old and V (the old policy) and log pi_ref
    5. advantages  task score on the last token, - beta * KL per token, GAE (or GRPO / RLOO)
    6. update      PPO: ppo_epochs passes, clipped policy + alpha * clipped value loss
    7. sync        the new weights, version v+1, go to every sampler, which proves it loaded them
    8. evaluate    greedy accuracy on the test split every eval_every steps; checkpoint

With ``rl.max_staleness = 1`` the next batch's questions go to the samplers as soon as this
batch's samples are in: they decode on the weights of version v while the learner runs steps 4-6,
and the sync of step 7 waits for them (an actor loads new weights only when its running requests
are done), so every sample of a batch comes from one version, one behind the learner. For such a
batch PPO's "old" policy, the one in the ratio and the KL penalty, is the sampler's: its log-probs
come with the samples (equal to the learner's in fp32, DESIGN §6); the values are the learner's.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from actors.fleet import RolloutFleet
from actors.reward import collect_scored, reward_item
from actors.reward import launch as launch_reward
from actors.rollout import Sample, SampleRequest
from cluster.actor_group import unshard
from cluster.config import SFT_ALGORITHMS, RunConfig
from cluster.config_io import dump_yaml
from cluster.experience import add_advantages, rollout_batch
from cluster.metrics import MetricsLogger, read_metrics, summary_line
from cluster.placement import place, plan_placement
from cluster.report import plot_curves, write_results
from cluster.runtime import init_ray, load_splits, make_run_dir, prepare_model
from cluster.schedule import TrainState, next_questions, peek_questions
from cluster.sft import start_learners, train_sft
from experiments.records import Example, build_prompt
from learner.algos import AdvantageConfig
from learner.export import save_hf_checkpoint
from learner.worker import LearnerWorker

logger = logging.getLogger("reft")


def sample_requests(examples: list[Example], indices: list[int], step: int, cfg: RunConfig) -> list[SampleRequest]:
    rl = cfg.rl
    return [SampleRequest(request_id=f"s{step}-q{i}", prompt=build_prompt(examples[i].question, examples[i].cot_kind),
                          n=rl.samples_per_question, temperature=rl.temperature, top_p=rl.top_p,
                          max_tokens=rl.max_new_tokens, seed=cfg.seed * 1_000_003 + step * 10_007 + i)
            for i in indices]


def request_index(sample: Sample) -> int:
    """The training-question index an RL request id ``s{step}-q{index}`` refers to."""
    return int(sample.request_id.rsplit("-q", 1)[1])


class ReFTTrainer:
    """Owns the actors of one RL run; ``step()`` is one iteration of the module docstring."""

    def __init__(self, cfg: RunConfig, warmup: str, run_dir: Path, train: list[Example], test: list[Example]):
        self.cfg, self.run_dir, self.train_set, self.test_set = cfg, run_dir, train, test
        self.warmup = warmup
        self.kind, self.dataset = cfg.data.cot_kind, cfg.data.dataset
        # The reference model is only needed for the KL penalty.
        self.with_reference = cfg.rl.kl_coef_for(self.kind) > 0
        learner_cfg = dataclasses.replace(cfg.learner, model=warmup, with_reference=self.with_reference)
        # Where the actors go (cluster.mode); in local-gpu the engines sleep while the learner trains.
        self.placement = place(cfg)
        self.colocate = self.placement.plan.colocate
        rollout_cfg = self.placement.plan.rollout_config(dataclasses.replace(cfg.rollout, model=warmup))
        try:
            self.learners = start_learners(cfg, learner_cfg, self.placement)                       # DeepSpeed ranks
            self.fleet = RolloutFleet(rollout_cfg, actor_options=lambda i: self.placement.options("rollout", i))
            self.reward = launch_reward(cfg.reward, name="reward-0",                               # sandboxed scoring
                                        num_cpus=self.placement.options("reward")["num_cpus"])
        except BaseException:
            self.placement.remove()   # frees the GPUs of whatever started in it
            raise
        self.adv_cfg = AdvantageConfig(gamma=cfg.rl.gamma, lam=cfg.rl.lam, whiten=cfg.rl.whiten_advantages)
        from experiments.tiny_model import load_tokenizer
        self.pad_id = load_tokenizer(warmup).pad_token_id
        self.state = TrainState()
        self.total_steps = total_steps(cfg, len(train))
        self.prefetched: Optional[list[int]] = None   # next step's questions, already sampling (max_staleness 1)
        self.metrics = MetricsLogger(run_dir / "rl", ray_keys=RAY_KEYS)

    # ---------------------------------------------------------------- one RL step
    def step(self) -> dict:
        cfg, rl, state = self.cfg, self.cfg.rl, self.state
        timing, t0 = {}, time.perf_counter()
        indices = next_questions(state, len(self.train_set), rl.questions_per_step, cfg.seed)          # 1
        if self.prefetched != indices:            # on-policy, or the first step (nothing prefetched)
            self.fleet.submit(sample_requests(self.train_set, indices, state.step, cfg))
        samples, scores = self.collect_and_score(len(indices) * rl.samples_per_question)            # 2, 3
        self.prefetched = self.prefetch_next() if rl.max_staleness else None
        timing["timing/rollout_s"] = time.perf_counter() - t0
        if self.colocate:
            self.fleet.sleep()      # local-gpu: the learner gets vLLM's GPU memory for steps 4-6

        t = time.perf_counter()
        batch = rollout_batch([s.prompt_token_ids for s in samples], [s.completion_token_ids for s in samples],
                              self.pad_id, [s.logprobs for s in samples])
        old = unshard(self.learners.run_sharded(LearnerWorker.compute_logprobs_and_values, batch))      # 4
        behaviour_version = min(s.policy_version for s in samples)
        # A batch sampled one version ago: PPO's old policy is the sampler's (module docstring).
        old_logprobs = batch["sampler_logprobs"] if behaviour_version < state.version else old.logprobs
        ref = (unshard(self.learners.run_sharded(LearnerWorker.compute_ref_logprobs, batch))
               if self.with_reference else old_logprobs)
        group_ids = torch.tensor([request_index(s) for s in samples])
        reward_t = torch.tensor([sc.reward for sc in scores], dtype=torch.float32)
        ppo_batch, metrics = add_advantages(batch, reward_t, old_logprobs, old.values, ref, group_ids,         # 5
                                            rl.estimator, rl.kl_coef_for(self.kind), self.adv_cfg,
                                            learner_logprobs=old.logprobs)
        update = self.learners.run_sharded(LearnerWorker.ppo_update, ppo_batch)[0]                     # 6
        timing["timing/learner_s"] = time.perf_counter() - t

        timing["timing/sync_s"] = self.sync_weights()                                                  # 7
        state.step += 1

        metrics.update({f"learner/{k}": v for k, v in update.items()})
        metrics.update(self.sample_metrics(samples, scores, timing))
        return metrics

    def sync_weights(self) -> float:
        """The learner's weights, as version v+1, to every sampler; returns the seconds it took."""
        t = time.perf_counter()
        if self.colocate:
            self.fleet.wake_up()    # before the sync: a sleeping engine refuses a weight load
        self.state.version += 1
        self.fleet.update_weights(self.learners.run(LearnerWorker.export_weights)[0], self.state.version)
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
            "perf/rollout_tokens_per_s": sum(len(s.completion_token_ids) for s in samples)
                                         / max(timing["timing/rollout_s"], 1e-9),
            **timing,
        }

    def prefetch_next(self) -> Optional[list[int]]:
        """max_staleness = 1: send the next step's questions to the samplers now (weights v)."""
        if self.state.step + 1 >= self.total_steps:
            return None
        indices = peek_questions(self.state, len(self.train_set), self.cfg.rl.questions_per_step, self.cfg.seed)
        self.fleet.submit(sample_requests(self.train_set, indices, self.state.step + 1, self.cfg))
        return indices

    def collect_and_score(self, expected: int) -> tuple[list[Sample], list]:
        """The ``expected`` samples of the submitted step and their scores (scored as they
        finish, `actors.reward.collect_scored`), in a fixed order: (request, index)."""
        samples, scores = collect_scored(self.fleet, self.reward, lambda s: self.train_set[request_index(s)],
                                         expected, self.cfg.rollout.call_timeout_s, self.cfg.cluster.call_timeout_s)
        order = sorted(range(len(samples)), key=lambda i: (request_index(samples[i]), samples[i].index))
        return [samples[i] for i in order], [scores[i] for i in order]

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, examples: list[Example]) -> dict:
        """Greedy top-1 accuracy through the samplers (current weights) and the reward actor."""
        requests = [SampleRequest(request_id=f"eval-{i}", prompt=build_prompt(e.question, e.cot_kind), n=1,
                                  temperature=0.0, max_tokens=self.cfg.rl.max_new_tokens)
                    for i, e in enumerate(examples)]
        samples = self.fleet.generate(requests, timeout_s=self.cfg.rollout.call_timeout_s)   # in request order
        import ray
        scores = ray.get(self.reward.score.remote([reward_item(s.completion_text, e) for s, e in zip(samples, examples)]),
                         timeout=self.cfg.cluster.call_timeout_s)
        return {"accuracy": 100.0 * sum(s.correct for s in scores) / len(scores),
                "answered": 100.0 * sum(s.answer is not None for s in scores) / len(scores)}

    def evaluate_and_log(self) -> dict:
        test = self.evaluate(self.test_set)
        train = self.evaluate(self.train_set[:self.cfg.data.train_eval_size])
        record = {"eval/test_accuracy": test["accuracy"], "eval/test_answered": test["answered"],
                  "eval/train_accuracy": train["accuracy"]}
        self.metrics.write(self.state.step, record)
        return record

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step-{self.state.step:06d}"
        self.learners.run(LearnerWorker.save_checkpoint, str(path), {"train_state": self.state.to_json()})
        # The policy as an HF model directory too: what `reft eval` and `reft train-reranker` load.
        save_hf_checkpoint(self.learners.run(LearnerWorker.export_weights)[0], self.warmup, path / "policy")
        dump_yaml(self.cfg, path / "config.yaml")
        (self.run_dir / "checkpoints" / "latest").write_text(path.name)
        return path

    def load(self, path: Path) -> None:
        client = self.learners.run(LearnerWorker.load_checkpoint, str(path))[0]
        self.state = TrainState(**client["train_state"])
        self.fleet.update_weights(self.learners.run(LearnerWorker.export_weights)[0], self.state.version)

    def close(self) -> None:
        import ray
        self.metrics.close()
        self.fleet.shutdown()
        self.learners.kill()
        try:
            ray.get(self.reward.close.remote(), timeout=30)   # stops its sandbox workers
        finally:
            ray.kill(self.reward)
            self.placement.remove()


RAY_KEYS = ("rl/reward_mean", "rl/train_accuracy", "rl/kl", "learner/entropy", "learner/clipfrac",
            "learner/vf_loss", "perf/rollout_tokens_per_s", "timing/sync_s", "rl/staleness",
            "rl/sampler_logprob_gap", "eval/test_accuracy")


def total_steps(cfg: RunConfig, n_train: int) -> int:
    return max(1, cfg.rl.epochs * n_train // cfg.rl.questions_per_step)


def run_rl(cfg: RunConfig, warmup: str, run_dir: Path, train: list[Example], test: list[Example],
           resume: Optional[Path] = None, max_seconds: Optional[float] = None) -> list[dict]:
    """The RL loop; returns the evaluation records. ``max_seconds`` stops it early (wall budget)."""
    from cluster.baselines import OnlineSTTrainer   # it imports this module
    trainer = (OnlineSTTrainer if cfg.rl.algorithm == "online_st" else ReFTTrainer)(cfg, warmup, run_dir, train, test)
    history = []
    try:
        if resume is not None:
            trainer.load(resume)
        steps = trainer.total_steps
        start = time.perf_counter()
        if trainer.state.step == 0:
            history.append({"step": 0, **trainer.evaluate_and_log()})
        bar = tqdm(total=steps, initial=trainer.state.step, desc=f"rl ({cfg.rl.algorithm})", unit="step")
        while trainer.state.step < steps:
            metrics = trainer.step()
            trainer.metrics.write(trainer.state.step, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['rl/reward_mean']:.3f}", acc=f"{metrics['rl/train_accuracy']:.0f}")
            logger.info("rl %s", summary_line(trainer.state.step, metrics, SUMMARY_KEYS))
            done = trainer.state.step == steps or (max_seconds and time.perf_counter() - start > max_seconds)
            if trainer.state.step % cfg.rl.eval_every == 0 or done:
                history.append({"step": trainer.state.step, **trainer.evaluate_and_log()})
            if trainer.state.step % cfg.rl.checkpoint_every == 0 or done:
                trainer.save()
            if done:
                break
        bar.close()
    finally:
        trainer.close()
    return history


SUMMARY_KEYS = ("rl/reward_mean", "rl/train_accuracy", "rl/kl", "learner/pg_loss", "learner/vf_loss",
                "learner/entropy", "timing/rollout_s", "timing/learner_s", "timing/sync_s")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    marker = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / marker.read_text().strip() if marker.exists() else None


def result_row(model: str, history: list[dict]) -> dict:
    """A results-table row: the last evaluation's test and train accuracy, and the best test
    accuracy of all evaluations (the paper reports the best checkpoint)."""
    evals = [r for r in history if "eval/test_accuracy" in r]
    if not evals:
        return {"model": model, "test_accuracy": None, "best_test_accuracy": None, "train_accuracy": None}
    return {"model": model, "test_accuracy": evals[-1]["eval/test_accuracy"],
            "best_test_accuracy": max(r["eval/test_accuracy"] for r in evals),
            "train_accuracy": evals[-1].get("eval/train_accuracy")}


def run_train(cfg: RunConfig, resume: bool = False) -> dict:
    """The whole ReFT pipeline of one config: warm-up, RL, (optionally) the SFT-continued
    baseline for the same wall time, the results table, the plots. Returns the headline."""
    start = time.perf_counter()
    cfg.validate()
    plan_placement(cfg)   # the run mode's own checks (sizes, weight sync, sleep mode) before anything starts
    run_dir = make_run_dir(cfg)
    init_ray(cfg)
    cfg = prepare_model(cfg, run_dir)
    train, test = load_splits(cfg)

    # 1. warm-up: SFT on the gold CoTs (or a given checkpoint)
    warmup = cfg.rl.warmup_checkpoint
    if warmup is None:
        done = sorted((run_dir / "sft").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
        if resume and len(done) == cfg.sft.epochs:
            warmup = str(done[-1])
        else:
            warmup = str(train_sft(cfg, run_dir, train, test).checkpoints[-1])
    warm_cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, model=warmup))

    # 2. from the warm-up: reinforcement learning, or one of the paper's SFT baselines (cluster.baselines)
    if cfg.rl.algorithm in SFT_ALGORITHMS:
        from cluster.baselines import run_sft_stage   # it imports this module
        history = run_sft_stage(warm_cfg, cfg.learner.model, run_dir, train, test, resume=resume)
    else:
        history = run_rl(warm_cfg, warmup, run_dir, train, test,
                         resume=latest_checkpoint(run_dir) if resume else None)
    series = {cfg.rl.algorithm: read_metrics(run_dir / "rl" / "metrics.jsonl")}
    # The stage's training time: RL's steps (rollout + learner + sync) or the SFT stage's epochs, not
    # engine start-up or evaluation, which the SFT baseline's budget does not count either.
    rl_seconds = sum(r.get("timing/rollout_s", 0) + r.get("timing/learner_s", 0) + r.get("timing/sync_s", 0)
                     + r.get("sft/epoch_seconds", 0) for r in series[cfg.rl.algorithm])

    # 3. the baseline: SFT continued from the same warm-up for the same wall time
    rows = [result_row("warm-up (SFT)", history[:1])]
    headline = {"warmup_acc": rows[0]["test_accuracy"], "rl_train_seconds": round(rl_seconds, 1)}
    if cfg.rl.compare_sft:
        sft_cfg = dataclasses.replace(warm_cfg, sft=dataclasses.replace(
            cfg.sft, epochs=10_000, lr_schedule="linear_warmup_constant", warmup_ratio=0.0))
        cont = train_sft(sft_cfg, run_dir, train, test, phase="sft-continued", max_seconds=rl_seconds)
        rows.append(result_row("SFT continued", cont.history))
        headline.update(sft_acc=rows[-1]["test_accuracy"], sft_best_test_accuracy=rows[-1]["best_test_accuracy"])
        series["sft-continued"] = read_metrics(run_dir / "sft-continued" / "metrics.jsonl")
    rows.append(result_row(cfg.rl.algorithm, history))
    # The paper reports each method's best evaluation (its code keeps the best checkpoint).
    best = max((r for r in history if "eval/test_accuracy" in r), key=lambda r: r["eval/test_accuracy"])
    headline.update({f"{cfg.rl.algorithm}_acc": rows[-1]["test_accuracy"],
                     f"{cfg.rl.algorithm}_best_test_accuracy": best["eval/test_accuracy"],
                     f"{cfg.rl.algorithm}_best_step": best["step"]})
    headline["wall_seconds"] = round(time.perf_counter() - start, 1)
    table = write_results(run_dir, rows, headline)
    plot_curves(run_dir / "curves.png", series, title=f"{cfg.name}: {cfg.data.dataset} {cfg.data.cot_kind}")
    print(table.to_markdown(index=False, floatfmt=".1f"))
    return headline
