"""`ray job submit` against a real `ray start --head` (loopback only), then the job and the named
actors found through the dashboard's HTTP API, as a user watching the Ray dashboard would.

Note: the test ends with `ray stop --force`, which stops every Ray started on this machine; CI runs
tests one after another, so nothing else is running then.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
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


def _names(tree) -> set:
    """Every "name" value anywhere in a JSON tree (the state API nests its results)."""
    if isinstance(tree, dict):
        found = {tree["name"]} if isinstance(tree.get("name"), str) else set()
        return found.union(*(_names(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_names(v) for v in tree)) if tree else set()
    return set()


@pytest.mark.slow
def test_ray_job_submit_runs_reft_and_the_dashboard_shows_it(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    subprocess.run([ray, "start", "--head", f"--port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats"], env=env, check=True, timeout=180, capture_output=True)
    base = f"http://127.0.0.1:{dashboard}"
    try:
        out = subprocess.run(
            [ray, "job", "submit", "--address", base, "--working-dir", str(REPO), "--no-wait", "--",
             "reft", "train", "--config", "experiments/configs/smoke.yaml", f"out_dir={tmp_path}", "name=job",
             "rl.epochs=1", "sft.epochs=4", "sft.eval_every_epochs=4"],
            env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        job_id = re.search(r"(raysubmit_\w+)", out.stdout + out.stderr).group(1)

        deadline, status = time.time() + 900, None
        while time.time() < deadline:
            status = _get(f"{base}/api/jobs/{job_id}")["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(5)
        logs = _get(f"{base}/api/jobs/{job_id}/logs").get("logs", "")
        assert status == "SUCCEEDED", logs[-3000:]
        assert "reft_acc" in logs                      # the job printed its results

        jobs = _get(f"{base}/api/jobs/")
        assert job_id in json.dumps(jobs)
        actors = _get(f"{base}/api/v0/actors?limit=1000&detail=true")
        assert {"learner-0", "rollout-0", "reward-0"} <= _names(actors)
        assert (tmp_path / "job" / "results.json").is_file()
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(tmp_path / "job" / "base_model", ignore_errors=True)
