"""Reductions of (B, T) tensors under a response mask, and the loss aggregation modes.

Notation: B = batch of sequences, T = response tokens. ``mask`` is 1 on a generated response
token and 0 on padding (right-padded); bool, int and float 0/1 masks are all accepted.

Every function selects with ``torch.where(mask.bool(), values, 0)`` before reducing, never
``values * mask``: NaN * 0 is NaN, so a multiplication would let a NaN or inf sitting in a padded
position (a value head on a pad token, an unfilled buffer) leak into the result. Denominators
that count tokens are clamped to at least 1, so an all-padding batch or row reduces to 0, not NaN;
``masked_var`` is the one exception and raises instead (a variance of 0 or 1 element is undefined).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _count(values: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Number of unmasked entries of ``values`` (mask broadcast to its shape), as a float of at least
    32 bits (a bf16 count is inexact above 256)."""
    return mask.bool().expand_as(values).sum(dim=dim).to(torch.promote_types(values.dtype, torch.float32))


def masked_sum(values: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1, over ``dim`` (all dims when None)."""
    zeroed = _zero_padding(values, mask)
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where nothing is unmasked (denominator clamp(min=1))."""
    return masked_sum(values, mask, dim) / _count(values, mask, dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all unmasked entries (a scalar).

    Raises:
        ValueError: if no entry is unmasked, or exactly one is and ``unbiased`` (Bessel's
            correction divides by n - 1 = 0). Checking this reads the count on the host: a
            CPU-GPU sync point, paid once per call (once per batch for advantage whitening).
    """
    n = int(mask.bool().expand_as(values).sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element; the variance is undefined")
    if unbiased and n == 1:
        raise ValueError("masked_var: the mask selects 1 element; the unbiased variance needs at least 2")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to zero mean and unit (unbiased) variance over the unmasked entries.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as in TRL / the
    paper's code for rewards. Padded positions come out as exactly 0. Raises like ``masked_var``
    when fewer than 2 entries are unmasked.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens_global: Optional[Union[int, Tensor]] = None,
    num_seqs_global: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    Modes:
        ``"token-mean"``: sum of the token losses / number of tokens (every token weighs the same;
            ``masked_mean``).
        ``"seq-mean-token-mean"``: mean over tokens within each sequence, then mean over sequences
            (the paper's code).
        ``"seq-mean-token-sum"``: sum over tokens within each sequence, then mean over sequences.
    Sequences whose mask is all 0 contribute nothing and are not counted.

    Data parallelism: pass the token count of the WHOLE (mini-)batch across all ranks as
    ``num_tokens_global`` (and the number of non-empty sequences as ``num_seqs_global`` for the
    seq-* modes). Each rank's loss is then its share, and the SUM of the shards' losses equals the
    full-batch loss, however the batch was split. Engines that AVERAGE gradients over ranks and
    micro-batches (DeepSpeed) need the per-rank loss multiplied by world_size * accumulation steps
    to get the full-batch gradient. Without the global counts, local counts are used.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {list(AGG_MODES)}")
    if mode == "token-mean":
        denom = _count(loss_mat, mask) if num_tokens_global is None else num_tokens_global
        return masked_sum(loss_mat, mask) / _as_denominator(denom, loss_mat)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)
    else:  # "seq-mean-token-sum"
        per_seq = masked_sum(loss_mat, mask, dim=-1)
    seq_mask = mask.bool().expand_as(loss_mat).any(dim=-1)
    denom = _count(per_seq, seq_mask) if num_seqs_global is None else num_seqs_global
    return masked_sum(per_seq, seq_mask) / _as_denominator(denom, loss_mat)


def _as_denominator(count: Union[int, float, Tensor], like: Tensor) -> Tensor:
    if not isinstance(count, Tensor) and count <= 0:
        raise ValueError(f"agg_loss: a global count must be positive, got {count}")
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.as_tensor(count, device=like.device).to(dtype).clamp(min=1)
