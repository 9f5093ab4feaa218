"""Fixtures of the e2e tests: a lab of User-Mode Linux nodes (csi/lab).

The test process stays in the host's network namespace: a LabNode's run/spawn/signal reach the node by
themselves (csi.lab creates its sockets inside the lab namespace). A host program that must reach the
nodes' addresses runs with lab.popen_in_netns(...), or talks through lab.expose(ip, port).
"""

import os
import shutil
import tempfile

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
_running = []  # the shared cluster itself, for the first failure's diagnosis
_first_failure: list[str] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, request):
    """storage-1 (zone-a), storage-2 (zone-b), worker-1 and worker-2 (zone-a) with the driver deployed: agents on
    the storage nodes, a node plugin on each worker, the controller on the host. Shared by the test modules;
    every test leaves the storage nodes as it found them."""
    from tests.e2e.cluster import make_cluster
    if any(item.nodeid.startswith(SANITY_TESTS) for item in request.session.items):
        request.getfixturevalue("sanity_run")   # csi-sanity's lab boots and runs beside this cluster's tests
    running = make_cluster(tmp_path_factory)
    _shared.append(running)
    _running.append(next(running))
    yield _running[-1]
    close_shared_cluster()


SANITY_TESTS = "tests/e2e/test_sanity.py"


@pytest.fixture(scope="session")
def sanity_run(tmp_path_factory):
    """csi-sanity on a lab of its own, started in the background (tests/e2e/test_sanity.py)."""
    from tests.e2e.test_sanity import SanityRun
    run = SanityRun(tmp_path_factory.mktemp("sanity"))
    yield run
    run.thread.join(1800)


def close_shared_cluster() -> None:
    """Stops the shared cluster now, not at the session's end: the Kubernetes tier (last) calls it first, so
    that five idle UML nodes and a controller do not share the host's two CPUs with its cluster."""
    _running.clear()
    while _shared:
        _shared.pop().close()   # make_cluster's own teardown (its finally and with blocks) runs here


def pytest_collection_modifyitems(items):
    """The Kubernetes tier last: scripts/test builds its parts in the background meanwhile (a cold cache needs
    about 30 minutes of both CPUs), and the UML tiers leave CPU idle while they wait on their nodes."""
    items.sort(key=lambda item: "tests/e2e/k8s/" in item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """At the first failing e2e test, what the host and the shared cluster's storage nodes looked like: CI shows
    only the end of the output, and a storage node that stopped answering says why only there and then."""
    report = (yield).get_result()
    if report.failed and not _first_failure and item.get_closest_marker("e2e"):
        _first_failure.append(f"{item.nodeid} ({report.when})")
        _first_failure.extend(_diagnosis())


def pytest_terminal_summary(terminalreporter):
    if _first_failure:
        terminalreporter.write_sep("-", "host and shared cluster at the first e2e failure")
        for line in _first_failure:
            terminalreporter.write_line(line[:200])


def _diagnosis() -> list[str]:
    lines = []
    for where in sorted({tempfile.gettempdir(), os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi")}):
        if os.path.isdir(where):
            free = shutil.disk_usage(where).free
            lines.append(f"host: {free / 2**30:.1f} GiB free on {where}")
    lines.append(f"host: load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for cluster in _running:
        for node in (cluster.s1, cluster.s2, cluster.s3):
            if not node.running:
                lines.append(f"{node.name}: not running")
                continue
            for what, argv, keep in (("dm", ["dmsetup", "info", "-c", "--noheadings", "-o", "name,attr,open"], 6),
                                     ("pool", ["dmsetup", "status", "csi--vg-thinpool-tpool"], 1),
                                     ("dmesg", ["dmesg"], 4),
                                     ("memory", ["grep", "-E", "^(MemAvailable|Dirty):", "/proc/meminfo"], 2)):
                try:
                    r = node.run(argv, timeout=10)
                    out = [x for x in (r.stdout + r.stderr).strip().splitlines() if not x.startswith(" ")]
                except Exception as exc:  # noqa: BLE001 - a diagnosis never fails the run
                    out = [f"{type(exc).__name__}: {exc}"]
                lines.extend(f"{node.name} {what}: {x}" for x in out[-keep:])
            log = node.log_path("agent")
            if log.exists():
                told = [x for x in log.read_text(errors="replace").splitlines() if " DEBUG " not in x]
                lines.extend(f"{node.name} agent.log: {x}" for x in told[-3:])
    return lines
