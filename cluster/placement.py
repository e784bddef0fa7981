"""Where the actors go, for each run mode. A pure function of the config and the cluster's
resources, so that the GPU layouts are checked (and printed by ``reft train --dry-run``) on
machines without GPUs.

    cpu        one node, no GPU. No placement group: learners reserve ``cluster.learner_cpus``
               each, rollout actors a fraction of a CPU (vLLM's CPU backend uses the node's cores
               whatever Ray reserves; two whole-CPU actors would fill a 2-core node and the next
               would wait forever, DESIGN §6).
    local-gpu  one GPU shared by everything: one bundle {GPU: 1}; the learner (rank 0 only) and
               the rollout engine each take half of it. vLLM keeps to
               ``rollout.gpu_memory_utilization`` and sleeps (frees its KV cache) while the learner
               trains, then wakes up for the next generation phase.
    cluster    multi-node: one bundle per learner rank {GPU: 1} and one per rollout engine
               {GPU: tensor_parallel_size}, in one placement group with the PACK strategy (Ray
               fills nodes before spilling to the next; NCCL prefers ranks on one node).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from cluster.config import RunConfig
from cluster.config_io import ConfigError

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

    def describe(self) -> str:
        lines = [f"mode: {self.mode}" + (" (learner and rollout colocated: vLLM sleeps while the learner trains)"
                                         if self.colocate else "")]
        if self.bundles:
            lines.append(f"placement group ({self.strategy}): " + ", ".join(
                f"#{i} {b}" for i, b in enumerate(self.bundles)))
        for role, idx, res in (("learner", self.learner_bundles, self.learner_resources),
                               ("rollout", self.rollout_bundles, self.rollout_resources)):
            where = f" in bundles {list(idx)}" if idx else ""
            lines.append(f"{role}: {res}{where}")
        lines.append(f"reward: {self.reward_resources}")
        return "\n".join(lines)


def plan_placement(cfg: RunConfig, cluster_resources: Optional[dict] = None) -> PlacementPlan:
    """The plan for ``cfg.cluster.mode``; with ``cluster_resources`` (``ray.cluster_resources()``)
    it also checks that the plan fits, raising ConfigError that names the keys to change."""
    c, r = cfg.cluster, cfg.rollout
    n_learn, n_roll = c.num_learners, r.num_actors
    reward = {"CPU": REWARD_CPUS}
    if c.mode == "cpu":
        plan = PlacementPlan("cpu", (), None, (), (), {"CPU": c.learner_cpus}, {"CPU": r.num_cpus_per_actor},
                             reward, colocate=False)
        need_gpu = 0.0
    elif c.mode == "local-gpu":
        if n_learn != 1 or n_roll != 1 or r.tensor_parallel_size != 1:
            raise ConfigError("cluster.mode = local-gpu runs one learner and one engine on one GPU: set "
                              f"cluster.num_learners=1 (got {n_learn}), rollout.num_actors=1 (got {n_roll}), "
                              f"rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size})")
        if r.gpu_memory_utilization > 0.6:
            raise ConfigError(f"cluster.mode = local-gpu shares the GPU with the learner: set "
                              f"rollout.gpu_memory_utilization <= 0.6 (got {r.gpu_memory_utilization})")
        plan = PlacementPlan("local-gpu", ({"CPU": 2, "GPU": 1},), "STRICT_PACK", (0,), (0,),
                             {"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.5}, reward, colocate=True)
        need_gpu = 1.0
    else:
        tp = r.tensor_parallel_size
        bundles = tuple([{"CPU": 1, "GPU": 1}] * n_learn + [{"CPU": 1, "GPU": tp}] * n_roll)
        plan = PlacementPlan("cluster", bundles, "PACK", tuple(range(n_learn)),
                             tuple(range(n_learn, n_learn + n_roll)), {"CPU": 1, "GPU": 1},
                             {"CPU": 1, "GPU": tp}, reward, colocate=False)
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
