"""One Ray instance per test session: a simulated 3-node cluster, two nodes with a logical GPU each."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "jobs" / "demo_data"


def pytest_configure(config):
    # Set before Ray starts, so every Ray worker process inherits them.
    cache = Path(os.environ.get("ANIMA_TEST_CACHE", "/tmp/anima-test-cache"))
    os.environ["ANIMA_CACHE"] = str(cache)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # No test reads Ray's metrics; collecting them took about a quarter of the idle cluster's CPU.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Train's controller polls its workers every 2 s by default: the tests' short runs end sooner.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The local S3 endpoint tests/test_object_store.py starts (moto), reached by every Ray process.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )


def pytest_collection_modifyitems(items):
    # Modules with no test on the session's Ray cluster run first: once up, its idle raylets, agents and
    # worker pool take a share of this machine's two cores from every later test. Whole modules move, so
    # no module-scoped fixture is built twice.
    on_ray = {i.module for i in items if "ray_cluster" in i.fixturenames}
    items.sort(key=lambda item: item.module in on_ray)


@pytest.fixture
def stalling_server():
    """A loopback address (`http://127.0.0.1:PORT`) whose server accepts connections and never answers:
    a stalled read, which only a time limit ends."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture(autouse=True)
def seeded():
    """Every test's random inputs are the same on every run, so a failure reproduces."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real example inputs: ../shared/data when present, else the copies the demo ships."""
    return SHARED_DATA if SHARED_DATA.exists() else DEMO_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    # A test before this one that started Ray of its own would have started a whole local instance.
    assert not ray.is_initialized(), "a test without the ray_cluster fixture started Ray"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "object_store_memory": 150 * 2**20, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def demo_output(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """`anima demo`, run once for the tests that check it and its reports: its folder and its stdout."""
    from jobs.cli import main

    folder = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--output", str(folder)]) == 0
    return folder, printed.getvalue()
