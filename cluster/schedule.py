"""Which training questions each RL step sees, and the state that makes a resumed run see the
same ones: a fixed permutation per (seed, epoch) and a position in it."""
from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the learner's own checkpoint."""
    step: int = 0
    version: int = 0          # policy version the samplers hold
    epoch: int = 0
    position: int = 0         # next index into this epoch's question order
    trained_s: float = 0.0    # training time of the steps so far (what rl.max_seconds counts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def question_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training questions' order in ``epoch``: a fixed permutation per (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def next_questions(state: TrainState, n_train: int, k: int, seed: int) -> list[int]:
    """The next ``k`` question indices; advances ``state`` (an epoch boundary wraps around)."""
    picked: list[int] = []
    while len(picked) < k:
        order = question_order(n_train, seed, state.epoch)
        take = order[state.position:state.position + (k - len(picked))]
        picked += take
        state.position += len(take)
        if state.position >= n_train:
            state.epoch, state.position = state.epoch + 1, 0
    return picked


def peek_questions(state: TrainState, n_train: int, k: int, seed: int) -> list[int]:
    """The indices the next ``next_questions`` call will return, without advancing ``state``."""
    return next_questions(dataclasses.replace(state), n_train, k, seed)
