"""Benchmark the reward: P-CoT programs/s through the sandbox pool, N-CoT extractions/s.

    python -m experiments.bench.rewards [--programs 2000] [--workers N]

Uses the real SVAMP P-CoT/N-CoT gold data when it is found (see `tasks.datasets`), else the
synthetic task's. Prints one line per figure and a JSON summary; not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _corpus(kind: str, n: int):
    from tasks.datasets import load_dataset
    try:
        examples = load_dataset("svamp", "train", kind)
        source = "svamp"
    except FileNotFoundError:
        from tasks.synthetic import SyntheticConfig
        examples = load_dataset("synthetic", "train", kind, synthetic_config=SyntheticConfig(num_train=n, num_test=10))
        source = "synthetic"
    examples = (examples * (n // len(examples) + 1))[:n]
    return examples, source


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=2000)
    parser.add_argument("--extractions", type=int, default=50000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    from rewards.score import RewardConfig, Scorer

    results = {"cpu_count": os.cpu_count(), "workers": args.workers}
    with Scorer(RewardConfig(sandbox_workers=args.workers)) as scorer:
        examples, source = _corpus("pcot", args.programs)
        scorer.score([examples[0].cot], [examples[0].answer], "pcot", examples[0].dataset)  # warm the pool
        start = time.perf_counter()
        scores = scorer.score([e.cot for e in examples], [e.answer for e in examples], "pcot", examples[0].dataset)
        seconds = time.perf_counter() - start
        results.update(pcot_source=source, pcot_programs=len(examples), pcot_seconds=round(seconds, 3),
                       pcot_programs_per_s=round(len(examples) / seconds, 1),
                       pcot_correct_pct=round(100 * sum(s.correct for s in scores) / len(scores), 2))
        print(f"P-CoT: {len(examples)} {source} programs in {seconds:.2f} s = "
              f"{len(examples) / seconds:.1f} programs/s ({args.workers} workers)")

        examples, source = _corpus("ncot", args.extractions)
        start = time.perf_counter()
        scores = scorer.score([e.cot for e in examples], [e.answer for e in examples], "ncot", examples[0].dataset)
        seconds = time.perf_counter() - start
        results.update(ncot_source=source, ncot_extractions=len(examples),
                       ncot_extractions_per_s=round(len(examples) / seconds, 1))
        print(f"N-CoT: {len(examples)} {source} CoTs in {seconds:.2f} s = {len(examples) / seconds:.0f} extractions/s")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
