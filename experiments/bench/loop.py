"""Benchmark the training loop of a config: where an RL step's and an SFT step's time goes, and
how far each is from the compute floor of the same passes.

    python -m experiments.bench.loop [--config experiments/configs/tiny.yaml] [--warmup DIR]
                                     [--steps 12] [--skip 2] [--sft-steps 20] [KEY=VALUE ...]
    python -m experiments.bench.loop --compare "" "rl.algorithm=grpo rl.samples_per_question=8 \\
                                     rl.questions_per_step=4 learner.ppo_epochs=1" [--repeats 2]

One run: Ray starts, the RL stage's actors start from the warm-up checkpoint (``--warmup``, by
default ``runs/<name>/sft/epoch-<sft.epochs>`` of the config: run ``reft sft`` first), ``--skip``
RL steps warm the engines up, ``--steps`` RL steps are measured, the actors stop; then
``--sft-steps`` SFT steps on the learner (after 2 unmeasured ones). The compute floors, in this
process with the torch threads the learner has:

- learner floor: the passes the algorithm needs on the step's batch, in a plain torch loop (same
  model, micro-batches and AdamW, no DeepSpeed, no Ray): a forward of the value model for the
  values, one of the reference when ``kl_coef > 0``, one of the policy only when the batch's old
  log-probs are not the sampler's, then ``ppo_epochs x ppo_mini_batches`` forward + backward +
  AdamW steps;
- rollout floor: HF ``generate`` of the step's prompts (n samples, the temperature), as many new
  tokens as the step's longest completion;
- SFT floor: forward + backward + AdamW of the policy alone on an SFT batch, after the run.

The first two are timed right after each measured step, on that step's samples (their time is
not counted in the step's), and each ratio is the median over the steps of the step's time over
its own floor's: this machine's speed drifts within minutes, and one step's longest completion
sets its time, so floors timed after the run on the last batch swung the ratios by up to 0.5x.

It prints samples/s, tokens/s (prompt and completion), each phase's share of the step's wall
time (rollout incl. the scoring tail, each learner pass as timed inside the learner, the
learner calls' Ray/transfer overhead, sync, the driver's own work), learner busy %, the floors
and the ratios, per-component start-up seconds and each process's peak RSS. ``--compare`` runs
each given override string as a fresh subprocess, back to back, ``--repeats`` times in turn
(A B A B), and prints one table. Figures, not a test; the README's throughput table comes
from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = "experiments/configs/tiny.yaml"
BUSY_KEYS = ("score", "ppo_update", "sft_step")   # the learner calls of an RL step (LearnerWorker.busy_s)


# ----------------------------------------------------------------------------- processes


def process_tree(pid: int, children: bool = True) -> list:
    """``pid``'s process and, with ``children``, its live descendants (vLLM's engine core,
    sandbox workers); [] if it is gone."""
    import psutil
    try:
        root = psutil.Process(pid)
        return [root] + (root.children(recursive=True) if children else [])
    except psutil.NoSuchProcess:
        return []


def peak_rss_mib(pid: int, children: bool = True) -> float:
    """The summed VmHWM of ``process_tree(pid, children)`` in MiB (nan if it is gone)."""
    procs = process_tree(pid, children)
    total = 0.0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            total += int(hwm.split()[1]) / 1024
        except (OSError, StopIteration):
            pass
    return round(total, 1) if procs else float("nan")


def cpu_s(pid: int, children: bool = True) -> float:
    """CPU seconds (user + system) used so far by ``process_tree(pid, children)``."""
    import psutil
    total = 0.0
    for proc in process_tree(pid, children):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``process_tree(pid)`` (an engine's thread, its OpenMP
    workers, Ray's; an own-process engine core's among them), keyed ``<name>-<tid>``."""
    import psutil
    out = {}
    for proc in process_tree(pid):
        try:
            threads = proc.threads()
        except psutil.NoSuchProcess:
            continue
        for t in threads:
            try:
                name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                continue
            out[f"{name}-{t.id}"] = t.user_time + t.system_time
    return out


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (all cores)."""
    import psutil
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def actor_pids() -> dict[str, int]:
    """"<Class>-<pid>" -> pid of the live Ray actors of the local cluster this driver started:
    Ray titles an actor's process ``ray::<Class>`` or ``ray::<Class>.<method>``."""
    import psutil
    pids = {}
    for proc in process_tree(os.getpid())[1:]:   # this driver's Ray cluster only
        try:
            title = (proc.cmdline() or [""])[0]
        except psutil.NoSuchProcess:
            continue
        name = title[5:].split(".")[0].split(" ")[0] if title.startswith("ray::") else ""
        if name[:1].isupper() and name != "IDLE":
            pids[f"{name}-{proc.pid}"] = proc.pid
    return pids


