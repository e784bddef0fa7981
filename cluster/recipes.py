"""What runs after the warm-up, by name: the registry behind ``rl.algorithm``.

Every recipe follows one small protocol (``Recipe``): ``check`` refuses a config it cannot run
(naming the keys), ``run`` is the stage after the warm-up and returns its evaluation records
(step 0 = the warm-up, then one per evaluation), so that ``cluster.train.run_train`` treats them
all alike. Two families:

    RLRecipe        the RL loop (``cluster.rl``) with the recipe's update: reft (PPO + value head
                    + GAE, the paper), grpo and rloo (PPO with critic-free advantages over the
                    question's samples), online_st (SFT on the step's correct samples + gold)
    SFTStageRecipe  SFT in the RL stage's place (``cluster.baselines.run_sft_stage``): sft (SFT
                    continued on the gold CoTs), offline_st (gold + the warm-up's correct samples)

``get_recipe`` lists the valid names on a typo. Adding an algorithm is one entry here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Protocol

from cluster.baselines import OnlineSTLearn, run_sft_stage
from cluster.config import GRPO_KL_LOSS_COEF, RunConfig
from cluster.config_io import ConfigError
from cluster.rl import Learn, PPOLearn, RLTrainer, latest_checkpoint, run_rl
from formats.records import Example


class Recipe(Protocol):
    name: str
    samples: bool   # does its stage sample from the policy (the RL loop)?

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError naming the keys if ``cfg`` cannot run this recipe."""

    def run(self, cfg: RunConfig, base_model: str, run_dir: Path, train: list[Example], test: list[Example],
            resume: bool) -> list[dict]:
        """The stage after the warm-up (``cfg.learner.model``; ``base_model``: what it started from)."""


@dataclasses.dataclass(frozen=True)
class RLRecipe:
    name: str
    make_learn: Callable[["RLRecipe", RunConfig, RLTrainer], Learn]   # the step's update
    estimator: Optional[str] = None   # a registered advantage estimator (learner.algos), for PPO updates
    min_samples: int = 1              # samples per question the update needs
    kl: str = "reward"                # where the KL to the reference goes: "reward" (ReFT's per-token
                                      # penalty, rl.kl_coef), "loss" (GRPO's k3 term, rl.kl_loss_coef), "none"
    on_policy: bool = False           # refuses rl.max_staleness > 0 (the paper's baselines are on-policy)
    critic: bool = True               # does the update read values (GAE)? If not, the learner has no critic
    samples: bool = True

    def kl_coef(self, cfg: RunConfig) -> float:
        """beta of the KL penalty in the reward (0 unless ``kl`` is "reward")."""
        return cfg.rl.paper_kl_coef(cfg.data.cot_kind) if self.kl == "reward" else 0.0

    def kl_loss_coef(self, cfg: RunConfig) -> float:
        """Coefficient of the k3 KL loss term (0 unless ``kl`` is "loss")."""
        if self.kl != "loss":
            return 0.0
        return GRPO_KL_LOSS_COEF if cfg.rl.kl_loss_coef is None else cfg.rl.kl_loss_coef

    def check(self, cfg: RunConfig) -> None:
        rl = cfg.rl
        if rl.samples_per_question < self.min_samples:
            raise ConfigError(f"rl.samples_per_question must be >= {self.min_samples} for rl.algorithm={self.name} "
                              f"(the baseline is the other samples of the question), got {rl.samples_per_question}")
        if rl.top_p < 1:
            raise ConfigError(f"rl.top_p = {rl.top_p}: the learner scores the untruncated softmax at rl.temperature, "
                              "so PPO's ratio and the KL would compare another policy than the one sampled; "
                              "use rl.top_p = 1")
        # A KL coefficient for the other kind of KL term is a mistake worth stopping for; a recipe
        # without a KL term (online_st) ignores both, so that a paper config's beta does not stop it.
        if self.kl == "loss" and rl.kl_coef is not None:
            raise ConfigError(f"rl.kl_coef is the KL penalty in ReFT's reward; rl.algorithm={self.name} takes its "
                              f"KL as a loss term: set rl.kl_loss_coef (got rl.kl_coef={rl.kl_coef})")
        if self.kl == "reward" and rl.kl_loss_coef is not None:
            raise ConfigError(f"rl.kl_loss_coef is the KL loss term of grpo / rloo; rl.algorithm={self.name} "
                              f"penalises the KL in its reward: set rl.kl_coef (got rl.kl_loss_coef={rl.kl_loss_coef})")
        if self.on_policy and rl.max_staleness:
            raise ConfigError(f"rl.max_staleness must be 0 for rl.algorithm={self.name} (the paper's baselines "
                              f"are on-policy), got {rl.max_staleness}")

    def run(self, cfg, base_model, run_dir, train, test, resume):
        return run_rl(cfg, cfg.learner.model, run_dir, train, test,
                      learn=lambda trainer: self.make_learn(self, cfg, trainer),
                      resume=latest_checkpoint(run_dir) if resume else None)


@dataclasses.dataclass(frozen=True)
class SFTStageRecipe:
    name: str
    self_training: bool = False   # add the warm-up's correct samples to the gold CoTs (offline_st)
    samples: bool = False

    def check(self, cfg: RunConfig) -> None:
        if cfg.rl.compare_sft:
            raise ConfigError(f"rl.compare_sft compares an RL run with SFT for the same time; rl.algorithm="
                              f"{self.name} is SFT already: set rl.compare_sft=false")

    def run(self, cfg, base_model, run_dir, train, test, resume):
        return run_sft_stage(cfg, base_model, run_dir, train, test, resume=resume, self_training=self.self_training)


def ppo_learn(recipe: RLRecipe, cfg: RunConfig, trainer: RLTrainer) -> Learn:
    sampler_dtype = cfg.rollout.resolved_dtype(on_gpu=cfg.cluster.on_gpu)
    return PPOLearn(estimator=recipe.estimator, kl_coef=recipe.kl_coef(cfg), kl_loss_coef=recipe.kl_loss_coef(cfg),
                    with_critic=recipe.critic,
                    recompute_old=cfg.rl.recompute_old_logprobs(cfg.learner.dtype, sampler_dtype),
                    check_every=cfg.rl.logprob_check_every)


def online_st_learn(recipe: RLRecipe, cfg: RunConfig, trainer: RLTrainer) -> Learn:
    return OnlineSTLearn(trainer)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    RLRecipe("reft", ppo_learn, estimator="gae"),
    RLRecipe("grpo", ppo_learn, estimator="grpo", min_samples=2, critic=False, kl="loss"),
    RLRecipe("rloo", ppo_learn, estimator="rloo", min_samples=2, critic=False, kl="loss"),
    # the paper's train_rl_sl.py: SFT losses, no KL term, on-policy
    RLRecipe("online_st", online_st_learn, kl="none", on_policy=True, critic=False),
    SFTStageRecipe("sft"),
    SFTStageRecipe("offline_st", self_training=True),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"rl.algorithm = {name!r}: unknown; valid names: {sorted(RECIPES)}") from None


def check_config(cfg: RunConfig) -> Recipe:
    """The checks that span sections (``RunConfig.validate``) and the recipe's own; the recipe."""
    cfg.validate()
    recipe = get_recipe(cfg.rl.algorithm)
    recipe.check(cfg)
    return recipe
