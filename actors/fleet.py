"""A fleet of rollout actors: one stream of requests in, one stream of samples out, faults handled.

``RolloutFleet`` owns ``cfg.num_actors`` Ray actors running ``actors.rollout.RolloutWorker``,
named ``rollout-0``, ``rollout-1``, ... in namespace ``reft``. It is driver-side code (a plain
object, not thread-safe: one driver thread uses it).

    fleet = RolloutFleet(cfg)                        # starts the engines (30-50 s on CPU)
    fleet.submit([SampleRequest("q17", prompt, n=4), ...])
    for sample in fleet.stream(timeout_s=60):        # samples as their requests finish
        ...
    fleet.update_weights(learner_state_dict, version=1)   # publish + load + verify everywhere
    fleet.shutdown()

Requests are spread by queue depth: each goes to the serving actor with the fewest samples
outstanding. Each started actor has one outstanding ``poll`` (a long-poll, see
``actors.rollout``) whenever the fleet is waiting for something (``poll``, ``stream``,
``push``...); ``ray.wait`` over the polls of all actors merges their streams, and the polls of
idle actors serve as heartbeats.

Faults. Every remote call carries a deadline. An actor whose call fails with a Ray actor error
(it died: killed, out of memory, its engine crashed) or misses its deadline (hung: it is killed)
is REPLACED: a new actor under the same name starts its engine, loads the current weights
(the last handle published, so it serves the fleet's current version), and only then serves.
Its unfinished requests are re-issued once, at once, to the serving actors (or wait for the
replacement if there are none). Every request id is answered exactly once: the fleet records
which actor incarnation owns each request, and samples from any other incarnation (a dead
actor's late replies) are discarded. A slot that dies more than ``cfg.max_actor_restarts``
times raises, so a crash loop stops the run loudly.

Nodes. Each actor reports the node it runs on (``RolloutWorker.node``) before its engine starts;
the loss and the recovery of a slot are logged with the nodes and the seconds it was out. A replacement that Ray cannot place within ``place_timeout_s`` (its node was
lost and no other node has room for its resources or its placement-group bundle) raises,
naming the lost node: replacing it again could not help, the run needs a node.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import ray
from ray.exceptions import RayActorError

from actors.config import RAY_NAMESPACE, RolloutConfig
from actors.naming import describe_node, wait_name_free
from actors.rollout import RolloutWorker, Sample, SampleRequest
from actors.weight_sync import (
    WeightHandle,
    WeightSync,
    WeightSyncError,
    make_weight_sync,
)

logger = logging.getLogger(__name__)

POLL_WAIT_S = 0.5      # how long an actor holds a poll open when it has nothing to return
POLL_MAX_ITEMS = 4096  # samples per poll reply at most


@dataclasses.dataclass
class _Slot:
    """One actor position: the actor handle changes when it is replaced, the name does not."""
    name: str
    actor: Any = None
    incarnation: int = 0
    state: str = "starting"        # starting -> loading -> serving; "unverified" after a failed sync
    restarts: int = 0
    assigned: dict[str, SampleRequest] = dataclasses.field(default_factory=dict)   # in flight here
    polling: bool = False
    node: Optional[dict] = None    # where this incarnation runs (``RolloutWorker.node``); None until placed
    lost: Optional[dict] = None    # since when it is out (the first loss not recovered from), its node, why

    @property
    def load(self) -> int:
        return sum(r.n for r in self.assigned.values())


@dataclasses.dataclass(frozen=True)
class _Call:
    slot: int
    incarnation: int
    kind: str                      # place | start | load | poll | submit | sleep | wake_up
    deadline: float


class RolloutFleet:
    """``cfg.num_actors`` rollout actors behind one request stream (module docstring)."""

    def __init__(self, cfg: RolloutConfig, sync: Optional[WeightSync] = None, namespace: str = RAY_NAMESPACE,
                 name_prefix: str = "rollout", actor_options: Optional[Callable[[int], dict]] = None,
                 place_timeout_s: Optional[float] = None):
        """
        Args:
            actor_options: Ray resources and scheduling of slot i's actor (and of its
                replacements, which go back into the same placement-group bundle): the run's plan,
                ``cluster.placement.Placement.options("rollout", i)``. None = ``cfg``'s
                ``num_cpus_per_actor`` / ``num_gpus_per_actor`` wherever Ray finds room.
            place_timeout_s: how long an actor may wait for Ray to place it (resources free on a
                node, its bundle re-placed after its node was lost) before the fleet gives up;
                a run passes ``cluster.placement_timeout_s``. None = ``cfg.start_timeout_s``.
        """
        if not ray.is_initialized():
            raise RuntimeError("RolloutFleet needs Ray: call ray.init() (or cluster.runtime.init_ray) first")
        self.cfg = cfg
        self.sync = sync or make_weight_sync(cfg)
        self.namespace = namespace
        self.version = 0                                   # of the weights every actor must serve
        self._handle: Optional[WeightHandle] = None        # the latest published weights
        self._handle_sync: WeightSync = self.sync          # ... and the transport that published them
        self._remote = ray.remote(RolloutWorker)
        self._actor_options = actor_options or self._default_options
        self.place_timeout_s = cfg.start_timeout_s if place_timeout_s is None else place_timeout_s
        self.slots = [_Slot(f"{name_prefix}-{i}") for i in range(cfg.num_actors)]
        self._calls: dict[ray.ObjectRef, _Call] = {}
        self._pending: dict[str, SampleRequest] = {}       # submitted, not yet answered
        self._backlog: collections.deque[SampleRequest] = collections.deque()   # not yet assigned
        self._ready: list[Sample] = []                     # accepted, not yet returned
        self.stats = collections.Counter()
        try:
            for index in range(len(self.slots)):
                self._launch(index)
            self.wait_until_serving(cfg.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ requests and samples

    def submit(self, requests: Iterable[SampleRequest]) -> None:
        """Queue requests (ids must not be in flight already) and send them to actors now."""
        requests = list(requests)
        ids = [r.request_id for r in requests]
        clash = [i for i in ids if i in self._pending]
        if clash or len(set(ids)) != len(ids):
            raise ValueError(f"request ids already in flight or repeated: {(clash or ids)[:5]}")
        for request in requests:
            self._pending[request.request_id] = request
        self._backlog.extend(requests)
        self._dispatch()

    def poll(self, timeout_s: float = 1.0, request_ids: Optional[set] = None) -> list[Sample]:
        """Samples of requests answered since the last call (whole requests), waiting up to
        ``timeout_s`` for the first; [] if none finished in time. With ``request_ids``, only
        those requests' samples: the others stay queued for a later poll (an evaluation while the
        next RL batch decodes, ``rl.max_staleness = 1``)."""
        def mine(s: Sample) -> bool:
            return request_ids is None or s.request_id in request_ids
        self._pump(timeout_s, until=lambda: any(mine(s) for s in self._ready))
        out = [s for s in self._ready if mine(s)]
        self._ready = [s for s in self._ready if not mine(s)]
        return out

    def stream(self, timeout_s: float = 60.0) -> Iterator[Sample]:
        """Yield samples until every submitted request is answered. Raises TimeoutError if no
        request finishes for ``timeout_s``."""
        while self._pending or self._ready:
            batch = self.poll(timeout_s)
            if not batch:
                raise TimeoutError(f"no rollout request finished in {timeout_s:.0f} s; {len(self._pending)} "
                                   f"pending; actors: {self.describe()}")
            yield from batch

    def generate(self, requests: Iterable[SampleRequest], timeout_s: float = 60.0) -> list[Sample]:
        """Submit and wait for all of them (evaluation): samples ordered by (request, index).
        Other requests' samples arriving meanwhile stay queued for ``poll``."""
        requests = list(requests)
        wanted = {r.request_id: i for i, r in enumerate(requests)}
        self.submit(requests)
        got, kept = [], []
        remaining = sum(r.n for r in requests)
        while remaining:
            batch = self.poll(timeout_s)
            if not batch:
                raise TimeoutError(f"generate: no request finished in {timeout_s:.0f} s; actors: {self.describe()}")
            for sample in batch:
                (got if sample.request_id in wanted else kept).append(sample)
            remaining = sum(r.n for r in requests) - len(got)
        self._ready = kept + self._ready
        return sorted(got, key=lambda s: (wanted[s.request_id], s.index))

    # ------------------------------------------------------------------ weights

    def update_weights(self, state_dict: dict, version: int) -> dict[str, dict]:
        """Publish ``state_dict`` as ``version`` with the fleet's transport and load it into every
        actor (``push``)."""
        if version <= self.version:
            raise ValueError(f"weights version {version} is not newer than the fleet's ({self.version})")
        return self.push(self.sync.publish(state_dict, version), self.sync)

    def push(self, handle: WeightHandle, sync: Optional[WeightSync] = None) -> dict[str, dict]:
        """Load published weights into every live actor and verify them; per-actor timings.

        ``sync`` is the transport that published ``handle`` (default: the fleet's). Actors still
        starting load it when they are up. Raises ``WeightSyncError`` naming every actor that
        failed (after all have answered); those actors do not take new requests until a later
        push succeeds. An actor that dies meanwhile is replaced and catches up by itself.
        """
        if not isinstance(handle, WeightHandle):
            raise TypeError(f"push takes a WeightHandle (what the learner's publish returns), got {type(handle).__name__}")
        sync = sync or self.sync
        # What crosses the driver per sync: the handle, without its location (a path or an ObjectRef).
        self.stats["last_handle_bytes"] = len(pickle.dumps(dataclasses.replace(handle, location=None)))
        self._handle, self._handle_sync, self.version = handle, sync, handle.version
        targets = [i for i, s in enumerate(self.slots) if s.state in ("serving", "unverified")]
        refs = {}
        for i in targets:
            slot = self.slots[i]
            ref = slot.actor.update_weights.remote(handle)
            refs[ref] = i
            self._calls[ref] = _Call(i, slot.incarnation, "load", time.monotonic() + self._sync_deadline())
            slot.state = "loading"
        errors = []
        try:
            sync.transmit(handle, [self.slots[i].name for i in targets], self.cfg.sync_timeout_s)
        except WeightSyncError as e:   # the receiver's own call reports too; keep the sender's view
            errors.append(str(e))
        reports: dict[str, dict] = {}
        self._pump(self._sync_deadline(), until=lambda: not any(ref in self._calls for ref in refs),
                   on_load=lambda slot, result: reports.__setitem__(slot.name, result),
                   on_load_error=lambda slot, e: errors.append(str(e)))
        late = [self.slots[refs[r]].name for r in refs if r in self._calls]
        if late:
            errors.append(f"no answer from {late} within {self._sync_deadline():.0f} s")
        if errors:
            raise WeightSyncError(f"weights version {handle.version}: " + " | ".join(errors))
        return reports

    @property
    def num_restarts(self) -> int:
        """Actors replaced so far (died, hung or crashed), over all slots."""
        return sum(s.restarts for s in self.slots)

    def versions(self) -> dict[str, int]:
        """The weights version each serving actor reports (asked now, with a timeout)."""
        live = [s for s in self.slots if s.state == "serving"]
        values = ray.get([s.actor.version.remote() for s in live], timeout=self.cfg.call_timeout_s)
        return {s.name: v for s, v in zip(live, values)}

    # ------------------------------------------------------------------ sleep (colocated GPU)

    def sleep(self) -> None:
        """Put every engine to sleep (``RolloutWorker.sleep``) so that a learner sharing their GPU
        has its memory: after a rollout phase, with nothing in flight. A no-op for engines
        without sleep mode (every engine on CPU). An actor found dead is replaced as usual; its
        replacement starts awake."""
        self._on_every_engine("sleep")

    def wake_up(self) -> None:
        """Wake every sleeping engine: before the weight sync that follows the learner's phase
        (a sleeping engine refuses a load) and before the next generation."""
        self._on_every_engine("wake_up")

    def _on_every_engine(self, method: str) -> None:
        if self._pending:
            raise RuntimeError(f"rollout {method} with {len(self._pending)} requests in flight: the driver "
                               "sleeps the engines between phases only (rl.max_staleness = 0)")
        refs = set()
        for i, slot in enumerate(self.slots):
            if slot.state in ("serving", "unverified"):
                ref = getattr(slot.actor, method).remote()
                refs.add(ref)
                self._calls[ref] = _Call(i, slot.incarnation, method, time.monotonic() + self._sync_deadline())
        # An actor that misses the deadline counts as hung and is replaced (``_enforce_deadlines``).
        self._pump(self._sync_deadline(), until=lambda: not refs & self._calls.keys())

    # ------------------------------------------------------------------ state and shutdown

    def wait_until_serving(self, timeout_s: float) -> None:
        """Block until every actor serves the current version (after start-up or a replacement)."""
        self._pump(timeout_s, until=lambda: all(s.state == "serving" for s in self.slots))
        if not all(s.state == "serving" for s in self.slots):
            raise TimeoutError(f"rollout actors not serving after {timeout_s:.0f} s: {self.describe()}")

    def describe(self) -> dict[str, str]:
        return {s.name: f"{s.state} (incarnation {s.incarnation} on {describe_node(s.node)}, {len(s.assigned)} requests)"
                for s in self.slots}

    def health(self) -> list[dict]:
        live = [s for s in self.slots if s.actor is not None]
        return ray.get([s.actor.health.remote() for s in live], timeout=self.cfg.call_timeout_s)

    def shutdown(self) -> None:
        """Stop every engine, kill the actors, free their names, release the weight sync. (An
        actor Ray has not placed yet is only killed: it would never answer.)"""
        stopping = [s.actor.shutdown.remote() for s in self.slots if s.actor is not None and s.node is not None]
        try:
            ray.wait(stopping, num_returns=len(stopping), timeout=self.cfg.call_timeout_s)
        finally:
            for slot in self.slots:
                if slot.actor is not None:
                    ray.kill(slot.actor, no_restart=True)
                    slot.actor = None
            for slot in self.slots:
                wait_name_free(slot.name, self.namespace, self.cfg.call_timeout_s)
            self.sync.close()
            self._calls.clear()

    # ------------------------------------------------------------------ the event loop

    def _pump(self, timeout_s: float, until: Callable[[], bool],
              on_load: Optional[Callable] = None, on_load_error: Optional[Callable] = None) -> None:
        """Process finished calls until ``until()`` holds or ``timeout_s`` passes.

        Keeps one poll open per actor that has requests; enforces every call's deadline.
        ``on_load(slot, report)`` / ``on_load_error(slot, error)`` see weight-load results
        (``push``); without them a failed catch-up load raises.
        """
        deadline = time.monotonic() + timeout_s
        while not until():
            self._open_polls()
            self._enforce_deadlines()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not self._calls:
                time.sleep(min(remaining, 0.05))
                continue
            ready, _ = ray.wait(list(self._calls), num_returns=1, timeout=min(remaining, POLL_WAIT_S))
            if ready:   # take everything else that is done too
                ready, _ = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)
            for ref in ready:
                self._finish(ref, on_load, on_load_error)

    def _finish(self, ref: ray.ObjectRef, on_load, on_load_error) -> None:
        call = self._calls.pop(ref)
        slot = self.slots[call.slot]
        stale = call.incarnation != slot.incarnation
        try:
            result = ray.get(ref, timeout=self.cfg.call_timeout_s)   # ready: returns at once
        except RayActorError as e:
            if not stale:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._replace(call.slot, f"{call.kind} failed: {type(e).__name__}: {first_line}")
            return
        except WeightSyncError as e:
            if stale:
                return
            e = getattr(e, "cause", e)   # Ray wraps it; report the original's message
            if on_load_error is None:    # a replacement's catch-up: start over (bounded by restarts)
                self._replace(call.slot, f"catch-up load failed: {e}")
                return
            slot.state = "unverified"
            on_load_error(slot, e)
            return
        except Exception as e:   # only a failed engine start is survivable; anything else re-raises
            if stale:
                return
            if call.kind == "start":
                self._replace(call.slot, f"engine start failed: {getattr(e, 'cause', e)!r}")
                return
            raise
        if stale:
            if call.kind == "poll" and result:
                self.stats["discarded_samples"] += len(result)   # a dead incarnation's late reply
            return
        if call.kind == "poll":
            slot.polling = False
            self._accept(slot, result)
        elif call.kind == "place":
            slot.node = result
            self._start_engine(call.slot)
        elif call.kind == "start":
            self._catch_up(call.slot)
        elif call.kind == "load":
            self._serving(slot)
            if on_load is not None:
                on_load(slot, result)
            if self._handle is not None and result["version"] != self._handle.version:
                self._catch_up(call.slot)   # a newer version was pushed while this one loaded
            self._dispatch()

    def _accept(self, slot: _Slot, samples: list[Sample]) -> None:
        by_request = collections.defaultdict(list)
        for sample in samples:
            by_request[sample.request_id].append(sample)
        for request_id, group in by_request.items():
            if request_id not in slot.assigned:   # not this incarnation's: never answer twice
                self.stats["discarded_samples"] += len(group)
                continue
            del slot.assigned[request_id]
            del self._pending[request_id]
            self._ready.extend(sorted(group, key=lambda s: s.index))

    def _dispatch(self) -> None:
        """Assign backlog requests to serving actors, fewest outstanding samples first."""
        serving = [i for i, s in enumerate(self.slots) if s.state == "serving"]
        if not serving or not self._backlog:
            return
        batches = collections.defaultdict(list)
        while self._backlog:
            request = self._backlog.popleft()
            i = min(serving, key=lambda k: self.slots[k].load)
            self.slots[i].assigned[request.request_id] = request
            batches[i].append(request)
        for i, batch in batches.items():
            slot = self.slots[i]
            ref = slot.actor.submit.remote(batch)
            self._calls[ref] = _Call(i, slot.incarnation, "submit", time.monotonic() + self.cfg.call_timeout_s)

    def _open_polls(self) -> None:
        """One long-poll open per started actor, even an idle one: it doubles as the heartbeat
        that notices a dead or hung actor before any request is sent to it."""
        for i, slot in enumerate(self.slots):
            if slot.state != "starting" and not slot.polling and slot.actor is not None:
                ref = slot.actor.poll.remote(POLL_MAX_ITEMS, POLL_WAIT_S)
                self._calls[ref] = _Call(i, slot.incarnation, "poll",
                                         time.monotonic() + POLL_WAIT_S + self.cfg.call_timeout_s)
                slot.polling = True

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for ref, call in list(self._calls.items()):
            if now <= call.deadline or ref not in self._calls:
                continue
            del self._calls[ref]
            if call.incarnation != self.slots[call.slot].incarnation:
                continue
            if call.kind == "place":   # no node has room for it: another replacement would wait as well
                raise RuntimeError(self._unplaceable(call.slot))
            self._replace(call.slot, f"{call.kind} call missed its deadline (hung)")

    # ------------------------------------------------------------------ faults

    def _launch(self, index: int) -> None:
        """Start a (new) actor in slot ``index``: placed (``RolloutWorker.node`` answers), then its
        engine starts (``_start_engine``), then ``_catch_up``."""
        slot = self.slots[index]
        wait_name_free(slot.name, self.namespace, self.cfg.call_timeout_s)
        slot.actor = self._remote.options(
            name=slot.name, namespace=self.namespace, **self._actor_options(index),
            max_restarts=0,   # replacement is ours: it must catch up on weights before serving
        ).remote(self.cfg, slot.name, 0)
        slot.state, slot.polling, slot.node = "starting", False, None
        ref = slot.actor.node.remote()
        self._calls[ref] = _Call(index, slot.incarnation, "place", time.monotonic() + self.place_timeout_s)

    def _start_engine(self, index: int) -> None:
        slot = self.slots[index]
        if slot.lost is not None:
            slot.lost["placed_s"] = time.monotonic() - slot.lost["at"]
        ref = slot.actor.start.remote()
        self._calls[ref] = _Call(index, slot.incarnation, "start", time.monotonic() + self.cfg.start_timeout_s)

    def _unplaceable(self, index: int) -> str:
        slot = self.slots[index]
        wanted = {k: v for k, v in self._actor_options(index).items() if k != "scheduling_strategy"}
        bundle = " in its placement-group bundle" if "scheduling_strategy" in self._actor_options(index) else ""
        lost = ""
        if slot.lost:
            node = slot.lost["node"]
            gone = node and not any(n["NodeID"] == node["node_id"] and n["Alive"] for n in ray.nodes())
            lost = (f" after incarnation {slot.incarnation - 1} was lost on {describe_node(node)}"
                    f"{', which has left the cluster' if gone else ''} ({slot.lost['reason']})")
        return (f"{slot.name} (incarnation {slot.incarnation}) was not placed within {self.place_timeout_s:.0f} s"
                f"{lost}: no node of the Ray cluster has {wanted} free{bundle}. Add a node (or free the "
                "resources) and start again: a run resumes from its last checkpoint (the wait is "
                "cluster.placement_timeout_s)")

    def _default_options(self, index: int) -> dict:
        num_gpus = self.cfg.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = self.cfg.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) > 0 else 0
        return {"num_cpus": self.cfg.num_cpus_per_actor, "num_gpus": num_gpus}

    def _catch_up(self, index: int) -> None:
        """A started actor joins the weight sync and loads the current weights, or serves now if
        the fleet still serves the starting model (version 0)."""
        slot = self.slots[index]
        try:
            self._handle_sync.attach(slot.name, lambda info: slot.actor.join_weight_sync.remote(info),
                                     self.cfg.sync_timeout_s)
        except WeightSyncError as e:
            self._replace(index, f"could not join the weight sync: {e}")
            return
        if self._handle is None:
            self._serving(slot)
            self._dispatch()
            return
        slot.state = "loading"
        ref = slot.actor.update_weights.remote(self._handle)
        self._calls[ref] = _Call(index, slot.incarnation, "load", time.monotonic() + self._sync_deadline())
        try:
            self._handle_sync.transmit(self._handle, [slot.name], self.cfg.sync_timeout_s)
        except WeightSyncError as e:   # the actor's update_weights fails too; its error decides
            logger.warning("%s: catch-up transfer failed: %s", slot.name, e)

    def _replace(self, index: int, reason: str) -> None:
        """The actor in slot ``index`` is dead or hung: re-issue its requests, start another."""
        slot = self.slots[index]
        slot.restarts += 1
        logger.warning("%s (incarnation %d, %s) is lost: %s; re-issuing %d requests and replacing it (restart %d/%d)",
                       slot.name, slot.incarnation, describe_node(slot.node), reason, len(slot.assigned), slot.restarts,
                       self.cfg.max_actor_restarts)
        first = slot.lost or {"at": time.monotonic(), "node": slot.node}   # a replacement lost too: since the first
        slot.lost = {**first, "reason": reason}
        orphans = list(slot.assigned.values())
        slot.assigned.clear()
        self._backlog.extendleft(reversed(orphans))   # first in line, in their original order
        self.stats["reissued_requests"] += len(orphans)
        self.stats["replacements"] += 1
        self._handle_sync.detach(slot.name)
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)   # if it was hung rather than dead
        slot.incarnation += 1
        slot.actor, slot.state, slot.polling = None, "starting", False
        if slot.restarts > self.cfg.max_actor_restarts:
            raise RuntimeError(f"{slot.name} was lost {slot.restarts} times (rollout.max_actor_restarts="
                               f"{self.cfg.max_actor_restarts}); last: {reason}")
        self._launch(index)
        self._dispatch()   # the orphans go to the actors still serving, if any

    def _serving(self, slot: _Slot) -> None:
        """The slot serves the fleet's version; after a replacement, log how long it was out."""
        slot.state = "serving"
        if slot.lost is None:
            return
        lost, slot.lost = slot.lost, None
        logger.warning("%s recovered: incarnation %d on %s serves weights version %d, %.1f s after the loss on %s "
                       "(placed after %.1f s, then engine start and weight load)", slot.name, slot.incarnation,
                       describe_node(slot.node), self.version, time.monotonic() - lost["at"],
                       describe_node(lost["node"]), lost.get("placed_s", 0.0))

    def _sync_deadline(self) -> float:
        return self.cfg.sync_timeout_s + self.cfg.call_timeout_s
