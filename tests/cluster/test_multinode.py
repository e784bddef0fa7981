"""`cluster` mode on a Ray cluster of three CPU nodes (the `ray_multinode` fixture: real raylets,
one scratch TMPDIR per node, only the run directory shared, as a cluster's storage is).

One ReFT run of the smoke config with 2 learner ranks (ZeRO-2 over gloo) and 2 vLLM engines,
weights through the object store, is shared by the module; an RL-only run from its warm-up then
takes ZeRO-3 and the gloo broadcast from learner rank 0; a `cpu`-mode run from the same warm-up is
the single-node reference.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import RunConfig
from cluster.config_io import ConfigError, load_config

SMOKE = "experiments/configs/smoke.yaml"
CLUSTER = ["cluster.mode=cluster", "cluster.num_learners=2", "rollout.num_actors=2"]
RL_STEPS = 4   # the RL-only runs from the shared warm-up


def rl_steps(run_dir):
    from cluster.metrics import read_metrics
    return [r for r in read_metrics(run_dir / "rl" / "metrics.jsonl") if "rl/reward_mean" in r]


def rl_layout(after_ms: float = 0) -> dict:
    """The node ids of the RL stage's learner ranks and engines (the actors of a run that started
    after ``after_ms``), from the GCS's actor table: Ray's own record, dead actors included. The
    warm-up's learner ranks (ended before the first engine started) are left out."""
    from ray._private import state
    actors = [a for a in state.actors().values() if a["StartTime"] >= after_ms and a["Name"]]
    engines = [a for a in actors if a["Name"].startswith("rollout-")]
    first_engine = min(a["StartTime"] for a in engines)
    learners = [a for a in actors if a["Name"].startswith("learner-") and (a["EndTime"] == 0 or a["EndTime"] >= first_engine)]
    return {"learner": {a["Address"]["NodeID"] for a in learners}, "rollout": {a["Address"]["NodeID"] for a in engines},
            "learner_ranks": len(learners), "engines": len(engines)}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def multinode_run(ray_multinode, storage):
    from cluster.train import run_train
    cfg = load_config(RunConfig, SMOKE, [f"cluster.storage={storage}", "name=mn", "learner.zero_stage=2", *CLUSTER])
    headline = run_train(cfg)
    return cfg, storage / "mn", headline


@pytest.mark.slow
def test_reft_on_three_nodes_zero2_object_store(multinode_run, ray_multinode):
    cfg, run_dir, headline = multinode_run
    # the layout: both learner ranks on one node, both engines on another (Ray's node ids)
    rl = rl_layout()
    assert (rl["learner_ranks"], rl["engines"]) == (2, 2), rl
    assert len(rl["learner"]) == 1 and len(rl["rollout"]) == 1 and rl["learner"].isdisjoint(rl["rollout"]), rl
    steps = rl_steps(run_dir)
    assert len(steps) == 512 // 32
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    assert mean(steps[8:], "rl/reward_mean") > mean(steps[:2], "rl/reward_mean")
    assert all(r["rl/staleness"] == 0 for r in steps)                  # every step synced and verified
    assert all(r["rollout/handle_bytes"] < 64 * 1024 for r in steps)  # a handle crossed the driver, not weights
    # the run directory is complete, on the shared storage
    for name in ("results.json", "results.md", "curves.png", "config.yaml", "rl/metrics.jsonl", "rl/samples.jsonl",
                 f"sft/epoch-{cfg.sft.epochs}/config.json", "checkpoints/latest", "logs/driver.log"):
        assert (run_dir / name).exists(), name
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (latest / "policy" / "model.safetensors").is_file()
    assert not list((run_dir / ".nodes").iterdir())                   # the storage probe cleaned up
    assert {"warmup_acc", "reft_acc"} <= set(headline)


