"""The paper's comparison on the synthetic task in cpu mode, made by the project's own commands.

    python -m experiments.table [--base experiments/configs/synthetic/reft.yaml] [--out runs/table]
                                [--samples K] [--reranker-samples K] [--algorithms sft,offline_st,...]
                                [--quick] [key.sub=value ...]

A pipeline of ``reft`` commands, each in its own process (each starts and stops its own local
Ray, so one step's actors never linger into the next), output in ``OUT/logs/<step>.log``:

    1. warm-up     reft sft --config BASE                              -> OUT/warmup/sft/epoch-N
    2. algorithms  reft train --config experiments/configs/synthetic/ALG.yaml
                       rl.warmup_checkpoint=WARM-UP                    -> OUT/ALG
                   for sft, offline_st, online_st, reft, grpo, rloo: all from the one warm-up, as
                   in the paper (offline_st.yaml has offline_init: warmup, so its SFT continues
                   from the warm-up too, not from the base model)
    3. rerankers   reft train-reranker --checkpoint FINAL --samples-from WARM-UP
                                                                       -> OUT/reranker-ALG
                   for each algorithm's final model, as the paper: initialised from the model it
                   reranks, trained on the warm-up's samples of the training questions (drawn
                   once, cached under the warm-up, shared by all the rerankers)
    4. evaluation  reft eval --checkpoint FINAL --samples K --rerank OUT/reranker-ALG, for each
                   algorithm's final model: greedy top-1, voting@K, pass@K, reranking@K
    5. report      reft report OUT/sft OUT/offline_st ... --out OUT/report
                   Table 2 / Table 4 as markdown + CSV, epochs.png, voting.png

then ``OUT/TABLE.md``: Table 4 (top-1, voting, reranking per algorithm) under a header naming the
commit and the config it ran with, Table 2, the wall time of each step and in all. Dotted
overrides (``key.sub=value``) go to every command, so the warm-up and the algorithms share them.

The six synthetic configs share one task, model, warm-up recipe and learner (they differ in
``name`` and ``rl``), so the warm-up runs with one of them, reft.yaml, by default. Another BASE
must equal them apart from ``name`` and ``rl`` too: the run checks that before it starts, since a
warm-up and algorithms on different questions would compare nothing. (tiny.yaml, the embedded
default, is a different task now.)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import RunConfig
from cluster.config_io import load_config
from cluster.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
ALGORITHM_CONFIGS = REPO / "experiments" / "configs" / "synthetic"
DEFAULT_BASE = ALGORITHM_CONFIGS / "reft.yaml"   # the warm-up's config: any of the six would do
ORDER = ("sft", "offline_st", "online_st", "reft", "grpo", "rloo")   # the paper's rows, baselines first
assert set(ORDER) == set(RECIPES)
# Every command here starts its own short-lived Ray: a dashboard per command would only add
# start-up time and CPU load on a 2-core machine.
ALWAYS = ["cluster.dashboard=false"]
# --quick: a smoke test of the whole pipeline (every command, every algorithm), not a result.
QUICK = ["data.synthetic.num_train=64", "data.synthetic.num_test=32", "data.train_eval_size=32",
         "sft.epochs=2", "rl.epochs=1", "rl.questions_per_step=16", "rl.offline_samples=2"]
QUICK_SAMPLES = 4
# The paper samples 100 per question for both (GPUs). On 2 CPU cores: the warm-up's K samples of the
# 512 training questions are drawn once; each algorithm's reranker then trains 3 epochs over their
# distinct ones on the learner (reranker.* of the synthetic configs).
DEFAULT_SAMPLES = 8
DEFAULT_RERANKER_SAMPLES = 4


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out, base = args.out.resolve(), args.base.resolve()
    samples = args.samples or (QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    reranker_samples = args.reranker_samples or min(samples, DEFAULT_RERANKER_SAMPLES)
    overrides = ALWAYS + (QUICK if args.quick else []) + args.overrides
    check_same_setup(base, args.algorithms, overrides)
    invocation = " ".join(sys.argv[1:] if argv is None else argv)
    # Now, not at the end: the configs and the code may change while the run goes on.
    header = provenance(base, overrides, samples, reranker_samples, invocation)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = {}   # step -> wall seconds

    def reft(step: str, *command: str) -> None:
        steps[step] = run_reft(out / "logs" / f"{step}.log", *command)

    # 1. the shared SFT warm-up
    reft("warmup", "sft", "--config", str(base), f"out_dir={out}", "name=warmup", *overrides)
    warmup = last_epoch(out / "warmup" / "sft")

    # 2. every algorithm from it
    for alg in args.algorithms:
        # No SFT-continued inside the RL runs (reft train's own table): here the sft row is that baseline.
        own = [] if not RECIPES[alg].samples else ["rl.compare_sft=false"]
        reft(alg, "train", "--config", str(ALGORITHM_CONFIGS / f"{alg}.yaml"), f"out_dir={out}", f"name={alg}",
             f"rl.warmup_checkpoint={warmup}", *own, *overrides)

    # 3. each algorithm's reranker: from its final model, on the warm-up's samples (drawn by the first)
    for alg in args.algorithms:
        reft(f"reranker-{alg}", "train-reranker", "--checkpoint", str(final_model(out / alg, alg)),
             "--samples-from", str(warmup), "--out", str(out / f"reranker-{alg}"), "--samples", str(reranker_samples),
             *overrides)

    # 4. each algorithm's final model: top-1, voting and reranking over K samples
    for alg in args.algorithms:
        reft(f"eval-{alg}", "eval", "--checkpoint", str(final_model(out / alg, alg)), "--dataset", "synthetic",
             "--samples", str(samples), "--rerank", str(out / f"reranker-{alg}"), *overrides)

    # 5. the paper-shaped tables and plots
    reft("report", "report", *(str(out / alg) for alg in args.algorithms), "--out", str(out / "report"))

    wall = time.perf_counter() - start
    table = header + tables(out / "report") + timings(steps, wall)
    (out / "TABLE.md").write_text(table)
    print("\n" + table + f"\nwrote {out / 'TABLE.md'}; plots: {out / 'report'}/epochs.png, voting.png")
    return 0


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help="the warm-up's config (default: synthetic/reft.yaml); the algorithms' configs "
                             "must equal it apart from name and rl")
    parser.add_argument("--out", type=Path, default=Path("runs/table"), help="where every run, log and table goes")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"K samples per test question for voting and reranking "
                             f"(default {DEFAULT_SAMPLES}, --quick {QUICK_SAMPLES}; the paper: 100)")
    parser.add_argument("--reranker-samples", type=int, default=None,
                        help=f"samples per training question to train the reranker on "
                             f"(default min(K, {DEFAULT_RERANKER_SAMPLES}); the paper: 100)")
    parser.add_argument("--algorithms", type=lambda s: s.split(","), default=list(ORDER),
                        help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--quick", action="store_true", help="a tiny task and short runs: a smoke test, minutes")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every command, e.g. rl.epochs=2")
    args = parser.parse_args(argv)
    unknown = [a for a in args.algorithms if a not in ORDER]
    if unknown:
        parser.error(f"--algorithms: unknown {unknown}; choose from {list(ORDER)}")
    for name in ("samples", "reranker_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def check_same_setup(base: Path, algorithms, overrides) -> None:
    """Refuse to start unless every algorithm's config is ``base`` apart from name and rl (the
    same task, model, warm-up recipe and cluster): tests/test_configs.py keeps the shipped
    configs so among themselves, but another --base, or an edited config, could break it."""
    reference = load_config(RunConfig, base, overrides)
    for alg in algorithms:
        cfg = load_config(RunConfig, ALGORITHM_CONFIGS / f"{alg}.yaml", overrides)
        differ = [f.name for f in dataclasses.fields(RunConfig)
                  if f.name not in ("name", "rl") and getattr(cfg, f.name) != getattr(reference, f.name)]
        if differ:
            sys.exit(f"{ALGORITHM_CONFIGS / alg}.yaml differs from {base} in {', '.join(differ)}: "
                     "the algorithms would not start from the warm-up's task and model")


def run_reft(log: Path, *command: str) -> float:
    """One ``reft`` command in its own process, its output in ``log``; returns its wall seconds.
    A failing command stops the pipeline with the end of its log."""
    print("$ reft " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "experiments.cli", *command], stdout=f, stderr=subprocess.STDOUT,
                              check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{tail}\n\nreft {command[0]} failed (exit {code}) after {seconds:.0f} s; its output: {log}")
    print(f"  {seconds:.0f} s", flush=True)
    return seconds


def last_epoch(phase_dir: Path) -> Path:
    """The last ``epoch-N`` HF checkpoint an SFT phase wrote."""
    return max(phase_dir.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))


def final_model(run_dir: Path, alg: str) -> Path:
    """The HF model an algorithm ended with: sft and offline_st train in the RL stage's place and
    export every epoch to ``rl/epoch-N``; the RL loops export ``checkpoints/step-N/policy``, the
    last named by ``checkpoints/latest``. The final one, not the best: one rule for every row, and
    the one Table 2's top-1 (the last evaluation) describes."""
    if not RECIPES[alg].samples:
        return last_epoch(run_dir / "rl")
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip() / "policy"