# ----------------------------------------------------------------------------- one run


class Recorder:
    """Wraps a recipe's ``Learn``: keeps the last step's samples (for the floors and token counts)
    and, once ``pids`` is set, the CPU seconds each actor uses while the learner trains (an idle
    engine that spins competes with the learner for the cores)."""

    def __init__(self, learn):
        self.learn, self.samples = learn, []
        self.with_reference, self.with_critic = learn.with_reference, getattr(learn, "with_critic", True)
        self.pids: dict[str, int] = {}
        self.cpu_during, self.cpu_rollout, self.thread_cpu_rollout = {}, {}, {}
        self.seconds = self.rollout_seconds = 0.0
        self._step_start = None

    def step_starts(self) -> None:
        """Called just before ``trainer.step()``: from here to the learner's call is the step's
        rollout (generation and scoring), whose CPU per process is kept too."""
        self._step_start = (time.perf_counter(), {name: cpu_s(pid) for name, pid in self.pids.items()},
                            self._rollout_threads())

    def _rollout_threads(self) -> dict[str, float]:
        return {f"{name}/{thread}": s for name, pid in self.pids.items() if name.startswith("RolloutWorker")
                for thread, s in thread_cpu_s(pid).items()}

    def _add_rollout(self, end: float, cpu_end: dict[str, float]) -> None:
        start, cpu_start, threads_start = self._step_start
        self._step_start = None
        self.rollout_seconds += end - start
        for name in self.pids:
            self.cpu_rollout[name] = self.cpu_rollout.get(name, 0.0) + cpu_end[name] - cpu_start[name]
        for name, s in self._rollout_threads().items():
            self.thread_cpu_rollout[name] = self.thread_cpu_rollout.get(name, 0.0) + s - threads_start.get(name, 0.0)

    def __call__(self, trainer, indices, samples, scores):
        self.samples = list(samples)
        before = {name: cpu_s(pid) for name, pid in self.pids.items()}
        start = time.perf_counter()
        if self._step_start is not None:   # the step's rollout ends where the learner's call begins
            self._add_rollout(start, before)
        try:
            return self.learn(trainer, indices, samples, scores)
        finally:
            self.seconds += time.perf_counter() - start
            for name, pid in self.pids.items():
                self.cpu_during[name] = self.cpu_during.get(name, 0.0) + cpu_s(pid) - before[name]


