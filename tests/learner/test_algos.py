"""learner/algos.py: the ReFT / PPO maths, against hand-computed values and reference loops."""
import math

import pytest
import torch

from learner import algos
from learner.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    AdvantageConfig,
    AdvantageInputs,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    get_advantage_estimator,
    get_policy_loss,
    get_value_loss,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    policy_loss_ppo,
    ppo_total_loss,
    register_advantage,
    register_policy_loss,
    register_value_loss,
    shape_rewards,
    value_loss_clipped,
    value_loss_mse,
)
from learner.masked import masked_whiten

NAN, INF = float("nan"), float("inf")


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0.0, atol=atol)


# ---- KL estimators -------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    # log r = -1 - (-1.5) = 0.5
    assert_close(kl_penalty(logp, ref, "k1"), [0.5])
    # k2 = 0.5^2 / 2 = 0.125
    assert_close(kl_penalty(logp, ref, "k2"), [0.125])
    # k3 = exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    assert_close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5])
    # identical policies: all three are 0
    for est in ("k1", "k2", "k3"):
        assert_close(kl_penalty(ref, ref, est), [0.0])


def test_kl_penalty_upcasts_and_rejects_unknown_names():
    out = kl_penalty(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-2.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"valid names: \['k1', 'k2', 'k3'\]"):
        kl_penalty(out, out, "mse")


# ---- reward shaping ------------------------------------------------------------------------


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, -1, 0]


