"""One run's results as files a person reads (``reft train``):

    write_results(run_dir, rows)        results.md / results.csv (+ results.json for the headline)
    plot_curves(path, series)           curves.png: reward and accuracy vs time, train vs test

Tables over several runs and evaluations (``reft report``) are ``experiments.report``'s.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd


def write_results(run_dir: Path, rows: Sequence[Mapping], headline: Mapping | None = None) -> pd.DataFrame:
    """One row per model/algorithm; columns are whatever the rows carry (accuracies in percent)."""
    frame = pd.DataFrame(list(rows))
    frame.to_csv(Path(run_dir) / "results.csv", index=False)
    (Path(run_dir) / "results.md").write_text(frame.to_markdown(index=False, floatfmt=".1f") + "\n")
    if headline is not None:
        (Path(run_dir) / "results.json").write_text(json.dumps(dict(headline), indent=2) + "\n")
    return frame


def plot_curves(path: Path, series: Mapping[str, Sequence[Mapping]], title: str = "") -> Path:
    """``series``: name → metric records (``{"step", key: value}``) as in metrics.jsonl.

    Left: training reward (mean score of the sampled CoTs) vs time. Right: greedy accuracy vs
    time, test solid and train dashed: the gap is SFT's overfitting, the paper's figure.
    """
    plt = pyplot()
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, records) in enumerate(series.items()):
        color = f"C{i}"
        # x = seconds since the phase's first record: phases of different step costs (an RL step
        # vs an SFT step) compare at equal wall time, which is how the baselines are matched.
        t0 = records[0]["time"] if records else 0.0
        reward = [(r["time"] - t0, r["rl/reward_mean"]) for r in records if "rl/reward_mean" in r]
        if reward:
            ax_r.plot(*zip(*reward), color=color, label=name)
        for key, style, label in (("eval/test_accuracy", "-", "test"), ("eval/train_accuracy", "--", "train")):
            points = [(r["time"] - t0, r[key]) for r in records if key in r]
            if points:
                ax_a.plot(*zip(*points), style, color=color, marker="o", label=f"{name} {label}")
    ax_r.set(xlabel="seconds", ylabel="mean reward of samples", title="training reward")
    ax_a.set(xlabel="seconds (evaluation time included)", ylabel="greedy accuracy (%)",
             title="accuracy (test solid, train dashed)")
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt
