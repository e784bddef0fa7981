"""Configuration of the DeepSpeed PPO/SFT learner.

Defaults are the paper's where it gives one (Luong et al., ACL 2024, §4.3 / App. B, and its code
lqtrung1998/mwp_ReFT: ``exps/paper_exps/ReFT/_template.sh``, ``default_config_deepspeed.yaml``,
``train_rl_reft.py``). Checks run in two stages, as in verl: ``__post_init__`` checks each value
on its own; ``validate(world_size, batch_size)`` checks the arithmetic that depends on the
cluster and the batch. Every error names the key (``learner.<field>``) and the value.
"""
from __future__ import annotations

import dataclasses

from learner.algos import POLICY_LOSSES, VALUE_LOSSES
from learner.masked import AGG_MODES

VALUE_HEADS = ("shared", "separate", "none")
DTYPES = ("fp32", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
LR_SCHEDULES = ("constant", "linear_warmup_constant", "linear_warmup_decay", "linear_warmup_cosine")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    model: str
    """HF hub id or local directory of the starting weights: the SFT warm-up checkpoint for the RL
    stage (it is also pi_ref), the pretrained model for the warm-up itself. No default: every run
    must say which model it trains."""

    with_reference: bool = True
    """Load a frozen copy of ``model`` as the reference policy pi_ref for the KL penalty. The SFT
    warm-up has no KL term and sets it False, saving one model's memory."""

    value_head: str = "shared"
    """"shared": a linear head on the policy's last hidden state (the paper's). "separate": a
    second copy of ``model`` as the critic backbone with its own head (the paper's ablation, same
    accuracy, twice the memory). "none": no critic; the driver sets it where nothing reads a
    value (the SFT stages, GRPO/RLOO's critic-free advantages), so no pass computes one."""

    num_threads: int = 0
    """torch intra-op threads per rank; 0 = what Ray gives the actor (OMP_NUM_THREADS = its whole
    reserved CPUs, 1 for a fractional or one-CPU actor). On a CPU machine where the samplers idle
    while the learner trains (on-policy), give it the machine's cores (the embedded default: 2)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3. 2 as the paper's ``default_config_deepspeed.yaml``; 3 also
    partitions the parameters (needed once a 7B policy + critic + optimizer no longer fit a GPU)."""

    dtype: str = "fp32"
    """"fp32" or "bf16". fp32 by default because the embedded default runs on CPU, where DeepSpeed
    refuses fp16 and bf16 measured ~5x slower than fp32 (docs/measurements.md §2). bf16 is the paper's GPU
    setting (``mixed_precision: bf16``): set it on GPUs."""

    backend: str = "auto"
    """torch.distributed backend: "auto" = nccl if CUDA is available, else gloo. Only this key
    changes between the CPU and the GPU runs."""

    collective_timeout_s: float = 1800.0
    """Timeout of every collective of the ranks' process group (all-reduce, ZeRO gathers,
    barriers; gloo and NCCL alike): a rank left waiting for a dead or hung peer raises after it
    instead of waiting forever. 30 min (torch's default for gloo; DeepSpeed's own is 10): the
    longest legitimate wait of a 7B run is a rank at the barrier after a checkpoint while rank 0
    still writes its tens of GB to shared storage. The driver's wait for a learner call,
    cluster.call_timeout_s, is as long."""

    lr: float = 3e-6
    """AdamW learning rate. 3e-6 is the paper's value for its small models (Galactica-125M etc.);
    use 3e-7 for 7B models (the paper's ``_template.sh``)."""

    weight_decay: float = 0.0
    """AdamW weight decay; 0 as the paper's RL runs (``weight_decay="0"``)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2); the paper constructs torch's AdamW without betas, i.e. these defaults."""

    adam_eps: float = 1e-8
    """AdamW epsilon; the paper passes eps=1e-8 explicitly."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (DeepSpeed ``gradient_clipping``); 0 = off. 1.0
    as the paper (``clip_grad_norm="1"``)."""

    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank: a memory knob only, it does not change the
    maths (gradients are accumulated up to the mini-batch). 4 as the paper's per-GPU batch."""

    ppo_mini_batches: int = 1
    """Optimizer steps per PPO epoch: the batch is cut into this many mini-batches, taken in order.
    1 = one step over the whole batch per epoch, the paper's (``mini_batch_size == batch_size``).
    Gradient accumulation is derived: each rank accumulates ceil(its mini-batch / micro) passes."""

    lr_schedule: str = "constant"
    """"constant"; or a linear warm-up then: "linear_warmup_constant" (1), "linear_warmup_decay"
    (linear to 0 at ``total_steps``, HF's ``get_linear_schedule_with_warmup``) or
    "linear_warmup_cosine" (cosine to 0). Constant as the paper's RL stage (0 warm-up steps); its
    SFT warm-up, SFT baseline, offline self-training and reranker use "linear_warmup_decay" with
    10% warm-up over their whole run (``train_sft_model.py``, ``train_reward_model.py``)."""

    warmup_ratio: float = 0.0
    """Fraction of ``total_steps`` spent warming the learning rate up linearly from 0. 0 as the
    paper's RL stage; 0.1 for its SFT warm-up."""

    total_steps: int = 0
    """Optimizer steps of the whole schedule, for the warm-up length and the decay; unused (may be
    0) with "constant". One ``ppo_update`` makes ``ppo_epochs * ppo_mini_batches`` steps, one
    ``sft_step`` makes 1. It may exceed the steps this learner runs: the paper's warm-up is the
    first 2 epochs of a 40-epoch schedule (``sft.schedule_epochs``)."""

    schedule_offset: int = 0
    """Steps of the schedule taken before this learner's first: a stage that continues another's
    schedule (the SFT baseline continuing the warm-up's 40-epoch schedule from its epoch 2) starts
    there. 0 for a stage with a schedule of its own."""

    ppo_epochs: int = 2
    """Passes over each rollout batch in ``ppo_update``; 2 as the paper."""

    clip_eps: float = 0.2
    """PPO ratio clip epsilon; 0.2 as the paper."""

    vf_clip_eps: float = 0.2
    """Value clip epsilon (how far the new value may move from the rollout's); 0.2 as the paper."""

    vf_coef: float = 5.0
    """Value-loss coefficient alpha in L = L_policy + alpha * L_value; 5 as the paper."""

    policy_loss: str = "ppo"
    """The registered policy loss (``learner.algos.POLICY_LOSSES``): "ppo", the clipped surrogate of
    the paper (and of GRPO/RLOO, whose advantages differ, not their loss)."""

    value_loss: str = "clipped"
    """The registered value loss (``learner.algos.VALUE_LOSSES``): "clipped", PPO's clipped squared
    error as the paper's code; "mse", the plain squared error."""

    loss_agg_mode: str = "seq-mean-token-mean"
    """How PPO's per-token losses become a scalar (``learner.masked.agg_loss``). The paper's code
    averages over each sequence's tokens, then over sequences ("seq-mean-token-mean"); "token-mean"
    weighs every token equally. Either is divided by GLOBAL counts, so data parallelism does not
    change it. (SFT always uses "token-mean", as HF's cross-entropy with -100 labels.)"""

    seed: int = 42
    """Random seed; rank r seeds with ``seed + r`` (as the paper's ``set_seed(seed + process_index)``).
    42 as the paper."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory. Off by default: for the tiny CPU model it
    only costs time. The paper's code turns it on for its 7B models; do so on GPUs."""

    def __post_init__(self):
        def fail(key: str, rule: str):
            raise ValueError(f"learner.{key} must be {rule}, got {getattr(self, key)!r}")

        if not isinstance(self.model, str) or not self.model:
            fail("model", "a non-empty HF id or path")
        for key, allowed in (
            ("value_head", VALUE_HEADS),
            ("dtype", DTYPES),
            ("backend", BACKENDS),
            ("lr_schedule", LR_SCHEDULES),
            ("loss_agg_mode", AGG_MODES),
            ("policy_loss", POLICY_LOSSES),
            ("value_loss", VALUE_LOSSES),
        ):
            if getattr(self, key) not in allowed:
                fail(key, f"one of {list(allowed)}")
        if self.zero_stage not in (0, 1, 2, 3):
            fail("zero_stage", "0..3")
        for key in ("lr", "adam_eps", "clip_eps", "vf_clip_eps", "collective_timeout_s"):
            if not getattr(self, key) > 0:
                fail(key, "> 0")
        for key in ("weight_decay", "grad_clip", "vf_coef"):
            if not getattr(self, key) >= 0:
                fail(key, ">= 0")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            fail("adam_betas", "two numbers in [0, 1)")
        if self.num_threads < 0:
            fail("num_threads", ">= 0")
        for key in ("micro_batch_size", "ppo_mini_batches", "ppo_epochs"):
            if not getattr(self, key) >= 1:
                fail(key, ">= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            fail("warmup_ratio", "in [0, 1)")
        if self.total_steps < 0:
            fail("total_steps", ">= 0")
        if self.schedule_offset < 0:
            fail("schedule_offset", ">= 0")
        if self.lr_schedule != "constant" and self.total_steps == 0:
            raise ValueError(
                f"learner.total_steps must be > 0 with learner.lr_schedule={self.lr_schedule!r} "
                "(the warm-up and decay lengths are fractions of it), got 0"
            )
        if self.seed < 0:
            fail("seed", ">= 0")

    def validate(self, world_size: int, batch_size: int) -> None:
        """Check that a global batch of ``batch_size`` sequences splits evenly over ``world_size``
        ranks and ``ppo_mini_batches`` mini-batches.

        Equal shards give every rank the same number of forward/backward passes, which ZeRO needs:
        its collectives (and ZeRO-3's parameter gathers in every forward) pair up across ranks, and
        a rank with one micro-batch more would wait forever. ``micro_batch_size`` need not divide
        anything: the last micro-batch may be smaller, since losses are divided by global counts.

        Raises:
            ValueError: if ``world_size`` < 1, ``batch_size`` < 1, or ``batch_size`` is not divisible
                by ``world_size * ppo_mini_batches``.
        """
        if world_size < 1:
            raise ValueError(f"learner: world_size must be >= 1, got {world_size}")
        if batch_size < 1:
            raise ValueError(f"learner: batch_size must be >= 1, got {batch_size}")
        unit = world_size * self.ppo_mini_batches
        if batch_size % unit:
            raise ValueError(
                f"learner: batch_size={batch_size} must be divisible by world_size ({world_size}) "
                f"x learner.ppo_mini_batches ({self.ppo_mini_batches}) = {unit}"
            )
