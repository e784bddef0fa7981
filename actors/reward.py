"""The reward actor: scores streamed samples in batches with the rules of ``rewards/``.

``RewardWorker`` is a plain class run as one Ray actor (``launch``). It owns a
``rewards.score.Scorer``, i.e. a pool of sandbox worker processes for P-CoT programs, so the
programs of a batch run in parallel (one per sandbox worker) while N-CoT answers are extracted
in-process. The driver sends it batches of finished samples as they stream out of the rollout
fleet; the actor keeps per-batch times and the count of each outcome (``stats``).

It survives any program: model-written programs never run in this process (the sandbox forks
confined children from pre-started workers; a worker that dies or hangs is replaced and only
its program is charged). What can still fail a call is a data bug, e.g. a gold answer that is
not a number: that raises (the caller gets the error, the actor stays up), because scoring it
as 0 would hide a broken dataset.

If the actor's process dies all the same (killed, out of memory, its node lost), Ray restarts it
(``reward.max_actor_restarts`` times a run) and ``collect_scored`` sends the samples whose scores
were lost with it again: each sample of a step is scored exactly once in the step's results
(scoring is a pure function, so a chunk the dead process had finished changes nothing).

A P-CoT sample is the model's continuation of the P-CoT prompt, which already holds the function
header; give its ``question`` and the header is put back before the program is cut and run
(``rewards.score.prepare_program``, once, in ``Scorer.score``). Without a question the completion must be a whole program.
Under the paper rule (``reward.rule``, the default) an N-CoT sample's question is used too: the
official code reads the decoded prompt + completion. Every `Score` says which rule made it
(``Score.rule``), and so does ``stats()["rule"]``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable, Mapping, Optional, Sequence, Union

from actors.config import RAY_NAMESPACE
from actors.naming import describe_node, wait_name_free, where
from rewards.sandbox import STATUSES
from rewards.score import RewardConfig, Score, Scorer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardItem:
    completion: str                               # the sample's text (P-CoT: after the prompt)
    gold: str                                     # the gold final answer
    cot_kind: str                                 # "ncot" | "pcot"
    dataset: str                                  # decides numeric vs MCQ comparison
    options: Optional[Mapping[str, str]] = None   # MCQ options {"a": "38", ...}
    question: Optional[str] = None                # the prompt's question (module docstring)


ItemLike = Union[RewardItem, tuple]   # a tuple in RewardItem's field order


class RewardWorker:
    """Scores batches of ``RewardItem`` (module docstring)."""

    def __init__(self, cfg: RewardConfig = RewardConfig()):
        self.cfg = cfg
        self.scorer = Scorer(cfg)
        self._status_counts = collections.Counter({status: 0 for status in STATUSES})
        self._batch_seconds: collections.deque[float] = collections.deque(maxlen=1000)
        self._items = 0
        self._correct = 0

    def score(self, batch: Sequence[ItemLike]) -> list[Score]:
        """One ``Score`` per item, in order (reward 1 / partial / 0, the extracted answer, the
        status ok | no_answer | timeout | error | killed, and why)."""
        start = time.perf_counter()
        items = [item if isinstance(item, RewardItem) else RewardItem(*item) for item in batch]
        scores: list[Optional[Score]] = [None] * len(items)
        # Scorer.score takes one CoT kind and dataset per call: group, then put back in order.
        groups = collections.defaultdict(list)
        for position, item in enumerate(items):
            groups[(item.cot_kind, item.dataset)].append(position)
        for (kind, dataset), positions in groups.items():
            group = [items[p] for p in positions]
            results = self.scorer.score([i.completion for i in group], [i.gold for i in group], kind, dataset,
                                        [i.options for i in group], questions=[i.question for i in group])
            for position, result in zip(positions, results):
                scores[position] = result
        self._batch_seconds.append(time.perf_counter() - start)
        self._items += len(items)
        self._correct += sum(s.correct for s in scores)
        self._status_counts.update(s.status for s in scores)
        return scores

    def stats(self) -> dict:
        """Counts since start: batches, items, correct, each status; per-batch seconds (the last
        1000 batches: last, mean, max); the reward rule that scores them."""
        seconds = list(self._batch_seconds)
        return {
            "rule": self.cfg.rule,
            "batches": len(seconds),
            "items": self._items,
            "correct": self._correct,
            "status_counts": dict(self._status_counts),
            "last_batch_s": seconds[-1] if seconds else None,
            "mean_batch_s": sum(seconds) / len(seconds) if seconds else None,
            "max_batch_s": max(seconds) if seconds else None,
            "sandbox_workers": len(self.scorer.sandbox.worker_pids),
        }

    def health(self) -> dict:
        return {"sandbox_worker_pids": self.scorer.sandbox.worker_pids, **where(), **self.stats()}

    def close(self) -> None:
        self.scorer.close()


def launch(cfg: RewardConfig = RewardConfig(), name: str = "reward", namespace: str = RAY_NAMESPACE,
           num_cpus: float = 0.25, timeout_s: float = 60.0):
    """Start the reward actor (named, in namespace reft) and wait until its sandbox is up.

    ``num_cpus`` is a scheduling share only (the sandbox workers use what the node has);
    fractional so that it never blocks the rollout and learner actors on a small node. Ray
    restarts the actor ``cfg.max_actor_restarts`` times if its process dies (its stats then start
    from zero; module docstring); programs cannot kill it, so that would be the host's doing.
    """
    import ray
    wait_name_free(name, namespace, timeout_s)   # a crashed run's reward actor may still hold it
    actor = ray.remote(RewardWorker).options(name=name, namespace=namespace, num_cpus=num_cpus,
                                             max_restarts=cfg.max_actor_restarts).remote(cfg)
    ray.get(actor.health.remote(), timeout=timeout_s)
    return actor


def reward_item(completion: str, example) -> RewardItem:
    """What the reward actor needs to score ``completion`` as an answer to ``example`` (an
    ``formats.records.Example``: gold answer, CoT kind, dataset, MCQ options, question)."""
    return RewardItem(completion, example.answer, example.cot_kind, example.dataset, example.options,
                      example.question)


def collect_scored(fleet, reward, example_of: Callable, expected: int, poll_timeout_s: float,
                   get_timeout_s: float, on_chunk: Optional[Callable] = None,
                   request_ids: Optional[set] = None, max_resends: int = RewardConfig.max_actor_restarts,
                   stats: Optional[collections.Counter] = None) -> tuple[list, list[Score]]:
    """The next ``expected`` samples from a ``RolloutFleet`` and their scores, in arrival order.

    Each chunk of finished samples goes to ``reward`` (a reward actor) at once, so scoring overlaps
    the decoding of the rest. ``example_of(sample)`` is the question a sample answers;
    ``on_chunk(samples)`` sees each chunk as it arrives (a progress bar); ``request_ids``: take only
    these requests' samples (``RolloutFleet.poll``). A chunk whose scoring died with the reward
    actor is sent again to its restart, at most ``max_resends`` times (``reward.max_actor_restarts``);
    ``stats`` (if given) counts the scoring calls lost with the actor (``lost_calls``) and the
    samples scored again (``rescored_samples``).

    Raises:
        TimeoutError: no sample finished for ``poll_timeout_s``.
        RuntimeError: the fleet answered a sample twice, or the reward actor stayed dead.
    """
    import ray
    pending, got = [], 0   # (samples, their reward items, ObjectRef of their scores)
    while got < expected:
        chunk = fleet.poll(timeout_s=poll_timeout_s, request_ids=request_ids)
        if not chunk:
            raise TimeoutError(f"no rollout finished in {poll_timeout_s:.0f} s: {fleet.describe()}")
        items = [reward_item(s.completion_text, example_of(s)) for s in chunk]
        pending.append((chunk, items, reward.score.remote(items)))
        got += len(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    samples = [s for chunk, _, _ in pending for s in chunk]
    seen = collections.Counter((s.request_id, s.index) for s in samples)
    twice = [key for key, n in seen.items() if n > 1]
    if twice or len(samples) != expected:
        raise RuntimeError(f"the rollout fleet answered {len(samples)} samples for {expected} expected; answered "
                           f"more than once: {twice[:5]}: a bug in the fleet's bookkeeping (actors.fleet)")
    scores = []
    for chunk, items, ref in pending:
        scores += _scores(reward, items, ref, get_timeout_s, max_resends, stats)
    return samples, scores


def _scores(reward, items: list, ref, timeout_s: float, max_resends: int,
            stats: Optional[collections.Counter]) -> list[Score]:
    """The scores of one chunk: ``ref``'s, or, where the reward actor died with it, those of the
    same items sent again (Ray restarts the actor and queues the call meanwhile)."""
    import ray
    resends, lost_at = 0, None
    while True:
        try:
            scores = ray.get(ref, timeout=timeout_s)
            break
        except ray.exceptions.RayActorError as e:
            lost_at = time.monotonic()
            if stats is not None:
                stats["lost_calls"] += 1
            first_line = (str(e).strip().splitlines() or [""])[0]
            if resends == max_resends:   # Ray's text names the actor, its node's IP and its pid
                raise RuntimeError(f"the reward actor died {resends + 1} times while scoring the same {len(items)} "
                                   f"samples (reward.max_actor_restarts={max_resends}); last: {type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:800]}") from e
            resends += 1
            logger.warning("the reward actor was lost while scoring %d samples (%s: %s); sending them to its "
                           "restart (%d/%d)", len(items), type(e).__name__, first_line, resends, max_resends)
            ref = reward.score.remote(items)
    if resends:
        health = ray.get(reward.health.remote(), timeout=timeout_s)
        if stats is not None:
            stats["rescored_samples"] += len(items)
        logger.warning("the reward actor is back on %s (pid %d): re-scored %d samples %.1f s after the loss",
                       describe_node(health), health["pid"], len(items), time.monotonic() - lost_at)
    return scores
