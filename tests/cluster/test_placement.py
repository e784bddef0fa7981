"""Placement plans of the three run modes, checked without GPUs."""
import pytest

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.placement import plan_placement
from experiments.cli import DEFAULT_CONFIG


LOCAL_GPU = ("cluster.mode=local-gpu", "rollout.num_actors=1")   # the embedded default runs two CPU engines


def _cfg(*overrides):
    return load_config(RunConfig, DEFAULT_CONFIG, list(overrides))


def test_cpu_mode_has_no_group_and_fits_two_cores():
    plan = plan_placement(_cfg(), {"CPU": 2.0})   # the embedded default: two engines beside the learner
    assert plan.bundles == () and not plan.colocate
    assert plan.learner_resources == {"CPU": 1} and plan.rollout_resources == {"CPU": 0.25}
    plan = plan_placement(_cfg("rollout.num_actors=1", "rollout.num_cpus_per_actor=0.5"), {"CPU": 2.0})
    assert plan.rollout_resources == {"CPU": 0.5}
    with pytest.raises(ConfigError, match=r"reserve 2\.25 CPUs but the Ray cluster has 2"):
        plan_placement(_cfg("rollout.num_cpus_per_actor=0.5"), {"CPU": 2.0})


def test_cpu_mode_that_would_wait_forever_is_refused():
    with pytest.raises(ConfigError, match=r"reserve 4\.75 CPUs but the Ray cluster has 2"):
        plan_placement(_cfg("cluster.num_learners=2", "cluster.learner_cpus=2", "rollout.num_actors=1",
                            "rollout.num_cpus_per_actor=0.5"),
                       {"CPU": 2.0})


def test_local_gpu_colocates_on_one_bundle():
    plan = plan_placement(_cfg(*LOCAL_GPU, "rollout.gpu_memory_utilization=0.4"), {"CPU": 8, "GPU": 1})
    assert plan.bundles == ({"CPU": 2, "GPU": 1},) and plan.colocate
    assert plan.learner_resources["GPU"] + plan.rollout_resources["GPU"] == 1.0
    with pytest.raises(ConfigError, match=r"rollout\.gpu_memory_utilization <= 0\.6"):
        plan_placement(_cfg(*LOCAL_GPU))
    with pytest.raises(ConfigError, match=r"cluster\.num_learners=1 \(got 2\)"):
        plan_placement(_cfg(*LOCAL_GPU, "cluster.num_learners=2"))


def test_cluster_mode_one_bundle_per_rank_and_engine():
    cfg = _cfg("cluster.mode=cluster", "cluster.num_learners=4", "rollout.num_actors=2", "rollout.tensor_parallel_size=2")
    plan = plan_placement(cfg, {"CPU": 64, "GPU": 8})
    assert plan.bundles == tuple([{"CPU": 1, "GPU": 1}] * 4 + [{"CPU": 1, "GPU": 2}] * 2)
    assert plan.learner_bundles == (0, 1, 2, 3) and plan.rollout_bundles == (4, 5)
    assert "placement group (PACK)" in plan.describe()
    with pytest.raises(ConfigError, match=r"needs 8 GPUs .* the Ray cluster has 4"):
        plan_placement(cfg, {"CPU": 64, "GPU": 4})


@pytest.mark.parametrize("learners, engines, tp", [(1, 1, 1), (2, 1, 1), (4, 2, 2), (8, 4, 1)])
def test_cluster_plans_of_several_sizes_fit_exactly_their_gpus(learners, engines, tp):
    cfg = _cfg("cluster.mode=cluster", f"cluster.num_learners={learners}", f"rollout.num_actors={engines}",
               f"rollout.tensor_parallel_size={tp}", "sft.batch_size=48", "rl.questions_per_step=32")
    gpus = learners + engines * tp
    plan = plan_placement(cfg, {"CPU": 64, "GPU": gpus})
    assert len(plan.bundles) == learners + engines and sum(b["GPU"] for b in plan.bundles) == gpus
    assert plan.learner_bundles == tuple(range(learners))
    assert plan.rollout_bundles == tuple(range(learners, learners + engines))
    assert plan.rollout_resources == {"CPU": 1, "GPU": tp} and not plan.colocate
    with pytest.raises(ConfigError, match=rf"needs {gpus} GPUs \(cluster\.num_learners={learners}, "
                                          rf"rollout\.num_actors={engines}, rollout\.tensor_parallel_size={tp}\)"):
        plan_placement(cfg, {"CPU": 64, "GPU": gpus - 1})


def test_local_gpu_refuses_what_one_gpu_cannot_do():
    for override, key in (("rollout.num_actors=2", r"rollout\.num_actors=1 \(got 2\)"),
                          ("rollout.tensor_parallel_size=2", r"rollout\.tensor_parallel_size=1 \(got 2\)"),
                          ("rl.max_staleness=1", r"rl\.max_staleness=0 \(got 1\)")):
        with pytest.raises(ConfigError, match=key):
            plan_placement(_cfg(*LOCAL_GPU, "rollout.gpu_memory_utilization=0.4", override))
    with pytest.raises(ConfigError, match=r"needs 1 GPUs .* the Ray cluster has 0"):
        plan_placement(_cfg(*LOCAL_GPU, "rollout.gpu_memory_utilization=0.4"), {"CPU": 8})


