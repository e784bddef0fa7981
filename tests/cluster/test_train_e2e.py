"""The whole ReFT loop on CPU with the real components: SFT warm-up and PPO on DeepSpeed learner
actors, vLLM (CPU) rollout actors, the sandboxed reward actor, weight sync after every step.

One smoke run (experiments/configs/smoke.yaml) is shared by the module: the end-to-end checks
read it, the resume test continues a copy of it from its mid-run checkpoint, and the fault and
max_staleness tests start RL from its warm-up checkpoint."""
import json
import shutil
import threading
import time

import pytest

from cluster.config import RunConfig
from cluster.config_io import load_config

# Values a re-run must reproduce; timings and rates are the machine's, not the run's.
NOT_REPRODUCIBLE = ("time", "timing/", "perf/")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, ray_local):
    from cluster.train import run_train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", [f"out_dir={out}", "name=e2e"])
    headline = run_train(cfg)
    return cfg, out / "e2e", headline


def rl_steps(run_dir):
    from cluster.metrics import read_metrics
    return [r for r in read_metrics(run_dir / "rl" / "metrics.jsonl") if "rl/reward_mean" in r]


def rl_overrides(smoke_run, tmp_path, name):
    """A short RL run from the smoke run's warm-up (no SFT phase)."""
    cfg, run_dir, _ = smoke_run
    return [f"out_dir={tmp_path}", f"name={name}", f"rl.warmup_checkpoint={run_dir / 'sft' / f'epoch-{cfg.sft.epochs}'}"]


