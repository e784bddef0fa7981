"""Every actor's failure, survived: faults on a Ray cluster of three CPU nodes (the `ray_multinode`
fixture: real raylets, one scratch TMPDIR per node, only the storage shared) in `cluster` mode.

All runs are RL from one short SFT warm-up that the module trains first, in one layout: 2 learner
ranks (ZeRO-2 over gloo) fill one worker node, the rollout engine (1.5 CPUs, more than the head's
1) takes the other, the reward actor goes wherever it fits; weights go through the object store.
Every fault is real: processes are killed with signals (their pids and nodes from Ray's state
API), a node is removed, a driver is killed.

    survivable   rollout-0 (on another node than the learners) frozen, then killed, in step 2;
                 the reward actor likewise in step 4. The run goes on.
    stop/resume  one run directory through three stops: its first driver (a subprocess) killed
                 inside the checkpoint of its last step (4); resumed, learner rank 1 killed after
                 step 3; resumed, the engine's node removed after step 3; resumed on a node added
                 meanwhile, to the end. The first driver ran steps 1-4 uninterrupted: the
                 reference every resumed step is compared with, and the survivable run too.

Freezing a process (SIGSTOP) before killing it makes "mid-step" certain: the step's requests or
scoring calls are queued on the frozen actor when it dies. Each fault's detection and recovery
times are printed (from the driver's log).
"""
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.config import RunConfig
from cluster.config_io import load_config
from cluster.metrics import read_metrics
from tests.cluster.test_train_e2e import NOT_REPRODUCIBLE, rl_steps

REPO = Path(__file__).resolve().parents[2]
SMOKE = "experiments/configs/smoke.yaml"
DATA = ["data.synthetic.num_train=256", "data.synthetic.num_test=32", "data.train_eval_size=32"]
STEPS = 4
TIMEOUT_S = 120          # cluster.call_timeout_s and learner.collective_timeout_s of the runs
PLACEMENT_S = 20         # cluster.placement_timeout_s: how long a lost engine may wait for a node
LAYOUT = ["cluster.mode=cluster", "cluster.num_learners=2", "rollout.num_actors=1", "rollout.num_cpus_per_actor=1.5",
          f"rl.max_steps={STEPS}", "rl.checkpoint_every=2", "rl.eval_every=100",
          f"cluster.call_timeout_s={TIMEOUT_S}", f"learner.collective_timeout_s={TIMEOUT_S}",
          f"cluster.placement_timeout_s={PLACEMENT_S}"]
# What differs between a run with survivable faults and one without: the fault counters.
FAULT_COUNTERS = ("rollout/actor_restarts", "rollout/reissued_requests", "reward/")


# ---------------------------------------------------------------------------------------- helpers

def alive(name: str, timeout_s: float = 600) -> dict:
    """This driver's live actor ``name`` as Ray's state API lists it (pid, node id and IP), once it is up.
    (Looked up before the step it is killed in: the state API takes a while to answer.) The
    cluster's address is given: left to itself, the state API takes the newest Ray on the machine,
    which may be another test's."""
    import ray
    from ray.util.state import list_actors
    context = ray.get_runtime_context()
    job, address = context.get_job_id(), context.gcs_address
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list_actors(address=address, filters=[("name", "=", name), ("state", "=", "ALIVE"),
                                                      ("job_id", "=", job)], detail=True, raise_on_missing_output=False)
        if found:
            (ip,) = [n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == found[0].node_id]
            return {"pid": found[0].pid, "node_id": found[0].node_id, "ip": ip}
        time.sleep(0.5)
    raise TimeoutError(f"no live actor {name} of job {job} in {timeout_s} s")


def wait_for_step(run_dir: Path, step: int, since: float, timeout_s: float = 600) -> None:
    """Until the RL metrics of ``step`` are written after time ``since`` (a resumed run's, not its
    predecessor's), polled every 10 ms: the next step starts at once."""
    path = run_dir / "rl" / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and any(r["step"] >= step and r["time"] >= since for r in rl_steps(run_dir)):
            return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout_s} s")


