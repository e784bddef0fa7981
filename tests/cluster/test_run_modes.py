"""The run modes wired into Ray, without GPUs.

(1) ``actor_options``, the ``.options(...)`` of every actor, is a pure function of the plan: its
GPU shares, bundle indices and strategies are checked for the three modes and several sizes.
(2) On a real local Ray, placement groups are created from the real plans and actors are placed
by them. Ray's GPUs are declared resources (``ray.init(num_gpus=N)``) that it counts and hands
out (``CUDA_VISIBLE_DEVICES``) without looking for hardware, so the GPU layouts are checked
here for real: which GPU each actor gets, which bundle it fills. What cannot be checked without
a GPU (vLLM's CUDA backend and its sleep mode, NCCL, DeepSpeed on CUDA) is not.
(3) The driver's refusals: a group that cannot be placed times out naming what is short. The
driver needs no GPU for rollout.sync = nccl: learner rank 0 is the sender.
"""
import time

import pytest
import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.placement import (
    actor_options,
    create_placement_group,
    place,
    plan_placement,
)
from experiments.cli import DEFAULT_CONFIG

# A handle only: ``actor_options`` puts it in the scheduling strategy and reads nothing from it.
HANDLE = PlacementGroup(PlacementGroupID.from_random())
LOCAL_GPU = ("cluster.mode=local-gpu", "rollout.num_actors=1", "rollout.gpu_memory_utilization=0.4")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cfg(*overrides):
    return load_config(RunConfig, DEFAULT_CONFIG, list(overrides))


def _bundle(options):
    strategy = options.get("scheduling_strategy")
    return None if strategy is None else strategy.placement_group_bundle_index


# ------------------------------------------------------------------------- (1) actor options


def test_cpu_mode_options_are_todays_resources_and_no_group():
    plan = plan_placement(_cfg("cluster.learner_cpus=1", "rollout.num_cpus_per_actor=0.5"))
    assert actor_options(plan, "learner", 0) == {"num_cpus": 1, "num_gpus": 0}
    assert actor_options(plan, "rollout", 0) == {"num_cpus": 0.5, "num_gpus": 0}
    assert actor_options(plan, "reward") == {"num_cpus": 0.25, "num_gpus": 0}


def test_local_gpu_options_share_bundle_zero():
    plan = plan_placement(_cfg(*LOCAL_GPU))
    learner, rollout = actor_options(plan, "learner", 0, HANDLE), actor_options(plan, "rollout", 0, HANDLE)
    assert learner["num_gpus"] == rollout["num_gpus"] == 0.5
    assert _bundle(learner) == _bundle(rollout) == 0
    assert learner["scheduling_strategy"].placement_group is HANDLE
    assert "scheduling_strategy" not in actor_options(plan, "reward", 0, HANDLE)   # no GPU: outside the group


@pytest.mark.parametrize("learners, engines, tp", [(1, 1, 1), (4, 2, 2), (8, 4, 1)])
def test_cluster_options_give_every_actor_its_own_bundle(learners, engines, tp):
    plan = plan_placement(_cfg("cluster.mode=cluster", f"cluster.num_learners={learners}",
                               f"rollout.num_actors={engines}", f"rollout.tensor_parallel_size={tp}"))
    ranks = [actor_options(plan, "learner", r, HANDLE) for r in range(learners)]
    samplers = [actor_options(plan, "rollout", i, HANDLE) for i in range(engines)]
    assert [_bundle(o) for o in ranks + samplers] == list(range(learners + engines))
    assert {o["num_gpus"] for o in ranks} == {1} and {o["num_gpus"] for o in samplers} == {tp}
    # Each actor asks for exactly what its bundle holds, or Ray would never schedule it there.
    for options in ranks + samplers:
        bundle = plan.bundles[_bundle(options)]
        assert (options["num_cpus"], options["num_gpus"]) == (bundle["CPU"], bundle["GPU"])


def test_actor_options_refuse_what_the_plan_does_not_hold():
    gpu_plan = plan_placement(_cfg("cluster.mode=cluster", "cluster.num_learners=2", "rollout.num_actors=1"))
    with pytest.raises(ValueError, match=r"learner 2: the plan has bundles for 2 learner actors"):
        actor_options(gpu_plan, "learner", 2, HANDLE)
    with pytest.raises(ValueError, match=r"cluster\.mode = cluster: the plan has 3 bundles but no placement group"):
        actor_options(gpu_plan, "rollout", 0)
    with pytest.raises(ValueError, match=r"cluster\.mode = cpu: the plan has 0 bundles but a placement group"):
        actor_options(plan_placement(_cfg()), "learner", 0, HANDLE)
    with pytest.raises(ValueError, match=r"role must be one of \['learner', 'reward', 'rollout'\]"):
        actor_options(gpu_plan, "critic", 0, HANDLE)


# ------------------------------------------------------------------------- (2) a real Ray