def run_once(args) -> dict:
    import ray

    from cluster.config import RunConfig
    from cluster.config_io import load_config
    from cluster.recipes import check_config
    from cluster.rl import RLTrainer
    from cluster.runtime import init_ray, load_splits
    from learner.worker import LearnerWorker

    overrides = ["rl.compare_sft=false", "rl.eval_every=100000", "rl.checkpoint_every=100000",
                 "cluster.dashboard=false", *args.overrides]
    cfg = load_config(RunConfig, args.config, overrides)
    recipe = check_config(cfg)
    warmup = args.warmup or str(Path(cfg.out_dir) / cfg.name / "sft" / f"epoch-{cfg.sft.epochs}")
    if not (Path(warmup) / "config.json").is_file():
        raise SystemExit(f"--warmup {warmup}: no HF checkpoint there; run `reft sft --config {args.config}` "
                         "first or pass --warmup DIR")
    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, model=warmup))
    train, test = load_splits(cfg)
    out: dict = {"overrides": " ".join(args.overrides), "startup_s": {}}

    # the benchmark's own run directory, so that init_ray links its Ray logs there, not into the
    # train run's directory whose warm-up it reads
    cfg = dataclasses.replace(cfg, out_dir=tempfile.mkdtemp(prefix="reft-bench-"),
                              cluster=dataclasses.replace(cfg.cluster, storage=None))
    run_dir = cfg.run_dir
    run_dir.mkdir()
    t = time.perf_counter()
    init_ray(cfg)
    out["startup_s"]["ray"] = time.perf_counter() - t
    recorder = {}

    def learn(trainer):
        recorder["learn"] = Recorder(recipe.make_learn(recipe, cfg, trainer))
        return recorder["learn"]

    trainer = RLTrainer(cfg, warmup, run_dir, train, test, learn)
    out["startup_s"].update(getattr(trainer, "startup_s", {}))   # (absent before the start-up breakdown)
    steps = []   # each measured step's metrics, its learner busy time and its paired floors
    try:
        for i in range(args.skip + args.steps):
            if i == args.skip:
                stats = trainer.learners.run(LearnerWorker.stats)[0]
                before = learner_busy = stats.get("busy_s", {})
                engine_before = engine_stats(trainer.fleet)
                floor = PairedFloors(cfg, recipe, warmup, trainer.pad_id, stats.get("threads", 1),
                                     recorder["learn"].samples)
                pids = actor_pids()
                cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
                recorder["learn"].pids = pids
                ours_before, machine_before = cpu_s(os.getpid()), machine_busy_s()
                aside = 0.0   # seconds spent on the paired floors, not the RL steps'
                t0 = time.perf_counter()
            if i >= args.skip:
                recorder["learn"].step_starts()
            t = time.perf_counter()
            metrics = trainer.step()
            metrics["wall_s"] = time.perf_counter() - t
            samples = recorder["learn"].samples
            metrics["prompt_tokens"] = sum(len(s.prompt_token_ids) for s in samples)
            metrics["completion_tokens"] = sum(len(s.completion_token_ids) for s in samples)
            metrics["samples"] = len(samples)
            if i >= args.skip:
                t = time.perf_counter()
                busy_now = trainer.learners.run(LearnerWorker.stats)[0].get("busy_s", {})
                metrics["learner_busy_s"] = sum(busy_now.get(k, 0.0) - learner_busy.get(k, 0.0) for k in BUSY_KEYS)
                learner_busy = busy_now
                metrics.update(floor(samples))
                steps.append(metrics)
                aside += time.perf_counter() - t
        wall = time.perf_counter() - t0 - aside
        # CPU use over the measured steps: each actor's process tree (a busy-waiting idle engine
        # shows here), and the machine's besides this run's (another job skews every figure).
        out["cpu_pct"] = {name: round(100.0 * (cpu_s(pid) - cpu_before[name]) / wall)
                          for name, pid in pids.items() if name in cpu_before}
        learn = recorder["learn"]
        out["cpu_pct_learner_phase"] = {name: round(100.0 * v / learn.seconds) for name, v in learn.cpu_during.items()}
        out["cpu_pct_rollout_phase"] = {name: round(100.0 * v / learn.rollout_seconds)
                                        for name, v in learn.cpu_rollout.items()}
        busiest = sorted(learn.thread_cpu_rollout.items(), key=lambda kv: -kv[1])[:4]   # the engine's, OpenMP's
        out["rollout_thread_cpu_pct"] = {name: round(100.0 * v / learn.rollout_seconds) for name, v in busiest}
        ours = cpu_s(os.getpid()) - ours_before
        out["foreign_cpu_pct"] = round(100.0 * max(0.0, machine_busy_s() - machine_before - ours) / wall)
        engine = {k: v - engine_before[k] for k, v in engine_stats(trainer.fleet).items()}
        stats = trainer.learners.run(LearnerWorker.stats)[0]
        busy = {k: v - before.get(k, 0.0) for k, v in stats.get("busy_s", {}).items()}
        out["learner_threads"] = stats.get("threads", 1)   # (older learners: Ray's OMP_NUM_THREADS=1)
        out["peak_rss_mib"] = {"driver": peak_rss_mib(os.getpid(), children=False),
                               **{name: peak_rss_mib(pid) for name, pid in sorted(pids.items())}}
    finally:
        trainer.close()
    out["rl"] = rl_figures(steps, busy, wall)
    if engine["engine_steps"]:   # in-process engines count their steps (others report none)
        out["rl"]["engine_steps_per_step"] = engine["engine_steps"] / len(steps)
        out["rl"]["engine_step_ms"] = 1000.0 * engine["engine_step_s"] / engine["engine_steps"]
        out["rl"]["engine_busy_s"] = engine["engine_step_s"] / len(steps)
    out["rl"]["poll_replies_per_step"] = engine["poll_replies"] / len(steps)   # the samples' trips to the driver

    out["sft"] = sft_steps(cfg, train, args.sft_steps)
    ray.shutdown()

    sft_batch = sft_batches(cfg, train, warmup, 1)[0]
    out["floor"] = {"threads": out["learner_threads"], **floor.passes,
                    "learner_s": statistics.median(s["floor/learner_s"] for s in steps),
                    "hf_generate_s": statistics.median(s["floor/hf_generate_s"] for s in steps),
                    "sft_step_s": statistics.median(sft_floor(cfg, warmup, sft_batch) for _ in range(args.floor_repeats))}
    # Each ratio is the median over the measured steps of the step's time over its floor's.
    paired = lambda key, floor_key: statistics.median(s[key] / s[floor_key] for s in steps)  # noqa: E731
    out["ratios"] = {
        "learner_busy_vs_floor": paired("learner_busy_s", "floor/learner_s"),
        "learner_call_vs_floor": paired("timing/learner_s", "floor/learner_s"),
        "sft_step_vs_floor": out["sft"]["step_s"] / out["floor"]["sft_step_s"],
        "rollout_vs_hf_generate": paired("timing/rollout_s", "floor/hf_generate_s"),
        "generation_vs_hf_generate": paired("timing/generate_s", "floor/hf_generate_s"),
    }
    return out