def freeze_then_kill(pid: int, hold_s: float = 2.0) -> float:
    """SIGSTOP ``pid``, wait, SIGKILL it; returns the time of the kill."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(hold_s)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def in_background(fault) -> tuple[threading.Thread, dict]:
    """Run ``fault()`` (which returns what it observed) in a thread; its result or error lands in the dict."""
    seen: dict = {}

    def run():
        try:
            seen.update(fault())
        except BaseException as e:   # noqa: BLE001 (reported by the test)
            seen["error"] = repr(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def log_lines(run_dir: Path, pattern: str) -> list[tuple[float, re.Match]]:
    """(wall time, match) of each driver.log line matching ``pattern``."""
    out = []
    for line in (run_dir / "logs" / "driver.log").read_text(encoding="utf-8").splitlines():
        match = re.search(pattern, line)
        if match:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((stamp, match))
    return out


def reproducible(record: dict, also: tuple = ()) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(NOT_REPRODUCIBLE + also)}


def assert_same_steps(got: list[dict], expected: list[dict], also: tuple = ()) -> None:
    """Per-step metrics equal up to float noise (the resume test's tolerance: the same samples and
    updates, recomputed in other processes)."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(map(lambda r: reproducible(r, also), expected), map(lambda r: reproducible(r, also), got)):
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key, a[key], b[key])


def resume(run_dir: Path) -> None:
    """`reft train --resume RUN_DIR`, in this process (the cluster joined is this process's)."""
    from experiments.cli import main
    assert main(["train", "--resume", str(run_dir)]) == 0


def assert_resume_said(run_dir: Path, error: str) -> None:
    """The driver's log says where the run stopped, why, and the command that continues it."""
    said = [m.group(0) for _, m in log_lines(run_dir, r"ERROR reft: rl stopped after step 3: (.*)")]
    assert any(error in line and f"`reft train --resume {run_dir}` continues from step-000002" in line
               for line in said), said


def node_of(cluster, node_id: str) -> tuple[str, object]:
    (found,) = [(name, node) for name, node in cluster.workers.items() if node.node_id == node_id]
    return found


# ---------------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def warmup(ray_multinode, storage) -> str:
    """A short SFT warm-up (cpu mode: one learner, wherever it fits) that every run starts RL from."""
    from cluster.sft import run_sft
    cfg = load_config(RunConfig, SMOKE, [f"cluster.storage={storage}", "name=warmup", "sft.epochs=12",
                                         "sft.eval_every_epochs=12", *DATA])
    return str(run_sft(cfg).checkpoints[-1])


def rl_run(storage: Path, warmup: str, name: str) -> list[str]:
    return [f"cluster.storage={storage}", f"name={name}", f"rl.warmup_checkpoint={warmup}", *DATA, *LAYOUT]


@pytest.fixture(scope="module")
def driver_killed(ray_multinode, storage, warmup, tmp_path_factory) -> dict:
    """The stop/resume run's first driver, a subprocess, SIGKILLed (with its process group) as soon as
    the checkpoint of step 4 is being written under its temporary name."""
    run_dir = storage / "chain"
    log = tmp_path_factory.mktemp("drivers") / "first-driver.log"
    command = [sys.executable, "-m", "experiments.cli", "train", "--config", SMOKE,
               *rl_run(storage, warmup, "chain"), f"cluster.address={ray_multinode.address}"]
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    try:
        deadline = time.monotonic() + 900
        while not list((run_dir / "checkpoints").glob(f"step-{STEPS:06d}.tmp-*")):
            assert driver.poll() is None, f"the driver ended (rc {driver.returncode}) before its last checkpoint:\n" \
                                          + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of the last step in 900 s"
            time.sleep(0.01)
        os.killpg(driver.pid, signal.SIGKILL)
        killed_at = time.time()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    checkpoints = run_dir / "checkpoints"
    return {"run_dir": run_dir, "killed_at": killed_at, "steps": rl_steps(run_dir),
            "after_kill": sorted(p.name for p in checkpoints.iterdir()), "latest": (checkpoints / "latest").read_text()}


