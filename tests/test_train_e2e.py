"""The whole ReFT loop on CPU with the real components: SFT warm-up and PPO on DeepSpeed learner
actors, vLLM (CPU) rollout actors, the sandboxed reward actor, weight sync after every step."""
import json

import pytest

from cluster.config import RunConfig
from cluster.config_io import load_config


@pytest.mark.slow
def test_reft_loop_end_to_end(tmp_path, ray_local):
    from cluster.metrics import read_metrics
    from cluster.train import run_train

    cfg = load_config(RunConfig, "experiments/configs/smoke.yaml", [f"out_dir={tmp_path}", "name=e2e"])
    headline = run_train(cfg)
    run_dir = tmp_path / "e2e"

    steps = [r for r in read_metrics(run_dir / "rl" / "metrics.jsonl") if "rl/reward_mean" in r]
    assert len(steps) == 512 // 32
    # The first steps sample from (nearly) the warm-up policy; the second half from the trained one.
    first, last = steps[:2], steps[8:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    print("reward per step", [round(r["rl/reward_mean"], 3) for r in steps])
    assert mean(last, "rl/reward_mean") > mean(first, "rl/reward_mean")
    assert mean(last, "rl/train_accuracy") > mean(first, "rl/train_accuracy")
    # every step synced the samplers: fp32 sampler and learner agree on the sampled tokens' logprobs
    assert all(r["rl/staleness"] == 0 for r in steps)
    assert max(r["rl/sampler_logprob_gap"] for r in steps) < 1e-3

    # the run directory: config, metrics, a checkpoint, the table, the plot
    assert (run_dir / "config.yaml").is_file() and (run_dir / "rl" / "metrics.csv").is_file()
    assert load_config(RunConfig, run_dir / "config.yaml") == cfg   # the phases never overwrite it
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "results.md").is_file() and (run_dir / "results.csv").is_file()
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert json.loads((run_dir / "results.json").read_text()) == headline
    assert {"warmup_acc", "reft_acc", "wall_seconds"} <= set(headline)
