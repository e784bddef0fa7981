"""Shared fixtures. Tests that need the real datasets skip, saying why, when ../shared/data is absent."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("REFT_DATA_DIR", REPO.parent / "shared" / "data"))

# Every Ray client and head in the test session uses the same auth mode (docs/measurements.md §2).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "reft" / "data").is_dir():
        pytest.skip(f"real datasets not found at {DATA_DIR} (set REFT_DATA_DIR to the shared/data folder)")
    return DATA_DIR


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs, no dashboard) for one test module; tests that need one ask for it."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="reft")   # never a cluster found running here
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_multinode(tmp_path_factory):
    """A Ray cluster of three real nodes on this machine (``ray.cluster_utils.Cluster``: each a
    raylet with its own node id, object store and workers): a head ("head", 1 CPU, the driver's)
    and two workers ("a", "b", 2 CPUs each). Each node's processes get their own TMPDIR, so that a
    file one node writes to its scratch space is not there for another; only the test's run
    directory is shared, as a cluster's storage is. Yields the Cluster (``.address``; nodes can be
    removed with ``remove_node``); ``scratch[name]`` is each node's TMPDIR."""
    import ray
    from ray.cluster_utils import Cluster

    scratch = {}

    def node(name: str, cpus: int) -> dict:
        scratch[name] = tmp_path_factory.mktemp(f"node-{name}")
        return {"num_cpus": cpus, "resources": {f"node_{name}": 1}, "env_vars": {"TMPDIR": str(scratch[name])}}

    cluster = Cluster(initialize_head=True, head_node_args=node("head", 1))
    cluster.workers = {name: cluster.add_node(**node(name, 2)) for name in ("a", "b")}
    cluster.scratch = scratch
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="reft")
    yield cluster
    ray.shutdown()
    cluster.shutdown()
