"""Placement plans of the three run modes, checked without GPUs."""
import pytest

from cluster.cli import DEFAULT_CONFIG
from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.placement import plan_placement


def _cfg(*overrides):
    return load_config(RunConfig, DEFAULT_CONFIG, list(overrides))


def test_cpu_mode_has_no_group_and_fits_two_cores():
    plan = plan_placement(_cfg("cluster.learner_cpus=1", "rollout.num_cpus_per_actor=0.5"), {"CPU": 2.0})
    assert plan.bundles == () and not plan.colocate
    assert plan.learner_resources == {"CPU": 1} and plan.rollout_resources == {"CPU": 0.5}


def test_cpu_mode_that_would_wait_forever_is_refused():
    with pytest.raises(ConfigError, match=r"reserve 4\.75 CPUs but the Ray cluster has 2"):
        plan_placement(_cfg("cluster.num_learners=2", "cluster.learner_cpus=2", "rollout.num_cpus_per_actor=0.5"),
                       {"CPU": 2.0})


def test_local_gpu_colocates_on_one_bundle():
    plan = plan_placement(_cfg("cluster.mode=local-gpu", "rollout.gpu_memory_utilization=0.4"), {"CPU": 8, "GPU": 1})
    assert plan.bundles == ({"CPU": 2, "GPU": 1},) and plan.colocate
    assert plan.learner_resources["GPU"] + plan.rollout_resources["GPU"] == 1.0
    with pytest.raises(ConfigError, match=r"rollout\.gpu_memory_utilization <= 0\.6"):
        plan_placement(_cfg("cluster.mode=local-gpu"))
    with pytest.raises(ConfigError, match=r"cluster\.num_learners=1 \(got 2\)"):
        plan_placement(_cfg("cluster.mode=local-gpu", "cluster.num_learners=2"))


def test_cluster_mode_one_bundle_per_rank_and_engine():
    cfg = _cfg("cluster.mode=cluster", "cluster.num_learners=4", "rollout.num_actors=2", "rollout.tensor_parallel_size=2")
    plan = plan_placement(cfg, {"CPU": 64, "GPU": 8})
    assert plan.bundles == tuple([{"CPU": 1, "GPU": 1}] * 4 + [{"CPU": 1, "GPU": 2}] * 2)
    assert plan.learner_bundles == (0, 1, 2, 3) and plan.rollout_bundles == (4, 5)
    assert "placement group (PACK)" in plan.describe()
    with pytest.raises(ConfigError, match=r"needs 8 GPUs .* the Ray cluster has 4"):
        plan_placement(cfg, {"CPU": 64, "GPU": 4})
