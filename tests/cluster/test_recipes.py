"""The registry behind rl.algorithm: one protocol, names checked, no algorithm branches elsewhere."""
import ast
from pathlib import Path

import pytest

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config
from cluster.recipes import RECIPES, RLRecipe, SFTStageRecipe, check_config, get_recipe
from learner.algos import ADVANTAGE_ESTIMATORS

SMOKE = "experiments/configs/smoke.yaml"
ROOT = Path(__file__).resolve().parents[2]


def test_the_paper_methods_and_baselines_are_registered():
    assert set(RECIPES) == {"reft", "grpo", "rloo", "online_st", "sft", "offline_st"}
    for name, recipe in RECIPES.items():
        assert recipe.name == name and callable(recipe.run) and callable(recipe.check)
        if isinstance(recipe, RLRecipe) and recipe.estimator is not None:
            assert recipe.estimator in ADVANTAGE_ESTIMATORS   # a registered estimator, by name
    assert get_recipe("reft").estimator == "gae" and get_recipe("offline_st").self_training
    assert isinstance(get_recipe("sft"), SFTStageRecipe) and not get_recipe("sft").samples


def test_a_typo_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"rl\.algorithm = 'refts': unknown; valid names: \['grpo', 'offline_st'"):
        get_recipe("refts")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_accepts_its_synthetic_config(name):
    cfg = load_config(RunConfig, ROOT / "experiments" / "configs" / "synthetic" / f"{name}.yaml")
    assert check_config(cfg) is RECIPES[name]


def test_no_algorithm_name_branches_in_the_driver():
    """The driver and the recipes' code never compare rl.algorithm with a name: the registry decides."""
    for path in (ROOT / "cluster").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "algorithm" in ast.unparse(node.left):
                raise AssertionError(f"{path.name}:{node.lineno}: {ast.unparse(node)}")


def test_each_kl_goes_where_its_algorithm_puts_it():
    """ReFT's KL is in the reward (rl.kl_coef), GRPO's and RLOO's a k3 loss term (rl.kl_loss_coef,
    DeepSeekMath's 0.04 by default; 0 skips the reference pass); the wrong key is refused."""
    base = load_config(RunConfig, ROOT / "experiments" / "configs" / "synthetic" / "grpo.yaml")
    grpo, reft = get_recipe("grpo"), get_recipe("reft")
    assert (grpo.kl_coef(base), grpo.kl_loss_coef(base)) == (0.0, 0.04)
    assert (reft.kl_coef(base), reft.kl_loss_coef(base)) == (0.05, 0.0)
    none = load_config(RunConfig, ROOT / "experiments" / "configs" / "synthetic" / "grpo.yaml", ["rl.kl_loss_coef=0"])
    assert grpo.kl_loss_coef(none) == 0.0
    with pytest.raises(ConfigError, match=r"rl.kl_coef is the KL penalty in ReFT's reward; rl.algorithm=grpo takes"):
        grpo.check(load_config(RunConfig, ROOT / "experiments" / "configs" / "synthetic" / "grpo.yaml", ["rl.kl_coef=0.1"]))
    with pytest.raises(ConfigError, match=r"rl.kl_loss_coef is the KL loss term of grpo / rloo; rl.algorithm=reft"):
        reft.check(load_config(RunConfig, ROOT / SMOKE, ["rl.kl_loss_coef=0.1"]))
