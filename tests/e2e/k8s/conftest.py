"""Fixtures of the Kubernetes e2e tests: a real cluster built from upstream parts (csi/lab/k8s.py).

k8s_bin      scripts/build-k8s cluster (Kubernetes, etcd) once per session (idempotent: seconds when the cache
             is warm; scripts/test starts the whole build in the background), -> <cache>/bin
k8s_sidecars scripts/build-k8s, the rest (the sidecars, the snapshot controller and CRDs): waited for only by
             what installs the driver, so the cluster boots while they build
k8s_images   the OCI archives of tests/e2e/k8s/images.py that the cluster needs (pause, busybox), cached;
             driver_images: the driver's and the sidecars' (imported by the scenario, which installs them);
             release_images: the last tagged release's driver image (release.py), which `installed` starts from.
             scripts/test builds them all in the background after build-k8s: these find their stamps fresh, or
             wait on the archive's lock while the background builds it
k8s          a lab of two UML nodes (storage-1: VG csi-vg, runs the agent and the controller; worker-1) with
             the control plane on the host in the lab's namespace, pause and busybox imported on every node,
             both nodes Ready. One per session (test_cluster.py, then test_release_upgrade.py, whose
             `installed` installs the last release and upgrades it to the working tree); logs stay in the
             pytest tmp dir (k8s*/k8s/*.log, k8s*/<node>/*.log).
CSI_K8S_BUILD=0 skips scripts/build-k8s (iterating on the tests); CSI_K8S_NODE_MEM sets the nodes' memory.
             With CSI_E2E_CLUSTER=kind, a kind cluster instead (tests/e2e/k8s/kind.py; untested here).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from csi.lab import VG_NAME, Lab, preflight
from tests.e2e.k8s import images as e2e_images
from tests.e2e.k8s import driver as drv
from tests.e2e.k8s import release, upgrade
from tests.e2e.k8s.driver import CACHE, PROJECT, STORAGE_LABEL, ZONE, ZONE_LABEL

NODE_MEM = os.environ.get("CSI_K8S_NODE_MEM", "2560M")


def _build(part: str) -> Path:
    if os.environ.get("CSI_K8S_BUILD") == "0":   # iterating on the tests: use what the cache has
        return CACHE / "bin"
    t0 = time.monotonic()
    done = subprocess.run([str(PROJECT / "scripts/build-k8s"), str(CACHE), part], capture_output=True, text=True,
                          timeout=3 * 3600)
    if done.returncode != 0:
        pytest.fail(f"scripts/build-k8s {part} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-5000:]}", pytrace=False)
    print(f"\nscripts/build-k8s {part}: {time.monotonic() - t0:.0f} s")
    return CACHE / "bin"


@pytest.fixture(scope="session")
def k8s_bin() -> Path:
    return _build("cluster")


@pytest.fixture(scope="session")
def k8s_sidecars(k8s_bin) -> Path:
    return _build("all")


@pytest.fixture(scope="session")
def k8s_images(k8s_bin) -> dict[str, e2e_images.Image]:
    """pause and busybox: what the cluster itself needs. The scenario adds the driver's (driver_images)."""
    return {"pause": e2e_images.pause_image(), "busybox": e2e_images.busybox_image()}


@pytest.fixture(scope="session")
def driver_images(k8s_sidecars) -> dict[str, e2e_images.Image]:
    return {**e2e_images.sidecar_images(), "driver": e2e_images.driver_image()}


