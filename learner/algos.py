"""The ReFT / PPO mathematics as pure functions on tensors (no model, no DeepSpeed, no Ray).

Notation: B = batch of sequences, T = token positions, V = vocabulary. The functions take any
(B, T) layout whose ``mask`` is 1 on the tokens the policy generated and 0 elsewhere: the learner
passes its whole (B, L) batch (prompt + response + right padding, ``learner.worker``) with
``response_mask``, so the prompt and the padding are masked out, not cut off.
Tensors named ``logprobs`` are log pi(a_t | s_t) of the generated tokens, (B, T).

The paper (Luong et al., ACL 2024, §3) in these terms, with its code lqtrung1998/mwp_ReFT:

    r_total(s_t, a_t) = r(s_T) * 1[t = last] - beta * KL_t,   KL_t = log pi_theta - log pi_ref (k1)
    delta_t = r_total_t + gamma * V_phi(s_{t+1}) - V_phi(s_t),  V_phi(s_{last+1}) = 0
    A_t = sum_l (gamma * lam)^l delta_{t+l},   R_t = A_t + V_phi(s_t)
    L_policy = -E[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],   rho_t = pi_theta / pi_old
    L_value  = 1/2 E[max((V_phi - R)^2, (clip(V_phi, V_old - eps, V_old + eps) - R)^2)]
    L_RL = L_policy + alpha * L_value,   alpha = 5 (``ppo_total_loss``)

where r = 1 (correct answer), 0.1 (an answer was extracted but it is wrong), 0 (no answer);
beta = 0.05 (N-CoT) / 0.01 (P-CoT); eps = 0.2; advantages are whitened over the batch.

Advantage estimators, policy losses and value losses are looked up by name in registries
(``get_advantage_estimator``, ``get_policy_loss``, ``get_value_loss``), so variants are chosen
from the config, not by if/elif in the learner. Metrics are returned as tensors: the caller calls
``.item()`` once per step (a CPU-GPU sync point), never inside a loss.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor

from learner.masked import agg_loss, masked_mean, masked_whiten

# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


def _make_register(registry: Dict[str, Callable], kind: str):
    """A decorator factory filling ``registry``; re-registering the SAME function is a no-op,
    a different function under a used name is refused (it would silently change a run)."""

    def register(name: str):
        def decorator(fn: Callable) -> Callable:
            existing = registry.get(name)
            if existing is not None and existing is not fn:
                raise ValueError(
                    f"{kind} {name!r} is already registered to {existing.__module__}."
                    f"{existing.__qualname__}; refusing to replace it with {fn.__module__}.{fn.__qualname__}"
                )
            registry[name] = fn
            return fn

        return decorator

    return register


def _lookup(registry: Dict[str, Callable], name: str, kind: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {sorted(registry)}")
    return registry[name]


ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {}
POLICY_LOSSES: Dict[str, Callable] = {}
VALUE_LOSSES: Dict[str, Callable] = {}

register_advantage = _make_register(ADVANTAGE_ESTIMATORS, "advantage estimator")
register_policy_loss = _make_register(POLICY_LOSSES, "policy loss")
register_value_loss = _make_register(VALUE_LOSSES, "value loss")

# The contracts every registered function follows (see the get_* docstrings).
AdvantageFn = Callable[["AdvantageInputs", "AdvantageConfig"], "AdvantageOutputs"]
# (logprobs, old_logprobs, advantages, mask, *, clip_eps, agg_mode, num_tokens_global, num_seqs_global) -> LossOutput
PolicyLossFn = Callable[..., "LossOutput"]
# (values, old_values, returns, mask, *, clip_eps, agg_mode, num_tokens_global, num_seqs_global) -> LossOutput
ValueLossFn = Callable[..., "LossOutput"]


def get_advantage_estimator(name: str) -> Callable:
    """``fn(batch: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs``."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def get_policy_loss(name: str) -> Callable:
    """``fn(logprobs, old_logprobs, advantages, mask, *, clip_eps, agg_mode, num_tokens_global, num_seqs_global) -> LossOutput``."""
    return _lookup(POLICY_LOSSES, name, "policy loss")


def get_value_loss(name: str) -> Callable:
    """``fn(values, old_values, returns, mask, *, clip_eps, agg_mode, num_tokens_global, num_seqs_global) -> LossOutput``."""
    return _lookup(VALUE_LOSSES, name, "value loss")


# --------------------------------------------------------------------------------------------
# Typed results
# --------------------------------------------------------------------------------------------


class ShapedRewards(NamedTuple):
    rewards: Tensor  # (B, T) float32: -beta * KL_t on every generated token, + score on the last one
    kl: Tensor  # (B, T) float32: the per-token KL estimate (unscaled), 0 on padding


class GAEOutput(NamedTuple):
    advantages: Tensor  # (B, T): A_t, 0 on padding
    returns: Tensor  # (B, T): R_t = A_t + V(s_t), 0 on padding


class AdvantageOutputs(NamedTuple):
    advantages: Tensor  # (B, T): what the policy loss multiplies, 0 on padding
    returns: Tensor  # (B, T): value-loss targets (critic-free estimators: = advantages)


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, differentiable
    metrics: Dict[str, Tensor]  # detached scalars; .item() them once per step in the caller


@dataclasses.dataclass(frozen=True, eq=False)
class AdvantageInputs:
    """What an advantage estimator may read; each estimator checks for the fields it needs."""

    mask: Tensor  # (B, T): 1 = generated response token, right-padded
    scores: Optional[Tensor] = None  # (B,): task reward of each sequence (1 / 0.1 / 0)
    token_rewards: Optional[Tensor] = None  # (B, T): KL-shaped rewards from ``shape_rewards``
    values: Optional[Tensor] = None  # (B, T): V_phi(s_t) from the value head (old, no grad)
    group_ids: Optional[Tensor] = None  # (B,) int: rows with equal ids answer the same question


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    gamma: float = 1.0
    """Discount gamma. 1.0 as in the paper's code (the paper's text writes gamma=0.95, lambda=1)."""
    lam: float = 0.95
    """GAE lambda. 0.95 as in the paper's code."""
    whiten: bool = True
    """GAE: whiten advantages over the batch (zero mean, unit variance), as the paper's code does."""
    norm_by_std: bool = True
    """GRPO: divide by the group's std (False = Dr. GRPO, arXiv 2503.20783, which drops it)."""
    eps: float = 1e-6
    """GRPO: added to the group std before dividing (a group whose scores are all equal gives 0)."""

    def __post_init__(self):
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"rl.advantage.{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.eps <= 0:
            raise ValueError(f"rl.advantage.eps must be > 0, got {self.eps}")


# --------------------------------------------------------------------------------------------
# KL and reward shaping
# --------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs.

    With log r = log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t) and a_t ~ pi_theta
    (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):
        k1 = log r                     unbiased, can be negative; the paper's penalty
        k2 = (log r)^2 / 2             biased, low variance
        k3 = (1/r - 1) + log r         unbiased, >= 0, low variance ("low_var_kl")
    Shapes: any, elementwise; float32 (or float64) out. Padded positions are not masked here.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid names: {list(KL_ESTIMATORS)}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    log_ratio = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last 1 in each row of ``mask`` (B, T); -1 for a row with no 1."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=-1)


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
) -> ShapedRewards:
    """The paper's per-token reward: r_total_t = score * 1[t = last generated token] - beta * KL_t.

    Args:
        scores: (B,) task reward r(s_T) per sequence (1 correct / 0.1 wrong answer / 0 none).
        logprobs, ref_logprobs: (B, T) log pi_theta (the sampling policy, as recomputed by the
            learner) and log pi_ref (the frozen warm-up model) of the generated tokens.
        mask: (B, T) 1 = generated token. The score goes on the row's last 1; rows with no 1 get
            nothing. Padded positions hold 0 in both outputs, whatever the log-probs hold there.
        kl_coef: beta >= 0 (0.05 N-CoT, 0.01 P-CoT in the paper; 0 collapses training).
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef (beta) must be >= 0, got {kl_coef}")
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    valid = mask.bool()
    kl = torch.where(valid, kl_penalty(logprobs, ref_logprobs, "k1"), 0.0)   # the paper's log-ratio
    last = last_token_index(mask)  # (B,), -1 for empty rows: matches no position below
    positions = torch.arange(mask.shape[-1], device=mask.device)
    is_last = positions.unsqueeze(0) == last.unsqueeze(1)  # (B, T)
    score_mat = torch.where(is_last, scores.to(kl.dtype).unsqueeze(1), 0.0)
    return ShapedRewards(rewards=score_mat - kl_coef * kl, kl=kl)


# --------------------------------------------------------------------------------------------
# Generalised advantage estimation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> GAEOutput:
    """GAE (Schulman et al. 2016) over right-padded responses, vectorised over B, backwards over T.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V(s_t)
    The value after a row's last generated token is 0 (the episode ends there) and A beyond it is
    0. Masked positions are skipped, never read: ``rewards``/``values`` there may hold anything,
    NaN included. (A masked hole inside a row, e.g. a tool's output in a multi-turn rollout, is
    stepped over: the token before it bootstraps from the next generated token, with one gamma.)
    Defaults gamma = 1.0, lam = 0.95 are the paper's CODE; its text swaps the two.

    Args:
        rewards: (B, T) per-token rewards (``shape_rewards(...).rewards``).
        values: (B, T) V_phi(s_t), detached.
        mask: (B, T) 1 = generated token.
    Returns:
        GAEOutput(advantages (B, T), returns (B, T)), both 0 on padding; float32 (or float64),
        without grad (they are targets).
    """
    _check_shapes(rewards=rewards, values=values, mask=mask)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    valid = mask.bool()
    rewards = torch.where(valid, rewards.to(dtype), 0.0)
    values = torch.where(valid, values.to(dtype), 0.0)
    B, T = values.shape
    next_value = values.new_zeros(B)  # V(s_{t+1}); 0 after the last generated token
    next_adv = values.new_zeros(B)  # A_{t+1}
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # On padding, carry the state of the next generated token through unchanged.
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        advantages[:, t] = torch.where(valid[:, t], adv_t, 0.0)
    return GAEOutput(advantages=advantages, returns=advantages + values)


# --------------------------------------------------------------------------------------------
# Advantage estimators: fn(batch: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs
# --------------------------------------------------------------------------------------------


@register_advantage("gae")
def gae_advantage(batch: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
    """ReFT / PPO: GAE on the KL-shaped token rewards with the critic's values; the returns come
    from the raw advantages, then the advantages are whitened over the batch (``cfg.whiten``).
    Needs ``token_rewards`` and ``values``. (The paper's code whitens over all ranks' tokens; with
    data parallelism, compute advantages on the whole batch before sharding it.)"""
    rewards, values = _need(batch, "gae", "token_rewards", "values")
    gae = compute_gae(rewards, values, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = masked_whiten(gae.advantages, batch.mask) if cfg.whiten else gae.advantages
    return AdvantageOutputs(advantages=advantages, returns=gae.returns)


@register_advantage("grpo")
def grpo_advantage(batch: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (s_i - mean_g) / (std_g + eps) for the K
    samples i of question g, the same on every generated token of sample i; returns = advantages.

    std_g is the unbiased sample std of the group; ``cfg.norm_by_std=False`` keeps s_i - mean_g
    (Dr. GRPO). A group of size 1 gets advantage 0 (there is no baseline to compare with; verl
    gives it its raw score instead). Needs ``scores`` and ``group_ids``; no critic.
    """
    scores, group_ids = _need(batch, "grpo", "scores", "group_ids")
    scores, inverse, counts, sums = _group_sums(scores, group_ids)
    centred = scores - (sums / counts)[inverse]  # a singleton's own mean: exactly 0
    if cfg.norm_by_std:
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred.square())
        std = (sq / (counts - 1).clamp(min=1)).sqrt()
        centred = centred / (std[inverse] + cfg.eps)
    advantages = _broadcast_to_tokens(centred, batch.mask)
    return AdvantageOutputs(advantages=advantages, returns=advantages)


