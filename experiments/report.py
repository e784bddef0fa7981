"""Evaluations and several runs together, in the paper's shapes (``reft eval``, ``reft report``):

    plot_voting(path, evals)            voting accuracy (and pass@k, reranking) vs k
    read_run(run_dir) -> RunSummary     config.yaml, results.json, */metrics.jsonl, **/eval-*/eval.json
    table2(runs), table4(runs)          top-1 per dataset x CoT kind; top-1 / voting / reranking
    plot_epoch_curves(path, runs)       reward, train and test accuracy vs epoch: SFT against ReFT
    write_report(run_dirs, out)         all of the above into one folder
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pandas as pd
import yaml

from cluster.metrics import read_metrics
from cluster.results import pyplot


def plot_voting(path: Path, evals: Mapping[str, Mapping]) -> Path:
    """``evals``: name -> an eval.json (``reft eval``). Accuracy against the number of samples k:
    majority voting solid, pass@k dashed, reranking dotted (where evaluated), greedy top-1 as a
    horizontal line. pass@k bounds voting from above: the gap is what a perfect selector of the k
    samples would add, and reranking is one such selector."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, result) in enumerate(evals.items()):
        color, curve = f"C{i}", result["curve"]
        ax.plot(curve["k"], curve["voting_accuracy"], "-", color=color, label=f"{name} voting")
        ax.plot(curve["k"], curve["pass_at_k"], "--", color=color, label=f"{name} pass@k")
        if "rerank_accuracy" in curve:
            ax.plot(curve["k"], curve["rerank_accuracy"], ":", color=color, label=f"{name} reranking")
        ax.axhline(result["greedy"]["accuracy"], color=color, alpha=0.4, lw=1, label=f"{name} greedy")
    ax.set(xlabel="samples k", ylabel="accuracy (%)", title="accuracy with k samples per question")
    ax.set_xscale("log" if max(len(r["curve"]["k"]) for r in evals.values()) >= 20 else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------- reft report

# Row names of the paper's tables. results.json's headline keys are "<name>_acc".
ALGORITHM_LABELS = {"warmup": "SFT", "sft": "SFT continued", "reft": "ReFT", "grpo": "GRPO", "rloo": "RLOO",
                    "offline_st": "Offline-ST", "online_st": "Online-ST"}
# A run directory's phase folders -> the model they hold (the RL ones get the run's algorithm).
PHASE_LABELS = {"sft": "SFT", "sft-continued": "SFT continued"}
RL_PHASES = ("rl", "checkpoints")
COT_LABELS = {"ncot": "N-CoT", "pcot": "P-CoT"}


@dataclasses.dataclass
class RunSummary:
    """What ``reft report`` reads from one run directory."""
    path: Path
    model: str                      # learner.model's last path component ("tiny", "CodeLlama-7b-hf")
    dataset: str
    cot_kind: str
    algorithm: str                  # rl.algorithm
    top1: dict                      # row label ("SFT", "ReFT", ...) -> test accuracy (%)
    series: dict                    # phase ("sft", "rl", "sft-continued") -> metric records
    evals: list                     # eval.json contents, each with "label" added


def read_run(run_dir: Path) -> RunSummary:
    """Read one run directory. FileNotFoundError when it has no config.yaml.

    Top-1 accuracy per row: the last ``eval/test_accuracy`` of each phase's metrics, then the
    headline of results.json over it (the number ``reft train`` reported; it also carries the
    baselines' keys). The config is read as plain YAML, so a run written by an older version of
    the code (other keys) still reports.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run directory)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data, rl = config.get("data", {}), config.get("rl", {})
    algorithm = rl.get("algorithm", "reft")
    series = {phase.parent.name: read_metrics(phase) for phase in sorted(run_dir.glob("*/metrics.jsonl"))}

    top1 = {}
    for phase in sorted(series, key=lambda p: p not in PHASE_LABELS):   # SFT rows first, as in the paper
        records, label = series[phase], _phase_label(phase, algorithm)
        tests = [r["eval/test_accuracy"] for r in records if r.get("eval/test_accuracy") is not None]
        if label is not None and tests:
            top1[label] = tests[-1]
    if (run_dir / "results.json").is_file():
        for key, value in json.loads((run_dir / "results.json").read_text()).items():
            if key.endswith("_acc") and value is not None:
                name = key[:-len("_acc")]
                top1[ALGORITHM_LABELS.get(name, name)] = value

    evals = []
    for path in sorted(run_dir.rglob("eval-*/eval.json")):
        result = json.loads(path.read_text())
        phase = path.relative_to(run_dir).parts[0]
        result["label"] = _phase_label(phase, algorithm) or phase
        evals.append(result)
    return RunSummary(run_dir, Path(str(config.get("learner", {}).get("model", "?"))).name,
                      data.get("dataset", "synthetic"), data.get("cot_kind", "ncot"), algorithm, top1, series, evals)


def _phase_label(phase: str, algorithm: str) -> Optional[str]:
    if phase in RL_PHASES:
        return ALGORITHM_LABELS.get(algorithm, algorithm)
    return PHASE_LABELS.get(phase)


def table2(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """The paper's Table 2: rows model + algorithm, columns "<dataset> <N-CoT|P-CoT>", top-1
    test accuracy (%). Rows and columns keep the order they first appear in; a cell filled by
    several runs keeps the first run's value."""
    rows = [{"model": r.model, "algorithm": label, "column": f"{r.dataset} {COT_LABELS.get(r.cot_kind, r.cot_kind)}",
             "accuracy": acc} for r in runs for label, acc in r.top1.items()]
    if not rows:
        return pd.DataFrame(columns=["model", "algorithm"])
    frame = pd.DataFrame(rows).pivot_table(index=["model", "algorithm"], columns="column", values="accuracy",
                                           aggfunc="first", sort=False)
    frame.columns.name = None
    return frame.reset_index()


def table4(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """The paper's Table 4: one row per evaluated checkpoint (model + algorithm), columns top-1,
    voting@K and reranking@K (%)."""
    rows = []
    for run in runs:
        for e in run.evals:
            k = e["samples"]
            rows.append({"model": run.model, "algorithm": e["label"], "checkpoint": Path(e["checkpoint"]).name,
                         "dataset": e["dataset"], "CoT": COT_LABELS.get(e["cot_kind"], e["cot_kind"]),
                         "questions": e["questions"], "K": k, "top-1": e["greedy"]["accuracy"],
                         "voting@K": e["voting"]["accuracy"], "pass@K": e["pass_at_k"][str(k)],
                         "reranking@K": e["rerank"]["accuracy"] if e.get("rerank") else None})
    return pd.DataFrame(rows)


def plot_epoch_curves(path: Path, runs: Sequence[RunSummary]) -> Path:
    """The paper's "SFT overfits, ReFT keeps learning" figure, against epochs over the training
    set: (1) the RL training reward, (2) training accuracy (SFT: greedy on training questions
    after each epoch; RL: its samples' accuracy, a moving average, plus greedy at evaluations,
    circles), (3) greedy test accuracy. RL and continued SFT start where the warm-up ended, so the
    x axis counts every epoch since the run began."""
    plt = pyplot()
    fig, (ax_r, ax_tr, ax_te) = plt.subplots(1, 3, figsize=(15, 4))
    color = 0
    for run in runs:
        warmup_epochs = max((r["epoch"] for r in run.series.get("sft", []) if "epoch" in r), default=0)
        for phase, records in run.series.items():
            label = f"{run.path.name} {_phase_label(phase, run.algorithm) or phase}"
            c = f"C{color % 10}"
            color += 1
            if phase in RL_PHASES:
                _plot_rl(records, warmup_epochs, label, c, ax_r, ax_tr, ax_te)
            else:
                offset = 0 if phase == "sft" else warmup_epochs
                epochs = [r for r in records if "epoch" in r and "eval/test_accuracy" in r]
                if not epochs:
                    continue
                x = [offset + r["epoch"] for r in epochs]
                ax_tr.plot(x, [r["eval/train_accuracy"] for r in epochs], "-o", color=c, label=label, ms=3)
                ax_te.plot(x, [r["eval/test_accuracy"] for r in epochs], "-o", color=c, label=label, ms=3)
    ax_r.set(xlabel="epoch", ylabel="mean reward of samples", title="training reward")
    ax_tr.set(xlabel="epoch", ylabel="accuracy (%)", title="training accuracy")
    ax_te.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy (greedy)")
    for ax in (ax_r, ax_tr, ax_te):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _plot_rl(records: Sequence[Mapping], offset: float, label: str, color: str, ax_r, ax_tr, ax_te) -> None:
    steps = [r for r in records if "rl/epoch" in r]
    if not steps:
        return
    epoch_at = {r["step"]: offset + r["rl/epoch"] for r in steps}
    epoch_at.setdefault(0, offset)                                    # the evaluation before step 1
    x = [epoch_at[r["step"]] for r in steps]
    window = max(1, len(steps) // 20)
    for ax, key in ((ax_r, "rl/reward_mean"), (ax_tr, "rl/train_accuracy")):
        # The SFT baselines' records (cluster.baselines) carry rl/epoch but sample nothing.
        sampled = [(x_i, r[key]) for x_i, r in zip(x, steps) if key in r]
        if not sampled:
            continue
        smooth = pd.Series([v for _, v in sampled]).rolling(window, min_periods=1).mean()
        ax.plot([x_i for x_i, _ in sampled], smooth, "-", color=color,
                label=label + (f" (mean of {window} steps)" if window > 1 else ""))
    evals = [r for r in records if "eval/test_accuracy" in r and r["step"] in epoch_at]
    ax_tr.plot([epoch_at[r["step"]] for r in evals], [r["eval/train_accuracy"] for r in evals], "o", color=color, ms=4)
    ax_te.plot([epoch_at[r["step"]] for r in evals], [r["eval/test_accuracy"] for r in evals], "-o", color=color,
               label=label, ms=3)


def write_report(run_dirs: Sequence[Path], out: Path) -> dict:
    """``reft report``: Table 2 and Table 4 (markdown + CSV, and report.md with both), the epoch
    curves and the voting curves of every evaluation, into ``out``. Returns the paths written."""
    runs = [read_run(Path(d)) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    sections = []
    for name, frame, title in (("table2", table2(runs), "Top-1 test accuracy (Table 2)"),
                               ("table4", table4(runs), "Top-1, voting and reranking (Table 4)")):
        frame.to_csv(out / f"{name}.csv", index=False)
        text = _markdown(frame) if len(frame) else "(nothing to report)"
        (out / f"{name}.md").write_text(text + "\n")
        written[name] = out / f"{name}.md"
        sections.append(f"## {title}\n\n{text}\n")
    written["epochs"] = plot_epoch_curves(out / "epochs.png", runs)
    sections.append("![reward and accuracy vs epoch](epochs.png)\n")
    evals = {f"{r.path.name} {e['label']} {Path(e['checkpoint']).name} ({e['dataset']} {e['cot_kind']})": e
             for r in runs for e in r.evals}
    if evals:
        written["voting"] = plot_voting(out / "voting.png", evals)
        sections.append("![voting accuracy vs k](voting.png)\n")
    (out / "report.md").write_text("# ReFT report: " + ", ".join(str(r.path) for r in runs) + "\n\n"
                                   + "\n".join(sections))
    written["report"] = out / "report.md"
    return written


def _markdown(frame: pd.DataFrame) -> str:
    """Markdown with one decimal; empty cells (a dataset a model was not run on) as "-"."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".1f", missingval="-")