@pytest.mark.slow
def test_zero3_and_the_gloo_broadcast_across_nodes_match_the_single_node_run(multinode_run, storage, ray_multinode):
    """The same warm-up and seed: the first step's samples are the same in every layout (seeded
    per request), so its rewards are equal exactly; later steps follow from updates computed over 2
    ranks (ZeRO-3, gradients all-reduced) against 1 rank: the same maths, other float sums, so the
    per-step rewards agree closely but not bit for bit (a sampled token can flip)."""
    from cluster.train import run_train
    cfg, run_dir, _ = multinode_run
    started_ms = time.time() * 1000
    warmup = f"rl.warmup_checkpoint={run_dir / 'sft' / f'epoch-{cfg.sft.epochs}'}"
    short = [warmup, f"rl.max_steps={RL_STEPS}", "rl.eval_every=4", "rl.checkpoint_every=4"]
    run_train(load_config(RunConfig, SMOKE, [f"cluster.storage={storage}", "name=mn-zero3-gloo", "learner.zero_stage=3",
                                             "rollout.sync=gloo", *CLUSTER, *short]))
    rl = rl_layout(started_ms)
    assert rl["learner"].isdisjoint(rl["rollout"]) and rl["engines"] == 2, rl
    run_train(load_config(RunConfig, SMOKE, [f"cluster.storage={storage}", "name=single", *short]))
    zero3, single = rl_steps(storage / "mn-zero3-gloo"), rl_steps(storage / "single")
    assert len(zero3) == len(single) == RL_STEPS
    assert zero3[0]["rl/reward_mean"] == single[0]["rl/reward_mean"] == rl_steps(run_dir)[0]["rl/reward_mean"]
    print("per-step rewards: 3 nodes, ZeRO-3, gloo:", [round(r["rl/reward_mean"], 4) for r in zero3],
          "| cpu mode, one node:", [round(r["rl/reward_mean"], 4) for r in single])
    assert max(abs(a["rl/reward_mean"] - b["rl/reward_mean"]) for a, b in zip(zero3, single)) < 0.1
    print("sync seconds per step: object_store", [round(r["timing/sync_s"], 3) for r in rl_steps(run_dir)][:RL_STEPS],
          "| gloo", [round(r["timing/sync_s"], 3) for r in zero3])


def test_a_relative_out_dir_under_a_job_is_refused(monkeypatch, tmp_path):
    from cluster.runtime import RAY_JOB_ENV, check_run_location
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {}}))
    with pytest.raises(ConfigError, match=r"out_dir = 'runs' is relative, and this `ray job submit` job runs in"):
        check_run_location(load_config(RunConfig, SMOKE))
    check_run_location(load_config(RunConfig, SMOKE, [f"out_dir={tmp_path}"]))
    check_run_location(load_config(RunConfig, SMOKE, [f"cluster.storage={tmp_path}"]))
    with pytest.raises(ConfigError, match="cluster.storage must be an absolute path"):
        check_run_location(load_config(RunConfig, SMOKE, ["cluster.storage=shared/runs"]))


def _can_unshare_mounts() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_storage_one_node_does_not_see_fails_at_once_naming_that_node(ray_multinode, tmp_path):
    """A fourth node joins with a private mount namespace in which the storage path is a tmpfs of
    its own: a real node-local directory at the shared path. The check must fail at once and name
    that node, and only it. (Last in the module: the node is killed afterwards.)"""
    import ray

    from cluster.runtime import check_shared_storage
    if shutil.which("unshare") is None or not _can_unshare_mounts():
        pytest.skip("giving a Ray node a private mount namespace needs unshare -m (root)")
    storage = tmp_path / "storage"
    storage.mkdir()
    check_shared_storage(storage)                                  # the three fixture nodes share it
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ray_bin = Path(sys.executable).parent / "ray"
    command = (f"mount -t tmpfs tmpfs {storage} && exec {ray_bin} start --address={ray_multinode.address} "
               "--num-cpus=1 --disable-usage-stats --block")
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
                            env=dict(os.environ, RAY_AUTH_MODE="disabled"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before) == 0:
            time.sleep(1)
        (private,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
        with pytest.raises(ConfigError) as failure:
            check_shared_storage(storage)
        message = str(failure.value)
        assert f"{private[:12]}" in message and "cannot read the driver's marker" in message, message
        assert not any(other[:12] in message for other in before), message
        assert "Set cluster.storage" in message
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=60)