@pytest.fixture(scope="module")
def ray_gpus():
    """A local Ray with 4 declared GPUs (none on this machine: see the module docstring) and 8
    declared CPUs (the GPU plans reserve one per bundle; the observers here use none of them)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False,
             namespace="reft")
    yield
    ray.shutdown()


@ray.remote
class Where:
    """Reports what Ray gave the actor: the observer of these tests, standing in for no component."""

    def report(self):
        import os
        return {"gpus": ray.get_gpu_ids(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "group": ray.get_runtime_context().get_placement_group_id()}


def _free_in_bundle(group, index: int, resource: str, expect: float, timeout_s: float = 20.0) -> float:
    """What is left of ``resource`` in bundle ``index`` of ``group`` (Ray accounts bundles as
    ``{resource}_group_{index}_{group id}``; a key is absent once it is used up), read until it is
    ``expect`` or ``timeout_s`` passed: the GCS learns what the raylet handed out from its periodic
    resource reports, which lag by seconds on a loaded 2-core machine (CI)."""
    key = f"{resource}_group_{index}_{group.id.hex()}"
    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get(key, 0.0)) != expect and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def _kill(*actors):
    """Kill the observers and wait until Ray has freed what they held (their names among it)."""
    from ray._private import state
    for actor in actors:
        ray.kill(actor, no_restart=True)
    # ray.kill only asks the GCS: a call sent right after it may still be answered. Dead is what
    # the GCS's actor table says (the state API needs the dashboard, not started here).
    deadline = time.monotonic() + 60
    for actor in actors:
        while state.actors(actor_id=actor._actor_id.hex())["State"] != "DEAD":
            assert time.monotonic() < deadline, f"actor {actor} not dead 60 s after ray.kill"
            time.sleep(0.05)


def test_local_gpu_learner_and_engine_share_one_gpu(ray_gpus):
    placement = place(_cfg(*LOCAL_GPU))
    try:
        assert placement.plan.colocate and placement.group is not None
        learner = Where.options(**placement.options("learner", 0)).remote()
        engine = Where.options(**placement.options("rollout", 0)).remote()
        seen = ray.get([learner.report.remote(), engine.report.remote()], timeout=60)
        assert seen[0]["gpus"] == seen[1]["gpus"] and len(seen[0]["gpus"]) == 1   # the same GPU, half each
        assert {s["group"] for s in seen} == {placement.group.id.hex()}
        assert _free_in_bundle(placement.group, 0, "GPU", expect=0.0) == 0.0
        _kill(learner, engine)
    finally:
        placement.remove()
    deadline = time.monotonic() + 10   # Ray reports freed resources a moment later
    while ray.available_resources().get("GPU") != 4.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("GPU") == 4.0   # removing the group frees its GPUs


def test_cluster_mode_puts_each_rank_and_engine_on_its_own_gpu(ray_gpus):
    cfg = _cfg("cluster.mode=cluster", "cluster.num_learners=2", "rollout.num_actors=2")
    placement = place(cfg)
    try:
        assert placement.group is not None
        learner_1 = Where.options(**placement.options("learner", 1)).remote()
        ray.get(learner_1.report.remote(), timeout=60)
        # learner rank 1 fills bundle 1 and nothing else
        expected = [1.0, 0.0, 1.0, 1.0]
        assert [_free_in_bundle(placement.group, i, "GPU", expect=e) for i, e in enumerate(expected)] == expected
        others = [Where.options(**placement.options("learner", 0)).remote()] + [
            Where.options(**placement.options("rollout", i)).remote() for i in range(2)]
        seen = ray.get([a.report.remote() for a in [learner_1] + others], timeout=60)
        assert sorted(gpu for s in seen for gpu in s["gpus"]) == [0, 1, 2, 3]
        assert sorted(s["cuda_visible"] for s in seen) == ["0", "1", "2", "3"]
        _kill(learner_1, *others)
    finally:
        placement.remove()


@pytest.mark.slow
def test_the_real_learner_group_goes_into_its_bundle(ray_gpus, tmp_path):
    """``start_learners`` (the driver's call) with the local-gpu plan: rank 0 is the named actor
    ``learner-0`` holding half of bundle 0's GPU. It trains on CPU here (torch sees no CUDA)."""
    from cluster.sft import start_learners
    from learner.config import LearnerConfig
    from tests.learner.test_learner_engine import tiny_qwen2

    tiny_qwen2(tmp_path)
    placement = place(_cfg(*LOCAL_GPU))
    group = None
    try:
        group = start_learners(_cfg(*LOCAL_GPU), LearnerConfig(model=str(tmp_path)), placement)
        assert group.names == ["learner-0"] and ray.get_actor("learner-0", namespace="reft")
        assert _free_in_bundle(placement.group, 0, "GPU", expect=0.5) == 0.5   # the other half is the engine's
    finally:
        if group is not None:
            group.kill()
        placement.remove()


# ------------------------------------------------------------------------- (3) refusals


def test_a_group_that_cannot_be_placed_times_out_naming_what_is_short(ray_gpus):
    plan = plan_placement(_cfg("cluster.mode=cluster", "cluster.num_learners=4", "rollout.num_actors=4"))
    with pytest.raises(TimeoutError, match=r"not ready after 2 s \(cluster\.placement_timeout_s\): short of "
                                           r"GPU \(needs 8, 4 free\)\. Lower cluster\.num_learners"):
        create_placement_group(plan, timeout_s=2)
    # The pending group was removed, not left to grab the GPUs when they free up.
    states = {g["state"] for g in ray.util.placement_group_table().values()}
    assert states <= {"REMOVED"}


def test_place_checks_the_plan_against_the_cluster_first(ray_gpus):
    with pytest.raises(ConfigError, match=r"needs 8 GPUs .* the Ray cluster has 4"):
        place(_cfg("cluster.mode=cluster", "cluster.num_learners=4", "rollout.num_actors=4"))


def test_nccl_sync_needs_no_gpu_on_the_driver(ray_gpus):
    placement = place(_cfg(*LOCAL_GPU, "rollout.sync=nccl"))   # learner rank 0 sends, on its GPU
    try:
        assert placement.plan.weight_sync == "nccl"
    finally:
        placement.remove()


def test_cpu_mode_places_without_a_group(ray_gpus):
    placement = place(_cfg())
    assert placement.group is None
    assert placement.options("learner", 0) == {"num_cpus": 1, "num_gpus": 0}
    placement.remove()   # nothing to free: a no-op
