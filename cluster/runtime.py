"""What every recipe needs before its loop: Ray, the data, the starting model, the run directory."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

from actors.config import RAY_NAMESPACE
from cluster.config import TINY, RunConfig
from cluster.console import CONSOLE, attach_run_log, link_ray_logs
from cluster.config_io import ConfigError, dump_yaml
from formats.records import Example
from tasks.datasets import load_dataset

logger = logging.getLogger("reft")

# Set by Ray's job supervisor in the environment of a submitted job's driver (ray.runtime_env.constants).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


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


def join_cluster(cfg: RunConfig) -> RunConfig:
    """`init_ray`, then what depends on the cluster joined: ``cluster.device = auto`` settled
    (`cluster.placement.resolve_device`) and, on a cluster of several nodes, the run directory
    proven shared (`check_shared_storage`). Returns the config the run goes on with."""
    import ray

    from cluster.placement import resolve_device
    init_ray(cfg)
    cfg = resolve_device(cfg, ray.cluster_resources())
    check_shared_storage(cfg.run_dir)
    return cfg


def check_shared_storage(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Every alive node of the Ray cluster reads a token the driver wrote in ``run_dir`` and writes
    one of its own there, which the driver reads back. The actors read the warm-up, the tokenizer
    and the checkpoints from the run directory and write checkpoints into it, so a directory that
    is not the same on every node (a node-local disk, a path only the head has) would fail later
    and obscurely; here it fails at once, naming the nodes. Nothing to do on a single node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    markers = Path(run_dir).resolve() / ".nodes"
    markers.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    (markers / "driver").write_text(token)
    probe = ray.remote(_storage_probe)
    probes = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(markers), n["NodeID"]) for n in nodes]
    answers = ray.get(probes, timeout=timeout_s)
    blind = []
    for node, seen in zip(nodes, answers):
        mine = markers / node["NodeID"]
        if seen != token or not mine.is_file() or mine.read_text() != token:
            blind.append(f"{node['NodeID'][:12]} ({node['NodeManagerAddress']}): "
                         + ("cannot read the driver's marker" if seen != token else "its marker is not visible here"))
        mine.unlink(missing_ok=True)
    (markers / "driver").unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"the run directory {run_dir} is not shared by every node of the Ray cluster: "
                          + "; ".join(blind) + ". Set cluster.storage to a directory every node mounts at the "
                          "same path (NFS, a shared volume)")
    logger.info("run directory shared by the cluster's %d nodes: %s", len(nodes), run_dir)


def _storage_probe(markers: str, node_id: str) -> Optional[str]:
    """On one node: the driver's token if this node sees it (else None); writes it back as this node's."""
    try:
        seen = (Path(markers) / "driver").read_text()
    except OSError:
        return None
    (Path(markers) / node_id).write_text(seen)
    return seen



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
    """The run directory (absolute, `check_run_location`) with the resolved config and the
    driver's log file (``logs/driver.log``); its location is the console's first line."""
    check_run_location(cfg)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    attach_run_log(run_dir)
    logger.info("run directory: %s", run_dir, extra=CONSOLE)
    return run_dir


def check_run_location(cfg: RunConfig) -> None:
    """Refuse a run directory that would not outlive the run. Under `ray job submit` the driver
    runs in Ray's temporary copy of the working directory (``<session>/runtime_resources/
    working_dir_files/...``), deleted with the Ray session: a relative ``out_dir`` would put the
    results there. Such a job needs ``cluster.storage`` or an absolute ``out_dir``."""
    if cfg.cluster.storage is not None and not Path(cfg.cluster.storage).is_absolute():
        raise ConfigError(f"cluster.storage must be an absolute path (every node resolves it alike), "
                          f"got {cfg.cluster.storage!r}")
    if (RAY_JOB_ENV in os.environ and cfg.cluster.storage is None and not Path(cfg.out_dir).is_absolute()):
        raise ConfigError(f"out_dir = {cfg.out_dir!r} is relative, and this `ray job submit` job runs in Ray's "
                          f"temporary copy of the working directory ({Path.cwd()}), deleted with the session: "
                          "set cluster.storage=/a/shared/dir (or out_dir=/an/absolute/dir) so that the run "
                          "directory outlives the job")
