"""The RL question schedule: every question once per epoch, and resumable from (epoch, position)."""
import dataclasses

from cluster.schedule import TrainState, next_questions, question_order


def test_each_epoch_is_a_permutation_and_epochs_differ():
    assert sorted(question_order(10, seed=0, epoch=0)) == list(range(10))
    assert question_order(10, 0, 0) != question_order(10, 0, 1)
    assert question_order(10, 0, 0) == question_order(10, 0, 0)


def test_batches_cover_an_epoch_then_wrap():
    state = TrainState()
    seen = [next_questions(state, 10, 4, seed=1) for _ in range(3)]   # 12 questions: wraps once
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    assert (state.epoch, state.position) == (1, 2)
    assert seen[2][2:] == question_order(10, 1, 1)[:2]


def test_resume_from_state_gives_the_same_questions():
    state = TrainState()
    next_questions(state, 10, 3, seed=2)
    saved = dataclasses.replace(state)
    rest = [next_questions(state, 10, 3, seed=2) for _ in range(4)]
    resumed = TrainState(**saved.to_json())
    assert [next_questions(resumed, 10, 3, seed=2) for _ in range(4)] == rest


def test_the_training_time_budget_survives_a_checkpoint():
    """rl.max_seconds counts TrainState.trained_s, which the checkpoint's client state carries:
    a resumed run continues its budget instead of starting a new one."""
    state = TrainState(step=7, trained_s=31.5)
    assert TrainState(**state.to_json()).trained_s == 31.5
    assert TrainState(**{k: v for k, v in state.to_json().items() if k != "trained_s"}).trained_s == 0.0  # older checkpoints
