"""From scored samples to a PPO batch: token tensors, the KL-shaped reward, advantages.

Notation: B = samples in the step, L = prompt + response tokens (right-padded). Everything is
(B, L) and aligned with ``input_ids`` (column t is about token t), as the learner's methods
take and return it, so the maths of ``learner.algos`` runs on it directly with ``response_mask``
as the mask (prompt and padding are masked out).

The advantages are computed here, in the driver, on the WHOLE batch before it is sharded over the
learner ranks: whitening and the group statistics of GRPO/RLOO are batch-wide quantities.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from learner.algos import AdvantageConfig, AdvantageInputs, explained_variance, get_advantage_estimator, shape_rewards
from learner.data import Tokenized, collate
from learner.masked import masked_mean


def rollout_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                  sampler_logprobs: Sequence[Sequence[float]] | None = None) -> dict[str, Tensor]:
    """The learner's batch layout for sampled completions; with ``sampler_logprobs`` (the rollout
    engine's log-probs of the sampled tokens) also a ``sampler_logprobs`` (B, L) tensor, 0 off the
    response, for the train/inference mismatch metric."""
    items = [Tokenized(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids)]
    batch = collate(items, pad_id)
    if sampler_logprobs is not None:
        lp = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, (p, values) in enumerate(zip(prompt_ids, sampler_logprobs)):
            if len(values) != len(completion_ids[i]):
                raise ValueError(f"sample {i}: {len(values)} sampler logprobs for {len(completion_ids[i])} tokens")
            lp[i, len(p):len(p) + len(values)] = torch.tensor(values, dtype=torch.float32)
        batch["sampler_logprobs"] = lp
    return batch


def add_advantages(batch: dict[str, Tensor], scores: Tensor, logprobs: Tensor, values: Tensor,
                   ref_logprobs: Tensor, group_ids: Tensor, estimator: str, kl_coef: float,
                   adv_cfg: AdvantageConfig, learner_logprobs: Tensor | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The PPO batch (``batch`` + old_logprobs, old_values, advantages, returns) and its metrics.

    ``logprobs``/``values`` are the learner's recomputation for the policy that sampled the batch
    (PPO's "old" policy); ``ref_logprobs`` the frozen warm-up model's. The task score sits on the
    last generated token, minus beta * (log pi - log pi_ref) on every generated token (the paper).
    ``learner_logprobs``: the learner's log-probs of the tokens under its current weights, when
    ``logprobs`` are the sampler's (a stale batch); the log-prob gap metric compares them.
    """
    mask = batch["response_mask"]
    shaped = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    out = get_advantage_estimator(estimator)(
        AdvantageInputs(mask=mask, scores=scores, token_rewards=shaped.rewards, values=values, group_ids=group_ids),
        adv_cfg)
    ppo_batch = dict(batch, old_logprobs=logprobs, old_values=values, advantages=out.advantages, returns=out.returns)
    metrics = {
        "rl/kl": float(masked_mean(shaped.kl, mask)),             # per-token log pi - log pi_ref
        "rl/kl_per_sequence": float((shaped.kl * mask).sum(-1).mean()),
        "rl/shaped_return": float(shaped.rewards.sum(-1).mean()),
        "rl/values_mean": float(masked_mean(values, mask)),
        "rl/returns_mean": float(masked_mean(out.returns, mask)),
        "rl/explained_variance": float(explained_variance(values, out.returns, mask)),
        "rl/response_length": float(mask.sum(-1).float().mean()),
    }
    if "sampler_logprobs" in batch:
        # Sampler (vLLM) vs learner log-probs of the same tokens under the same weights: the
        # train/inference mismatch. Near 0 in fp32; grows with bf16, a broken weight sync, or
        # (max_staleness 1) by one update's change of the policy.
        gap = (batch["sampler_logprobs"] - (logprobs if learner_logprobs is None else learner_logprobs)).abs()
        metrics["rl/sampler_logprob_gap"] = float(masked_mean(gap, mask))
    return ppo_batch, metrics
