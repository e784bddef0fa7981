"""A group of Ray actors that form one torch.distributed world: one generic class for every
role that runs data-parallel ranks (the DeepSpeed learner first), after OpenRLHF's
``RayActorGroup``.

The actor class is a plain class (``learner.worker.LearnerWorker``) following this protocol:

    __init__(rank, world_size, master_addr, master_port, cfg)   cheap; rank 0 gets None, None
                                                                and picks the rendezvous itself
    get_master_addr_port() -> (str, int)                        rank 0's choice
    node() -> {"node_id", "ip", "pid"}                          where the rank runs (``actors.naming.where``)
    setup()                                                     joins the process group (collective)

Start-up: rank 0 first; it is asked for its node's IP and a free port; ranks 1..M-1 are started
with that rendezvous; each says where it runs; then ``setup`` runs on all ranks at once. (A
name still held, by the ranks of a run that just crashed, is waited for first.) Rank r gets the
Ray resources and scheduling ``options(r)`` says: in a run, the placement plan's (``cluster.placement``: in the GPU
modes its GPU share and its placement-group bundle), else ``num_cpus_per_actor`` CPUs wherever
Ray finds room. Actors are named ``{name_prefix}-{rank}`` in namespace ``reft`` so that the Ray
dashboard and ``ray.get_actor`` find them.

Calls: ``async_run`` / ``async_run_sharded`` return one ObjectRef per rank (the caller waits);
``run`` / ``run_sharded`` wait for all of them with a timeout, raise as soon as one rank fails
(``RankFailure``, naming the rank, its node and IP), or when ``timeout_s`` passes without every
answer (TimeoutError naming the ranks still pending and their nodes: hung, or stuck in a
collective with a dead peer until ``learner.collective_timeout_s``). After a failure the world
is broken (the other ranks may be stuck in a collective): ``kill`` the group and start a new one.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import ray
import torch
from torch import Tensor

from actors.config import RAY_NAMESPACE
from actors.naming import describe_node, wait_name_free

Method = Union[str, Callable]  # "ppo_update" or LearnerWorker.ppo_update


class RankFailure(RuntimeError):
    """A rank's call failed (its actor died, or the method raised): the message names the rank,
    its node and IP, and what to do. ``rank`` and ``node`` (``actors.naming.where``) say which."""

    def __init__(self, message: str, rank: int, node: Optional[dict]):
        super().__init__(message)
        self.rank, self.node = rank, node

    def __reduce__(self):
        return type(self), (str(self), self.rank, self.node)


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
        self.nodes: list[Optional[dict]] = [None] * num_ranks   # where each rank runs (``node()``)
        remote_cls = ray.remote(actor_cls)

        def start(rank: int, addr: Optional[str], port: Optional[int]):
            rank_options = options(rank) if options is not None else {"num_cpus": num_cpus_per_actor}
            return remote_cls.options(name=self.names[rank], namespace=namespace, **rank_options).remote(
                rank, num_ranks, addr, port, cfg)

        self.actors = []
        try:
            for name in self.names:
                wait_name_free(name, namespace, timeout_s)
            self.actors.append(start(0, None, None))
            ((addr, port),) = self._wait(
                [self.actors[0].get_master_addr_port.remote()], "get_master_addr_port", self.names[:1]
            )
            self.actors += [start(rank, addr, port) for rank in range(1, num_ranks)]
            self.master_addr, self.master_port = addr, port
            self.nodes = self.run("node")
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

    def run_rank(self, rank: int, method: Method, *args, **kwargs) -> Any:
        """Call ``method`` on rank ``rank`` alone and wait (what only one rank holds, e.g. rank 0's
        weight publisher; a call the other ranks would join as a collective would hang)."""
        name = self._method_name(method)
        ref = getattr(self.actors[rank], name).remote(*args, **kwargs)
        return self._wait([ref], name, self.names[rank:rank + 1])[0]

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
            wait_name_free(name, self.namespace, max(0.0, deadline - time.monotonic()))
        self.actors = []

    # ------------------------------------------------------------------ helpers

    def _method_name(self, method: Method) -> str:
        name = method if isinstance(method, str) else method.__name__
        if not callable(getattr(self.actor_cls, name, None)):
            raise AttributeError(f"{self.actor_cls.__name__} has no method {name!r}")
        return name

    def _wait(self, refs: list[ray.ObjectRef], what: str, names: list[str]) -> list[Any]:
        """Results of ``refs`` (one per actor in ``names``), in order. Raises as soon as one fails
        (``RankFailure`` naming the rank and its node, with Ray's error), or TimeoutError naming
        the ranks still pending after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        pending = dict(zip(refs, names))
        results = {}
        while pending:
            remaining = deadline - time.monotonic()
            ready = ray.wait(list(pending), num_returns=1, timeout=max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                raise TimeoutError(
                    f"{what}: {'; '.join(self._describe(n) for n in sorted(pending.values()))} did not answer "
                    f"within {self.timeout_s:.0f} s (hung, or waiting in a collective for a rank that is; "
                    "cluster.call_timeout_s): kill the group and start a new one (a run: from its last checkpoint)"
                )
            for ref in ready:
                name = pending.pop(ref)
                try:
                    results[ref] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except ray.exceptions.RayError as err:
                    rank = self.names.index(name)
                    died = isinstance(err, ray.exceptions.RayActorError)
                    # A death in one line (Ray's text goes on with the actor's details); an exception of
                    # the method whole (its traceback says where).
                    why = f"died in {what}: {_gist(err)}" if died else f"failed in {what}: {err}"
                    raise RankFailure(
                        f"{self._describe(name)} {why}. The other ranks cannot go on without it: kill the group "
                        "and start a new one (a run: from its last checkpoint)", rank, self.nodes[rank]) from err
        return [results[ref] for ref in refs]

    def _describe(self, name: str) -> str:
        """"reft/learner-1 (rank 1 of 2, node 1a2b3c4d5e6f (10.0.0.5), pid 4242)"."""
        rank = self.names.index(name)
        node = self.nodes[rank]
        pid = f", pid {node['pid']}" if node else ""
        return f"{self.namespace}/{name} (rank {rank} of {self.num_ranks}, {describe_node(node)}{pid})"


def _gist(err: Exception) -> str:
    """Ray's error in one line: its type and first line (the rest is a traceback or actor details)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].rstrip('.') if lines else ''}"


def _put(value: Any) -> ray.ObjectRef:
    """Into the object store once (Ray hands a top-level ObjectRef argument over as its value)."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)
