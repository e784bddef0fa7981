"""learner/masked.py: masked reductions and loss aggregation, against hand-computed values."""
import math

import pytest
import torch

from learner.masked import agg_loss, masked_mean, masked_sum, masked_var, masked_whiten

NAN, INF = float("nan"), float("inf")


def assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0.0, atol=atol)


# Garbage (NaN, inf) sits in every padded position; it must never reach a result.
VALUES = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 1]])


def test_masked_sum_and_mean_ignore_nan_and_inf_in_padding():
    # all: 1 + 2 + 4 + 6 = 13 over 4 tokens = 3.25
    assert_close(masked_sum(VALUES, MASK), 13.0)
    assert_close(masked_mean(VALUES, MASK), 3.25)
    # per row: (1 + 2) / 2 = 1.5 ; (4 + 6) / 2 = 5.0
    assert_close(masked_sum(VALUES, MASK, dim=-1), [3.0, 10.0])
    assert_close(masked_mean(VALUES, MASK, dim=-1), [1.5, 5.0])
    # per column: (1 + 4) / 2 = 2.5 ; 2 / 1 = 2 ; 6 / 1 = 6
    assert_close(masked_mean(VALUES, MASK, dim=0), [2.5, 2.0, 6.0])


def test_masked_mean_accepts_bool_and_float_masks():
    for mask in (MASK.bool(), MASK.float()):
        assert_close(masked_mean(VALUES, mask), 3.25)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    # denominator clamp(min=1): 0 / 1 = 0
    empty = torch.zeros(2, 3)
    assert_close(masked_mean(VALUES, empty), 0.0)
    assert_close(masked_mean(VALUES, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=-1), [1.0, 0.0])


def test_masked_var_unbiased_and_biased():
    # unmasked: 1, 2, 4, 6; mean 3.25; squared deviations 5.0625, 1.5625, 0.5625, 7.5625 = 14.75
    # unbiased: 14.75 / 3 = 4.916667 ; biased: 14.75 / 4 = 3.6875
    assert_close(masked_var(VALUES, MASK), 14.75 / 3)
    assert_close(masked_var(VALUES, MASK, unbiased=False), 3.6875)


def test_masked_var_raises_below_two_elements():
    with pytest.raises(ValueError, match="selects no element"):
        masked_var(VALUES, torch.zeros(2, 3))
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="selects 1 element"):
        masked_var(VALUES, one)
    # biased variance of one element is defined: 0
    assert_close(masked_var(VALUES, one, unbiased=False), 0.0)


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # mean 2.5; unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; std = 1.2909944
    # (x - 2.5) / 1.2909944 = -1.1618950, -0.3872983, 0.3872983, 1.1618950; padding -> 0
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0]]
    assert_close(masked_whiten(values, mask), expected)
    # shift_mean=False adds the mean 2.5 back to the unmasked entries
    assert_close(masked_whiten(values, mask, shift_mean=False), [[2.5 + e for e in expected[0][:4]] + [0.0]])


def test_masked_whiten_gives_zero_mean_unit_variance_on_random_batch():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g) * 3 + 7
    mask = torch.rand(6, 9, generator=g) > 0.3
    w = masked_whiten(values, mask)
    assert_close(masked_mean(w, mask), 0.0, atol=1e-5)
    assert_close(masked_var(w, mask), 1.0, atol=1e-5)
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))


# ---- agg_loss ------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
LOSS_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode, expected", [
    # tokens: 1 + 2 + 4 + 5 + 6 + 7 = 25 over 6 tokens
    ("token-mean", 25.0 / 6.0),
    # row means 1.5, 5.0, 7.0 -> 13.5 / 3 = 4.5
    ("seq-mean-token-mean", 4.5),
    # row sums 3, 15, 7 -> 25 / 3
    ("seq-mean-token-sum", 25.0 / 3.0),
])
def test_agg_loss_modes_by_hand(mode, expected):
    assert_close(agg_loss(LOSS, LOSS_MASK, mode), expected)


def test_agg_loss_token_mean_shards_sum_to_full_batch():
    # OpenRLHF-style: shard A = rows 0-1 (5 tokens), shard B = row 2 (1 token), 6 tokens in all.
    # A: (1 + 2 + 4 + 5 + 6) / 6 = 18/6 = 3 ; B: 7/6 ; A + B = 25/6 = the full-batch token mean.
    full = agg_loss(LOSS, LOSS_MASK, "token-mean")
    a = agg_loss(LOSS[:2], LOSS_MASK[:2], "token-mean", num_tokens_global=6)
    b = agg_loss(LOSS[2:], LOSS_MASK[2:], "token-mean", num_tokens_global=torch.tensor(6))
    assert_close(a, 3.0)
    assert_close(b, 7.0 / 6.0)
    assert_close(a + b, full.item())
    # Without the global count the shards' local means (18/5 = 3.6 and 7) average to 5.3 != 25/6.
    local = (agg_loss(LOSS[:2], LOSS_MASK[:2], "token-mean") + agg_loss(LOSS[2:], LOSS_MASK[2:], "token-mean")) / 2
    assert abs(local.item() - full.item()) > 1.0


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_agg_loss_seq_modes_shards_sum_to_full_batch(mode):
    # 3 non-empty sequences in all; seq-mean-token-mean: A = (1.5 + 5) / 3, B = 7 / 3 -> 4.5
    full = agg_loss(LOSS, LOSS_MASK, mode)
    a = agg_loss(LOSS[:2], LOSS_MASK[:2], mode, num_seqs_global=3)
    b = agg_loss(LOSS[2:], LOSS_MASK[2:], mode, num_seqs_global=3)
    assert_close(a + b, full.item())


def test_agg_loss_shard_invariance_random_split_and_gradients():
    g = torch.Generator().manual_seed(1)
    loss = torch.rand(8, 11, generator=g, requires_grad=True)
    mask = torch.rand(8, 11, generator=g) > 0.4
    full = agg_loss(loss, mask, "token-mean")
    (full_grad,) = torch.autograd.grad(full, loss)
    n = int(mask.sum())
    sharded = sum(agg_loss(loss[i:i + 3], mask[i:i + 3], "token-mean", num_tokens_global=n) for i in (0, 3, 6))
    (sharded_grad,) = torch.autograd.grad(sharded, loss)
    assert_close(sharded, full.item())
    torch.testing.assert_close(sharded_grad, full_grad, rtol=0, atol=1e-7)


def test_agg_loss_skips_empty_rows_and_nan_padding():
    loss = torch.tensor([[2.0, NAN], [NAN, NAN], [4.0, 6.0]])
    mask = torch.tensor([[1, 0], [0, 0], [1, 1]])
    # the empty row neither contributes nor counts: seq-mean-token-mean = (2 + 5) / 2 = 3.5
    assert_close(agg_loss(loss, mask, "seq-mean-token-mean"), 3.5)
    # token-mean = (2 + 4 + 6) / 3 = 4
    assert_close(agg_loss(loss, mask, "token-mean"), 4.0)
    # all padding: 0, not NaN
    assert_close(agg_loss(loss, torch.zeros(3, 2), "token-mean"), 0.0)
    assert_close(agg_loss(loss, torch.zeros(3, 2), "seq-mean-token-sum"), 0.0)


def test_agg_loss_rejects_unknown_mode_and_bad_count():
    with pytest.raises(ValueError, match=r"valid modes: \['token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'\]"):
        agg_loss(LOSS, LOSS_MASK, "token-sum")
    with pytest.raises(ValueError, match="must be positive"):
        agg_loss(LOSS, LOSS_MASK, "token-mean", num_tokens_global=0)
