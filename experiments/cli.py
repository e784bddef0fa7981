"""The ``reft`` command line.

    reft reward --kind ncot|pcot --gold ANSWER|--gold-fd FD [--dataset NAME] [--rule paper|lenient] < completion.txt
    reft audit-rewards --dataset NAME|all [--split train|test] [--kind ncot|pcot] [--path FILE] [--rule paper|lenient|both]
    reft sft [--config FILE] [key.sub=value ...]
    reft train [--config FILE] [--resume RUN_DIR] [--dry-run] [key.sub=value ...]
    reft eval --checkpoint DIR --dataset NAME [--samples K] [--rerank DIR] [--out DIR] [key.sub=value ...]
    reft train-reranker --checkpoint DIR --out DIR [--samples-from DIR] [--samples 100] [--epochs 3] [key.sub=value ...]
    reft report RUN_DIR... [--out DIR]

Each subcommand is one function ``cmd_<name>(args) -> int``; heavy imports happen inside it so
that ``reft --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The embedded default run: the synthetic task and a tiny model built from scratch, on CPU.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny.yaml"


def reward_config(args, **fixed):
    """RewardConfig's defaults, with what the command line set (flags default to None: one source)."""
    from rewards.score import RewardConfig
    rule = getattr(args, "rule", None)
    given = {"partial_reward": getattr(args, "partial_reward", None), "program_timeout_s": args.timeout,
             "rule": None if rule == "both" else rule}
    return RewardConfig(**{k: v for k, v in given.items() if v is not None}, **fixed)


class CommandLineError(ValueError):
    """Arguments that do not fit together: reported as an error, without a traceback."""


class GoldInputError(CommandLineError):
    """The gold answer could not be read."""


def read_gold(args) -> str:
    """The gold answer: `--gold`, which every process on the machine can read in /proc, or the
    private `--gold-fd`, read (and closed) here."""
    if args.gold_fd is None:
        return args.gold
    try:
        with open(args.gold_fd, encoding="utf-8", closefd=True) as f:
            return f.read(4096).strip()
    except (OSError, ValueError) as e:
        raise GoldInputError(f"cannot read the gold answer from --gold-fd {args.gold_fd}: {e}") from e


def cmd_reward(args) -> int:
    from rewards.extract import parse_mcq_options
    from rewards.score import Scorer

    gold = read_gold(args)
    completion = sys.stdin.read()
    cfg = reward_config(args, sandbox_workers=1)
    options = parse_mcq_options(args.question) if args.question else None
    with Scorer(cfg) as scorer:
        try:
            score = scorer.score([completion], [gold], args.kind, args.dataset, [options])[0]
        except ValueError as e:          # a gold answer that is not one (e.g. not a number)
            raise GoldInputError(str(e)) from e
    print(json.dumps({"reward": score.reward, "answer": score.answer, "status": score.status,
                      "correct": score.correct, "detail": score.detail, "rule": score.rule}))
    return 0


def audit_targets(args) -> list[tuple[str, str, str, object]]:
    """(dataset, split, kind, path or None) to audit. ``--path``: that file, of the kind its CoTs
    are (`tasks.datasets.infer_cot_kind`) unless ``--kind`` says; a test set is audited as N-CoT,
    its answers read through the paper's answer line."""
    from tasks.datasets import DATASETS, SPLITS, infer_cot_kind

    if args.path:
        if args.dataset in ("all", "synthetic"):
            raise CommandLineError(f"--path needs the file's dataset (--dataset one of {DATASETS[:-1]}), not {args.dataset!r}")
        return [(args.dataset, args.split or "train", args.kind or infer_cot_kind(args.path) or "ncot", args.path)]
    names = [d for d in DATASETS if d != "synthetic"] if args.dataset == "all" else [args.dataset]
    targets = []
    for name in names:
        for split in ([args.split] if args.split else SPLITS):
            # Real test sets carry answers only (one N-CoT audit); the synthetic task has CoTs everywhere.
            only_answers = split == "test" and name != "synthetic"
            kinds = ["ncot"] if only_answers else [args.kind] if args.kind else ["ncot", "pcot"]
            targets += [(name, split, kind, None) for kind in kinds]
    return targets