@pytest.fixture(scope="session")
def k8s(k8s_bin, k8s_images, tmp_path_factory):
    if os.environ.get("CSI_E2E_CLUSTER", "uml") == "kind":
        yield from _kind(k8s_images, tmp_path_factory)
        return
    from csi.lab.k8s import Cluster
    from tests.e2e.conftest import close_shared_cluster
    close_shared_cluster()
    problem = preflight()
    if problem:
        pytest.fail(f"e2e tests need User-Mode Linux: {problem}", pytrace=False)
    workdir = tmp_path_factory.mktemp("k8s")
    with Lab(workdir, name=f"k8s{os.getpid()}", subnet="10.214.0", mem=NODE_MEM) as lab:
        storage = lab.add_node("storage-1", role="storage", disk_bytes=8 << 30)
        worker = lab.add_node("worker-1", role="worker")
        t0 = time.monotonic()
        lab.boot_all(timeout=180)
        cluster = Cluster(lab, bin_dir=k8s_bin, sandbox_image=k8s_images["pause"].ref)
        cluster.timings["nodes booted"] = round(time.monotonic() - t0, 1)
        try:
            cluster.start_control_plane()
            # The lab's boot activated the thin pool with the node's own LVM and udev; on a storage node of
            # a cluster, activation is the agent's job (in its container, with its own lvm.conf and no udev).
            storage.run(["vgchange", "--activate", "n", VG_NAME], timeout=60, check=True)
            cluster.join(storage, labels={ZONE_LABEL: ZONE})
            cluster.join(worker, labels={ZONE_LABEL: ZONE})
            t1 = time.monotonic()
            per_node = cluster.import_images([i.archive for i in k8s_images.values()])
            cluster.timings["images imported"] = round(time.monotonic() - t1, 1)
            cluster.timings.update({f"import on {n}": s for n, s in per_node.items()})
            cluster.wait_nodes_ready()
            # An administrator's label, once the Node exists: kubelets may not set node-restriction.kubernetes.io/
            # labels, not even with --node-labels.
            cluster.kubectl(["label", "node", storage.name, f"{STORAGE_LABEL}=true"])
            print("\ncluster bring-up (s): " + ", ".join(f"{k} {v}" for k, v in cluster.timings.items()))
            yield cluster
        finally:
            cluster.stop()


def _kind(k8s_images, tmp_path_factory):
    """CSI_E2E_CLUSTER=kind: the same tests on a kind cluster (deploy/kind/cluster.yaml). Untested here."""
    from tests.e2e.k8s.kind import KindCluster
    cluster = KindCluster(tmp_path_factory.mktemp("kind"))
    try:
        cluster.create()
        cluster.timings.update(cluster.import_images([i.archive for i in k8s_images.values()]))
        yield cluster
    finally:
        if os.environ.get("CSI_E2E_KEEP_KIND") != "1":
            cluster.delete()


@pytest.fixture(scope="session")
def release_images(driver_images) -> dict[str, e2e_images.Image]:
    """The last tagged release's driver image (deploy/releases.txt), built like the working tree's from that
    release's code and lock (images.py)."""
    return {"driver-release": release.release_image()}


@pytest.fixture(scope="session")
def installed(k8s, k8s_bin, k8s_images, driver_images, release_images):
    """The working tree's chart installed the way a cluster gets it: the last release installed (helm install of
    its own chart and image), then `helm upgrade` to the working tree with a volume attached (upgrade.py; the
    facts go to STATE["upgrade"] for test_release_upgrade.py); every pod ready. The snapshot CRDs and controller
    first. Shared by the scenario modules, which run in file order."""
    drv.STATE["busybox"] = k8s_images["busybox"].ref
    drv.STATE["driver_image"] = driver_images["driver"].ref
    t0 = time.monotonic()
    k8s.import_images([i.archive for i in {**driver_images, **release_images}.values()])
    drv.TIMINGS["driver + sidecar images imported (all nodes)"] = time.monotonic() - t0
    images = {**k8s_images, **driver_images}
    drv.STATE["storage"] = next(n.name for n in k8s.nodes.values() if n.role == "storage")
    drv.STATE["worker"] = next(n.name for n in k8s.nodes.values() if n.role == "worker")
    drv.install_snapshot_support(k8s, CACHE, images["snapshot-controller"])
    # The controller replicas on different nodes (the chart's preferred anti-affinity), as HA wants them:
    # both on storage-1, a one-CPU UML node that also runs the agent and a node plugin, start so slowly that
    # their sidecars give up on the CSI socket and restart.
    values = drv.e2e_values(images, controller_selector={})
    t1 = time.monotonic()
    drv.STATE["upgrade"] = upgrade.install_release_then_upgrade(
        k8s, k8s_bin / "helm", values, release_images["driver-release"], release.release_chart(),
        release.last_release().tag)
    drv.TIMINGS["install of the last release + upgrade -> driver pods ready"] = time.monotonic() - t1
    yield k8s
    rows = [("step", "seconds")] + [(k, f"{v:.1f}") for k, v in drv.TIMINGS.items()]
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b:>8}" for a, b in rows))
