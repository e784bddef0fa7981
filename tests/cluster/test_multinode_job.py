"""`ray job submit` to a Ray cluster of three nodes started with the `ray` CLI as a user would (a
head and two workers on this machine, loopback only, each with its own scratch TMPDIR), then the
job, its run directory on the shared storage and the actors' nodes through the dashboard's HTTP
API, as a user watching the Ray dashboard would.

The test stops its own cluster only (the processes whose command line names its scratch
directories), not every Ray on the machine as `ray stop` would.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _actors(tree) -> list:
    """Every actor record (a dict with "name" and "node_id") anywhere in the state API's answer."""
    if isinstance(tree, dict):
        found = [tree] if isinstance(tree.get("name"), str) and "node_id" in tree else []
        return found + [a for v in tree.values() for a in _actors(v)]
    if isinstance(tree, list):
        return [a for v in tree for a in _actors(v)]
    return []


def _wait_for_job(base: str, job_id: str, timeout_s: float) -> tuple[str, str]:
    deadline, status = time.time() + timeout_s, None
    while time.time() < deadline:
        status = _get(f"{base}/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    return status, _get(f"{base}/api/jobs/{job_id}/logs").get("logs", "")


def _submit(ray: str, base: str, env: dict, *args: str) -> str:
    out = subprocess.run([ray, "job", "submit", "--address", base, "--working-dir", str(REPO), "--no-wait", "--",
                          "reft", "train", "--config", "experiments/configs/smoke.yaml", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"(raysubmit_\w+)", out.stdout + out.stderr).group(1)


@pytest.mark.slow
def test_ray_job_submit_to_three_nodes_keeps_its_results_and_the_dashboard_shows_the_layout(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    storage = tmp_path / "storage"
    storage.mkdir()

    # short scratch paths: Ray's unix sockets live under the session directory (107 bytes at most)
    nodes_root = Path(tempfile.mkdtemp(prefix="reft-mn-"))

    def start(name: str, *args: str) -> None:
        scratch = nodes_root / name
        scratch.mkdir()
        done = subprocess.run([ray, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                              env=dict(env, TMPDIR=str(scratch)), timeout=180, capture_output=True, text=True)
        assert done.returncode == 0, f"ray start ({name}): {done.stdout[-2000:]}{done.stderr[-2000:]}"

    start("head", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
    base = f"http://127.0.0.1:{dashboard}"
    try:
        for name in ("a", "b"):
            start(name, f"--address=127.0.0.1:{port}", "--num-cpus=2")
        # a relative out_dir under a job would land in Ray's temporary copy of the working directory
        refused, logs = _wait_for_job(base, _submit(ray, base, env, "name=relative"), 300)
        assert refused == "FAILED" and "out_dir = 'runs' is relative" in logs, logs[-2000:]

        job_id = _submit(ray, base, env, f"cluster.storage={storage}", "name=job", "cluster.mode=cluster",
                         "cluster.num_learners=2", "rollout.num_actors=2", "rl.max_steps=4", "rl.eval_every=4",
                         "rl.checkpoint_every=4", "sft.epochs=4", "sft.eval_every_epochs=4")
        status, logs = _wait_for_job(base, job_id, 1200)
        assert status == "SUCCEEDED", logs[-3000:]
        run_dir = storage / "job"
        assert f"run directory: {run_dir}" in logs                         # said at the start ...
        assert f"results in {run_dir}" in logs and "of it reft training (4 steps)" in logs   # ... and at the end,
        headline = json.loads((run_dir / "results.json").read_text())       # after the results table
        acc = re.escape(f"{headline['reft_acc']:.1f}")
        assert re.search(rf"\|\s*reft\s*\|\s*{acc}\s*\|", logs), logs[-3000:]
        assert (run_dir / "checkpoints" / "latest").is_file()
        assert job_id in json.dumps(_get(f"{base}/api/jobs/"))

        # the dashboard's state API: the RL stage's learner ranks on one node, its engines on another
        actors = _actors(_get(f"{base}/api/v0/actors?limit=1000&detail=true"))
        groups: dict = {}
        for a in actors:
            role = a["name"].split("-")[0]
            if role in ("learner", "rollout") and a.get("placement_group_id"):
                groups.setdefault(a["placement_group_id"], {"learner": set(), "rollout": set()})[role].add(a["node_id"])
        (rl,) = [g for g in groups.values() if g["rollout"]]
        assert len(rl["learner"]) == 1 and len(rl["rollout"]) == 1 and rl["learner"].isdisjoint(rl["rollout"]), rl
        assert {"learner-0", "learner-1", "rollout-0", "rollout-1", "reward-0"} <= {a["name"] for a in actors}
    finally:
        _stop_processes_naming(nodes_root)
        shutil.rmtree(nodes_root, ignore_errors=True)
        shutil.rmtree(storage / "job" / "base_model", ignore_errors=True)


def _stop_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line mentions ``path`` (this test's Ray nodes: their
    session and log directories are under the nodes' scratch TMPDIRs)."""
    import psutil
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(str(path) in arg for arg in proc.info["cmdline"] or ()):
            mine.append(proc)
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)
