"""Shared test setup: deterministic, single-threaded torch (2 shared CPU cores in CI), and one
local Ray cluster for the whole session (started by the first test that asks for `ray_cluster`)."""
import os
import pathlib
import time

import pytest
import torch

# ---- one local Ray cluster for the whole session (started by the first test that asks for it) ----
# Bound to 127.0.0.1, 4 logical CPUs (scheduling units: the trainer's pools mostly wait on each
# other), no dashboard, token auth left at Ray's default; `ray.shutdown()` stops only this cluster.
# The repo root is the working directory while it starts, so workers can import the packages.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: on Linux Ray would otherwise listen on the routable address
# even when given 127.0.0.1; Ray reads it when imported, so it is set before any test module loads.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start_local_cluster(ray):
    """ray.init, tried twice: on a CPU-starved machine the raylet can time out waiting for its agent
    ("The current node timed out during startup"), and a second start usually succeeds."""
    for attempt in (1, 2):
        try:
            return ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                            object_store_memory=100 * 2**20, log_to_driver=False)
        except Exception as e:
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"\n[ray] local cluster failed to start ({type(e).__name__}: {e}); trying once more")


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.fail("a Ray cluster is already connected in this process; these tests start their own")
    started = time.monotonic()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        context = _start_local_cluster(ray)
    finally:
        os.chdir(cwd)
    print(f"\n[ray] local cluster up in {time.monotonic() - started:.1f}s")
    node_ip = ray.nodes()[0]["NodeManagerAddress"]
    if node_ip != "127.0.0.1":
        ray.shutdown()
        pytest.fail(f"the test cluster listens on {node_ip}, not 127.0.0.1: Ray was imported before "
                    "tests/conftest.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    yield context
    ray.shutdown()



torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
