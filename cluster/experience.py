"""From scored samples to a PPO batch: token tensors, the KL-shaped reward, advantages.

Notation: B = samples in the step, L = prompt + response tokens (right-padded). Everything is
(B, L) and aligned with ``input_ids`` (column t is about token t), as the learner's methods
take and return it, so the maths of ``learner.algos`` runs on it directly with ``response_mask``
as the mask (prompt and padding are masked out).

One conversion: ``samples_to_batch`` turns the samplers' ``Sample``s (token ids, log-probs,
question index) into the batch tensors; the learner's scores and the rewards are added as keys;
``add_advantages`` reads them all from the batch.

The advantages are computed here, in the driver, on the WHOLE batch before it is sharded over the
learner ranks: whitening and the group statistics of GRPO/RLOO are batch-wide quantities.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from learner.algos import (
    AdvantageConfig,
    AdvantageInputs,
    explained_variance,
    get_advantage_estimator,
    shape_rewards,
)
from learner.masked import masked_mean

# What add_advantages reads from the batch besides the learner's layout (``learner.worker``):
#   scores         (B,)   float32  the task reward of each sample (1 / 0.1 / 0)
#   group_ids      (B,)   long     the question each sample answers (GRPO / RLOO's groups)
#   old_logprobs   (B, L) float32  log pi_old of the sampled tokens: PPO's ratio and the KL
#   values         (B, L) float32  V(state before token t) of the old policy
#   ref_logprobs   (B, L) float32  log pi_ref (equal to old_logprobs when there is no KL term)
# and optionally sampler_logprobs / learner_logprobs for the mismatch metric.
EXPERIENCE_KEYS = ("scores", "group_ids", "old_logprobs", "values", "ref_logprobs")


def samples_to_batch(samples: Sequence, pad_id: int) -> dict[str, Tensor]:
    """The learner's batch of sampled completions (``actors.rollout.Sample``): input_ids,
    attention_mask, response_mask, the samplers' log-probs on the response (``sampler_logprobs``,
    0 elsewhere) and each sample's question (``group_ids``)."""
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples]
    shape = (len(samples), max(lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    sampler_logprobs = torch.zeros(shape, dtype=torch.float32)
    for i, s in enumerate(samples):
        p, n = len(s.prompt_token_ids), lengths[i]
        if len(s.logprobs) != len(s.completion_token_ids):
            raise ValueError(f"sample {i}: {len(s.logprobs)} sampler logprobs for {len(s.completion_token_ids)} tokens")
        input_ids[i, :n] = torch.tensor(s.prompt_token_ids + s.completion_token_ids)
        attention_mask[i, :n] = 1
        response_mask[i, p:n] = 1
        sampler_logprobs[i, p:n] = torch.tensor(s.logprobs, dtype=torch.float32)
    group_ids = torch.tensor([-1 if s.question_index is None else s.question_index for s in samples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "sampler_logprobs": sampler_logprobs, "group_ids": group_ids}


def add_advantages(batch: dict[str, Tensor], estimator: str, kl_coef: float,
                   adv_cfg: AdvantageConfig) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The PPO batch (``batch`` + advantages, returns, old_values) and its metrics.

    ``batch`` carries ``EXPERIENCE_KEYS``: the learner's recomputation for the policy that sampled
    it (PPO's "old" policy, or the sampler's log-probs for a stale batch), the frozen warm-up
    model's log-probs and the task scores. The score sits on the last generated token, minus
    beta * (log pi - log pi_ref) on every generated token (the paper).
    """
    missing = [k for k in EXPERIENCE_KEYS if k not in batch]
    if missing:
        raise KeyError(f"add_advantages: the batch lacks {missing}")
    mask, values = batch["response_mask"], batch["values"]
    shaped = shape_rewards(batch["scores"], batch["old_logprobs"], batch["ref_logprobs"], mask, kl_coef)
    out = get_advantage_estimator(estimator)(
        AdvantageInputs(mask=mask, scores=batch["scores"], token_rewards=shaped.rewards, values=values,
                        group_ids=batch["group_ids"]), adv_cfg)
    ppo_batch = dict(batch, old_values=values, advantages=out.advantages, returns=out.returns)
    metrics = {
        "rl/kl": float(masked_mean(shaped.kl, mask)),             # per-token log pi - log pi_ref
        "rl/kl_per_sequence": float((shaped.kl * mask).sum(-1).mean()),
        "rl/shaped_return": float(shaped.rewards.sum(-1).mean()),
        "rl/values_mean": float(masked_mean(values, mask)),
        "rl/returns_mean": float(masked_mean(out.returns, mask)),
        "rl/explained_variance": float(explained_variance(values, out.returns, mask)),
        "rl/response_length": float(mask.sum(-1).float().mean()),
    }
    if "sampler_logprobs" in batch and "learner_logprobs" in batch:
        # Sampler (vLLM) vs learner log-probs of the same tokens under the same weights: the
        # train/inference mismatch. Near 0 in fp32 (then the learner does not recompute them,
        # ``cluster.rl.PPOLearn``); grows with bf16 or a broken weight sync.
        learner = batch["learner_logprobs"]
        metrics["rl/sampler_logprob_gap"] = float(masked_mean((batch["sampler_logprobs"] - learner).abs(), mask))
    return ppo_batch, metrics