def cmd_audit_rewards(args) -> int:
    from rewards.audit import audit_examples, disagreements, format_table
    from rewards.score import RULES, Scorer
    from tasks.datasets import load_dataset

    rules = list(RULES) if args.rule == "both" else [args.rule]
    results, missing, differing = [], [], []
    with Scorer(reward_config(args)) as scorer:
        for name, split, kind, path in audit_targets(args):
            try:
                examples = load_dataset(name, split, kind, data_dir=args.data_dir, path=path)
            except FileNotFoundError as e:
                missing.append(str(e))
                continue
            if split == "train" and examples and examples[0].cot is None:
                missing.append(f"{name}/{split}/{kind}: file has no gold CoTs")
                continue
            rows = [audit_examples(examples, split, scorer, rule=rule, progress=not args.quiet) for rule in rules]
            if len(rows) == 2:
                differing.append((rows[0], disagreements(*rows)))
            results += rows

    if not results:
        print("nothing audited:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    print(format_table(results))
    for r in results:
        for f in r.failures:
            print(f"FAIL {r.dataset}/{r.split}/{r.cot_kind} rule={r.rule} {f['id']}: gold={f['gold']!r} "
                  f"status={f['status']} answer={f['answer']!r} reason={f['reason']}")
    for r, rows in differing:
        if rows:
            print(f"\n{r.dataset}/{r.split}/{r.cot_kind}: {len(rows)} gold rows the rules score differently"
                  + (f" (first {args.show_disagreements})" if len(rows) > args.show_disagreements else ""))
            for d in rows[:args.show_disagreements]:
                print("  " + ", ".join(f"{k}={v!r}" for k, v in d.items()))
    for m in missing:
        print(f"skipped: {m}")
    report = {"results": [dict(r.summary(), failures=r.failures) for r in results], "skipped": missing,
              "disagreements": [dict(dataset=r.dataset, split=r.split, cot_kind=r.cot_kind, rows=rows)
                                for r, rows in differing]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps([r.summary() for r in results]))
    bad = [f"{r.dataset}/{r.split}/{r.cot_kind} rule={r.rule}" for r in results if not r.ok]
    if bad:
        print("reward audit failed (a gold row not scored correct, or a perturbed one scored correct): "
              + "; ".join(bad), file=sys.stderr)
    return 1 if bad else 0


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
    from cluster.recipes import check_config
    check_config(cfg)
    if args.dry_run:
        print(plan_placement(cfg).describe())
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from cluster.train import run_train
    run_train(cfg, resume=bool(args.resume))   # prints the table; the headline goes to results.json
    return 0


def cmd_eval(args) -> int:
    from experiments.sampled_eval import format_eval, resolve_config, run_eval

    cfg, source = resolve_config(args.checkpoint, args.dataset, args.cot_kind, args.config, args.overrides)
    out = args.out or args.checkpoint / f"eval-{cfg.data.dataset}"
    result = run_eval(cfg, args.checkpoint, args.split, args.samples, args.temperature, out,
                      max_new_tokens=args.max_new_tokens, max_questions=args.max_questions, reranker=args.rerank,
                      config_source=source)
    print(format_eval(result))
    print(f"wrote {out}/eval.json, eval.csv, questions.jsonl, voting.png")
    return 0


def cmd_train_reranker(args) -> int:
    from experiments.reranker import run_train_reranker
    from experiments.sampled_eval import resolve_config

    # The flags are the reranker.* keys of the run config (whose defaults are the paper's).
    flags = {"samples": args.samples, "temperature": args.temperature, "epochs": args.epochs, "lr": args.lr,
             "batch_size": args.batch_size}
    overrides = [f"reranker.{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg, source = resolve_config(args.checkpoint, args.dataset, args.cot_kind, args.config, overrides)
    meta = run_train_reranker(cfg, args.checkpoint, args.out, samples_from=args.samples_from,
                              max_new_tokens=args.max_new_tokens, max_questions=args.max_questions,
                              config_source=source)
    last = meta["history"][-1]
    print(f"reranker: {meta['questions']} questions, {meta['drawn']} samples of {meta['samples_from']}, "
          f"{meta['distinct']} distinct, {meta['positives']} of them correct; epoch {last['epoch']}: loss "
          f"{last['reranker/epoch_loss']:.4f}, train accuracy {last['reranker/train_accuracy']:.1f}% -> {args.out}")
    return 0


def cmd_report(args) -> int:
    import os

    from experiments.report import write_report

    out = args.out or Path(os.path.commonpath([d.resolve() for d in args.run_dirs])) / "report"
    written = write_report(args.run_dirs, out)
    print(written["report"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from tasks.datasets import DATASETS

    parser = argparse.ArgumentParser(prog="reft", description="ReFT: reinforced fine-tuning for math reasoning, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reward", help="score one completion read from stdin; prints a JSON object")
    p.add_argument("--kind", choices=["ncot", "pcot"], required=True,
                   help="ncot: stdin is the CoT text; pcot: stdin is a program defining solution()")
    gold = p.add_mutually_exclusive_group(required=True)
    gold.add_argument("--gold", help="the gold answer (a number, or an option letter for mathqa); "
                                     "visible to every process on the machine (/proc/PID/cmdline)")
    gold.add_argument("--gold-fd", type=int, metavar="FD",
                      help="read the gold answer from this open file descriptor instead: private, "
                           "e.g. `3<gold.txt` or `3<<<208` in bash")
    p.add_argument("--dataset", default="gsm8k", help="decides how answers compare (mathqa = option letters)")
    p.add_argument("--question", default=None, help="mathqa: the question with its options, to map a value to a letter")
    p.add_argument("--partial-reward", type=float, default=None,
                   help="reward for a wrong but extracted answer (default: reward.partial_reward, the paper's 0.1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="program time limit in seconds (default: reward.program_timeout_s, the paper's 10)")
    p.add_argument("--rule", choices=["paper", "lenient"], default=None,
                   help="how the answer is extracted and compared (default: reward.rule, the paper's)")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("audit-rewards", help="score every gold CoT of a dataset and perturbed copies under both reward "
                                             "rules; lists failures and the rows the rules disagree on; exit 1 on a failure")
    p.add_argument("--dataset", required=True, help="gsm8k | svamp | mathqa | mathqa-numeric | synthetic | all")
    p.add_argument("--split", choices=["train", "test"], default=None, help="default: both")
    p.add_argument("--kind", choices=["ncot", "pcot"], default=None,
                   help="default: both where files exist; with --path, the kind of the file's CoTs")
    p.add_argument("--path", type=Path, default=None, help="audit this file instead of the dataset's default")
    p.add_argument("--rule", choices=["paper", "lenient", "both"], default="both",
                   help="the reward rule(s) to audit (default: both, and the gold rows they score differently)")
    p.add_argument("--show-disagreements", type=_positive_int, default=10, metavar="N",
                   help="print at most N of the rows the two rules score differently, per file (all in --json)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $REFT_DATA_DIR, ./data or ../shared/data")
    p.add_argument("--timeout", type=float, default=None,
                   help="program time limit in seconds (default: reward.program_timeout_s)")
    p.add_argument("--json", default=None, help="also write the full report (with failures) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_audit_rewards)

    p = sub.add_parser("sft", help="SFT warm-up alone: per-epoch HF checkpoints and greedy accuracy")
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: experiments/configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.epochs=3 learner.zero_stage=3")
    p.add_argument("--verbose", action="store_true",
                   help="engine logs (vLLM, DeepSpeed, Ray) on the console too (= cluster.verbose=true)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="the ReFT pipeline: SFT warm-up, RL on Ray (vLLM samplers, DeepSpeed learner), evaluation")
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: experiments/configs/tiny.yaml)")
    p.add_argument("--resume", type=Path, default=None, help="continue the run in this directory from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the placement plan and the resolved config; start nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.questions_per_step=16 rollout.num_actors=2")
    p.add_argument("--verbose", action="store_true",
                   help="engine logs (vLLM, DeepSpeed, Ray) on the console too (= cluster.verbose=true)")
    p.set_defaults(func=cmd_train)

    def sampling_options(p, samples_help: str, samples: int | None = 100, temperature: float | None = 1.0):
        """What eval and train-reranker share: the model, its run config, how to sample."""
        p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face model directory, e.g. <run>/sft/epoch-2")
        p.add_argument("--cot-kind", choices=["ncot", "pcot"], default=None, help="default: the run config's")
        p.add_argument("--samples", type=_positive_int, default=samples, help=samples_help)
        p.add_argument("--temperature", type=_positive_float, default=temperature,
                       help="sampling temperature (paper: 1.0)" + ("" if temperature else "; = reranker.temperature"))
        p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the config's rl.max_new_tokens")
        p.add_argument("--max-questions", type=_positive_int, default=None, help="only the first N questions (quick runs)")
        p.add_argument("--config", type=Path, default=None,
                       help="run config (default: config.yaml in the checkpoint or its two parent directories)")
        p.add_argument("overrides", nargs="*", help="dotted overrides of the run config, e.g. rollout.num_actors=2")
        p.add_argument("--verbose", action="store_true",
                       help="engine logs (vLLM, DeepSpeed, Ray) on the console too (= cluster.verbose=true)")

    p = sub.add_parser("eval", help="greedy top-1, majority voting and pass@k over K samples, reranking (vLLM + reward actor)")
    sampling_options(p, "samples per question for voting and pass@k (paper: 100)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--rerank", type=Path, default=None, help="a reranker directory (reft train-reranker): also rerank the samples")
    p.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/eval-<dataset>")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-reranker", help="train the paper's reranker: initialised from --checkpoint, on its "
                                              "warm-up's samples of the training questions")
    sampling_options(p, "samples per training question from the warm-up (= reranker.samples; paper: 100)",
                     samples=None, temperature=None)
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the run config's")
    p.add_argument("--out", type=Path, required=True, help="the reranker directory to write")
    p.add_argument("--samples-from", type=Path, default=None,
                   help="the model whose samples it trains on (default: the SFT warm-up --checkpoint started from, "
                        "as the paper; sampled once, cached in <it>/reranker-samples/)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="= reranker.epochs (paper: 3)")
    p.add_argument("--lr", type=_positive_float, default=None, help="= reranker.lr, AdamW (paper: 1e-6)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="= reranker.batch_size, over all learner ranks (paper: 24 = 3 per GPU x 8)")
    p.set_defaults(func=cmd_train_reranker)

    p = sub.add_parser("report", help="Table 2 / Table 4 shaped tables and plots from run directories")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="default: <common parent of the runs>/report")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    from cluster.config_io import ConfigError
    from tasks.datasets import DatasetError

    from cluster.console import setup_console

    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_console(verbose)   # the console: progress bars, evaluations, the table; the rest goes to <run>/logs
    if verbose:
        args.overrides.append("cluster.verbose=true")
    try:
        return args.func(args)
    except (DatasetError, ConfigError, FileNotFoundError, CommandLineError) as e:
        # Bad input: say where, no traceback.
        print(f"reft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
