"""Majority voting, pass@k and reranking against hand-made sample sets with known answers."""
import itertools
import math
import random

import pytest

from experiments.voting import (
    majority_vote,
    pass_at_k,
    pass_at_k_curve,
    rerank_curve,
    rerank_pick,
    same_answer,
    voting_curve,
)


def test_same_answer_uses_the_reward_tolerance():
    assert same_answer("5", "5.0") and same_answer("5", "5.01") and same_answer("0.5", "1/2")
    assert not same_answer("5", "5.02")          # |a - b| > 1e-2
    assert same_answer("c", "c") and not same_answer("c", "d")   # MCQ letters compare as text
    assert not same_answer("1", "a")


def test_majority_vote_counts_tolerant_numbers_as_one_answer():
    # "7" x2 vs "5" / "5.0" / "5.004" x3: five wins, represented by its first sample (index 1).
    assert majority_vote(["7", "5", "7", "5.0", "5.004"]) == 1


def test_majority_vote_abstentions_and_ties():
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "4", None]) == 1            # one vote beats all abstentions
    assert majority_vote(["4", "9", "9", "4"]) == 0         # 2-2: the answer seen first
    assert majority_vote(["9", "4", "4", "9"]) == 0
    assert majority_vote([None, "b", "a", "a", "b"]) == 1   # MCQ letters, 2-2 tie: "b" came first


def test_voting_curve_by_hand():
    # Gold is 5 for both questions; correct[i] is what the reward said of answers[i].
    answers = [["5", "3", "3", "5", "5"],      # k=1: 5 ok; k=2: 1-1 tie, 5 first, ok; k=3: 3 wins, wrong;
                                               # k=4: 2-2 tie, 5 first, ok; k=5: 5 x3, ok
               [None, "3", "5", "5", None]]    # k=1: abstain, wrong; k=2: 3, wrong; k=3: tie, 3 first, wrong;
                                               # k=4: 5 x2, ok; k=5: ok
    correct = [[a == "5" for a in row] for row in answers]
    assert voting_curve(answers, correct) == [50.0, 50.0, 0.0, 100.0, 100.0]


def test_voting_at_1_is_the_first_samples_accuracy():
    rng = random.Random(0)
    answers = [[rng.choice([None, "1", "2", "3"]) for _ in range(8)] for _ in range(50)]
    correct = [[a == "2" for a in row] for row in answers]
    curve = voting_curve(answers, correct)
    assert curve[0] == 100.0 * sum(row[0] for row in correct) / 50
    # the vote over all K equals majority_vote on the whole row
    assert curve[-1] == 100.0 * sum(bool(v is not None and c[v]) for v, c in
                                    ((majority_vote(a), c) for a, c in zip(answers, correct))) / 50


def test_pass_at_k_matches_the_binomial_formula():
    for n, c, k in itertools.product(range(1, 9), range(9), range(1, 9)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(100, 0, 100) == 0.0 and pass_at_k(100, 1, 100) == 1.0
    assert pass_at_k(100, 10, 1) == pytest.approx(0.1)      # pass@1 = fraction correct
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_at_k_curve_and_bounds():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    curve = pass_at_k_curve(correct)
    # k=1: (1/4 + 0 + 1) / 3; k=4: (1 + 0 + 1) / 3
    assert curve[0] == pytest.approx(100 * (0.25 + 1) / 3)
    assert curve[-1] == pytest.approx(200 / 3)
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(curve))          # non-decreasing in k
    answers = [["1" if ok else "9" for ok in row] for row in correct]
    assert curve[-1] >= voting_curve(answers, correct)[-1]                # any correct >= vote correct


def test_rerank_by_hand():
    assert rerank_pick([0.1, 0.9, 0.9, -1.0], ["1", "2", "3", "4"]) == 1      # ties: the first
    scores = [[0.2, 0.8, 0.5], [0.9, 0.1, 0.95]]
    correct = [[False, True, False], [True, False, False]]
    every = [["1", "2", "3"], ["4", "5", "6"]]
    # q0: k=1 picks 0 (wrong), k>=2 picks 1 (ok); q1: k=1,2 pick 0 (ok), k=3 picks 2 (wrong)
    assert rerank_curve(scores, correct, every) == [50.0, 100.0, 50.0]


def test_rerank_picks_among_answered_samples_only():
    # The top score has no answer: the best answered one is picked; none answered: no pick.
    assert rerank_pick([0.9, 0.2, 0.7], [None, "3", "c"]) == 2
    assert rerank_pick([0.9, 0.2], [None, None]) is None
    scores = [[0.9, 0.1, 0.5], [0.8, 0.7, 0.1]]
    correct = [[False, True, False], [False, False, True]]
    answers = [[None, "5", "7"], [None, None, "2"]]
    # q0: k=1 none answered (wrong), k=2 picks 1 (ok), k=3 picks 2 (0.5 > 0.1, wrong);
    # q1: k=1,2 none answered (wrong), k=3 picks 2 (ok)
    assert rerank_curve(scores, correct, answers) == [0.0, 50.0, 50.0]
    with pytest.raises(ValueError):
        rerank_pick([0.1], [])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same number"):
        voting_curve([["1", "2"], ["1"]], [[True, False], [True]])
    with pytest.raises(ValueError):
        pass_at_k_curve([])
