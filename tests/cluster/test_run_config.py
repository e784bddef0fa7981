"""The run config: every shipped YAML loads and validates; bad keys and arithmetic name the key."""
from pathlib import Path

import pytest

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from experiments.cli import DEFAULT_CONFIG, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    load_config(RunConfig, path).validate()


def test_default_config_is_the_tiny_run():
    cfg = load_config(RunConfig, DEFAULT_CONFIG)
    assert (cfg.name, cfg.data.dataset, cfg.learner.model, cfg.cluster.mode) == ("tiny", "synthetic", "tiny", "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["learner.zero_stage=4"], r"learner\.zero_stage must be 0\.\.3, got 4"),
    (["learner.dtype=fp16"], r"learner\.dtype must be one of \['fp32', 'bf16'\]"),
    (["learner.lr=-1"], r"learner\.lr must be > 0"),
    (["learner.zero_stag=2"], r"unknown key\(s\) learner\.zero_stag at learner; valid keys: .*zero_stage"),
    (["sft.epochs=0"], r"sft\.epochs must be >= 1"),
    (["cluster.mode=gpu"], r"cluster\.mode must be one of \['cpu', 'local-gpu', 'cluster'\]"),
    (["data.cot_kind=xcot"], r"data\.cot_kind must be ncot or pcot"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, DEFAULT_CONFIG, overrides)


def test_batch_arithmetic_is_checked_before_any_actor_starts():
    cfg = load_config(RunConfig, DEFAULT_CONFIG, ["sft.batch_size=30", "cluster.num_learners=4"])
    with pytest.raises(ConfigError, match=r"batch_size=30 must be divisible by world_size \(4\)"):
        cfg.validate()
    cfg = load_config(RunConfig, DEFAULT_CONFIG, ["data.dataset=gsm8k"])
    with pytest.raises(ConfigError, match="learner.model = tiny"):
        cfg.validate()


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["sft", "learner.zero_stage=7"]) == 2
    err = capsys.readouterr().err
    assert "learner.zero_stage must be 0..3, got 7" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, message", [
    (["rl.temperature=0"], r"rl\.temperature must be > 0"),
    (["rl.top_p=1.5"], r"rl\.top_p in \(0, 1\]"),
    (["rl.max_staleness=2"], r"rl\.max_staleness must be 0 or 1"),
    (["rollout.kv_cache_gib=0"], r"rollout\.kv_cache_gib"),
])
def test_rl_and_rollout_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, DEFAULT_CONFIG, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["rl.algorithm=ppo2"], r"rl\.algorithm = 'ppo2': unknown; valid names: \['grpo', 'offline_st', 'online_st', "
                            r"'reft', 'rloo', 'sft'\]"),
    (["rl.algorithm=grpo"], r"rl\.samples_per_question must be >= 2 for rl\.algorithm=grpo"),
    (["rl.top_p=0.9"], r"rl\.top_p = 0\.9: the learner scores the untruncated softmax"),
])
def test_recipes_check_their_keys(overrides, message):
    from cluster.recipes import check_config
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(RunConfig, DEFAULT_CONFIG, overrides))


def test_paper_kl_coefficients_by_cot_kind():
    from cluster.recipes import get_recipe
    reft = get_recipe("reft")
    for kind, beta in (("ncot", 0.05), ("pcot", 0.01)):
        assert reft.kl_coef(load_config(RunConfig, DEFAULT_CONFIG, [f"data.cot_kind={kind}"])) == beta
    assert reft.kl_coef(load_config(RunConfig, DEFAULT_CONFIG, ["rl.kl_coef=0.2", "data.cot_kind=pcot"])) == 0.2


@pytest.mark.parametrize("overrides, message", [
    (["cluster.mode=local-gpu"], "rollout.num_actors=1 (got 2)"),   # the embedded default runs two CPU engines
    (["cluster.mode=local-gpu", "rollout.num_actors=1"], "rollout.gpu_memory_utilization <= 0.6"),
    (["rollout.sync=nccl"], "rollout.sync = nccl needs GPUs and cluster.mode = cpu has none"),
])
def test_train_refuses_what_the_driver_does_not_do_yet(capsys, overrides, message):
    # These fail before Ray or any actor starts.
    assert main(["train", *overrides]) == 2
    assert message in capsys.readouterr().err