@pytest.mark.slow
def test_reft_loop_end_to_end(smoke_run):
    cfg, run_dir, headline = smoke_run
    steps = rl_steps(run_dir)
    assert len(steps) == 512 // 32
    # The first steps sample from (nearly) the warm-up policy; the second half from the trained one.
    first, last = steps[:2], steps[8:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    print("reward per step", [round(r["rl/reward_mean"], 3) for r in steps])
    assert mean(last, "rl/reward_mean") > mean(first, "rl/reward_mean")
    assert mean(last, "rl/train_accuracy") > mean(first, "rl/train_accuracy")
    # every step synced the samplers: fp32 sampler and learner agree on the sampled tokens' logprobs
    assert all(r["rl/staleness"] == 0 for r in steps)
    # (smoke.yaml: the learner recomputes them at least every other step; with its shared value
    # head they come with the values' forward on every step)
    checked = [r for r in steps if "rl/sampler_logprob_gap" in r]
    assert len(checked) >= len(steps) // 2
    assert max(r["rl/sampler_logprob_gap"] for r in checked) < 1e-3
    # Learner rank 0 published every version itself: what crossed the driver per sync was a handle
    # of a few KiB (the tiny model's weights are MBs), and each checkpoint reused the sync's export.
    assert 0 < max(r["rollout/handle_bytes"] for r in steps) < 64 * 1024
    from cluster.metrics import read_metrics
    saves = [r for r in read_metrics(run_dir / "rl" / "metrics.jsonl") if "learner/exports" in r]
    assert saves and all(r["learner/exports"] == r["learner/versions"] for r in saves)

    # the run directory: config, metrics, a checkpoint, the table, the plot
    assert (run_dir / "config.yaml").is_file() and (run_dir / "rl" / "metrics.csv").is_file()
    assert load_config(RunConfig, run_dir / "config.yaml") == cfg   # the phases never overwrite it
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "results.md").is_file() and (run_dir / "results.csv").is_file()
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert json.loads((run_dir / "results.json").read_text()) == headline
    assert {"warmup_acc", "reft_acc", "wall_seconds"} <= set(headline)

    # the CoT-style analysis reads the run's models; every smoke gold CoT works step by step, so
    # most completions do (the 2-3 step test problems, longer than any trained on, get some odd ones)
    from experiments.cot_styles import main as cot_styles
    assert cot_styles([str(run_dir), "--max-questions", "16"]) == 0
    styles = json.loads((run_dir / "cot_styles.json").read_text())
    assert [r["model"] for r in styles] == ["warm-up (SFT)", "reft"] and styles[1]["checkpoint"].endswith("policy")
    for r in styles:
        assert r["questions"] == 16 and r["steps_share"] + r["terse_share"] == pytest.approx(100) and r["steps_share"] > 50
        within = [r[f"{k}_share"] * (r[f"{k}_accuracy"] or 0) / 100 for k in ("steps", "terse")]
        assert r["accuracy"] == pytest.approx(sum(within))


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(smoke_run, tmp_path):
    """Cut a copy of the finished run back to its step-8 checkpoint, --resume it, and compare
    steps 9-16 with the uninterrupted run: same questions, samples, rewards, updates."""
    from cluster.train import run_train

    cfg, run_dir, _ = smoke_run
    copy = tmp_path / "e2e"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "latest").write_text("step-000008")
    kept = [line for line in (copy / "rl" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 8]
    (copy / "rl" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    shutil.rmtree(copy / "rl" / "tensorboard", ignore_errors=True)

    resumed_cfg = load_config(RunConfig, copy / "config.yaml", [f"out_dir={tmp_path}"])
    run_train(resumed_cfg, resume=True)

    def reproducible(records):
        return [{k: v for k, v in r.items() if not k.startswith(NOT_REPRODUCIBLE)} for r in records]
    original = [r for r in rl_steps(run_dir) if r["step"] > 8]
    resumed = [r for r in rl_steps(copy) if r["step"] > 8]
    assert [r["step"] for r in resumed] == list(range(9, 17))
    for a, b in zip(reproducible(original), reproducible(resumed)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.slow
def test_killed_rollout_actor_is_replaced_and_resynced(smoke_run, tmp_path):
    """Kill rollout-0 while the loop runs: the fleet starts a new rollout-0, loads it with the
    current weights, re-issues its requests, and the run completes on policy."""
    import ray

    from cluster.train import run_train

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", rl_overrides(smoke_run, tmp_path, "kill"))
    metrics = tmp_path / "kill" / "rl" / "metrics.jsonl"
    killed = []

    def kill_after_step_4():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()):
                ray.kill(ray.get_actor("rollout-0", namespace="reft"), no_restart=True)
                killed.append(time.monotonic())
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_step_4, daemon=True)
    killer.start()
    run_train(cfg)
    killer.join(timeout=5)

    assert killed, "the run ended before the actor could be killed"
    steps = rl_steps(tmp_path / "kill")
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert steps[-1]["rollout/actor_restarts"] >= 1
    # The replacement serves the learner's current weights: on-policy, and its log-probs of the
    # sampled tokens are the learner's (a replacement on the warm-up weights would be far off).
    after = [r for r in steps if r["rollout/actor_restarts"] >= 1]
    assert after and all(r["rl/staleness"] == 0 for r in steps)
    checked = [r for r in after if "rl/sampler_logprob_gap" in r]
    assert checked and max(r["rl/sampler_logprob_gap"] for r in checked) < 1e-3


@pytest.mark.slow
def test_max_staleness_1_overlaps_generation_with_training(smoke_run, tmp_path):
    """rl.max_staleness=1: batch t+1 decodes on version v while the learner trains on batch t."""
    from cluster.train import run_train

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml",
                      rl_overrides(smoke_run, tmp_path, "async") + ["rl.max_staleness=1"])
    headline = run_train(cfg)
    steps = rl_steps(tmp_path / "async")
    assert [r["step"] for r in steps] == list(range(1, 17))
    # Step 1 is sampled by the warm-up weights it trains; every later batch is one version behind.
    assert [r["rl/staleness"] for r in steps] == [0.0] + [1.0] * 15
    # The ratio's old policy is the sampler's: the learner's log-probs differ by one update.
    checked = [r for r in steps[1:] if "rl/sampler_logprob_gap" in r]
    assert checked and min(r["rl/sampler_logprob_gap"] for r in checked) > 1e-5
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    assert mean(steps[8:], "rl/reward_mean") > mean(steps[:2], "rl/reward_mean")
    assert headline["reft_acc"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_algorithms_run_the_same_loop(smoke_run, tmp_path, algorithm):
    """GRPO and RLOO: K samples per question, the baseline from the question's other samples,
    no value model; the same driver, samplers, reward actor and run directory as ReFT."""
    from cluster.train import run_train

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", rl_overrides(smoke_run, tmp_path, algorithm) + [
        f"rl.algorithm={algorithm}", "rl.samples_per_question=2"])
    headline = run_train(cfg)
    steps = rl_steps(tmp_path / algorithm)
    assert [r["step"] for r in steps] == list(range(1, 17))          # 512 questions / 32 per step
    assert all(r["rl/staleness"] == 0 for r in steps)
    assert f"{algorithm}_acc" in headline and (tmp_path / algorithm / "curves.png").is_file()
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    assert mean(steps[8:], "rl/reward_mean") > mean(steps[:2], "rl/reward_mean") - 0.02