def engine_stats(fleet) -> dict:
    """Engine steps and their seconds so far, summed over the fleet's in-process engines, and
    the actors' poll replies that carried samples."""
    health = fleet.health()
    return {key: sum(h.get(key, 0) for h in health) for key in ("engine_steps", "engine_step_s", "poll_replies")}


def rl_figures(steps: list[dict], busy: dict, wall: float) -> dict:
    n = len(steps)
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    total = lambda key: sum(s[key] for s in steps)  # noqa: E731
    learner_busy = sum(busy.get(k, 0.0) for k in BUSY_KEYS) / n
    if not busy:   # a learner that does not time itself: the driver's view of its calls
        learner_busy = med("timing/learner_s")
    shares = {
        "rollout+scoring": total("timing/rollout_s"),
        "learner score (inside)": busy.get("score", 0.0),
        "learner update (inside)": busy.get("ppo_update", 0.0) + busy.get("sft_step", 0.0),
        "learner calls: Ray + driver maths": total("timing/learner_s") - busy.get("score", 0.0)
                                             - busy.get("ppo_update", 0.0) - busy.get("sft_step", 0.0),
        "sync (publish inside)": busy.get("publish_weights", 0.0),
        "sync: Ray + samplers' load": total("timing/sync_s") - busy.get("publish_weights", 0.0),
    }
    shares["driver (rest of the step)"] = wall - sum(shares.values())
    return {
        "steps": n, "wall_s": wall, "step_s": wall / n,
        "samples_per_s": total("samples") / wall,
        "prompt_tokens_per_s": total("prompt_tokens") / wall,
        "completion_tokens_per_s": total("completion_tokens") / wall,
        "rollout_s": med("timing/rollout_s"),
        # until the step's last sample arrived (older checkouts do not time it: the whole rollout)
        "generate_s": statistics.median(s.get("timing/generate_s", s["timing/rollout_s"]) for s in steps),
        "learner_s": med("timing/learner_s"), "sync_s": med("timing/sync_s"),
        "learner_busy_s": learner_busy, "learner_busy_pct": 100.0 * learner_busy * n / wall,
        "share_pct": {k: round(100.0 * v / wall, 1) for k, v in shares.items()},
        "reward_mean": statistics.mean(s["rl/reward_mean"] for s in steps),
        "kl": statistics.mean(s.get("rl/kl", 0.0) for s in steps),
    }


