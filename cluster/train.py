"""The ReFT pipeline of one config: SFT warm-up, then the recipe ``rl.algorithm`` names
(``cluster.recipes``: ReFT's RL loop, GRPO, RLOO, or one of the paper's baselines) on the same
questions, optionally SFT continued for the same training time, and the results table.

    1. warm-up     SFT on the gold CoTs (``cluster.sft.train_sft``), or ``rl.warmup_checkpoint``
    2. the recipe  from the warm-up: the RL loop (``cluster.rl``) or an SFT stage (``cluster.baselines``)
    3. baseline    SFT continued from the same warm-up for the recipe's training time (rl.compare_sft)
    4. results     results.md / .csv / .json, curves.png
"""
from __future__ import annotations

import dataclasses
import logging
import time

from cluster.config import RunConfig
from cluster.console import CONSOLE
from cluster.metrics import read_metrics
from cluster.placement import plan_placement
from cluster.recipes import check_config
from cluster.rl import STEP_TIME_KEYS, step_seconds
from cluster.results import plot_curves, write_results
from cluster.runtime import join_cluster, load_splits, make_run_dir, prepare_model
from cluster.sft import train_sft

logger = logging.getLogger("reft")


def result_row(model: str, history: list[dict]) -> dict:
    """A results-table row: the last evaluation's test and train accuracy, and the best test
    accuracy of all evaluations (the paper reports the best checkpoint)."""
    evals = [r for r in history if "eval/test_accuracy" in r]
    if not evals:
        return {"model": model, "test_accuracy": None, "best_test_accuracy": None, "train_accuracy": None}
    return {"model": model, "test_accuracy": evals[-1]["eval/test_accuracy"],
            "best_test_accuracy": max(r["eval/test_accuracy"] for r in evals),
            "train_accuracy": evals[-1].get("eval/train_accuracy")}


def trained_units(records: list[dict]) -> str:
    """What the recipe's training time bought, for the console: ``34 steps`` for an RL loop (its
    step records carry the step timings), ``5 epochs`` for an SFT stage."""
    epochs = sum("sft/epoch_seconds" in r for r in records)
    if epochs:
        return f"{epochs} epoch{'s' * (epochs != 1)}"
    steps = sum(any(k in r for k in STEP_TIME_KEYS) for r in records)
    return f"{steps} step{'s' * (steps != 1)}"


def run_train(cfg: RunConfig, resume: bool = False) -> dict:
    """The whole ReFT pipeline of one config: warm-up, RL, (optionally) the SFT-continued
    baseline for the same wall time, the results table, the plots. Returns the headline."""
    start = time.perf_counter()
    recipe = check_config(cfg)
    plan_placement(cfg)   # the run mode's own checks (sizes, weight sync, sleep mode) before anything starts
    run_dir = make_run_dir(cfg)
    cfg = join_cluster(cfg)
    cfg = prepare_model(cfg, run_dir)
    train, test = load_splits(cfg)

    # 1. warm-up: SFT on the gold CoTs (or a given checkpoint)
    warmup = cfg.rl.warmup_checkpoint
    if warmup is None:
        done = sorted((run_dir / "sft").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
        if resume and len(done) == cfg.sft.epochs:
            warmup = str(done[-1])
        else:
            warmup = str(train_sft(cfg, run_dir, train, test, max_seconds=cfg.sft.max_seconds).checkpoints[-1])
    warm_cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, model=warmup))

    # 2. from the warm-up: the recipe (reinforcement learning, or one of the paper's SFT baselines)
    history = recipe.run(warm_cfg, cfg.learner.model, run_dir, train, test, resume)
    series = {cfg.rl.algorithm: read_metrics(run_dir / "rl" / "metrics.jsonl")}
    # The stage's training time: RL's steps (rollout + learner + sync) or the SFT stage's epochs, not
    # engine start-up or evaluation, which the SFT baseline's budget does not count either.
    rl_seconds = sum(step_seconds(r) + r.get("sft/epoch_seconds", 0) for r in series[cfg.rl.algorithm])
    trained = trained_units(series[cfg.rl.algorithm])
    budget_ended = cfg.rl.max_seconds is not None and rl_seconds >= cfg.rl.max_seconds

    # 3. the baseline: SFT continued from the same warm-up for the same wall time
    rows = [result_row("warm-up (SFT)", history[:1])]
    headline = {"warmup_acc": rows[0]["test_accuracy"], "rl_train_seconds": round(rl_seconds, 1)}
    if cfg.rl.compare_sft:
        sft_cfg = dataclasses.replace(warm_cfg, sft=dataclasses.replace(
            cfg.sft, epochs=10_000, lr_schedule="linear_warmup_constant", warmup_ratio=0.0))
        cont = train_sft(sft_cfg, run_dir, train, test, phase="sft-continued", max_seconds=rl_seconds)
        rows.append(result_row("SFT continued", cont.history))
        headline.update(sft_acc=rows[-1]["test_accuracy"], sft_best_test_accuracy=rows[-1]["best_test_accuracy"])
        series["sft-continued"] = read_metrics(run_dir / "sft-continued" / "metrics.jsonl")
    rows.append(result_row(cfg.rl.algorithm, history))
    # The paper reports each method's best evaluation (its code keeps the best checkpoint).
    best = max((r for r in history if "eval/test_accuracy" in r), key=lambda r: r["eval/test_accuracy"])
    headline.update({f"{cfg.rl.algorithm}_acc": rows[-1]["test_accuracy"],
                     f"{cfg.rl.algorithm}_best_test_accuracy": best["eval/test_accuracy"],
                     f"{cfg.rl.algorithm}_best_step": best["step"]})
    headline["wall_seconds"] = round(time.perf_counter() - start, 1)
    table = write_results(run_dir, rows, headline)
    plot_curves(run_dir / "curves.png", series, title=f"{cfg.name}: {cfg.data.dataset} {cfg.data.cot_kind}")
    print(table.to_markdown(index=False, floatfmt=".1f"))
    logger.info("%.0f s in all, %.1f s of it %s training (%s%s); results in %s (results.md, results.json, "
                "curves.png, metrics per phase); logs in %s", headline["wall_seconds"], rl_seconds, cfg.rl.algorithm,
                trained, f"; rl.max_seconds={cfg.rl.max_seconds:g} ended it" if budget_ended else "", run_dir,
                run_dir / "logs", extra=CONSOLE)
    return headline
