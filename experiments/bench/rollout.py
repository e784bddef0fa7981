"""Benchmark the rollout side on CPU: tokens/s of the vLLM rollout actor vs HF batched
generate, and weight-sync latency vs model size per transport.

    python -m experiments.bench.rollout [--prompts 32] [--n 4] [--max-tokens 128] [--repeats 3]

Throughput: the same prompts (synthetic questions, N-CoT prompts), ``n`` samples each at
temperature 1.0, exactly ``max_tokens`` tokens per sample (EOS ignored, so both engines decode
the same number of tokens). vLLM: one ``RolloutWorker`` Ray actor, its blocking ``generate``,
timed by the driver (Ray overhead included), after one warm-up call. HF: ``model.generate`` on
all prompts at once (left-padded, ``num_return_sequences=n``, ``min_new_tokens`` = max so EOS
never stops it) in the driver process. One timed run each.

Sync latency: for the tiny model (hidden 256, 4 layers, ~3 M parameters: the embedded default)
and a ~10x larger one (hidden 640, 8 layers, ~35 M), per transport (shm, object_store, gloo
broadcast), from a real DeepSpeed learner actor: publish (export, checks, checksums, the probe's
expectation, write/put) and sampler-side update (drain, load, verify), verify "both" and "off",
published by learner rank 0 (the system) and, for comparison, by the driver after fetching the
full state dict (the shape before); the median of ``repeats`` syncs, and the bytes of the handle
that crosses the driver.
Prints one line per figure and a JSON summary at the end; not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from actors.config import RAY_NAMESPACE

MODELS = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704),
    "10x": dict(hidden_size=640, num_layers=8, num_heads=10, num_kv_heads=2, intermediate_size=1728),
}


def build_models(root: Path) -> tuple[dict[str, Path], list[str]]:
    from formats.records import build_prompt
    from tasks.synthetic import SyntheticConfig, generate
    from tasks.tiny_model import TinyModelConfig, build_tiny_model, corpus_from_examples

    syn = SyntheticConfig()
    train, test = generate(syn)
    corpus = corpus_from_examples(train + test)
    dirs = {name: build_tiny_model(root / name, corpus, TinyModelConfig(**spec), syn.max_value)
            for name, spec in MODELS.items()}
    return dirs, [build_prompt(e.question, "ncot") for e in test]


def num_params(model_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def start_actor(cfg, name: str):
    import ray

    from actors.rollout import RolloutWorker
    start = time.perf_counter()
    actor = ray.remote(RolloutWorker).options(name=name, namespace=RAY_NAMESPACE, num_cpus=0.5).remote(cfg, name)
    health = ray.get(actor.start.remote(), timeout=cfg.start_timeout_s)
    assert health["engine"] == "vllm", health
    return actor, time.perf_counter() - start


def bench_vllm(actor, prompts: list[str], n: int, max_tokens: int) -> dict:
    import ray

    from actors.rollout import SampleRequest
    requests = [SampleRequest(f"bench-{i}", p, n=n, temperature=1.0, max_tokens=max_tokens, seed=i, ignore_eos=True)
                for i, p in enumerate(prompts)]
    warm = [dataclasses.replace(r, request_id=f"warm-{r.request_id}", max_tokens=8) for r in requests[:4]]
    ray.get(actor.generate.remote(warm), timeout=600)
    start = time.perf_counter()
    samples = ray.get(actor.generate.remote(requests), timeout=1800)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.completion_token_ids) for s in samples)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def bench_hf(model_dir: Path, prompts: list[str], n: int, max_tokens: int) -> dict:
    import torch

    from formats.hf import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(model_dir), "fp32").eval()
    tokenizer = load_tokenizer(model_dir)
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, encoded))
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    kwargs = dict(attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  max_new_tokens=max_tokens, min_new_tokens=max_tokens, num_return_sequences=n,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(input_ids=input_ids[:4], **{**kwargs, "attention_mask": attention_mask[:4],
                                                   "max_new_tokens": 8, "min_new_tokens": 8})   # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, **kwargs)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def start_learner(model_dir: Path):
    """One DeepSpeed learner rank (ZeRO-2, fp32) holding the model: the publisher of the syncs."""
    from cluster.actor_group import ActorGroup
    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker
    cfg = LearnerConfig(model=str(model_dir), with_reference=False, lr=1e-4, micro_batch_size=8)
    return ActorGroup(LearnerWorker, 1, cfg, num_cpus_per_actor=0.5, name_prefix="bench-learner", timeout_s=600)


def new_version(learner, model_dir: Path) -> None:
    """One SFT step on a few synthetic examples: the learner's weights change, so the next
    export is a new one (not timed)."""
    from formats.hf import load_tokenizer
    from learner.data import collate, tokenize_sft
    from learner.worker import LearnerWorker
    from tasks.synthetic import SyntheticConfig, generate
    tokenizer = load_tokenizer(model_dir)
    batch = collate([tokenize_sft(tokenizer, e) for e in generate(SyntheticConfig())[0][:8]], tokenizer.pad_token_id)
    learner.run_sharded(LearnerWorker.sft_step, batch)


def bench_sync(actor, learner, cfg, model_dir: Path, transport: str, verify: str, repeats: int, version0: int,
               path: str) -> dict:
    """``repeats`` syncs of new versions from the learner to the rollout actor, one of two ways:

    * "learner" (the system's): learner rank 0 exports and publishes (checksums, probe on its own
      policy, write / put / broadcast); the driver gets the handle and passes it to the sampler.
    * "driver" (the shape before): the full state dict goes from the learner to the driver
      (``export_weights``), which publishes it (probe rebuilt from the tensors on CPU).
    """
    import ray

    from actors.weight_sync import RemoteSender, make_weight_sync
    from learner.worker import LearnerWorker

    cfg = dataclasses.replace(cfg, verify=verify, sync=transport)
    if path == "learner":
        learner.run(LearnerWorker.open_weight_sync, cfg)
        sync = RemoteSender(learner.actors[0], transport, 600)
    else:
        sync = make_weight_sync(cfg, transport)
    publish, update, load, check, handle_bytes = [], [], [], [], []
    try:
        sync.attach("bench", lambda info: actor.join_weight_sync.remote(info), cfg.sync_timeout_s)
        for k in range(repeats):
            new_version(learner, model_dir)
            start = time.perf_counter()
            state_bytes = 0
            if path == "learner":
                handle = learner.run(LearnerWorker.publish_weights, version0 + k)[0]
            else:
                state = learner.run(LearnerWorker.export_weights)[0]
                state_bytes = sum(t.numel() * t.element_size() for t in state.values())
                handle = sync.publish(state, version0 + k)
            publish.append(time.perf_counter() - start)
            handle_bytes.append(state_bytes + len(pickle.dumps(dataclasses.replace(handle, location=None))))
            start = time.perf_counter()
            ref = actor.update_weights.remote(handle)
            sync.transmit(handle, ["bench"], cfg.sync_timeout_s)
            report = ray.get(ref, timeout=cfg.sync_timeout_s + 60)
            update.append(time.perf_counter() - start)
            load.append(report["load_s"])
            check.append(report["verify_s"])
    finally:
        sync.detach("bench")
        sync.close()
        if path == "learner":
            learner.run(LearnerWorker.close_weight_sync)

    def med(xs):
        return round(statistics.median(xs), 3)
    return {"path": path, "transport": transport, "verify": verify, "publish_s": med(publish),
            "update_s": med(update), "load_s": med(load), "verify_s": med(check),
            "end_to_end_s": med([a + b for a, b in zip(publish, update)]), "handle_bytes": max(handle_bytes)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="shm,object_store,gloo")
    parser.add_argument("--paths", default="learner,driver",
                        help="who publishes: learner rank 0 (the system) and/or the driver (the shape before)")
    parser.add_argument("--verify", default="off,both")
    args = parser.parse_args(argv)

    import ray

    from actors.config import RolloutConfig

    results: dict = {"cpu_count": os.cpu_count(), "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        dirs, prompts = build_models(Path(tmp))
        prompts = prompts[:args.prompts]
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False)
        try:
            sync_rows = []
            for name, model_dir in dirs.items():
                cfg = RolloutConfig(model=str(model_dir), max_model_len=1024, sync_dir="/dev/shm/reft-bench",
                                    start_timeout_s=600, sync_timeout_s=600)
                params = num_params(model_dir)
                actor, startup = start_actor(cfg, f"bench-{name}")
                learner = start_learner(model_dir)
                print(f"[{name}] {params / 1e6:.1f} M parameters; engine start {startup:.1f} s", flush=True)
                try:
                    if name == "tiny":
                        v = bench_vllm(actor, prompts, args.n, args.max_tokens)
                        h = bench_hf(model_dir, prompts, args.n, args.max_tokens)
                        results["throughput"] = {"model": name, "params": params, "vllm_actor": v, "hf_generate": h,
                                                 "ratio": round(v["tokens_per_s"] / h["tokens_per_s"], 2)}
                        print(f"[{name}] sampling {args.prompts} prompts x {args.n} x {args.max_tokens} tokens: vLLM "
                              f"actor {v['tokens_per_s']} tok/s ({v['seconds']} s), HF generate "
                              f"{h['tokens_per_s']} tok/s ({h['seconds']} s): x{results['throughput']['ratio']}",
                              flush=True)
                    version = 1
                    for transport in args.transports.split(","):
                        for verify in args.verify.split(","):
                            for path in args.paths.split(","):
                                row = bench_sync(actor, learner, cfg, model_dir, transport, verify, args.repeats,
                                                 version, path)
                                version += args.repeats
                                row.update(model=name, params=params, mb=round(params * 4 / 1e6, 1))
                                sync_rows.append(row)
                                print(f"[{name}] sync {transport:12s} verify={verify:4s} published by {path:7s}: "
                                      f"publish {row['publish_s']} s, update {row['update_s']} s (load "
                                      f"{row['load_s']}, verify {row['verify_s']}), end to end {row['end_to_end_s']} s,"
                                      f" {row['handle_bytes']} bytes through the driver", flush=True)
                finally:
                    learner.kill()
                    ray.get(actor.shutdown.remote(), timeout=120)
                    ray.kill(actor)
            results["sync"] = sync_rows
        finally:
            ray.shutdown()
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