def test_shape_rewards_puts_score_on_last_token_of_each_row():
    beta = 0.1
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, NAN], [-0.2, -0.3, -0.4, -0.1], [NAN, 1.0, 2.0, 3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-0.4, -0.3, -0.2, -0.6], [0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, 0.1, 1.0])
    out = shape_rewards(scores, logprobs, ref, mask, kl_coef=beta)
    # row 0 (3 tokens): kl = [0.5, -1.0, 0.0]; -beta*kl = [-0.05, 0.1, 0.0]; score 1 at index 2
    # row 1 (4 tokens): kl = [0.2, 0.0, -0.2, 0.5]; -beta*kl = [-0.02, 0, 0.02, -0.05]; +0.1 at index 3
    # row 2 (empty):    nothing, not even its score
    assert_close(out.kl, [[0.5, -1.0, 0.0, 0.0], [0.2, 0.0, -0.2, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert_close(out.rewards, [[-0.05, 0.1, 1.0, 0.0], [-0.02, 0.0, 0.02, 0.05], [0.0, 0.0, 0.0, 0.0]])


def test_shape_rewards_beta_zero_is_score_only_and_negative_beta_refused():
    mask = torch.tensor([[1, 1, 0]])
    lp, ref = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-3.0, -1.0, 0.0]])
    out = shape_rewards(torch.tensor([0.1]), lp, ref, mask, kl_coef=0.0)
    assert_close(out.rewards, [[0.0, 0.1, 0.0]])
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(torch.tensor([0.1]), lp, ref, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        shape_rewards(torch.tensor([0.1]), lp, ref[:, :2], mask, kl_coef=0.1)


# ---- GAE -----------------------------------------------------------------------------------


def test_gae_one_row_by_hand():
    rewards = torch.tensor([[-0.1, 0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    out = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: delta = 1.0 + 1*0 - 0.8 = 0.2 (terminal: V after the last token is 0); A2 = 0.2
    # t=1: delta = 0.2 + 0.8 - 0.4 = 0.6;  A1 = 0.6 + 0.95 * 0.2 = 0.79
    # t=0: delta = -0.1 + 0.4 - 0.5 = -0.2; A0 = -0.2 + 0.95 * 0.79 = 0.5505
    # R = A + V = [1.0505, 1.19, 1.0]
    assert_close(out.advantages, [[0.5505, 0.79, 0.2]])
    assert_close(out.returns, [[1.0505, 1.19, 1.0]])


def test_gae_gamma_and_lambda_play_different_roles():
    rewards = torch.tensor([[-0.1, 0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    out = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # t=2: delta = 1.0 - 0.8 = 0.2; A2 = 0.2
    # t=1: delta = 0.2 + 0.9*0.8 - 0.4 = 0.52; A1 = 0.52 + 0.9*0.5*0.2 = 0.61
    # t=0: delta = -0.1 + 0.9*0.4 - 0.5 = -0.24; A0 = -0.24 + 0.45*0.61 = 0.0345
    assert_close(out.advantages, [[0.0345, 0.61, 0.2]])
    assert_close(out.returns, [[0.5345, 1.01, 1.0]])
    # swapping them (the paper text's order) gives something else: t=1 delta = 0.2 + 0.5*0.8 - 0.4 = 0.2
    swapped = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.9)
    assert abs(swapped.advantages[0, 1].item() - 0.61) > 0.1


def test_gae_padded_row_by_hand():
    # row 0: the 3-token row above; row 1: 2 tokens then padding holding garbage
    rewards = torch.tensor([[-0.1, 0.2, 1.0], [0.3, 0.5, 123.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [0.2, 0.4, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1, t=1 (its last token): delta = 0.5 + 0 - 0.4 = 0.1; A = 0.1
    #        t=0: delta = 0.3 + 0.4 - 0.2 = 0.5; A = 0.5 + 0.95 * 0.1 = 0.595
    #        R = [0.795, 0.5]; padding: A = R = 0
    assert_close(out.advantages, [[0.5505, 0.79, 0.2], [0.595, 0.1, 0.0]])
    assert_close(out.returns, [[1.0505, 1.19, 1.0], [0.795, 0.5, 0.0]])


def test_shaped_rewards_then_gae_end_to_end():
    # log pi - log pi_ref = [0.2, -0.4], beta = 0.5, score 1:
    # rewards = [-0.5*0.2, -0.5*(-0.4) + 1] = [-0.1, 1.2]
    shaped = shape_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -1.4]]), torch.tensor([[-1.2, -1.0]]),
                           torch.ones(1, 2), kl_coef=0.5)
    assert_close(shaped.rewards, [[-0.1, 1.2]])
    out = compute_gae(shaped.rewards, torch.tensor([[0.3, 0.6]]), torch.ones(1, 2))
    # t=1: delta = 1.2 - 0.6 = 0.6; t=0: delta = -0.1 + 0.6 - 0.3 = 0.2, A0 = 0.2 + 0.95*0.6 = 0.77
    assert_close(out.advantages, [[0.77, 0.6]])
    assert_close(out.returns, [[1.07, 1.2]])


def gae_reference(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} straight from the definition, in Python floats, over
    the generated positions of each row (masked positions are not steps)."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        for k, t in enumerate(steps):
            total = 0.0
            for l, s in enumerate(steps[k:]):
                nxt = values[b][steps[k + l + 1]] if k + l + 1 < len(steps) else 0.0
                total += (gamma * lam) ** l * (rewards[b][s] + gamma * nxt - values[b][s])
            adv[b][t] = total
            ret[b][t] = total + values[b][t]
    return adv, ret


def random_mask(B, T, g, holes):
    if holes:
        return torch.rand(B, T, generator=g) > 0.35
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # always one full row
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (5, 16), (8, 33)])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference_loop(seed, B, T, gamma, lam, holes):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = random_mask(B, T, g, holes)
    out = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv, ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(out.advantages, torch.tensor(adv, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.returns, torch.tensor(ret, dtype=torch.float64), rtol=0, atol=1e-10)


def with_garbage_at_padding(x, mask, g):
    """x with NaN, inf and huge random numbers at every masked position."""
    garbage = torch.randn(x.shape, generator=g) * 1e6
    garbage.view(-1)[::3] = NAN
    garbage.view(-1)[1::5] = -INF
    return torch.where(mask, x, garbage)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_is_bit_identical_whatever_the_padding_holds(seed, holes):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    mask = random_mask(6, 12, g, holes)
    clean = compute_gae(rewards, values, mask)
    dirty = compute_gae(with_garbage_at_padding(rewards, mask, g), with_garbage_at_padding(values, mask, g), mask)
    assert torch.equal(clean.advantages, dirty.advantages)
    assert torch.equal(clean.returns, dirty.returns)
    assert torch.equal(dirty.advantages[~mask], torch.zeros(int((~mask).sum())))
    # and the registered, whitened estimator too
    est = get_advantage_estimator("gae")
    cfg = AdvantageConfig()
    a = est(AdvantageInputs(mask=mask, token_rewards=rewards, values=values), cfg)
    b = est(AdvantageInputs(mask=mask, token_rewards=with_garbage_at_padding(rewards, mask, g),
                            values=with_garbage_at_padding(values, mask, g)), cfg)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)


# ---- advantage estimators ------------------------------------------------------------------


def test_gae_estimator_whitens_advantages_but_not_returns():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = random_mask(4, 6, g, holes=False)
    raw = compute_gae(rewards, values, mask)
    batch = AdvantageInputs(mask=mask, token_rewards=rewards, values=values)
    out = get_advantage_estimator("gae")(batch, AdvantageConfig())
    assert torch.equal(out.advantages, masked_whiten(raw.advantages, mask))
    assert torch.equal(out.returns, raw.returns)  # value targets use the raw advantages
    plain = get_advantage_estimator("gae")(batch, AdvantageConfig(whiten=False))
    assert torch.equal(plain.advantages, raw.advantages)


def test_gae_estimator_says_which_field_is_missing():
    with pytest.raises(ValueError, match=r"'gae' needs AdvantageInputs.values"):
        get_advantage_estimator("gae")(AdvantageInputs(mask=torch.ones(1, 2), token_rewards=torch.ones(1, 2)),
                                       AdvantageConfig())
    with pytest.raises(ValueError, match=r"'grpo' needs AdvantageInputs.group_ids"):
        get_advantage_estimator("grpo")(AdvantageInputs(mask=torch.ones(1, 2), scores=torch.ones(1)),
                                        AdvantageConfig())


# Four questions: id 7 has K=4 samples, id 3 has 2 (one with the 0.1 partial reward), id 5 one,
# id 9 two that both failed. Rows have different lengths; the last row is empty.
GROUP_IDS = torch.tensor([7, 7, 3, 7, 3, 5, 7, 9, 9, 9])
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.1, 1.0, 1.0, 0.0, 0.0, 0.0])
LENGTHS = torch.tensor([3, 2, 3, 1, 2, 3, 3, 2, 3, 0])
GROUP_MASK = torch.arange(3).unsqueeze(0) < LENGTHS.unsqueeze(1)  # (10, 3), right-padded


def per_row(advantages):
    """The one advantage of each row (it is constant over the row's tokens); 0 for empty rows."""
    first = advantages[:, 0]
    assert torch.equal(advantages, torch.where(GROUP_MASK, first.unsqueeze(1), 0.0))
    return first


def test_grpo_by_hand():
    eps = 1e-6
    out = get_advantage_estimator("grpo")(AdvantageInputs(mask=GROUP_MASK, scores=SCORES, group_ids=GROUP_IDS),
                                          AdvantageConfig(eps=eps))
    # id 7: scores 1, 0, 0, 1 -> mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #       advantages = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    a7 = 0.5 / (math.sqrt(1 / 3) + eps)
    # id 3: scores 1, 0.1 -> mean 0.55, deviations +-0.45, var = 2 * 0.2025 / 1 = 0.405, std = 0.6363961
    a3 = 0.45 / (math.sqrt(0.405) + eps)
    # id 5: one sample -> 0 ; id 9: all 0 -> deviation 0 / (0 + eps) = 0 ; the empty row -> nothing
    expected = [a7, -a7, a3, -a7, -a3, 0.0, a7, 0.0, 0.0, 0.0]
    assert_close(per_row(out.advantages), expected)
    assert torch.equal(out.returns, out.advantages)


def test_grpo_without_std_is_the_centred_score():
    out = get_advantage_estimator("grpo")(AdvantageInputs(mask=GROUP_MASK, scores=SCORES, group_ids=GROUP_IDS),
                                          AdvantageConfig(norm_by_std=False))
    # score - group mean: id 7 +-0.5, id 3 +-0.45, singletons and all-equal groups 0
    assert_close(per_row(out.advantages), [0.5, -0.5, 0.45, -0.5, -0.45, 0.0, 0.5, 0.0, 0.0, 0.0])


def test_rloo_by_hand():
    out = get_advantage_estimator("rloo")(AdvantageInputs(mask=GROUP_MASK, scores=SCORES, group_ids=GROUP_IDS),
                                          AdvantageConfig())
    # id 7 (1, 0, 0, 1): a 1 has others (0 + 0 + 1)/3 = 1/3 -> 2/3; a 0 has others (1 + 0 + 1)/3 = 2/3 -> -2/3
    # id 3 (1, 0.1): 1 - 0.1 = 0.9 and 0.1 - 1 = -0.9 ; id 5 (one sample): 0 ; id 9: 0 - 0 = 0
    assert_close(per_row(out.advantages), [2 / 3, -2 / 3, 0.9, -2 / 3, -0.9, 0.0, 2 / 3, 0.0, 0.0, 0.0])
    assert torch.equal(out.returns, out.advantages)


def test_grpo_and_rloo_do_not_depend_on_row_order_or_id_values():
    perm = torch.tensor([9, 3, 0, 8, 1, 5, 2, 7, 6, 4])
    for name in ("grpo", "rloo"):
        est = get_advantage_estimator(name)
        base = est(AdvantageInputs(mask=GROUP_MASK, scores=SCORES, group_ids=GROUP_IDS), AdvantageConfig())
        shuffled = est(AdvantageInputs(mask=GROUP_MASK[perm], scores=SCORES[perm], group_ids=GROUP_IDS[perm] * 100 - 7),
                       AdvantageConfig())
        torch.testing.assert_close(shuffled.advantages, base.advantages[perm], rtol=0, atol=1e-6)


def test_advantage_config_checks_itself():
    with pytest.raises(ValueError, match=r"rl\.advantage\.gamma"):
        AdvantageConfig(gamma=1.5)
    with pytest.raises(ValueError, match=r"rl\.advantage\.lam"):
        AdvantageConfig(lam=-0.1)


# ---- PPO policy loss: one test per clipping regime (clip_eps = 0.2) ------------------------


def ppo_one_token(ratio, advantage):
    old = torch.tensor([[-1.0]])
    logprobs = (old + math.log(ratio)).requires_grad_(True)
    out = policy_loss_ppo(logprobs, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip_eps=0.2)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return out, grad.item()


def test_ppo_positive_advantage_ratio_above_band_is_clipped():
    out, grad = ppo_one_token(ratio=1.5, advantage=2.0)
    # unclipped -A*r = -3.0; clipped -A*1.2 = -2.4; max = -2.4 -> clipped, no gradient
    assert_close(out.loss, -2.4)
    assert grad == 0.0
    assert_close(out.metrics["clipfrac"], 1.0)
    # approx_kl = (r - 1) - log r = 0.5 - 0.4054651 = 0.0945349
    assert_close(out.metrics["approx_kl"], 0.5 - math.log(1.5))
    assert_close(out.metrics["ratio_mean"], 1.5)


def test_ppo_negative_advantage_ratio_below_band_is_clipped():
    out, grad = ppo_one_token(ratio=0.5, advantage=-2.0)
    # unclipped -A*r = 1.0; clipped -A*0.8 = 1.6; max = 1.6 -> clipped, no gradient
    assert_close(out.loss, 1.6)
    assert grad == 0.0
    assert_close(out.metrics["clipfrac"], 1.0)


def test_ppo_inside_band_is_not_clipped():
    out, grad = ppo_one_token(ratio=1.1, advantage=2.0)
    # -A*r = -2.2 both ways; d(-A * exp(logp - old))/dlogp = -A*r = -2.2
    assert_close(out.loss, -2.2)
    assert_close(torch.tensor(grad), -2.2)
    assert_close(out.metrics["clipfrac"], 0.0)


def test_ppo_ratio_outside_band_on_the_pessimistic_side_is_not_clipped():
    out, grad = ppo_one_token(ratio=0.5, advantage=2.0)
    # unclipped -A*r = -1.0; clipped -A*0.8 = -1.6; max = -1.0 -> the unclipped term, gradient -A*r = -1
    assert_close(out.loss, -1.0)
    assert_close(torch.tensor(grad), -1.0)
    assert_close(out.metrics["clipfrac"], 0.0)


def test_ppo_loss_token_mean_over_mask_and_padding_garbage():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-1.0 + math.log(1.5), -1.0 + math.log(1.1), NAN],
                             [-1.0 + math.log(0.5), 50.0, 80.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, NAN], [-2.0, INF, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = policy_loss_ppo(logprobs, old, adv, mask)
    # tokens: -2.4 (clipped), -2.2 (inside), 1.6 (clipped) -> (-2.4 - 2.2 + 1.6) / 3 = -1.0
    assert_close(out.loss, -1.0)
    assert_close(out.metrics["clipfrac"], 2 / 3)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    # only the unclipped token has a gradient: -A*r / 3 = -2.2 / 3; padding 0, not NaN
    assert_close(grad, [[0.0, -2.2 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert all(v.requires_grad is False for v in out.metrics.values())


# ---- value loss ----------------------------------------------------------------------------


def test_value_loss_clipped_by_hand():
    values = torch.tensor([[1.0, 0.6, -0.5, NAN]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0, NAN]])
    returns = torch.tensor([[1.2, 0.0, 0.3, INF]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = value_loss_clipped(values, old, returns, mask, clip_eps=0.2)
    # token 0: (1.0-1.2)^2 = 0.04; clip(1.0, 0.3, 0.7) = 0.7 -> (0.7-1.2)^2 = 0.25; max 0.25 (clipped)
    # token 1: (0.6-0.0)^2 = 0.36; 0.6 is inside [0.3, 0.7] -> 0.36; max 0.36
    # token 2: (-0.5-0.3)^2 = 0.64; clip(-0.5, -0.2, 0.2) = -0.2 -> (-0.5)^2 = 0.25; max 0.64
    # loss = 0.5 * (0.25 + 0.36 + 0.64) / 3 = 0.2083333 ; vf_clipfrac = 1/3
    assert_close(out.loss, 0.5 * 1.25 / 3)
    assert_close(out.metrics["vf_clipfrac"], 1 / 3)
    (grad,) = torch.autograd.grad(out.loss, values)
    # d/dv of 0.5 * (v - R)^2 / 3 = (v - R) / 3 on unclipped tokens; 0 on the clipped one and padding
    assert_close(grad, [[0.0, 0.6 / 3, -0.8 / 3, 0.0]])


def test_value_loss_mse_by_hand():
    out = value_loss_mse(torch.tensor([[1.0, 0.6, 9.0]]), torch.zeros(1, 3), torch.tensor([[1.2, 0.0, 0.0]]),
                         torch.tensor([[1, 1, 0]]))
    # 0.5 * (0.04 + 0.36) / 2 = 0.1
    assert_close(out.loss, 0.1)


def test_ppo_total_loss_uses_value_coefficient_five():
    # 0.3 + 5 * 0.1 = 0.8
    assert_close(ppo_total_loss(torch.tensor(0.3), torch.tensor(0.1)), 0.8)
    assert_close(ppo_total_loss(torch.tensor(0.3), torch.tensor(0.1), vf_coef=1.0), 0.4)


# ---- log-probs, entropy, explained variance ------------------------------------------------


def test_logprobs_from_logits_by_hand_and_leaves_input_alone():
    # logits (0, ln 2, ln 3) -> softmax (1/6, 2/6, 3/6)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    before = logits.clone()
    out = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    assert_close(out, [[math.log(0.5), math.log(1 / 6)]])
    assert torch.equal(logits, before)
    # temperature 2: softmax of (0, ln 2, ln 3)/2 ∝ (1, sqrt 2, sqrt 3)
    hot = logprobs_from_logits(logits, torch.tensor([[2, 0]]), temperature=2.0)
    z = 1 + math.sqrt(2) + math.sqrt(3)
    assert_close(hot, [[math.log(math.sqrt(3) / z), math.log(1 / z)]])
    assert torch.equal(logits, before)


def test_logprobs_from_logits_upcasts_half_precision():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    before = logits.clone()
    out = logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32 and torch.equal(logits, before)


def test_entropy_from_logits_by_hand():
    # p = (1/6, 1/3, 1/2): H = (1/6) ln 6 + (1/3) ln 3 + (1/2) ln 2 = 1.0114043
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0]))
    assert_close(entropy_from_logits(logits), (1 / 6) * math.log(6) + (1 / 3) * math.log(3) + 0.5 * math.log(2))
    # uniform over 4: ln 4, also with a huge common offset (stability)
    assert_close(entropy_from_logits(torch.full((4,), 1e4)), math.log(4))


def test_entropy_with_minus_inf_logits_is_finite_and_input_unchanged():
    logits = torch.tensor([[0.0, 0.0, -INF, -INF]], requires_grad=True)
    before = logits.detach().clone()
    h = entropy_from_logits(logits)
    assert_close(h, [math.log(2)])
    (grad,) = torch.autograd.grad(h.sum(), logits)
    assert torch.isfinite(grad).all()
    assert torch.equal(logits.detach(), before)


def test_explained_variance_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    # perfect critic -> 1
    assert_close(explained_variance(returns, returns, mask), 1.0)
    # residual (0, 0, 0, -1): var = mean((x + 0.25)^2) = (3 * 0.0625 + 0.5625) / 4 = 0.1875
    # var(returns) = 1.25 -> 1 - 0.1875 / 1.25 = 0.85
    assert_close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 5.0, 7.0]]), returns, mask), 0.85)
    # a constant critic equal to the mean explains nothing -> 0
    assert_close(explained_variance(torch.full((1, 5), 2.5), returns, mask), 0.0)
    # constant returns -> NaN (undefined), as CleanRL
    assert torch.isnan(explained_variance(torch.zeros(1, 5), torch.ones(1, 5), mask))