@pytest.fixture(scope="module")
def learner_killed(ray_multinode, driver_killed) -> dict:
    """Resumed after the driver's death; learner rank 1's process SIGKILLed after step 3."""
    run_dir = driver_killed["run_dir"]

    since = time.time()

    def kill_rank_1():
        rank_1 = alive("learner-1")
        wait_for_step(run_dir, 3, since)
        os.kill(rank_1["pid"], signal.SIGKILL)
        return {"killed_at": time.time(), **rank_1}
    killer, seen = in_background(kill_rank_1)
    with pytest.raises(RuntimeError) as stopped:
        resume(run_dir)
    seen["stopped_at"] = time.time()
    killer.join(timeout=5)
    assert "error" not in seen, seen
    return {**seen, "run_dir": run_dir, "error": str(stopped.value), "steps": rl_steps(run_dir)}


@pytest.fixture(scope="module")
def node_removed(ray_multinode, learner_killed, tmp_path_factory) -> dict:
    """Resumed after the rank's death; the rollout engine's node removed after step 3 (no other node
    can hold the engine's 1.5 CPUs, so the run must stop); then a new worker node joins."""
    cluster, run_dir = ray_multinode, learner_killed["run_dir"]

    since = time.time()

    def remove_engines_node():
        engine, learner = alive("rollout-0"), alive("learner-0")
        name, node = node_of(cluster, engine["node_id"])
        wait_for_step(run_dir, 3, since)
        cluster.remove_node(node)
        return {"removed_at": time.time(), "node": name, "node_id": engine["node_id"], "ip": engine["ip"],
                "learner_node_id": learner["node_id"]}
    remover, seen = in_background(remove_engines_node)
    with pytest.raises(RuntimeError) as stopped:
        resume(run_dir)
    seen["stopped_at"] = time.time()
    remover.join(timeout=30)
    assert "error" not in seen, seen
    del cluster.workers[seen["node"]]
    scratch = tmp_path_factory.mktemp("node-c")
    cluster.workers["c"] = cluster.add_node(num_cpus=2, resources={"node_c": 1}, env_vars={"TMPDIR": str(scratch)})
    cluster.wait_for_nodes()
    return {**seen, "run_dir": run_dir, "error": str(stopped.value), "steps": rl_steps(run_dir)}


@pytest.fixture(scope="module")
def finished(node_removed) -> dict:
    """Resumed once more, on the new node, to the end."""
    run_dir = node_removed["run_dir"]
    started = time.time()
    resume(run_dir)
    return {"run_dir": run_dir, "seconds": time.time() - started, "steps": rl_steps(run_dir)}


@pytest.fixture(scope="module")
def survivable(ray_multinode, storage, warmup) -> dict:
    """rollout-0 frozen and killed right after step 1 (so in step 2, with the step's requests on
    it), the reward actor likewise right after step 3; the run goes on."""
    from cluster.train import run_train
    run_dir, since = storage / "survivable", time.time()

    def faults():
        engine, learner, reward = alive("rollout-0"), alive("learner-0"), alive("reward-0")
        wait_for_step(run_dir, 1, since)
        engine_killed_at = freeze_then_kill(engine["pid"])
        wait_for_step(run_dir, 3, since)
        reward_killed_at = freeze_then_kill(reward["pid"])
        return {"engine": engine, "learner_node_id": learner["node_id"], "engine_killed_at": engine_killed_at,
                "reward": reward, "reward_killed_at": reward_killed_at}
    killer, seen = in_background(faults)
    run_train(load_config(RunConfig, SMOKE, rl_run(storage, warmup, "survivable")))
    killer.join(timeout=5)
    assert "error" not in seen and "reward_killed_at" in seen, seen
    return {**seen, "run_dir": run_dir, "steps": rl_steps(run_dir)}


