"""Fixtures of the e2e tests: a lab of User-Mode Linux nodes (csi/lab).

The test process stays in the host's network namespace: a LabNode's run/spawn/signal reach the node by
themselves (csi.lab creates its sockets inside the lab namespace). A host program that must reach the
nodes' addresses runs with lab.popen_in_netns(...), or talks through lab.expose(ip, port).
"""

import os

import pytest

from csi.lab import Lab, preflight


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A booted lab: storage-1 (<subnet>.11, VG csi-vg with csi-vg/thinpool) and worker-1 (<subnet>.21).
    One per test module; logs stay in the pytest tmp dir (lab*/<node>/console.log)."""
    problem = preflight()
    if problem:
        pytest.fail(f"e2e tests need User-Mode Linux: {problem}", pytrace=False)
    workdir = tmp_path_factory.mktemp("lab")
    with Lab(workdir, name=f"e2e{os.getpid()}") as the_lab:
        the_lab.add_node("storage-1", role="storage", disk_bytes=4 << 30)
        the_lab.add_node("worker-1", role="worker")
        the_lab.boot_all(timeout=120)
        yield the_lab


_shared = []   # the shared cluster's generator while it runs (close_shared_cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """storage-1 (zone-a), storage-2 (zone-b), worker-1 and worker-2 (zone-a) with the driver deployed: agents on
    the storage nodes, a node plugin on each worker, the controller on the host. Shared by the test modules;
    every test leaves the storage nodes as it found them."""
    from tests.e2e.cluster import make_cluster
    running = make_cluster(tmp_path_factory)
    _shared.append(running)
    yield next(running)
    close_shared_cluster()


def close_shared_cluster() -> None:
    """Stops the shared cluster now, not at the session's end: the Kubernetes tier (last) calls it first, so
    that five idle UML nodes and a controller do not share the host's two CPUs with its cluster."""
    while _shared:
        _shared.pop().close()   # make_cluster's own teardown (its finally and with blocks) runs here


def pytest_collection_modifyitems(items):
    """The Kubernetes tier last: scripts/test builds its parts in the background meanwhile (a cold cache needs
    about 30 minutes of both CPUs), and the UML tiers leave CPU idle while they wait on their nodes."""
    items.sort(key=lambda item: "tests/e2e/k8s/" in item.nodeid)