def sft_batches(cfg, train, model_dir: str, count: int):
    from formats.hf import load_tokenizer
    from learner.data import collate, tokenize_sft
    tokenizer = load_tokenizer(model_dir)
    size = cfg.sft.batch_size
    return [collate([tokenize_sft(tokenizer, e) for e in train[i * size:(i + 1) * size]], tokenizer.pad_token_id)
            for i in range(count)]


def sft_steps(cfg, train, count: int) -> dict:
    """``count`` SFT steps on the learner group as ``cluster.sft.train_sft`` runs them (after 2
    unmeasured ones), from the warm-up checkpoint."""
    from cluster import sft
    from cluster.placement import place
    from learner.worker import LearnerWorker

    batches = sft_batches(cfg, train, cfg.learner.model, count + 2)
    placement = place(cfg)
    t = time.perf_counter()
    if hasattr(sft, "sft_learner_config"):
        learner_cfg = sft.sft_learner_config(cfg, total_steps=count + 2)
    else:   # before it existed: the SFT learner was the run's with the SFT optimiser settings
        learner_cfg = dataclasses.replace(cfg.learner, with_reference=False, lr=cfg.sft.lr, total_steps=count + 2,
                                          lr_schedule=cfg.sft.lr_schedule, warmup_ratio=cfg.sft.warmup_ratio)
    group = sft.start_learners(cfg, learner_cfg, placement)
    startup = time.perf_counter() - t
    try:
        for batch in batches[:2]:
            group.run_sharded(LearnerWorker.sft_step, batch)
        before = group.run(LearnerWorker.stats)[0].get("busy_s", {}).get("sft_step", 0.0)
        t = time.perf_counter()
        for batch in batches[2:]:
            group.run_sharded(LearnerWorker.sft_step, batch)
        wall = time.perf_counter() - t
        busy = group.run(LearnerWorker.stats)[0].get("busy_s", {}).get("sft_step", wall) - before
    finally:
        group.kill()
        placement.remove()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:])
    return {"startup_s": startup, "steps": count, "step_s": wall / count, "busy_step_s": busy / count,
            "tokens_per_s": tokens / wall}


# ----------------------------------------------------------------------------- the floors


def scoring_passes(cfg, recipe) -> dict:
    """The learner passes the algorithm needs before its updates: the reference's when either KL
    term is on (ReFT's in the reward, GRPO's / RLOO's in the loss); the policy's only where the
    sampler's log-probs cannot stand for PPO's old policy (bf16); the critic's only where the
    estimator reads values."""
    kl_coef = recipe.kl_coef(cfg) or getattr(recipe, "kl_loss_coef", lambda _cfg: 0.0)(cfg)
    sampler_dtype = cfg.rollout.resolved_dtype(on_gpu=False)
    policy_forward = cfg.rl.max_staleness == 0 and not (cfg.learner.dtype == "fp32" and sampler_dtype == "float32")
    value_head = cfg.learner.value_head if getattr(recipe, "critic", True) else "none"
    return {"kl_coef": kl_coef, "policy_forward_in_score": policy_forward, "value_head": value_head}


