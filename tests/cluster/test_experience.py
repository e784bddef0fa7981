"""Sampled completions → the learner's batch layout → KL-shaped rewards and advantages."""
import pytest
import torch

from actors.rollout import Sample
from cluster.experience import add_advantages, samples_to_batch
from learner.algos import AdvantageConfig


def sample(prompt, completion, logprobs=None, question=0):
    logprobs = tuple(logprobs) if logprobs is not None else (0.0,) * len(completion)
    return Sample(f"q{question}", 0, tuple(prompt), tuple(completion), "", logprobs, "stop", 0, "rollout-0",
                  question_index=question)


def experience(batch, scores, old, values, ref):
    return dict(batch, scores=torch.tensor(scores), old_logprobs=old, values=values, ref_logprobs=ref)


def test_samples_to_batch_layout():
    batch = samples_to_batch([sample([5, 6], [8, 9, 2], [-1., -2., -3.], question=3),
                              sample([7], [10, 2], [-4., -5.], question=1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, 2], [7, 10, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["sampler_logprobs"].tolist() == [[0, 0, -1, -2, -3], [0, -4, -5, 0, 0]]
    assert batch["group_ids"].tolist() == [3, 1]   # the question index, a field, not parsed from an id
    with pytest.raises(ValueError, match="sample 1: 1 sampler logprobs for 2 tokens"):
        samples_to_batch([sample([5], [8]), sample([7], [10, 2], [-4.])], 0)


def test_gae_on_the_learner_layout_by_hand():
    # One prompt token, three response tokens, score 1, values 0, no KL, gamma 1, lambda 0.95:
    # delta = (0, 0, 1) on the response; A_3 = 1, A_2 = 0.95, A_1 = 0.95^2 = 0.9025; R = A + V = A.
    batch = samples_to_batch([sample([5], [8, 9, 2])], pad_id=0)
    zeros = torch.zeros(1, 4)
    ppo, metrics = add_advantages(experience(batch, [1.0], zeros, zeros, zeros), "gae", kl_coef=0.05,
                                  adv_cfg=AdvantageConfig(whiten=False))
    expected = torch.tensor([[0.0, 0.9025, 0.95, 1.0]])
    torch.testing.assert_close(ppo["advantages"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ppo["returns"], expected, atol=1e-6, rtol=0)
    assert metrics["rl/kl"] == 0.0 and metrics["rl/response_length"] == 3.0


def test_kl_penalty_enters_the_reward():
    # log pi - log pi_ref = 0.5 on each of 2 response tokens, beta = 0.1 -> per-token reward -0.05,
    # plus the score 0.1 (wrong answer) on the last: shaped return 0.1 - 2 * 0.05 = 0.0.
    batch = samples_to_batch([sample([5], [8, 2], [-1.0, -1.2])], pad_id=0)
    logprobs = torch.tensor([[0.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.5]])
    exp = experience(batch, [0.1], logprobs, torch.zeros(1, 3), ref)
    _, metrics = add_advantages(exp, "gae", kl_coef=0.1, adv_cfg=AdvantageConfig())
    assert metrics["rl/kl"] == pytest.approx(0.5)
    assert metrics["rl/shaped_return"] == pytest.approx(0.0, abs=1e-7)
    assert "rl/sampler_logprob_gap" not in metrics   # no learner log-probs to compare with
    _, metrics = add_advantages(dict(exp, learner_logprobs=logprobs), "gae", kl_coef=0.1, adv_cfg=AdvantageConfig())
    assert metrics["rl/sampler_logprob_gap"] == pytest.approx((0.0 + 0.2) / 2)


def test_grpo_uses_groups():
    batch = samples_to_batch([sample([5], [8, 2], question=3), sample([5], [9, 2], question=3)], pad_id=0)
    zeros = torch.zeros(2, 3)
    ppo, _ = add_advantages(experience(batch, [1.0, 0.0], zeros, zeros, zeros), "grpo", kl_coef=0.0,
                            adv_cfg=AdvantageConfig())
    # mean 0.5, unbiased std 0.7071: A = +-0.7071 on every response token, 0 on the prompt.
    a = 0.5 ** 0.5
    torch.testing.assert_close(ppo["advantages"][:, 1:], torch.tensor([[a, a], [-a, -a]]), atol=1e-5, rtol=0)
    assert ppo["advantages"][:, 0].tolist() == [0.0, 0.0]


def test_missing_experience_is_named():
    batch = samples_to_batch([sample([5], [8, 2])], pad_id=0)
    with pytest.raises(KeyError, match="scores"):
        add_advantages(batch, "gae", 0.05, AdvantageConfig())
