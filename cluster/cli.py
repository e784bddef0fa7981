"""The ``reft`` command line.

    reft reward --kind ncot|pcot --gold ANSWER [--dataset NAME] < completion.txt
    reft audit-rewards --dataset NAME|all [--split train|test] [--kind ncot|pcot] [--path FILE]
    reft sft [--config FILE] [key.sub=value ...]
    reft train [--config FILE] [--resume RUN_DIR] [--dry-run] [key.sub=value ...]

Each subcommand is one function ``cmd_<name>(args) -> int``; heavy imports happen inside it so
that ``reft --help`` stays instant.
"""
from __future__ import annotations

import argparse
import logging
import json
import sys
from pathlib import Path

# The embedded default run: the synthetic task and a tiny model built from scratch, on CPU.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny.yaml"


def cmd_reward(args) -> int:
    from rewards.extract import parse_mcq_options
    from rewards.score import RewardConfig, Scorer

    completion = sys.stdin.read()
    cfg = RewardConfig(partial_reward=args.partial_reward, program_timeout_s=args.timeout, sandbox_workers=1)
    options = parse_mcq_options(args.question) if args.question else None
    with Scorer(cfg) as scorer:
        score = scorer.score([completion], [args.gold], args.kind, args.dataset, [options])[0]
    print(json.dumps({"reward": score.reward, "answer": score.answer, "status": score.status,
                      "correct": score.correct, "detail": score.detail}))
    return 0


def cmd_audit_rewards(args) -> int:
    from experiments.datasets import DATASETS, SPLITS, load_dataset
    from rewards.audit import audit_examples, format_table
    from rewards.score import RewardConfig, Scorer

    names = [d for d in DATASETS if d != "synthetic"] if args.dataset == "all" else [args.dataset]
    targets = []   # (dataset, split, kind) with a file
    if args.path:  # one explicit file
        names = []
        targets = [(args.dataset, args.split or "train", args.kind or "ncot")]
    for name in names:
        for split in ([args.split] if args.split else SPLITS):
            # Real test sets carry answers only (one N-CoT audit); the synthetic task has CoTs everywhere.
            only_answers = split == "test" and name != "synthetic"
            kinds = [args.kind] if args.kind else (["ncot"] if only_answers else ["ncot", "pcot"])
            targets += [(name, split, kind) for kind in kinds]

    results, missing = [], []
    with Scorer(RewardConfig(program_timeout_s=args.timeout)) as scorer:
        for name, split, kind in targets:
            try:
                examples = load_dataset(name, split, kind, data_dir=args.data_dir, path=args.path)
            except FileNotFoundError as e:
                missing.append(str(e))
                continue
            if split == "train" and examples and examples[0].cot is None:
                missing.append(f"{name}/{split}/{kind}: file has no gold CoTs")
                continue
            results.append(audit_examples(examples, split, scorer, progress=not args.quiet))

    if not results:
        print("nothing audited:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    print(format_table(results))
    for r in results:
        for f in r.failures:
            print(f"FAIL {r.dataset}/{r.split}/{r.cot_kind} {f['id']}: gold={f['gold']!r} "
                  f"status={f['status']} answer={f['answer']!r} reason={f['reason']}")
    for m in missing:
        print(f"skipped: {m}")
    report = {"results": [dict(r.summary(), failures=r.failures) for r in results], "skipped": missing}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps([r.summary() for r in results]))
    ok = all(r.perturbed_scored_correct == 0 for r in results)
    return 0 if ok else 1


def cmd_sft(args) -> int:
    from cluster.config import RunConfig
    from cluster.config_io import load_config
    from cluster.sft import run_sft

    cfg = load_config(RunConfig, args.config or DEFAULT_CONFIG, args.overrides)
    result = run_sft(cfg)
    for record, ckpt in zip(result.history, result.checkpoints):
        acc = record.get("eval/test_accuracy")
        print(f"epoch {record['epoch']}: loss {record['sft/epoch_loss']:.4f}"
              + (f", test accuracy {acc:.1f}%, train accuracy {record['eval/train_accuracy']:.1f}%" if acc is not None else "")
              + f", {record['sft/epoch_seconds']:.0f} s -> {ckpt}")
    return 0


def cmd_train(args) -> int:
    import yaml

    from cluster.config import RunConfig
    from cluster.config_io import load_config, to_dict
    from cluster.placement import plan_placement

    if args.resume:
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no config.yaml (not a run directory)")
        cfg = load_config(RunConfig, saved, args.overrides)
    else:
        cfg = load_config(RunConfig, args.config or DEFAULT_CONFIG, args.overrides)
    cfg.validate()
    if args.dry_run:
        print(plan_placement(cfg).describe())
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from cluster.train import run_train
    headline = run_train(cfg, resume=bool(args.resume))
    print(json.dumps(headline))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reft", description="ReFT: reinforced fine-tuning for math reasoning, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reward", help="score one completion read from stdin; prints a JSON object")
    p.add_argument("--kind", choices=["ncot", "pcot"], required=True,
                   help="ncot: stdin is the CoT text; pcot: stdin is a program defining solution()")
    p.add_argument("--gold", required=True, help="the gold answer (a number, or an option letter for mathqa)")
    p.add_argument("--dataset", default="gsm8k", help="decides how answers compare (mathqa = option letters)")
    p.add_argument("--question", default=None, help="mathqa: the question with its options, to map a value to a letter")
    p.add_argument("--partial-reward", type=float, default=0.1, help="reward for a wrong but extracted answer (paper: 0.1)")
    p.add_argument("--timeout", type=float, default=10.0, help="program time limit in seconds (paper: 10)")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("audit-rewards", help="score every gold CoT of a dataset and perturbed copies; lists failures")
    p.add_argument("--dataset", required=True, help="gsm8k | svamp | mathqa | mathqa-numeric | synthetic | all")
    p.add_argument("--split", choices=["train", "test"], default=None, help="default: both")
    p.add_argument("--kind", choices=["ncot", "pcot"], default=None, help="default: both where files exist")
    p.add_argument("--path", type=Path, default=None, help="audit this file instead of the dataset's default")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $REFT_DATA_DIR, ./data or ../shared/data")
    p.add_argument("--timeout", type=float, default=10.0, help="program time limit in seconds")
    p.add_argument("--json", default=None, help="also write the full report (with failures) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit_rewards)

    p = sub.add_parser("sft", help="SFT warm-up alone: per-epoch HF checkpoints and greedy accuracy")
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: experiments/configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.epochs=3 learner.zero_stage=3")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="the ReFT pipeline: SFT warm-up, RL on Ray (vLLM samplers, DeepSpeed learner), evaluation")
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: experiments/configs/tiny.yaml)")
    p.add_argument("--resume", type=Path, default=None, help="continue the run in this directory from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the placement plan and the resolved config; start nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.questions_per_step=16 rollout.num_actors=2")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv=None) -> int:
    from cluster.config_io import ConfigError
    from experiments.datasets import DatasetError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DatasetError, ConfigError, FileNotFoundError) as e:
        # Bad input: say where, no traceback.
        print(f"reft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