def _micro(batch, size):
    for a in range(0, batch["input_ids"].shape[0], size):
        rows = slice(a, a + size)
        width = int(batch["attention_mask"][rows].sum(dim=1).max())
        yield {k: v[rows, :width] for k, v in batch.items() if v.dim() == 2}


class LearnerFloor:
    """The learner's passes (``scoring_passes``, then ``ppo_epochs x ppo_mini_batches`` forward +
    backward + AdamW steps) on a step's batch in a plain torch loop in this process (same model,
    micro-batches and AdamW; no DeepSpeed, no Ray); a call returns its seconds."""

    def __init__(self, cfg, recipe, warmup: str, pad_id: int):
        import torch

        from learner.algos import get_policy_loss, get_value_loss
        from learner.model import PolicyWithValue, load_reference

        self.cfg, self.pad_id, self.passes = cfg, pad_id, scoring_passes(cfg, recipe)
        lc = cfg.learner
        self.model = PolicyWithValue.from_pretrained(warmup, self.passes["value_head"], lc.dtype)
        self.reference = load_reference(warmup, lc.dtype) if self.passes["kl_coef"] > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lc.lr)
        self.policy_loss, self.value_loss = get_policy_loss(lc.policy_loss), get_value_loss(lc.value_loss)

    def __call__(self, samples) -> float:
        import torch

        from cluster.experience import samples_to_batch
        from learner.worker import token_outputs

        lc, model, reference = self.cfg.learner, self.model, self.reference
        batch = samples_to_batch(samples, self.pad_id)
        mask = batch["response_mask"]
        n_tokens = float(mask.sum())
        start = time.perf_counter()
        with torch.no_grad():                                   # the scoring passes
            for mb in _micro(batch, lc.micro_batch_size):
                if self.passes["policy_forward_in_score"] or (model.value_head is not None and model.critic is None):
                    model(mb["input_ids"], mb["attention_mask"])
                elif model.value_head is not None:   # a separate critic: its backbone and head alone
                    hidden = model.critic(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                          use_cache=False).last_hidden_state
                    model.value_head(hidden)
                if reference is not None:
                    reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
        ppo = dict(batch, old_logprobs=batch["sampler_logprobs"], old_values=torch.zeros_like(batch["sampler_logprobs"]),
                   advantages=torch.randn(mask.shape) * mask, returns=torch.randn(mask.shape) * mask)
        rows = batch["input_ids"].shape[0] // lc.ppo_mini_batches
        for _ in range(lc.ppo_epochs):
            for k in range(lc.ppo_mini_batches):
                part = {key: v[k * rows:(k + 1) * rows] for key, v in ppo.items() if v.dim() == 2}
                for mb in _micro(part, lc.micro_batch_size):
                    out = model(mb["input_ids"], mb["attention_mask"])
                    tok = token_outputs(mb["input_ids"], out.logits, out.values, self.cfg.rl.temperature,
                                        with_entropy=True)
                    counts = {"num_tokens_global": n_tokens, "num_seqs_global": float(rows)}
                    pg = self.policy_loss(tok.logprobs, mb["old_logprobs"], mb["advantages"], mb["response_mask"],
                                          clip_eps=lc.clip_eps, agg_mode=lc.loss_agg_mode, **counts)
                    loss = pg.loss
                    if tok.values is not None:
                        loss = loss + lc.vf_coef * self.value_loss(tok.values, mb["old_values"], mb["returns"],
                                                                   mb["response_mask"], clip_eps=lc.vf_clip_eps,
                                                                   agg_mode=lc.loss_agg_mode, **counts).loss
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def sft_floor(cfg, warmup: str, batch) -> float:
    import torch

    from formats.hf import load_causal_lm
    from learner.masked import masked_sum
    from learner.worker import token_outputs

    model = load_causal_lm(warmup, cfg.learner.dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr)
    n_tokens = float(batch["response_mask"].sum())
    start = time.perf_counter()
    for mb in _micro(batch, cfg.learner.micro_batch_size):
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
        loss = -masked_sum(token_outputs(mb["input_ids"], logits).logprobs, mb["response_mask"]) / n_tokens
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
    optimizer.step()
    return time.perf_counter() - start


