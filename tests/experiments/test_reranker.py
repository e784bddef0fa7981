"""``reft train-reranker``'s data rules: which warm-up's samples a reranker trains on, and their
per-question de-duplication. (The model: tests/learner/test_reranker.py; training on the learner
group: tests/cluster/test_reranker.py; the command end to end: test_eval.py.)"""
import dataclasses
import json

import pytest

from cluster.config import RunConfig
from cluster.config_io import ConfigError
from experiments.reranker import distinct, find_warmup, read_samples


def test_distinct_keeps_first_occurrences_and_counts():
    assert distinct(["a", "b", "a", "c", "b", "a"]) == [(0, 3), (1, 2), (3, 1)]
    assert distinct(["x ", "x"]) == [(0, 1), (1, 1)]      # exact text, as the paper's code
    assert distinct([]) == []


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_find_warmup_from_the_run_layout_and_config(tmp_path):
    run = tmp_path / "run"
    _model_dir(run / "sft" / "epoch-1"), _model_dir(run / "sft" / "epoch-2")
    (run / "config.yaml").write_text("name: run\n")
    policy = _model_dir(run / "checkpoints" / "step-4" / "policy")
    baseline = _model_dir(run / "rl" / "epoch-3")
    continued = _model_dir(run / "sft-continued" / "epoch-5")
    cfg = RunConfig()

    # an SFT warm-up epoch is its own warm-up
    assert find_warmup(run / "sft" / "epoch-1", cfg)[0] == run / "sft" / "epoch-1"
    # RL policies and SFT baselines of a run that warmed up itself: its last warm-up epoch
    for model in (policy, baseline, continued):
        assert find_warmup(model, cfg)[0] == (run / "sft" / "epoch-2").resolve()
    # a run started from a given warm-up (rl.warmup_checkpoint) names it
    other = _model_dir(tmp_path / "elsewhere" / "sft" / "epoch-2")
    given = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, warmup_checkpoint=str(other)))
    assert find_warmup(policy, given) == (other, "rl.warmup_checkpoint of its run config")
    gone = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, warmup_checkpoint=str(tmp_path / "gone")))
    with pytest.raises(ConfigError, match="--samples-from"):
        find_warmup(policy, gone)
    # a model outside any run
    with pytest.raises(ConfigError, match="--samples-from"):
        find_warmup(_model_dir(tmp_path / "hub" / "model"), cfg)


def test_a_truncated_cache_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"distinct": 2}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"question": 0, "completion": "x", "correct": True}) + "\n")
    with pytest.raises(ValueError, match="delete the directory"):
        read_samples(tmp_path)
