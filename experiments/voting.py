"""Sampling-based evaluation maths: majority voting, pass@k, reranking. Pure functions, no I/O.

Notation: Q = questions, K = samples per question. Per question the inputs are the K samples'
extracted answers (``rewards.score.Score.answer``: canonical text such as ``"72"``, ``"0.5"`` or an
MCQ letter; None when nothing could be extracted) and their correctness as the reward judged it.

* Majority voting (the paper's Table 4, Wang et al. 2023's self-consistency): the answer given by
  most samples wins; samples without an answer abstain. Numeric answers that the reward would
  call equal (``|a - b| <= 1e-2``) count as one answer. Ties go to the answer seen first, so the
  result depends only on the samples' order, never on hashing.
* A vote is correct when its answer is, and the reward already judged every answer against the
  gold one (numeric tolerance, MCQ letters, option values): the vote is scored with the
  correctness of the first sample that gave the winning answer instead of re-implementing that
  comparison here.
* pass@k: the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, k) / C(n, k) for n
  samples of which c are correct: the chance that k samples drawn without replacement hold at
  least one correct one.
* Reranking: a learned scorer rates each sample; the correctness of the top-rated sample among
  those with an answer counts (none with an answer: wrong), as the paper's code.
"""
from __future__ import annotations

from typing import Optional, Sequence

from rewards.extract import numbers_equal, parse_number


def same_answer(a: str, b: str) -> bool:
    """Whether two extracted answers are the same answer: numerically within the reward's
    tolerance when both are numbers, else as text (MCQ letters)."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return numbers_equal(x, y)
    return a == b


class _Tally:
    """Running vote over a stream of answers.

    Each distinct answer is a group represented by its first sample; an answer joins the first
    group whose representative it equals. The leader only changes when the group that just grew
    overtakes it (or equals it while being older), so feeding K answers costs O(K x groups).
    """

    def __init__(self):
        self.representatives: list[tuple[str, int]] = []   # (answer, index of its first sample)
        self.counts: list[int] = []
        self.leader: Optional[int] = None                  # group index

    def add(self, index: int, answer: Optional[str]) -> None:
        if answer is None:   # abstention
            return
        group = next((g for g, (rep, _) in enumerate(self.representatives) if same_answer(answer, rep)), None)
        if group is None:
            group = len(self.representatives)
            self.representatives.append((answer, index))
            self.counts.append(0)
        self.counts[group] += 1
        if self.leader is None or self.counts[group] > self.counts[self.leader] or (
                self.counts[group] == self.counts[self.leader] and group < self.leader):
            self.leader = group

    @property
    def winner(self) -> Optional[int]:
        """Index of the sample that represents the winning answer; None if every sample abstained."""
        return None if self.leader is None else self.representatives[self.leader][1]


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[int]:
    """The index of the first sample giving the most frequent answer (ties: the answer seen
    first); None when no sample has an answer.

    >>> majority_vote(["3", None, "5", "5.0", "3", "5.001"])   # "5" x3 beats "3" x2
    2
    """
    tally = _Tally()
    for index, answer in enumerate(answers):
        tally.add(index, answer)
    return tally.winner


def voting_curve(answers: Sequence[Sequence[Optional[str]]], correct: Sequence[Sequence[bool]]) -> list[float]:
    """Majority-voting accuracy (percent) with the first k samples of every question, k = 1..K.

    ``answers[q][i]`` / ``correct[q][i]``: sample i of question q (every question has K samples).
    A question whose first k samples all abstain counts as wrong at that k. Element 0 (k = 1) is
    the accuracy of the first sample alone.
    """
    num_samples = _check_rectangular(answers, correct)
    hits = [0] * num_samples
    for question_answers, question_correct in zip(answers, correct):
        tally = _Tally()
        for i, answer in enumerate(question_answers):
            tally.add(i, answer)
            winner = tally.winner
            hits[i] += winner is not None and bool(question_correct[winner])
    return [100.0 * h / len(answers) for h in hits]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with ``c`` correct out of ``n`` samples (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1..n} (1 - k / i), which
    never forms the huge binomials.

    >>> pass_at_k(4, 1, 2)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:   # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_curve(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Mean pass@k (percent) over the questions, k = 1..K, each from all K samples."""
    num_samples = _check_rectangular(correct, correct)
    counts = [sum(map(bool, row)) for row in correct]
    return [100.0 * sum(pass_at_k(num_samples, c, k) for c in counts) / len(counts)
            for k in range(1, num_samples + 1)]


def rerank_pick(scores: Sequence[float], answers: Sequence[Optional[str]]) -> Optional[int]:
    """Index of the top-scored sample among those with an answer (ties: the first); None when no
    sample has one. As the paper's code: a sample the reward could extract no answer from (for
    MathQA-MCQ: no option letter, ``Score.answer`` is then None) cannot be picked."""
    if len(scores) != len(answers):
        raise ValueError(f"rerank_pick: {len(scores)} scores but {len(answers)} answers")
    answered = [i for i, answer in enumerate(answers) if answer is not None]
    return max(answered, key=lambda i: (scores[i], -i)) if answered else None


def rerank_curve(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]],
                 answers: Sequence[Sequence[Optional[str]]]) -> list[float]:
    """Reranking accuracy (percent) with the first k samples of every question, k = 1..K: the
    top-scored of samples 0..k-1 that have an answer is the question's answer (``rerank_pick``);
    a question none of whose first k samples has one counts as wrong, as the paper's code scores it."""
    num_samples = _check_rectangular(scores, correct)
    _check_rectangular(scores, answers)
    hits = [0] * num_samples
    for question_scores, question_correct, question_answers in zip(scores, correct, answers):
        best = None
        for i in range(num_samples):
            if question_answers[i] is not None and (best is None or question_scores[i] > question_scores[best]):
                best = i
            hits[i] += best is not None and bool(question_correct[best])
    return [100.0 * h / len(scores) for h in hits]


def _check_rectangular(a: Sequence[Sequence], b: Sequence[Sequence]) -> int:
    """K, after checking that both are Q x K with the same Q and K >= 1 everywhere."""
    if not a or len(a) != len(b):
        raise ValueError(f"need the same number (>= 1) of questions in both inputs, got {len(a)} and {len(b)}")
    widths = {len(row) for row in a} | {len(row) for row in b}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every question needs the same number (>= 1) of samples, got {sorted(widths)}")
    return widths.pop()