class HFGenerate:
    """HF ``generate`` of a step's prompts, left-padded, all at once, ``n`` samples each, for as
    many new tokens as the step's longest completion (the decode steps the rollout took: the
    policy trained since the warm-up writes other lengths than these weights would, and at a
    fixed length the time does not depend on the weights); a call returns its seconds."""

    def __init__(self, cfg, warmup: str):
        from formats.hf import load_causal_lm, load_tokenizer
        self.cfg, self.tokenizer = cfg, load_tokenizer(warmup)
        self.model = load_causal_lm(warmup, cfg.learner.dtype).eval()

    def __call__(self, samples) -> float:
        import torch
        pad, rl = self.tokenizer.pad_token_id, self.cfg.rl
        prompts = list(dict.fromkeys(s.prompt_token_ids for s in samples))
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        length = max(len(s.completion_token_ids) for s in samples)
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=rl.temperature,
                                top_p=1.0, top_k=0, max_new_tokens=length, min_new_tokens=length,
                                num_return_sequences=rl.samples_per_question, pad_token_id=pad,
                                eos_token_id=self.tokenizer.eos_token_id)
        return time.perf_counter() - start


class PairedFloors:
    """The RL step's floors, timed right after each measured step in this process with the
    learner's threads (module docstring): ``floor(samples)`` returns that step's
    ``floor/learner_s`` and ``floor/hf_generate_s``. Built with an untimed first call of each
    (``warm``: the previous step's samples)."""

    def __init__(self, cfg, recipe, warmup: str, pad_id: int, threads: int, warm):
        import torch
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # a "Loading weights" bar per model load
        torch.set_num_threads(threads)
        self.learner = LearnerFloor(cfg, recipe, warmup, pad_id)
        self.generate = HFGenerate(cfg, warmup)
        self.passes = self.learner.passes
        self(warm)

    def __call__(self, samples) -> dict:
        return {"floor/learner_s": self.learner(samples), "floor/hf_generate_s": self.generate(samples)}


# ----------------------------------------------------------------------------- report