# ---- registries ----------------------------------------------------------------------------

REGISTRIES = [
    (ADVANTAGE_ESTIMATORS, register_advantage, get_advantage_estimator, ["gae", "grpo", "rloo"]),
    (POLICY_LOSSES, register_policy_loss, get_policy_loss, ["ppo"]),
    (VALUE_LOSSES, register_value_loss, get_value_loss, ["clipped", "mse"]),
]


@pytest.mark.parametrize("registry, register, get, names", REGISTRIES)
def test_registry_lists_valid_names_for_unknown_name(registry, register, get, names):
    assert sorted(registry) == names
    with pytest.raises(ValueError, match="valid names: " + str(names).replace("[", r"\[").replace("]", r"\]")):
        get("no-such-thing")


@pytest.mark.parametrize("registry, register, get, names", REGISTRIES)
def test_registry_refuses_conflicting_registration(monkeypatch, registry, register, get, names):
    # Reserve a fresh name so that monkeypatch deletes it at teardown (setitem of a new key is
    # undone by deleting it; the delitem right after empties it for the test).
    monkeypatch.setitem(registry, "test-only", None)
    monkeypatch.delitem(registry, "test-only")

    def first(*args, **kwargs):
        pass

    def second(*args, **kwargs):
        pass

    assert register("test-only")(first) is first
    assert get("test-only") is first
    register("test-only")(first)  # the same function again: allowed (idempotent)
    with pytest.raises(ValueError, match="already registered"):
        register("test-only")(second)
    original = registry[names[0]]
    with pytest.raises(ValueError, match="already registered"):
        register(names[0])(second)
    assert get("test-only") is first and registry[names[0]] is original