def provenance(base: Path, overrides, samples: int, reranker_samples: int, command: str) -> str:
    """The table's header: the commit and config the run used (uncommitted changes named)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("diff", "--name-only", "HEAD").splitlines()
    digest = hashlib.sha256(base.read_bytes()).hexdigest()[:12]
    return (f"# ReFT and baselines on the synthetic task (cpu mode)\n\n"
            f"- commit: {git('rev-parse', '--short', 'HEAD')} {git('log', '-1', '--format=%s')[:80]!r}"
            + (f", with uncommitted changes to {', '.join(changed)}" if changed else "") + "\n"
            f"- config: {base} (sha256 {digest}), resolved in warmup/config.yaml and each run's config.yaml; "
            f"per algorithm {ALGORITHM_CONFIGS.relative_to(REPO)}/<algorithm>.yaml\n"
            f"- overrides: {' '.join(overrides) or 'none'}\n"
            f"- evaluation: test split, K = {samples} samples per question at temperature 1.0; "
            f"each algorithm's reranker initialised from its final model, trained on the warm-up's "
            f"{reranker_samples} samples per training question\n"
            f"- command: python -m experiments.table {command}\n\n")


def tables(report: Path) -> str:
    """Table 4 (the headline), then Table 2, as ``reft report`` wrote them."""
    return ("## Top-1, voting and reranking of each algorithm's final model (Table 4)\n\n"
            + (report / "table4.md").read_text()
            + "\n## Top-1 test accuracy during training (Table 2; SFT = the shared warm-up)\n\n"
            + (report / "table2.md").read_text()
            + f"\nPlots: {report / 'epochs.png'} (reward, training and test accuracy against epochs), "
            f"{report / 'voting.png'} (voting, pass@k and reranking against k).\n")


def timings(steps: dict, wall: float) -> str:
    rows = "".join(f"| {step} | {seconds:.0f} |\n" for step, seconds in steps.items())
    return f"\n## Wall time\n\n| step | seconds |\n|---|---|\n{rows}| **total** | **{wall:.0f}** ({wall / 60:.1f} min) |\n"


if __name__ == "__main__":
    sys.exit(main())