def describe(r: dict) -> str:
    rl, sft, fl, ra = r["rl"], r["sft"], r["floor"], r["ratios"]
    lines = [
        f"== {r['overrides'] or '(config as is)'}",
        f"RL   {rl['samples_per_s']:.1f} samples/s, {rl['step_s']:.2f} s/step over {rl['steps']} steps; tokens/s "
        f"prompt {rl['prompt_tokens_per_s']:.0f}, completion {rl['completion_tokens_per_s']:.0f}; reward "
        f"{rl['reward_mean']:.3f}",
        f"     per step (median): rollout {rl['rollout_s']:.3f} s (generation {rl['generate_s']:.3f} s, the "
        f"rest the scoring tail), learner {rl['learner_s']:.3f} s (busy inside "
        f"{rl['learner_busy_s']:.3f} s, {rl['learner_busy_pct']:.0f}% of wall), sync {rl['sync_s']:.3f} s",
        "     share of wall: " + ", ".join(f"{k} {v}%" for k, v in rl["share_pct"].items()),
        *([f"     engine (in-process): {rl['engine_steps_per_step']:.0f} decode steps per RL step, "
           f"{rl['engine_step_ms']:.2f} ms each, {rl['engine_busy_s']:.3f} s busy of the rollout"]
          if "engine_steps_per_step" in rl else []),
        f"     samples reached the driver in {rl['poll_replies_per_step']:.1f} poll replies per RL step "
        f"(rollout.poll_linger_s)",
        f"SFT  {sft['step_s']:.3f} s/step (busy inside {sft['busy_step_s']:.3f} s), {sft['tokens_per_s']:.0f} tokens/s",
        f"floor ({fl['threads']} threads): learner {fl['learner_s']:.3f} s, "
        f"SFT step {fl['sft_step_s']:.3f} s; HF generate {fl['hf_generate_s']:.3f} s (medians; the first two timed after each step)",
        f"ratios: learner call {ra['learner_call_vs_floor']:.2f}x floor (busy {ra['learner_busy_vs_floor']:.2f}x), "
        f"SFT {ra['sft_step_vs_floor']:.2f}x, rollout {ra['rollout_vs_hf_generate']:.2f}x HF generate (per step) "
        f"(generation {ra['generation_vs_hf_generate']:.2f}x)",
        "start-up s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["startup_s"].items())
        + f"; SFT learner {sft['startup_s']:.1f}",
        "peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mib"].items()),
        "CPU % over the RL steps (100 = one core): " + ", ".join(f"{k} {v}" for k, v in r["cpu_pct"].items())
        + f"; other processes on the machine {r['foreign_cpu_pct']} (should be ~0)",
        "CPU % while the learner trains: " + ", ".join(f"{k} {v}" for k, v in r["cpu_pct_learner_phase"].items()),
        "CPU % while the samplers generate: " + ", ".join(f"{k} {v}" for k, v in r.get("cpu_pct_rollout_phase", {}).items())
        + "; the busiest threads of the samplers: " + ", ".join(f"{k} {v}" for k, v in r.get("rollout_thread_cpu_pct", {}).items()),
    ]
    return "\n".join(lines)


def compare(args) -> list[dict]:
    """Each override string in a fresh subprocess, back to back, ``repeats`` rounds."""
    results = []
    for round_ in range(args.repeats):
        for spec in args.compare:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            cmd = [sys.executable, "-m", "experiments.bench.loop", "--config", args.config, "--steps", str(args.steps),
                   "--skip", str(args.skip), "--sft-steps", str(args.sft_steps), "--json-out", path,
                   *(["--warmup", args.warmup] if args.warmup else []), *shlex.split(spec)]
            print(f"-- round {round_ + 1}: {spec or '(config as is)'}", flush=True)
            subprocess.run(cmd, check=True)
            results.append(json.loads(Path(path).read_text()))
            os.unlink(path)
    print("\n| run | samples/s | rollout s | learner s | sync s | learner/floor | SFT step s | SFT/floor | "
          "rollout/HF | generation/HF |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rl, sft, ra = r["rl"], r["sft"], r["ratios"]
        print(f"| {r['overrides'] or 'config'} | {rl['samples_per_s']:.1f} | {rl['rollout_s']:.3f} | "
              f"{rl['learner_s']:.3f} | {rl['sync_s']:.3f} | {ra['learner_call_vs_floor']:.2f} | {sft['step_s']:.3f} | "
              f"{ra['sft_step_vs_floor']:.2f} | {ra['rollout_vs_hf_generate']:.2f} | "
              f"{ra['generation_vs_hf_generate']:.2f} |")
    return results


def main(argv=None) -> dict | list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--warmup", default=None, help="the SFT checkpoint RL starts from")
    parser.add_argument("--steps", type=int, default=12, help="RL steps measured")
    parser.add_argument("--skip", type=int, default=2, help="RL steps run first, not measured")
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--floor-repeats", type=int, default=3,
                        help="runs of the SFT floor (their median); the RL floors are timed once per measured step")
    parser.add_argument("--compare", nargs="+", metavar="OVERRIDES", help="override strings to run back to back")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of --compare")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)
    result = run_once(args)
    print(describe(result), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
