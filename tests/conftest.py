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
    ray.init(num_cpus=2, include_dashboard=False, namespace="reft")
    yield
    ray.shutdown()
