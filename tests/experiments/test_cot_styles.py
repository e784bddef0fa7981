"""experiments.cot_styles: sorting CoTs into "steps" and "terse" and scoring each style."""
import pytest

from actors.reward import RewardWorker, reward_item
from actors.rollout import Sample
from cluster.evaluate import Scored
from experiments.cot_styles import style, style_table
from formats.records import Example
from rewards.score import RewardConfig
from tasks.synthetic import SyntheticConfig, generate


@pytest.mark.parametrize("completion, expected", [
    ("Tom starts with 5 apples.\nTom has 5 + 3 = 8 apples.\nTherefore, the answer is: 8", "steps"),
    ("Tom starts with 5 apples.\nSo Tom has 8 apples.\nTherefore, the answer is: 8", "terse"),
    ("    apples = 5\n    bought = 3\n    tom_apples = apples + bought\n    result = tom_apples\n    return result", "steps"),
    ("    result = 8\n    return result", "terse"),
    ("    a = 12\n    result = a // 4\n    return result", "steps"),
    # the answer line does not count: "8 - 1" after the trigger is not working shown
    ("So Tom has 8 apples.\nTherefore, the answer is: 8 - 1", "terse"),
])
def test_style(completion, expected):
    assert style(completion) == expected


def test_generated_annotations_have_the_configured_styles():
    train, test = generate(SyntheticConfig(num_train=400, num_test=50, min_steps=2, max_steps=3, terse_fraction=0.5))
    terse = sum(style(e.cot) == "terse" for e in train)
    assert 150 < terse < 250 and all(style(e.cot) == "steps" for e in test)


def test_style_table_scores_each_style():
    examples = [Example(id=str(i), question="q", answer="8", dataset="synthetic", cot_kind="ncot") for i in range(3)]
    completions = ["Tom has 5 + 3 = 8 apples.\nTherefore, the answer is: 8",      # steps, right
                   "Tom has 5 + 3 = 9 apples.\nTherefore, the answer is: 9",      # steps, wrong
                   "So Tom has 7 apples.\nTherefore, the answer is: 7"]           # terse, wrong
    worker = RewardWorker(RewardConfig(sandbox_workers=1))
    try:
        scores = worker.score([reward_item(c, e) for c, e in zip(completions, examples)])
    finally:
        worker.close()
    row = style_table([Scored(Sample("q", 0, (1,), (2,), c, (0.0,), "stop", 0, "hf"), s)
                       for c, s in zip(completions, scores)])
    assert row == pytest.approx({"questions": 3, "accuracy": 100 / 3, "steps_share": 200 / 3, "steps_accuracy": 50.0,
                                 "terse_share": 100 / 3, "terse_accuracy": 0.0})
