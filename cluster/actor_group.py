"""A group of Ray actors that form one torch.distributed world: one generic class for every
role that runs data-parallel ranks (the DeepSpeed learner first), after OpenRLHF's
``RayActorGroup``.

The actor class is a plain class (``learner.worker.LearnerWorker``) following this protocol:

    __init__(rank, world_size, master_addr, master_port, cfg)   cheap; rank 0 gets None, None
                                                                and picks the rendezvous itself
    get_master_addr_port() -> (str, int)                        rank 0's choice
    setup()                                                     joins the process group (collective)

Start-up: rank 0 first; it is asked for its node's IP and a free port; ranks 1..M-1 are started
with that rendezvous; then ``setup`` runs on all ranks at once. Rank r gets the Ray resources and
scheduling ``options(r)`` says: in a run, the placement plan's (``cluster.placement``: in the GPU
modes its GPU share and its placement-group bundle), else ``num_cpus_per_actor`` CPUs wherever
Ray finds room. Actors are named ``{name_prefix}-{rank}`` in namespace ``reft`` so that the Ray
dashboard and ``ray.get_actor`` find them.

Calls: ``async_run`` / ``async_run_sharded`` return one ObjectRef per rank (the caller waits);
``run`` / ``run_sharded`` wait for all of them with a timeout, raise as soon as one rank fails,
and name the actor in the error. After a failure the world is broken (the other ranks may be
stuck in a collective): ``kill`` the group and start a new one.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import ray
import torch
from torch import Tensor

from actors.config import RAY_NAMESPACE

Method = Union[str, Callable]  # "ppo_update" or LearnerWorker.ppo_update


def shard(batch: dict[str, Tensor], world_size: int) -> list[dict[str, Tensor]]:
    """Split a batch (dict of tensors with rows first) into ``world_size`` interleaved shards:
    rank r gets rows r, r + W, r + 2W, ...

    Interleaving, not contiguous blocks, keeps mini-batches intact: rank r's k-th contiguous
    mini-batch holds global rows {jW + r : j in mini-batch k of the shard}, and over all ranks that
    is exactly the k-th contiguous mini-batch of the whole batch, so an update with several
    mini-batches sees the same sequences in each step whatever the number of ranks.

    Raises:
        ValueError: if the row count is not divisible by ``world_size`` (ranks must get equal
            shards: see ``LearnerConfig.validate``) or the tensors disagree on it.
    """
    rows = {key: value.shape[0] for key, value in batch.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"batch tensors disagree on the number of rows: {rows}")
    (num_rows,) = set(rows.values())
    if num_rows % world_size:
        raise ValueError(f"a batch of {num_rows} rows does not split into {world_size} equal shards")
    return [{key: value[r::world_size].contiguous() for key, value in batch.items()} for r in range(world_size)]


def unshard(parts: Sequence[Any]) -> Any:
    """Inverse of ``shard`` for per-rank results: tensors with rows first, or NamedTuples of them.
    Row j of rank r goes back to row j * W + r."""
    first = parts[0]
    if first is None:   # an optional field every rank left out (Scores.ref_logprobs without a reference)
        return None
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(unshard([p[i] for p in parts]) for i in range(len(first))))
    stacked = torch.stack(list(parts), dim=1)  # (B/W, W, ...): [j, r] = global row j * W + r
    return stacked.reshape(-1, *stacked.shape[2:])


class ActorGroup:
    """``num_ranks`` actors of ``actor_cls`` forming one distributed world (module docstring)."""

    def __init__(
        self,
        actor_cls: type,
        num_ranks: int,
        cfg: Any,
        options: Optional[Callable[[int], dict]] = None,
        num_cpus_per_actor: float = 0.5,
        name_prefix: str = "learner",
        namespace: str = RAY_NAMESPACE,
        timeout_s: float = 600.0,
    ):
        """
        Args:
            options: rank -> the ``.options(...)`` of its actor besides name and namespace:
                ``num_cpus``, ``num_gpus``, ``scheduling_strategy`` (a placement-group bundle), as
                ``cluster.placement.Placement.options("learner", rank)`` gives them. None = only
                ``num_cpus_per_actor``.
            num_cpus_per_actor: Ray CPUs reserved per rank without ``options``. Fractional by
                default: on a 2-CPU node two actors with num_cpus=1 fill it and the next actor (a
                rollout, a reward) waits forever without an error (docs/measurements.md §2). This is a
                scheduling share only; Ray sets OMP_NUM_THREADS=1 for fractional actors.
            timeout_s: how long ``run``/``run_sharded``/start-up wait for all ranks.
        """
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self.actor_cls = actor_cls
        self.num_ranks = num_ranks
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.names = [f"{name_prefix}-{rank}" for rank in range(num_ranks)]
        remote_cls = ray.remote(actor_cls)

        def start(rank: int, addr: Optional[str], port: Optional[int]):
            rank_options = options(rank) if options is not None else {"num_cpus": num_cpus_per_actor}
            return remote_cls.options(name=self.names[rank], namespace=namespace, **rank_options).remote(
                rank, num_ranks, addr, port, cfg)

        self.actors = []
        try:
            self.actors.append(start(0, None, None))
            ((addr, port),) = self._wait(
                [self.actors[0].get_master_addr_port.remote()], "get_master_addr_port", self.names[:1]
            )
            self.actors += [start(rank, addr, port) for rank in range(1, num_ranks)]
            self.master_addr, self.master_port = addr, port
            self.setup_seconds = self.run("setup")  # per rank; includes waiting for the others
        except BaseException:
            self.kill()  # free the names, or the next group could not start
            raise

    # ------------------------------------------------------------------ calls

    def async_run(self, method: Method, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call ``method`` on every rank with the same arguments (each put in the object store
        once, not once per rank); one ObjectRef per rank."""
        name = self._method_name(method)
        args, kwargs = [_put(a) for a in args], {k: _put(v) for k, v in kwargs.items()}
        return [getattr(actor, name).remote(*args, **kwargs) for actor in self.actors]

    def async_run_sharded(self, method: Method, batch: dict[str, Tensor], *args, **kwargs) -> list[ray.ObjectRef]:
        """Call ``method(shard_r, *args, **kwargs)`` on rank r: the batch is sliced (``shard``)
        BEFORE it is put in the object store, so each rank receives only its own rows."""
        name = self._method_name(method)
        shards = shard(batch, self.num_ranks)
        args, kwargs = [_put(a) for a in args], {k: _put(v) for k, v in kwargs.items()}
        return [
            getattr(actor, name).remote(ray.put(part), *args, **kwargs) for actor, part in zip(self.actors, shards)
        ]

    def run(self, method: Method, *args, **kwargs) -> list[Any]:
        """``async_run`` and wait: the per-rank results, in rank order."""
        return self._wait(self.async_run(method, *args, **kwargs), self._method_name(method), self.names)

    def run_sharded(self, method: Method, batch: dict[str, Tensor], *args, **kwargs) -> list[Any]:
        """``async_run_sharded`` and wait: the per-rank results, in rank order (``unshard`` puts
        per-row results back in the batch's order)."""
        refs = self.async_run_sharded(method, batch, *args, **kwargs)
        return self._wait(refs, self._method_name(method), self.names)

    def kill(self, timeout_s: float = 30.0) -> None:
        """Kill every rank and wait until their names are free again (a new group with the same
        names can then start at once)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + timeout_s
        for name in self.names:
            while _actor_exists(name, self.namespace):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"actor {self.namespace}/{name} still registered {timeout_s} s after ray.kill"
                    )
                time.sleep(0.1)
        self.actors = []

    # ------------------------------------------------------------------ helpers

    def _method_name(self, method: Method) -> str:
        name = method if isinstance(method, str) else method.__name__
        if not callable(getattr(self.actor_cls, name, None)):
            raise AttributeError(f"{self.actor_cls.__name__} has no method {name!r}")
        return name

    def _wait(self, refs: list[ray.ObjectRef], what: str, names: list[str]) -> list[Any]:
        """Results of ``refs`` (one per actor in ``names``), in order. Raises as soon as one fails
        (RuntimeError naming the actor, from Ray's error), or TimeoutError naming the ranks still
        pending after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        pending = dict(zip(refs, names))
        results = {}
        while pending:
            remaining = deadline - time.monotonic()
            ready = ray.wait(list(pending), num_returns=1, timeout=max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                raise TimeoutError(
                    f"{what}: {', '.join(sorted(pending.values()))} (namespace {self.namespace}) did not "
                    f"answer within {self.timeout_s:.0f} s"
                )
            for ref in ready:
                name = pending.pop(ref)
                try:
                    results[ref] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except ray.exceptions.RayError as err:
                    raise RuntimeError(f"{self.namespace}/{name}.{what} failed: {err}") from err
        return [results[ref] for ref in refs]


def _put(value: Any) -> ray.ObjectRef:
    """Into the object store once (Ray hands a top-level ObjectRef argument over as its value)."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def _actor_exists(name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True