def test_registries_are_clean_after_the_registration_tests():
    # runs after the tests above (file order): monkeypatch removed the test entries
    assert "test-only" not in ADVANTAGE_ESTIMATORS and "test-only" not in POLICY_LOSSES
    assert get_policy_loss("ppo") is policy_loss_ppo and get_value_loss("clipped") is value_loss_clipped
    assert algos.get_advantage_estimator("gae") is algos.gae_advantage


def test_entropy_and_its_gradient_match_the_float64_definition_on_random_logits():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 17, generator=g) * 4).requires_grad_(True)
    ref_logits = logits.detach().double().requires_grad_(True)
    p = torch.softmax(ref_logits, dim=-1)
    ref = -(p * torch.log_softmax(ref_logits, dim=-1)).sum(-1)  # H = -sum p log p
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, ref.float(), rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(h.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- GRPO's KL loss term

def test_kl_loss_is_k3_by_hand_and_ignores_padding():
    # Two tokens of one sequence, then padding (NaN there must not leak).
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), float("nan")]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), float("nan")]])
    mask = torch.tensor([[1, 1, 0]])
    # k3 = r - log r - 1 with r = pi_ref / pi: r = 0.5 -> 0.5 + log 2 - 1; r = 2 -> 2 - log 2 - 1.
    expected = ((0.5 + math.log(2) - 1) + (2 - math.log(2) - 1)) / 2
    assert algos.kl_loss(logprobs, ref, mask).item() == pytest.approx(expected)
    assert algos.kl_loss(ref, ref, mask).item() == 0.0   # at the reference: no KL


def test_the_kl_loss_term_changes_the_policy_gradient():
    """GRPO with beta > 0: the same surrogate, plus beta * k3, whose gradient per token is
    beta * (1 - pi_ref / pi_theta) / T: hand-computed here for one sequence of two tokens."""
    logits = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)   # log pi of 2 tokens
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([[1.0, 1.0]])

    def grad(kl_loss_coef):
        logits.grad = None
        pg = algos.policy_loss_ppo(logits, logits.detach(), adv, mask, agg_mode="seq-mean-token-mean")
        kl = algos.kl_loss(logits, ref, mask, agg_mode="seq-mean-token-mean")
        algos.ppo_total_loss(pg.loss, torch.zeros(()), 5.0, kl, kl_loss_coef).backward()
        return logits.grad.clone()

    without, beta = grad(0.0), 0.04
    assert torch.allclose(without, torch.tensor([[-0.5, -0.5]]))   # -A * rho / T at rho = 1
    with_kl = grad(beta)
    # d k3 / d log pi = 1 - pi_ref / pi: token 1 (pi above the reference) 1 - 0.5, token 2: 1 - 2.
    assert torch.allclose(with_kl - without, torch.tensor([[beta * 0.5 / 2, beta * -1.0 / 2]]))