# ---------------------------------------------------------------------------------------- faults

@pytest.mark.slow
def test_a_rollout_actor_killed_mid_step_on_another_node_is_replaced_and_resynced(survivable, driver_killed):
    run_dir, steps = survivable["run_dir"], survivable["steps"]
    # The killed engine ran on another node than the learners (and the driver, on the head).
    assert survivable["engine"]["node_id"] != survivable["learner_node_id"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # Killed in step 2 with the step's requests on it: all re-issued, each answered once (the
    # driver checks every step's samples for repeats), by the replacement, on the current weights.
    assert [r["rollout/actor_restarts"] for r in steps] == [0, 1, 1, 1]
    assert steps[1]["rollout/reissued_requests"] >= 1
    assert all(r["rl/samples"] == 32 and r["rl/staleness"] == 0 for r in steps)
    assert max(r["rl/sampler_logprob_gap"] for r in steps[1:]) < 1e-3   # its weights are the learner's
    ((lost_at, lost),) = log_lines(run_dir, r"rollout-0 \(incarnation 0, node (\w+) .*\) is lost: (.*); re-issuing (\d+)")
    ((_, back),) = log_lines(run_dir, r"rollout-0 recovered: incarnation 1 on node (\w+) .* serves weights version (\d+), "
                                      r"([\d.]+) s after the loss")
    assert survivable["engine"]["node_id"].startswith(lost.group(1)) and back.group(2) == "1"
    print(f"\nrollout actor: detected {lost_at - survivable['engine_killed_at']:.1f} s after the kill "
          f"({lost.group(2)}), serving the current weights again {back.group(3)} s later; "
          f"{lost.group(3)} requests re-issued")
    # Nothing lost or counted twice: the same samples, scores and updates as the undisturbed run.
    assert_same_steps(steps, driver_killed["steps"], also=FAULT_COUNTERS)


@pytest.mark.slow
def test_the_reward_actor_killed_mid_step_is_restarted_and_the_step_scored_once(survivable, driver_killed):
    run_dir, steps = survivable["run_dir"], survivable["steps"]
    # Killed in step 4 with every chunk of the step's scoring queued on it: each sent again once.
    assert [r["reward/lost_calls"] for r in steps][:3] == [0, 0, 0] and steps[3]["reward/lost_calls"] >= 1
    assert steps[3]["reward/rescored_samples"] == 32 and steps[3]["rl/samples"] == 32
    assert_same_steps(steps, driver_killed["steps"], also=FAULT_COUNTERS)   # every score as the undisturbed run's
    lost = log_lines(run_dir, r"the reward actor was lost while scoring (\d+) samples")
    back = log_lines(run_dir, r"the reward actor is back on node (\w+) .*: re-scored (\d+) samples ([\d.]+) s after")
    assert sum(int(m.group(1)) for _, m in lost) == sum(int(m.group(2)) for _, m in back) == 32
    print(f"\nreward actor: detected {lost[0][0] - survivable['reward_killed_at']:.1f} s after the kill, the step's "
          f"samples re-scored by its restart {max(float(m.group(3)) for _, m in back):.1f} s after the loss")
    # Training went on: the last step's record and the run's results are there.
    assert (run_dir / "results.json").is_file()


@pytest.mark.slow
def test_a_driver_killed_inside_a_checkpoint_leaves_the_last_good_one_and_resume_uses_it(driver_killed, learner_killed):
    after = driver_killed["after_kill"]
    # Killed while the step-4 checkpoint was being written: only its temporary directory exists, and
    # the marker still names step 2, complete.
    assert driver_killed["latest"] == "step-000002" and f"step-{STEPS:06d}" not in after
    assert any(name.startswith(f"step-{STEPS:06d}.tmp-") for name in after), after
    assert (driver_killed["run_dir"] / "checkpoints" / "step-000002" / "policy" / "model.safetensors").is_file()
    assert [r["step"] for r in driver_killed["steps"]] == list(range(1, STEPS + 1))
    # The resume started from step 2: steps 1-2 kept once, step 3 recomputed as the first driver had it.
    resumed = learner_killed["steps"]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert_same_steps(resumed, driver_killed["steps"][:3])
    assert not list((driver_killed["run_dir"] / "checkpoints").glob("*.tmp-*"))   # the leftover is gone
    (_, first), (_, again) = log_lines(driver_killed["run_dir"], r"rl start-up .* total ([\d.]+) s")[:2]
    print(f"\ndriver killed: the resumed run was up in {again.group(1)} s (the first: {first.group(1)} s) and "
          "continued from step 2")


@pytest.mark.slow
def test_a_killed_learner_rank_stops_the_run_naming_it_and_resume_reproduces_the_metrics(
        learner_killed, node_removed, finished, driver_killed):
    error = learner_killed["error"]
    # Stopped at once (every learner call waits cluster.call_timeout_s at most, every collective
    # learner.collective_timeout_s), naming the rank, its node and IP.
    stopped_s = learner_killed["stopped_at"] - learner_killed["killed_at"]
    assert stopped_s < 2 * TIMEOUT_S, stopped_s
    named = f"learner-1 (rank 1 of 2, node {learner_killed['node_id'][:12]} ({learner_killed['ip']}), " \
            f"pid {learner_killed['pid']})"
    assert named in error, error
    assert " died in " in error, error   # in the first learner call after the kill (score, in step 4)
    assert_resume_said(learner_killed["run_dir"], "RankFailure: reft/learner-1 (rank 1 of 2")
    print(f"\nlearner rank 1 killed: the run stopped {stopped_s:.1f} s later (actors stopped, error raised):\n{error}")
    # Resumed from step 2, every step as the uninterrupted first driver's, each once (the next
    # resume's steps before its node was removed, and the last one's, to the end).
    again = node_removed["steps"]
    assert [r["step"] for r in again][:3] == [1, 2, 3] and len(again) <= STEPS
    assert_same_steps(again, driver_killed["steps"][:len(again)])
    assert_same_steps(finished["steps"], driver_killed["steps"])


@pytest.mark.slow
def test_a_removed_node_stops_the_run_naming_it_and_resume_succeeds_on_a_new_node(node_removed, finished):
    error = node_removed["error"]
    assert node_removed["node_id"] != node_removed["learner_node_id"]   # the engine's node, not the learners'
    # The engine could not be placed again (no node has 1.5 CPUs free): stopped after
    # cluster.placement_timeout_s, naming the lost node and what to do.
    stopped_s = node_removed["stopped_at"] - node_removed["removed_at"]
    assert stopped_s < PLACEMENT_S + TIMEOUT_S, stopped_s
    assert f"was lost on node {node_removed['node_id'][:12]} ({node_removed['ip']}), which has left the cluster" \
        in error, error
    assert "Add a node" in error, error
    assert_resume_said(node_removed["run_dir"], "RuntimeError: rollout-0 (incarnation 1) was not placed")
    print(f"\nnode removed: the run stopped {stopped_s:.1f} s later; resumed on a new node in "
          f"{finished['seconds']:.0f} s (start-up and 2 steps):\n{error}")
    # The resume ran to the end on the new node: every step once, the results written.
    run_dir = finished["run_dir"]
    assert [r["step"] for r in finished["steps"]] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{STEPS:06d}"
    evals = [r["step"] for r in read_metrics(run_dir / "rl" / "metrics.jsonl") if "eval/test_accuracy" in r]
    assert evals == [0, STEPS]
    assert json.loads((run_dir / "results.json").read_text())["reft_acc"] is not None
