"""The reward actor on a real local Ray cluster: a batch mixing correct and wrong P-CoT programs,
hostile programs (infinite loop, fork bomb, os.system, memory bomb, sys.exit, os._exit, a syntax
error) and N-CoT completions. The good ones get their rewards, every hostile one 0 with the
expected status, the actor stays alive and serves the next batch, and stats() counts it all.
~15 s: Ray start-up plus one 2 s program timeout."""
import pytest

from actors.reward import RewardItem, RewardWorker, launch
from formats.records import ANSWER_TRIGGER
from rewards.score import RewardConfig

QUESTION = "Mia has 3 apples. She buys 4 more apples. How many apples does Mia have now?"


def body(*lines):
    """A P-CoT completion: what the model writes after the prompt's `def solution():` header."""
    return "".join(f"    {line}\n" for line in lines)


# (completion, gold, kind, expected reward, expected status, text the detail must contain)
CASES = [
    (body("apples = 3", "more = 4", "result = apples + more", "return result"), "7", "pcot", 1.0, "ok", ""),
    (body("apples = 3", "result = apples * 4", "return result"), "7", "pcot", 0.1, "ok", ""),
    # what the model writes after the function is cut off (the paper's rule): still correct
    (body("return 3 + 4") + "\n\nprint(solution())\nimport os\nos.system('true')\n", "7", "pcot", 1.0, "ok", ""),
    (body("while True:", "    pass"), "7", "pcot", 0.0, "timeout", ""),
    (body("import os", "while True:", "    os.fork()"), "7", "pcot", 0.0, "error", "blocked: os.fork"),
    (body("import os", "os.system('touch /tmp/reft-reward-pwned')", "return 7"), "7", "pcot", 0.0, "error",
     "blocked: os.system"),
    (body("x = bytearray(10**10)", "return 7"), "7", "pcot", 0.0, "error", "MemoryError"),
    # the paper's runner turns sys.exit into print: the function then returns None, no answer
    (body("import sys", "sys.exit(0)"), "7", "pcot", 0.0, "no_answer", "not a number"),
    (body("import os", "os._exit(0)"), "7", "pcot", 0.0, "killed", ""),
    (body("return (3 +"), "7", "pcot", 0.0, "error", "SyntaxError"),
    (f"Mia has 3 + 4 = 7 apples.\n{ANSWER_TRIGGER} 7", "7", "ncot", 1.0, "ok", ""),
    (f"Mia has 3 * 4 = 12 apples.\n{ANSWER_TRIGGER} 12", "7", "ncot", 0.1, "ok", ""),
    ("Mia has many apples.", "7", "ncot", 0.0, "no_answer", ""),
]


@pytest.fixture(scope="module")
def reward_actor():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="reft")
    actor = launch(RewardConfig(program_timeout_s=2.0, sandbox_workers=2), timeout_s=120)
    yield ray, actor
    ray.get(actor.close.remote(), timeout=60)
    ray.kill(actor)
    ray.shutdown()


def test_reward_actor_scores_good_bad_and_hostile_samples_and_survives(reward_actor):
    ray, actor = reward_actor
    items = [RewardItem(c, gold, kind, "synthetic", question=QUESTION if kind == "pcot" else None)
             for c, gold, kind, *_ in CASES]
    pids_before = ray.get(actor.health.remote(), timeout=30)["sandbox_worker_pids"]
    scores = ray.get(actor.score.remote(items), timeout=120)
    assert len(scores) == len(CASES)
    for score, (completion, _gold, _kind, reward, status, detail) in zip(scores, CASES):
        assert (score.reward, score.status) == (reward, status), (completion, score)
        assert detail in score.detail, (completion, score)

    # Alive and serving: a second batch (tuples are accepted too) gets scored.
    again = ray.get(actor.score.remote([CASES[0][0:3] + ("synthetic", None, QUESTION)]), timeout=60)
    assert again[0].reward == 1.0

    stats = ray.get(actor.stats.remote(), timeout=30)
    assert stats["batches"] == 2 and stats["items"] == len(CASES) + 1
    assert stats["correct"] == 4   # three correct in the batch, one in the second
    expected = {"ok": 6, "no_answer": 2, "timeout": 1, "error": 4, "killed": 1}
    assert stats["status_counts"] == expected
    assert stats["rule"] == "paper" and {s.rule for s in scores} == {"paper"}   # reward.rule's default
    assert stats["max_batch_s"] >= 2.0   # the infinite loop ran into its 2 s timeout
    health = ray.get(actor.health.remote(), timeout=30)
    assert len(health["sandbox_worker_pids"]) == 2 and len(pids_before) == 2


def test_reward_worker_in_process_keeps_input_order_across_kinds():
    # Grouping by (kind, dataset) must not reorder the scores.
    worker = RewardWorker(RewardConfig(program_timeout_s=2.0, sandbox_workers=1))
    try:
        items = [CASES[11][:3] + ("synthetic",), CASES[0][:3] + ("synthetic", None, QUESTION),
                 CASES[10][:3] + ("synthetic",)]
        assert [s.reward for s in worker.score(items)] == [0.1, 1.0, 1.0]
    finally:
        worker.close()
