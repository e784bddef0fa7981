"""What every recipe needs before its loop: Ray, the data, the starting model, the run directory."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from actors.config import RAY_NAMESPACE
from cluster.config import TINY, RunConfig
from cluster.console import attach_run_log, link_ray_logs
from cluster.config_io import dump_yaml
from formats.records import Example
from tasks.datasets import load_dataset

logger = logging.getLogger("reft")


def init_ray(cfg: RunConfig) -> None:
    """Join the configured Ray cluster, the job's cluster under `ray job submit`, or start a
    local one: its dashboard listens on 127.0.0.1 only, and token auth guards the rest.

    Ray 2.60's core gRPC servers (GCS, raylet, workers) bind every interface whatever node IP is
    asked for (``ray.init`` even turns 127.0.0.1 into the external address), so what protects a
    cluster we start is Ray's token auth, its default for a new local cluster: it stays on unless
    the user set RAY_AUTH_MODE. A cluster we join keeps its own mode.
    """
    import ray
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    # The actors' output (vLLM's engine logs, DeepSpeed's, transformers') stays in the Ray
    # session's log files, linked from the run directory (``cluster.console``); cluster.verbose
    # forwards it to the console as well.
    verbose = cfg.cluster.verbose
    if address:
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=verbose)
    else:
        # No RAY_AUTH_MODE set here: Ray reads it at import, and its default for a new local
        # cluster is token auth, set up in-process. address="local": a cluster of our own, never
        # a `ray start` head that happens to run here (plain ray.init() would join it).
        ray.init(address="local", namespace=RAY_NAMESPACE, include_dashboard=cfg.cluster.dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=verbose, logging_level=logging.WARNING)
    logger.info("ray: %s", ray.get_runtime_context().gcs_address)
    if cfg.run_dir.is_dir():
        link_ray_logs(cfg.run_dir)


def load_splits(cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    d = cfg.data
    kwargs = dict(cot_kind=d.cot_kind, data_dir=Path(d.data_dir) if d.data_dir else None,
                  synthetic_config=d.synthetic)
    train = load_dataset(d.dataset, "train", path=d.train_path, **kwargs)
    test = load_dataset(d.dataset, "test", path=d.test_path, **kwargs)
    return train, (test[:d.eval_size] if d.eval_size else test)


def prepare_model(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """Resolve ``learner.model``: "tiny" builds a tokenizer + random-init Qwen2 from the synthetic
    corpus into ``run_dir/base_model`` (once; a resumed run reuses it)."""
    if cfg.learner.model != TINY:
        return cfg
    from tasks.synthetic import generate
    from tasks.tiny_model import build_tiny_model, corpus_from_examples

    out = run_dir / "base_model"
    if not (out / "config.json").exists():
        texts = []
        for kind in ("ncot", "pcot"):   # one vocabulary for both CoT kinds
            train, test = generate(cfg.data.synthetic, cot_kind=kind)
            texts += corpus_from_examples(train + test)
        build_tiny_model(out, texts, cfg.tiny_model, max_value=cfg.data.synthetic.max_value)
        logger.info("built the tiny model in %s", out)
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, model=str(out)))


def make_run_dir(cfg: RunConfig) -> Path:
    """The run directory with the resolved config and the driver's log file (``logs/driver.log``)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    attach_run_log(run_dir)
    return run_dir