@register_advantage("rloo")
def rloo_advantage(batch: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
    """RLOO (Ahmadian et al. 2024): A_i = s_i - mean of the OTHER K-1 samples of the same
    question, on every generated token; a group of size 1 gets 0; returns = advantages.
    Needs ``scores`` and ``group_ids``; no critic."""
    scores, group_ids = _need(batch, "rloo", "scores", "group_ids")
    scores, inverse, counts, sums = _group_sums(scores, group_ids)
    n = counts[inverse]
    baseline = (sums[inverse] - scores) / (n - 1).clamp(min=1)
    per_seq = torch.where(n > 1, scores - baseline, 0.0)
    advantages = _broadcast_to_tokens(per_seq, batch.mask)
    return AdvantageOutputs(advantages=advantages, returns=advantages)


def _need(batch: AdvantageInputs, estimator: str, *fields: str):
    got = []
    for name in fields:
        value = getattr(batch, name)
        if value is None:
            raise ValueError(f"advantage estimator {estimator!r} needs AdvantageInputs.{name}; it is None")
        got.append(value)
    return got


def _group_sums(scores: Tensor, group_ids: Tensor):
    """Scores as float (B,), each row's group index (B,), per-group sample count and sum (G,)."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores and group_ids must both be (B,), got {tuple(scores.shape)} and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = scores.new_zeros(num_groups).index_add_(0, inverse, torch.ones_like(scores))
    sums = scores.new_zeros(num_groups).index_add_(0, inverse, scores)
    return scores, inverse, counts, sums


def _broadcast_to_tokens(per_seq: Tensor, mask: Tensor) -> Tensor:
    if per_seq.shape[0] != mask.shape[0]:
        raise ValueError(f"{per_seq.shape[0]} sequence scores for a mask of {mask.shape[0]} rows")
    return torch.where(mask.bool(), per_seq.unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------------------------
# Losses: fn(...) -> LossOutput(loss, metrics)
# --------------------------------------------------------------------------------------------


@register_policy_loss("ppo")
def policy_loss_ppo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg_mode: str = "token-mean",
    num_tokens_global: Optional[Union[int, Tensor]] = None,
    num_seqs_global: Optional[Union[int, Tensor]] = None,
) -> LossOutput:
    """PPO clipped surrogate, L = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t).

    Args:
        logprobs: (B, T) log pi_theta of the generated tokens, WITH grad.
        old_logprobs: (B, T) log pi_old: recomputed by the learner before the PPO epochs.
        advantages: (B, T) A_t.   mask: (B, T) 1 = generated token (padding is ignored, even NaN).
        clip_eps: eps (0.2).   agg_mode / num_tokens_global / num_seqs_global: see
            ``learner.masked.agg_loss`` (global counts make data-parallel shards add up).
    Metrics (detached): ``approx_kl`` = mean of (rho - 1) - log rho, an unbiased, non-negative
    estimate of KL(pi_old || pi_theta) (k3; CleanRL), ``clipfrac`` = fraction of tokens where the
    clipped term is the active one (its gradient is 0), ``ratio_mean`` = mean rho.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)  # 0 on padding: rho = 1, finite
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach(), 0.0)
    surrogate = -adv * ratio
    surrogate_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss_mat = torch.maximum(surrogate, surrogate_clipped)
    loss = agg_loss(loss_mat, mask, agg_mode, num_tokens_global, num_seqs_global)
    with torch.no_grad():
        metrics = {
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "clipfrac": masked_mean((surrogate_clipped > surrogate).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return LossOutput(loss=loss, metrics=metrics)


@register_value_loss("clipped")
def value_loss_clipped(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg_mode: str = "token-mean",
    num_tokens_global: Optional[Union[int, Tensor]] = None,
    num_seqs_global: Optional[Union[int, Tensor]] = None,
) -> LossOutput:
    """Clipped value loss, 1/2 * agg(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)).

    Args:
        values: (B, T) V_phi(s_t) WITH grad.   old_values: (B, T) V at rollout time (detached).
        returns: (B, T) R_t targets.   mask: (B, T) 1 = generated token.   clip_eps: eps (0.2).
    Metrics (detached): ``vf_clipfrac`` = fraction of tokens where the clipped term is the larger
    (its gradient is 0), ``vpred_mean`` = mean V.
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    valid = mask.bool()
    values, old_values, returns = (torch.where(valid, x, 0.0) for x in (values, old_values, returns))
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss_unclipped = (values - returns).square()
    loss_clipped = (clipped - returns).square()
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    loss = 0.5 * agg_loss(loss_mat, mask, agg_mode, num_tokens_global, num_seqs_global)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "vpred_mean": masked_mean(values, mask),
        }
    return LossOutput(loss=loss, metrics=metrics)


@register_value_loss("mse")
def value_loss_mse(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    agg_mode: str = "token-mean",
    num_tokens_global: Optional[Union[int, Tensor]] = None,
    num_seqs_global: Optional[Union[int, Tensor]] = None,
) -> LossOutput:
    """Unclipped value loss 1/2 * agg((V - R)^2) (``old_values`` and ``clip_eps`` are unused;
    the signature is the value-loss registry's)."""
    _check_shapes(values=values, returns=returns, mask=mask)
    valid = mask.bool()
    err = torch.where(valid, values, 0.0) - torch.where(valid, returns, 0.0)
    loss = 0.5 * agg_loss(err.square(), mask, agg_mode, num_tokens_global, num_seqs_global)
    with torch.no_grad():
        metrics = {"vf_clipfrac": torch.zeros((), device=values.device), "vpred_mean": masked_mean(values, mask)}
    return LossOutput(loss=loss, metrics=metrics)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    agg_mode: str = "token-mean",
    num_tokens_global: Optional[Union[int, Tensor]] = None,
    num_seqs_global: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """GRPO's KL term (Shao et al. 2024, DeepSeekMath eq. 3-4): the k3 estimate of
    KL(pi_theta || pi_ref) per generated token, pi_ref / pi_theta - log(pi_ref / pi_theta) - 1,
    aggregated as the policy loss is. A loss term, WITH grad through ``logprobs`` (the critic-free
    estimators' scores carry no KL; ReFT's KL is in its reward instead, ``shape_rewards``).
    Padding is ignored (0 there, even NaN). Its gradient per token is 1 - pi_ref / pi_theta: it
    pulls the policy back where it has moved above the reference and pushes where below."""
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    valid = mask.bool()
    per_token = kl_penalty(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), "k3")
    return agg_loss(per_token, mask, agg_mode, num_tokens_global, num_seqs_global)


def ppo_total_loss(policy_loss: Tensor, value_loss: Tensor, vf_coef: float = 5.0,
                   kl_term: Optional[Tensor] = None, kl_loss_coef: float = 0.0) -> Tensor:
    """L_RL = L_policy + alpha * L_value (alpha = 5, the paper's value-loss coefficient), plus
    kl_loss_coef * L_KL for the critic-free estimators (``kl_loss``; GRPO's beta 0.04)."""
    total = policy_loss + vf_coef * value_loss
    return total if kl_term is None or not kl_loss_coef else total + kl_loss_coef * kl_term


# --------------------------------------------------------------------------------------------
# Log-probs, entropy, diagnostics
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label], float32; ``logits`` is never modified.

    Shapes: logits (..., V), labels (...) int64 -> (...). Pass logits[:, t] for the token at
    t + 1 (the caller shifts). ``temperature`` must match the sampler's for the ratios to mean
    anything (the paper samples at 1.0).
    """
    logits = logits.float()  # a copy for half precision; the division below is out of place
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H = logsumexp(z) - sum_v softmax(z)_v z_v of the categorical with logits z.

    Shapes: (..., V) -> (...), float32. The logits are first shifted by their max (H does not
    change), so a large common offset does not cancel catastrophically, and logsumexp cannot
    overflow. -inf logits (banned tokens) are raised to the float32 minimum, whose probability is
    exactly 0, so value and gradient stay finite. ``logits`` is never modified.
    """
    lowest = torch.finfo(torch.float32).min
    z = logits.float().clamp(min=lowest)
    z = (z - z.amax(dim=-1, keepdim=True).detach()).clamp(min=lowest)
    probs = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over the generated tokens (scalar tensor): 1 = perfect critic,
    0 = no better than a constant, < 0 = worse; NaN when Var[R] = 0 (as CleanRL)."""
    _check_shapes(values=values, returns=returns, mask=mask)
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    ev = 1.0 - var_residual / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch, all must be (B, T): {shapes}")
