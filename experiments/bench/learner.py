"""Benchmark the DeepSpeed learner on the tiny model: tokens/s of SFT steps and PPO updates,
ZeRO-2 vs ZeRO-3, 1 vs 2 ranks (Ray actors on a local cluster, gloo on CPU).

    python -m experiments.bench.learner [--steps 5] [--batch 32] [--configs 1x2,1x3,2x2,2x3]

Tokens/s counts every non-padding token of the batch (prompt + response) per second of wall time
of the learner call, as seen by the driver. A PPO update is ``ppo_epochs`` (2) passes over the
batch plus the old-logprob/value pass it needs. Prints one line per configuration and a JSON
summary; not a test.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from actors.config import RAY_NAMESPACE


def build_batch(model_dir: Path, batch_size: int, seed: int = 0):
    from formats.hf import load_tokenizer
    from learner.data import collate, tokenize_sft
    from tasks.synthetic import SyntheticConfig, generate

    train, _ = generate(SyntheticConfig(num_train=max(batch_size, 64), num_test=10, seed=seed))
    tokenizer = load_tokenizer(model_dir)
    return collate([tokenize_sft(tokenizer, e) for e in train[:batch_size]], tokenizer.pad_token_id)


def bench_config(model_dir: Path, ranks: int, stage: int, batch, steps: int) -> dict:
    import torch

    from cluster.actor_group import ActorGroup
    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(model=str(model_dir), zero_stage=stage, micro_batch_size=16, lr=1e-4)
    start = time.perf_counter()
    group = ActorGroup(LearnerWorker, ranks, cfg, num_cpus_per_actor=2 / ranks, timeout_s=1800)
    startup = time.perf_counter() - start
    tokens = int(batch["attention_mask"].sum())
    try:
        group.run_sharded(LearnerWorker.sft_step, batch)   # warm-up step, not timed
        start = time.perf_counter()
        for _ in range(steps):
            group.run_sharded(LearnerWorker.sft_step, batch)
        sft_s = (time.perf_counter() - start) / steps

        scores = group.run_sharded(LearnerWorker.score, batch, 1.0, False)
        from cluster.actor_group import unshard
        scores = unshard(scores)
        mask = batch["response_mask"].float()
        advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
        ppo_batch = dict(batch, old_logprobs=scores.logprobs, old_values=scores.values,
                         advantages=advantages, returns=scores.values + advantages)
        start = time.perf_counter()
        for _ in range(steps):
            group.run_sharded(LearnerWorker.score, batch, 1.0, False)
            group.run_sharded(LearnerWorker.ppo_update, ppo_batch, 1.0)
        ppo_s = (time.perf_counter() - start) / steps

        start = time.perf_counter()
        group.run(LearnerWorker.export_weights)   # a new export: the weights changed since the last
        export_s = time.perf_counter() - start
    finally:
        group.kill()
    return {"ranks": ranks, "zero_stage": stage, "startup_s": round(startup, 1), "tokens_per_batch": tokens,
            "sft_step_s": round(sft_s, 3), "sft_tokens_per_s": round(tokens / sft_s),
            "ppo_update_s": round(ppo_s, 3), "ppo_tokens_per_s": round(tokens / ppo_s),
            "export_s": round(export_s, 3)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--configs", default="1x2,1x3,2x2,2x3", help="RANKSxZERO_STAGE, comma-separated")
    args = parser.parse_args(argv)

    import ray

    from tasks.synthetic import SyntheticConfig, generate
    from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train, test = generate(SyntheticConfig())
        model_dir = build_tiny_model(Path(tmp) / "model", corpus_from_examples(train + test), TinyModelConfig(),
                                     max_value=SyntheticConfig().max_value)
        batch = build_batch(model_dir, args.batch)
        ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE)
        try:
            for spec in args.configs.split(","):
                ranks, stage = (int(x) for x in spec.split("x"))
                r = bench_config(model_dir, ranks, stage, batch, args.steps)
                results.append(r)
                print(f"ranks={ranks} zero={stage}: SFT {r['sft_tokens_per_s']} tok/s ({r['sft_step_s']} s/step), "
                      f"PPO {r['ppo_tokens_per_s']} tok/s ({r['ppo_update_s']} s/update), "
                      f"export {r['export_s']} s, start {r['startup_s']} s", flush=True)
        finally:
            ray.shutdown()
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
