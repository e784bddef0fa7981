"""The shipped configs: every YAML dry-runs (loads, validates, gets a placement plan); the paper's
cells carry the paper's hyperparameters and are what their generator writes; the synthetic
per-algorithm configs share one task, model, warm-up and learner, apart from their rl section."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import RunConfig
from cluster.config_io import load_config
from cluster.recipes import RECIPES, get_recipe
from experiments.cli import main

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))
PAPER = sorted((CONFIGS_DIR / "paper").glob("*.yaml"))
SYNTHETIC = sorted((CONFIGS_DIR / "synthetic").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIGS_DIR)) for p in CONFIGS])
def test_every_config_dry_runs(path, capsys):
    # --dry-run: load, validate, plan the placement (cluster mode without Ray resources), print.
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(RunConfig, path)
    assert out.startswith(f"mode: {cfg.cluster.mode}")
    assert f"name: {cfg.name}\n" in out and f"algorithm: {cfg.rl.algorithm}\n" in out


def test_the_paper_cells_are_all_there_and_generated():
    names = {p.stem for p in PAPER}
    assert names == {f"{d}-{k}-{m}" for d in ("gsm8k", "svamp", "mathqa", "mathqa-numeric")
                     for k in ("ncot", "pcot") for m in ("galactica-6.7b", "codellama-7b")}
    check = subprocess.run([sys.executable, str(CONFIGS_DIR / "paper" / "make_configs.py"), "--check"],
                           check=False, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_cells_carry_the_papers_hyperparameters(path, capsys):
    cfg = load_config(RunConfig, path)
    dataset, kind = cfg.data.dataset, cfg.data.cot_kind
    assert cfg.learner.model == ("codellama/CodeLlama-7b-hf" if "codellama" in path.stem else "facebook/galactica-6.7b")
    assert (cfg.cluster.mode, cfg.learner.dtype, cfg.learner.lr, cfg.rl.epochs) == ("cluster", "bf16", 3e-7, 300)
    warmup = {"gsm8k": 2, "svamp": 2, "mathqa": 5 if kind == "ncot" else 2, "mathqa-numeric": 10}[dataset]
    assert (cfg.sft.epochs, cfg.sft.lr, cfg.sft.batch_size, cfg.sft.warmup_ratio, cfg.sft.max_length) == \
        (warmup, 1e-5, 48, 0.1, 1024)
    # the warm-up is the first epochs of a 40-epoch linear-decay schedule (train_sft_model.py, SFT/*.sh)
    assert (cfg.sft.lr_schedule, cfg.sft.schedule_epochs) == ("linear_warmup_decay", 40)
    assert cfg.reward.rule == "paper"
    r = cfg.reranker   # train_reward_model.py, Rerank/_template.sh
    assert (r.samples, r.temperature, r.epochs, r.batch_size, r.lr, r.lr_schedule, r.warmup_ratio, r.max_length) == \
        (100, 1.0, 3, 24, 1e-6, "linear_warmup_decay", 0.1, 700)
    # beta: 0.05 N-CoT, 0.01 P-CoT; the paper's script runs MathQA-numeric N-CoT at 0.01
    assert get_recipe(cfg.rl.algorithm).kl_coef(cfg) == (0.05 if kind == "ncot" and dataset != "mathqa-numeric" else 0.01)
    assert (cfg.rl.questions_per_step, cfg.rl.samples_per_question, cfg.rl.temperature) == (32, 1, 1.0)
    assert (cfg.learner.ppo_epochs, cfg.learner.clip_eps, cfg.learner.vf_coef, cfg.rl.advantage.gamma, cfg.rl.advantage.lam) == \
        (2, 0.2, 5.0, 1.0, 0.95)
    assert cfg.rollout.max_model_len == 700 and cfg.rl.max_new_tokens <= 700
    assert (cfg.rl.offline_samples, cfg.rl.offline_keep, cfg.rl.offline_init) == (100, 10, "base")
    # The baseline commands in the file's header run as written.
    commands = [line.split("reft train ", 1)[1].split() for line in path.read_text().splitlines()
                if line.startswith("#   reft train")]
    assert {arg for c in commands for arg in c if arg.startswith("rl.algorithm=")} == \
        {"rl.algorithm=sft", "rl.algorithm=offline_st", "rl.algorithm=online_st"}
    for command in commands:
        assert main(["train", *command, "--dry-run"]) == 0
    assert "rl.epochs=" + str(40 - warmup) in path.read_text()       # SFT: 40 epochs in all
    capsys.readouterr()


@pytest.mark.parametrize("path", SYNTHETIC, ids=[p.stem for p in SYNTHETIC])
def test_synthetic_configs_differ_only_in_their_rl(path):
    cfg, reft = load_config(RunConfig, path), load_config(RunConfig, CONFIGS_DIR / "synthetic" / "reft.yaml")
    assert cfg.rl.algorithm == path.stem and cfg.name == f"synthetic-{path.stem}"
    assert dataclasses.replace(cfg, name=reft.name, rl=reft.rl) == reft


def test_every_algorithm_has_a_synthetic_config():
    assert {p.stem for p in SYNTHETIC} == set(RECIPES)
