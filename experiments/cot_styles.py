"""Which reasoning style each model of a run writes, and how often each style is right.

The embedded default's mechanism (experiments/configs/tiny.yaml): half of the training CoTs skip
their working, a tiny model cannot compute a terse answer for a new question, and RL learns from
its own samples to write the working out. This measures it on a finished ``reft train`` run:

    python -m experiments.cot_styles runs/tiny            # -> runs/tiny/cot_styles.{md,json}

For the warm-up, the last SFT-continued epoch and the final RL policy, greedy completions of the
test questions (HF ``generate``, as SFT's per-epoch evaluation) are sorted into "steps" (at least
one arithmetic operation before the answer: ``Tom has 12 + 7 = 19 apples.``, ``x = a + b``) and
"terse" (none: ``So Tom has 15 apples.``, ``result = 15``), and scored by the reward.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from cluster.config import RunConfig
from cluster.config_io import load_config
from cluster.runtime import load_splits
from experiments.table import final_model, last_epoch
from formats.records import ANSWER_TRIGGER

# An operation between two operands (numbers or variables): what a CoT that shows its working has.
OPERATION = re.compile(r"[\w)]\s*(?:[+\-*/]|//)\s*[\w(]")


def style(completion: str) -> str:
    """"steps" if the CoT (before its answer line) shows an arithmetic operation, else "terse"."""
    body = completion.split(ANSWER_TRIGGER)[0]
    return "steps" if OPERATION.search(body) else "terse"


def style_table(scored: Sequence) -> dict:
    """Share of each style (percent of questions) and accuracy within it, plus overall accuracy,
    of greedy completions and their scores (``cluster.evaluate.Scored``, one per question)."""
    scores = [s.score for s in scored]
    styles = [style(s.sample.completion_text) for s in scored]
    n = len(styles)
    row = {"questions": n, "accuracy": 100.0 * sum(s.correct for s in scores) / n}
    for kind in ("steps", "terse"):
        picked = [s.correct for s, k in zip(scores, styles) if k == kind]
        row[f"{kind}_share"] = 100.0 * len(picked) / n
        row[f"{kind}_accuracy"] = 100.0 * sum(picked) / len(picked) if picked else None
    return row


def run_models(run_dir: Path, cfg: RunConfig) -> dict[str, Path]:
    """The run's warm-up, last SFT-continued epoch and final RL policy (those that exist)."""
    warmup = Path(cfg.rl.warmup_checkpoint) if cfg.rl.warmup_checkpoint else run_dir / "sft" / f"epoch-{cfg.sft.epochs}"
    models = {"warm-up (SFT)": warmup}
    if any((run_dir / "sft-continued").glob("epoch-*")):
        models["SFT continued"] = last_epoch(run_dir / "sft-continued")
    if (run_dir / "checkpoints" / "latest").is_file():
        models[cfg.rl.algorithm] = final_model(run_dir, cfg.rl.algorithm)
    return {name: path for name, path in models.items() if path.is_dir()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cot_styles", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished `reft train` run directory")
    parser.add_argument("--max-questions", type=int, default=None, help="test questions to use (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's sft.eval_max_new_tokens")
    args = parser.parse_args(argv)

    from cluster.evaluate import HFEvaluator  # imports torch: not needed for --help

    config = args.run_dir / "config.yaml"
    if not config.is_file():
        parser.error(f"{config} not found: pass a `reft train` run directory")
    cfg = load_config(RunConfig, config)
    train, test = load_splits(cfg)
    test = test[:args.max_questions] if args.max_questions else test
    terse = sum(style(e.cot or "") == "terse" for e in train)
    print(f"training annotations: {100 * terse / len(train):.1f}% terse")

    rows, evaluator = [], None
    try:
        for name, path in run_models(args.run_dir, cfg).items():
            evaluator = evaluator.load(path) if evaluator else HFEvaluator(cfg, path)
            result = evaluator.greedy(test, args.max_new_tokens or cfg.sft.eval_max_new_tokens)
            rows.append({"model": name, "checkpoint": str(path), **style_table(result.scored)})
    finally:
        if evaluator is not None:
            evaluator.close()
    table = pd.DataFrame(rows)
    markdown = table.drop(columns="checkpoint").to_markdown(index=False, floatfmt=".1f")
    print(markdown)
    (args.run_dir / "cot_styles.md").write_text(markdown + "\n")
    (args.run_dir / "cot_styles.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