@pytest.mark.parametrize("mode, transport", [("cpu", "shm"), ("local-gpu", "shm"), ("cluster", "object_store")])
def test_weight_sync_auto_follows_the_mode(mode, transport):
    cfg = _cfg(f"cluster.mode={mode}", "rollout.num_actors=1", "rollout.gpu_memory_utilization=0.4")
    assert cfg.rollout.sync == "auto"   # reft train's default: the run mode picks
    plan = plan_placement(cfg)
    assert plan.weight_sync == transport and plan.rollout_config(cfg.rollout).sync == transport
    assert f"weight sync: {transport}" in plan.describe()


def test_weight_sync_choices_the_mode_cannot_run_are_refused():
    with pytest.raises(ConfigError, match=r"rollout\.sync = nccl needs GPUs and cluster\.mode = cpu"):
        plan_placement(_cfg("rollout.sync=nccl"))
    with pytest.raises(ConfigError, match=r"rollout\.sync = shm .* cluster\.mode = cluster .*\(object_store\)"):
        plan_placement(_cfg("cluster.mode=cluster", "rollout.sync=shm"))
    # A named transport the mode can run is kept as given.
    assert plan_placement(_cfg("cluster.mode=cluster", "rollout.sync=gloo")).weight_sync == "gloo"
    assert plan_placement(_cfg("cluster.mode=cluster", "rollout.sync=nccl")).weight_sync == "nccl"


def test_auto_is_not_a_transport_outside_a_run():
    from actors.config import RolloutConfig
    from actors.weight_sync import make_weight_sync
    with pytest.raises(ValueError, match=r"rollout\.sync = 'auto' is the run mode's to resolve"):
        make_weight_sync(RolloutConfig(model="m", sync="auto"))


@pytest.mark.parametrize("mode, sleeps", [("cpu", False), ("local-gpu", True), ("cluster", False)])
def test_vllm_sleeps_exactly_when_colocated(mode, sleeps):
    cfg = _cfg(f"cluster.mode={mode}", "rollout.num_actors=1", "rollout.gpu_memory_utilization=0.4")
    plan = plan_placement(cfg)
    assert plan.sleep_mode == plan.colocate == sleeps
    assert plan.rollout_config(cfg.rollout).enable_sleep_mode is sleeps


def test_sleep_mode_settings():
    with pytest.raises(ConfigError, match=r"rollout\.enable_sleep_mode = true needs a GPU"):
        plan_placement(_cfg("rollout.enable_sleep_mode=true"))
    # Colocated without sleeping is allowed (vLLM then keeps its share of the GPU throughout).
    plan = plan_placement(_cfg(*LOCAL_GPU, "rollout.gpu_memory_utilization=0.4",
                               "rollout.enable_sleep_mode=false"))
    assert plan.colocate and not plan.sleep_mode
    # The engine's own guard: never on CPU, whatever the config says (vLLM has no CPU sleep mode).
    from actors.config import RolloutConfig
    for wanted in (None, False, True):
        assert RolloutConfig(model="m", enable_sleep_mode=wanted).resolved_sleep_mode(on_gpu=False) is False
    assert RolloutConfig(model="m", enable_sleep_mode=True).resolved_sleep_mode(on_gpu=True) is True
    assert RolloutConfig(model="m").resolved_sleep_mode(on_gpu=True) is False   # a fleet on its own


def test_probe_every_keeps_the_first_version_and_every_nth():
    from actors.config import RolloutConfig
    cfg = RolloutConfig(model="m", probe_every=10)
    assert [v for v in range(1, 32) if cfg.probes(v)] == [1, 11, 21, 31]
    assert all(RolloutConfig(model="m", probe_every=1).probes(v) for v in range(1, 5))
    assert not any(RolloutConfig(model="m", verify="checksum").probes(v) for v in range(1, 5))
    with pytest.raises(ValueError, match="rollout.probe_every"):
        RolloutConfig(model="m", probe_every=0)


def test_engine_threads_share_the_cores_among_the_engines_on_cpu(monkeypatch):
    from actors.config import RolloutConfig
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert RolloutConfig(model="m").resolved_num_threads(on_gpu=False) == 4      # not Ray's OMP_NUM_THREADS=1
    assert RolloutConfig(model="m", num_actors=2).resolved_num_threads(on_gpu=False) == 2
    assert RolloutConfig(model="m", num_actors=8).resolved_num_threads(on_gpu=False) == 1
    assert RolloutConfig(model="m").resolved_num_threads(on_gpu=True) is None    # vLLM's choice
    assert RolloutConfig(model="m", num_threads=3).resolved_num_threads(on_gpu=True) == 3
    with pytest.raises(ValueError, match="rollout.num_threads"):
        RolloutConfig(model="m", num_threads=0)
