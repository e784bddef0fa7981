"""The SFT warm-up recipe end to end on CPU: a real DeepSpeed learner actor on a local Ray,
the tiny model built from scratch, per-epoch HF checkpoints and greedy evaluation."""
import json

import pytest

from cluster.config import RunConfig
from cluster.config_io import load_config


@pytest.mark.slow
def test_sft_lowers_loss_and_raises_held_out_accuracy(tmp_path, ray_local):
    # An easy task (one addition with small numbers) so that a short run shows learning.
    cfg = load_config(RunConfig, "experiments/configs/tiny.yaml", [
        f"out_dir={tmp_path}", "name=sft", "data.synthetic.num_train=480", "data.synthetic.num_test=60",
        "data.synthetic.min_steps=1", "data.synthetic.max_steps=1", "data.synthetic.max_operand=9",
        "data.synthetic.max_value=40", "data.synthetic.operations=['+']", "data.synthetic.terse_fraction=0",
        "data.synthetic.restate_steps=true", "data.eval_size=60",
        "data.train_eval_size=60", "tiny_model.hidden_size=128", "tiny_model.num_layers=2",
        "sft.epochs=10", "sft.batch_size=32", "sft.eval_every_epochs=1", "sft.eval_max_new_tokens=48",
        "cluster.learner_cpus=1",
    ])
    from cluster.sft import run_sft
    result = run_sft(cfg)

    losses = [h["sft/epoch_loss"] for h in result.history]
    accuracy = [h["eval/test_accuracy"] for h in result.history]
    print("SFT loss per epoch", losses, "held-out accuracy", accuracy)
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert accuracy[-1] > accuracy[0] and max(accuracy[-3:]) >= 15.0, accuracy   # measured: 3.3 -> 21.7
    # One HF checkpoint per epoch, loadable as the RL stage's start; metrics on disk.
    assert [p.name for p in result.checkpoints] == [f"epoch-{e}" for e in range(1, 11)]
    assert all((p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file() for p in result.checkpoints)
    run_dir = tmp_path / "sft"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "sft" / "metrics.csv").is_file()
    records = [json.loads(line) for line in open(run_dir / "sft" / "metrics.jsonl")]
    assert sum("sft/loss" in r for r in records) == 10 * (480 // 32)
